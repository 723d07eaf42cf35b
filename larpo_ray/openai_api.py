"""The OpenAI API as this server speaks it: request validation, error and response shapes.

Pure Python (no Ray, torch, vLLM or FastAPI): `larpo_ray.serve` validates every request body
here before it reaches an engine, and answers in the shapes built here. Errors are `RequestError`,
an HTTP status plus OpenAI's error object {"error": {"message", "type", "param", "code"}}.
"""

import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_SEED = 2**63 - 1
# OpenAI fields this server does not implement: a request setting one to anything but these
# values gets a 400 rather than a silently different answer.
UNSUPPORTED = {
    "stream": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
}


# --------------------------------------------------------------------------------------------
# Requests: limits, errors and validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (flags --max-tokens, --max-prompt-tokens, --max-choices)."""

    max_tokens: int = 256
    max_prompt_tokens: int = 768
    max_choices: int = 8

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_prompt_tokens", "max_choices"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")

    @property
    def max_model_len(self) -> int:
        return self.max_prompt_tokens + self.max_tokens


class RequestError(Exception):
    """A request the server refuses, as an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """Validated generation parameters of one request (each choice samples with these)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...]  # {"role", "content": str}
    sampling: Sampling


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[str, ...]
    sampling: Sampling


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, else a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, not {_kind(body)}", code="invalid_json")
    return body


def validate_chat(body: dict, model_name: str, limits: Limits) -> ChatRequest:
    """A /v1/chat/completions body -> ChatRequest, or a RequestError naming the bad field."""
    _check_common(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _missing_or_bad("messages", messages, "a non-empty list of {role, content} objects")
    checked = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return ChatRequest(checked, _sampling(body, limits, 1, max_tokens, limits.max_tokens, param))


def validate_completion(body: dict, model_name: str, limits: Limits) -> CompletionRequest:
    """A /v1/completions body -> CompletionRequest, or a RequestError naming the bad field."""
    _check_common(body, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    else:
        raise _missing_or_bad(
            "prompt", prompt, "a string or a non-empty list of strings (token-id prompts are not supported)"
        )
    sampling = _sampling(
        body, limits, len(prompts), body.get("max_tokens"), min(16, limits.max_tokens), "max_tokens"
    )  # 16: OpenAI's default
    return CompletionRequest(prompts, sampling)


def check_prompt_length(n_tokens: int, limits: Limits, param: str) -> None:
    """400 for an empty prompt or one longer than --max-prompt-tokens (both lengths named)."""
    if n_tokens == 0:
        raise RequestError(400, f"{param} is empty (0 tokens)", param, "empty_prompt")
    if n_tokens > limits.max_prompt_tokens:
        raise RequestError(
            400,
            f"{param} has {n_tokens} tokens, more than this server's limit of "
            f"{limits.max_prompt_tokens} prompt tokens (--max-prompt-tokens)",
            param,
            "prompt_too_long",
        )


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """401 unless `authorization` is "Bearer <api_key>" (no key configured: everyone passes)."""
    if api_key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest: the time taken does not reveal how much of a guessed key is right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        what = "wrong API key" if authorization else "missing API key"
        raise RequestError(
            401,
            f"{what}: send the header 'Authorization: Bearer <key>' with the key this server was started with",
            code="invalid_api_key",
        )


def _check_common(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _missing_or_bad("model", model, "a string")
    if model is not None and model != model_name:
        raise RequestError(
            404,
            f"model {model!r} does not exist; this server serves {model_name!r} (GET /v1/models)",
            "model",
            "model_not_found",
        )
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise RequestError(
                400,
                f"{name}={body[name]!r} is not supported by this server; leave it out",
                name,
                "unsupported_parameter",
            )


def _message(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise _missing_or_bad(where, m, "an object with role and content")
    role, content = m.get("role"), m.get("content")
    if role not in CHAT_ROLES:
        raise _missing_or_bad(f"{where}.role", role, f"one of {', '.join(CHAT_ROLES)}")
    if isinstance(content, list):  # OpenAI's content parts: only text parts, joined
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise _missing_or_bad(
                f"{where}.content", content, 'a string or a list of {"type": "text", "text": ...} parts'
            )
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _missing_or_bad(f"{where}.content", content, "a string")
    return {"role": role, "content": content}


def _sampling(
    body: dict, limits: Limits, n_prompts: int, max_tokens: Any, default_max: int, max_param: str
) -> Sampling:
    max_tokens = default_max if max_tokens is None else _int(max_tokens, max_param, 1)
    if max_tokens > limits.max_tokens:
        raise RequestError(
            400,
            f"{max_param}={max_tokens} is more than this server's limit of {limits.max_tokens} (--max-tokens)",
            max_param,
            "max_tokens_too_large",
        )
    n = 1 if body.get("n") is None else _int(body["n"], "n", 1)
    if n * n_prompts > limits.max_choices:
        raise RequestError(
            400,
            f"n={n} x {n_prompts} prompt(s) asks for {n * n_prompts} choices, "
            f"more than this server's limit of {limits.max_choices} per request "
            f"(--max-choices)",
            "n",
            "too_many_choices",
        )
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (
        isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop)
    ):
        raise _missing_or_bad("stop", stop, f"a non-empty string or a list of at most {MAX_STOP} of them")
    seed = body.get("seed")
    return Sampling(
        max_tokens=max_tokens,
        n=n,
        stop=tuple(stop or ()),
        temperature=_number(body.get("temperature"), "temperature", 1.0, 0.0, 2.0, low_open=False),
        top_p=_number(body.get("top_p"), "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=None if seed is None else _int(seed, "seed", 0, MAX_SEED),
    )


def _int(value: Any, param: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _missing_or_bad(param, value, f"an integer {bounds}")
    return value


def _number(value: Any, param: str, default: float, low: float, high: float, low_open: bool) -> float:
    if value is None:
        return default
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (low < value if low_open else low <= value)
        and value <= high
    )
    if not ok:
        raise _missing_or_bad(param, value, f"a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _missing_or_bad(param: str, value: Any, expected: str) -> RequestError:
    got = "missing" if value is None else f"got {_kind(value)} {json.dumps(value)[:80]}"
    return RequestError(400, f"{param} must be {expected} ({got})", param, "invalid_value")


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), "null")


# --------------------------------------------------------------------------------------------
# Responses: OpenAI's shapes for what the engine generated
# --------------------------------------------------------------------------------------------


class Output(NamedTuple):
    """One generated choice: what an engine returns and a response's choice is built from."""

    text: str  # without the stop string or EOS
    n_tokens: int  # generated tokens, EOS included
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def chat_response(model_name: str, outputs: list[Output], prompt_tokens: int) -> dict:
    """A chat.completion object: one assistant message per output, in order."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": o.text},
            "finish_reason": o.finish_reason,
            "logprobs": None,
        }
        for i, o in enumerate(outputs)
    ]
    return _response("chatcmpl", "chat.completion", model_name, choices, prompt_tokens, outputs)


def completion_response(model_name: str, outputs: list[Output], prompt_tokens: int) -> dict:
    """A text_completion object: one choice per output, in order."""
    choices = [
        {"index": i, "text": o.text, "finish_reason": o.finish_reason, "logprobs": None} for i, o in enumerate(outputs)
    ]
    return _response("cmpl", "text_completion", model_name, choices, prompt_tokens, outputs)


def models_response(model_name: str, created: int, max_model_len: int) -> dict:
    """The /v1/models list: the one model this server serves."""
    return {
        "object": "list",
        "data": [
            {
                "id": model_name,
                "object": "model",
                "created": created,
                "owned_by": "larpo-ray",
                "max_model_len": max_model_len,
            }
        ],
    }


def _response(
    prefix: str, kind: str, model_name: str, choices: list[dict], prompt_tokens: int, outputs: list[Output]
) -> dict:
    completion_tokens = sum(o.n_tokens for o in outputs)
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
