"""Tests for actors/listwise.py, the listwise LLM judge: the answer parser, the sliding window with an
in-process fake judge, the scorer against a deterministic stdlib judge server on 127.0.0.1 (OpenAI
chat-completions shape), the RewardActor's accounting of a list that fails, and (slow) the project's
own `python -m larpo_ray.serve` on the tiny model, whose replies are not rankings."""

import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import builders
import pytest

from actors.listwise import (
    ListwiseJudgeScorer,
    UnparseableRanking,
    judge_messages,
    parse_ranking,
    scores_from_order,
    sliding_rank,
    window_schedule,
)
from actors.reward import RewardActor
from larpo_ray.config import RewardConfig
from larpo_ray.types import Prompt, ScorerError

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV, KEY = "LARPO_TEST_JUDGE_KEY", "sk-judge-5e1f0c9d"


def calls_expected(n: int, window: int, step: int) -> int:
    """The module docstring's request count for one pass over n unique responses."""
    return 1 if n <= window else 1 + math.ceil((n - window) / step)


# ---- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, m, order",
    [
        ("[2] > [1] > [3]", 3, [1, 0, 2]),
        ("Ranking: [3] > [1] > [2]. Hope this helps!", 3, [2, 0, 1]),
        ("[ 2 ]>[1]>[3]", 3, [1, 0, 2]),
        ("[2] > [2] > [1] > [3]", 3, [1, 0, 2]),  # a repeat: the first one counts
        ("[4] > [2] > [9] > [1]", 4, [3, 1, 0, 2]),  # [9] dropped, the missing [3] appended
        ("[2] > [4]", 4, [1, 3, 0, 2]),  # half given: completed in shown order
        ("[2]", 2, [1, 0]),
        ("2 > 1 > 3", 3, [1, 0, 2]),  # bare numbers, when that is all the answer is
        ("2, 3, 1.", 3, [1, 2, 0]),
        ("3 1 2", 3, [2, 0, 1]),
        ("<think>[1] is wrong, [3] maybe</think>\n[2] > [3] > [1]", 3, [1, 2, 0]),
        ("[2]", 4, None),  # fewer than half
        ("[12] > [3]", 3, None),  # one usable id of three
        ("[0] > [7]", 3, None),
        ("Response 2 beats 1 because 42 is right", 3, None),  # bare numbers in prose are not a ranking
        ("", 3, None),
        ("I cannot rank these.", 3, None),
        ("1" * 40 + "x", 3, None),
    ],
)
def test_parse_ranking(answer, m, order):
    assert parse_ranking(answer, m) == order
    if order is not None:
        assert sorted(order) == list(range(m))


def test_prompt_shows_the_question_and_numbered_responses():
    chat = Prompt(uid="u", text="templated", token_ids=(1,), messages=(("system", "s"), ("user", "a"), ("user", "b")))
    assert chat.question == "b"
    assert Prompt(uid="u", text="plain text", token_ids=(1,)).question == "plain text"
    system, user = judge_messages("What is 2 + 2?", ["four", "five", "4"])
    assert system["role"] == "system" and user["role"] == "user"
    assert "What is 2 + 2?" in user["content"] and "[1] four\n\n[2] five\n\n[3] 4" in user["content"]
    assert "[2] > [1] > [3]" in user["content"] and "could not be read" not in user["content"]
    assert "could not be read" in judge_messages("q", ["a", "b"], strict=True)[1]["content"]


def test_bad_window_settings_name_the_rule():
    with pytest.raises(ValueError, match="1 <= window_step < window"):
        ListwiseJudgeScorer("http://127.0.0.1:1/v1", "judge", window=4, window_step=4)


# ---- sliding window (in-process fake judge) ------------------------------------------------------


@pytest.mark.parametrize(
    "n, window, step, spans",
    [
        (3, 20, 10, [(0, 3)]),
        (20, 20, 10, [(0, 20)]),
        (21, 20, 10, [(1, 21), (0, 11)]),
        (25, 20, 10, [(5, 25), (0, 15)]),
        (40, 20, 10, [(20, 40), (10, 30), (0, 20)]),
        (5, 2, 1, [(3, 5), (2, 4), (1, 3), (0, 2)]),
    ],
)
def test_window_schedule(n, window, step, spans):
    assert window_schedule(n, window, step) == spans


def test_window_schedule_counts_and_overlaps():
    for n in range(2, 60):
        for window, step in [(2, 1), (3, 2), (4, 1), (5, 3), (20, 10), (8, 7)]:
            spans = window_schedule(n, window, step)
            assert len(spans) == calls_expected(n, window, step)
            assert spans[0][1] == n and spans[-1][0] == 0
            assert all(2 <= end - start <= window for start, end in spans)
            assert all(b_end > a_start for (a_start, _), (_, b_end) in zip(spans, spans[1:]))  # they overlap


def test_one_pass_brings_the_true_top_to_the_front():
    rng = random.Random(0)
    for n, window, step in [(7, 3, 2), (25, 20, 10), (50, 20, 10), (30, 6, 3), (13, 4, 1), (9, 20, 10)]:
        for _ in range(20):
            quality = rng.sample(range(1000), n)  # hidden; the fake judge is consistent with it
            calls = []

            def judge(ids):
                calls.append(list(ids))
                return sorted(ids, key=lambda i: -quality[i])

            order = sliding_rank(n, window, step, judge)
            truth = sorted(range(n), key=lambda i: -quality[i])
            assert sorted(order) == list(range(n))
            top = n if n <= window else window - step  # what one pass guarantees
            assert order[:top] == truth[:top]
            assert len(calls) == calls_expected(n, window, step)


def test_sliding_rank_refuses_a_judge_that_loses_items():
    with pytest.raises(ValueError, match="must permute"):
        sliding_rank(3, 20, 10, lambda ids: ids[:1])


def test_scores_from_order():
    assert scores_from_order([2, 0, 1]) == [2.0, 1.0, 3.0]


# ---- a deterministic judge server ----------------------------------------------------------------


class Judge:
    """Speaks OpenAI chat completions; ranks the numbered responses by the number after "q=" in
    their text (higher first). A question with JUNK always gets a non-ranking; one with FLAKY only
    until the request carries the strict reminder. `script` holds (status, body) replies sent
    first, in order; "{auth}" in a body echoes the Authorization header back (as careless servers do)."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []  # (path, headers, body)
        self.script: list[tuple[int, str]] = []
        self.url = ""
        self.lock = threading.Lock()

    def reply(self, path: str, headers: dict, body: dict) -> tuple[int, str]:
        with self.lock:
            self.requests.append((path, headers, body))
            if self.script:
                status, text = self.script.pop(0)
                return status, text.replace("{auth}", headers.get("Authorization", ""))
        user = body["messages"][-1]["content"]
        if "JUNK" in user or ("FLAKY" in user and "could not be read" not in user):
            return 200, completion("These responses are all quite good.")
        items = re.findall(r"^\[(\d+)\] .*?q=(\d+)", user, re.M)
        ranked = sorted(items, key=lambda item: -int(item[1]))
        return 200, completion(" > ".join(f"[{k}]" for k, _ in ranked))

    def users(self) -> list[str]:
        return [body["messages"][-1]["content"] for _, _, body in self.requests]


def completion(content) -> str:
    message = {"role": "assistant", "content": content}
    return json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": message}]})


def _handler(judge: Judge) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, text = judge.reply(self.path, dict(self.headers), body)
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def judge(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    state = Judge()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def scorer(url: str, model: str = "judge-1", **overrides) -> ListwiseJudgeScorer:
    options = {"api_key_env": KEY_ENV, "backoff_s": 0.001, "max_retries": 2, **overrides}
    return ListwiseJudgeScorer(url, model, **options)


def ask(question: str) -> Prompt:
    return builders.prompt("p", question=question)


def test_ranks_over_http_with_ties_for_identical_texts(judge):
    responses = ["q=1 low", "q=3 high", "q=1 low", "q=2 mid"]
    result = scorer(judge.url).rank(ask("What is 2 + 2?"), responses)
    assert result.scores == [1.0, 3.0, 1.0, 2.0] and result.calls == 1
    ((path, headers, body),) = judge.requests
    assert path == "/v1/chat/completions" and headers["Authorization"] == f"Bearer {KEY}"
    assert body["model"] == "judge-1" and body["temperature"] == 0 and body["max_tokens"] == 8 * 3 + 16
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "What is 2 + 2?" in judge.users()[0] and "[3] q=2 mid" in judge.users()[0]  # the copy is not shown


def test_sliding_window_over_http(judge):
    # Windows [4, 7), [2, 5), [0, 3) (worked by hand): the order becomes items 2, 0, 1, 4, 3, 6, 5.
    quality = [5, 1, 7, 3, 6, 2, 4]
    result = scorer(judge.url, window=3, window_step=2).rank(ask("q"), [f"q={q}" for q in quality])
    assert result.scores == [6.0, 5.0, 7.0, 3.0, 4.0, 1.0, 2.0]
    assert result.calls == len(judge.requests) == calls_expected(7, 3, 2) == 3


def test_identical_texts_tie_without_a_request(judge):
    result = scorer(judge.url).rank(ask("q"), ["same", "same", "same"])
    assert result.scores == [1.0, 1.0, 1.0] and result.calls == 0 and judge.requests == []


def test_retries_500_and_429(judge):
    judge.script = [(500, "overloaded"), (429, "slow down")]
    result = scorer(judge.url).rank(ask("q"), ["q=1", "q=2"])
    assert result.scores == [1.0, 2.0] and len(judge.requests) == 3
    assert result.calls == 1  # the judge answered once; failed attempts are not judge calls


def test_400_fails_at_once_and_the_key_stays_secret(judge):
    judge.script = [(400, '{"error": "bad model; you sent {auth}"}')]
    with pytest.raises(ScorerError, match="HTTP 400") as info:
        scorer(judge.url).rank(ask("q"), ["q=1", "q=2"])
    assert len(judge.requests) == 1 and KEY not in str(info.value) and "***" in str(info.value)
    judge.script = [(500, "trace: {auth}")] * 3
    with pytest.raises(ScorerError, match="3 attempts failed") as info:
        scorer(judge.url).rank(ask("q"), ["q=1", "q=2"])
    assert len(judge.requests) == 4 and KEY not in str(info.value)


def test_a_judge_that_is_down_is_named(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ScorerError, match=f"127.0.0.1:{port}/v1/chat/completions is down"):
        scorer(f"http://127.0.0.1:{port}/v1", max_retries=1).rank(ask("q"), ["a", "b"])


def test_reask_after_an_unparseable_answer(judge):
    result = scorer(judge.url).rank(ask("FLAKY"), ["q=2", "q=9", "q=4"])
    assert result.scores == [1.0, 3.0, 2.0] and result.calls == 2
    first, second = judge.users()
    assert "could not be read" not in first and "could not be read" in second
    assert judge.requests[0][2]["temperature"] == judge.requests[1][2]["temperature"] == 0


@pytest.mark.parametrize("parse_retries", [0, 2])
def test_always_unparseable_raises_after_the_retries(judge, parse_retries):
    with pytest.raises(UnparseableRanking, match="gave no ranking of 2 responses") as info:
        scorer(judge.url, parse_retries=parse_retries).rank(ask("JUNK"), ["q=1", "q=2"])
    assert isinstance(info.value, ScorerError) and len(judge.requests) == 1 + parse_retries


@pytest.mark.parametrize(
    "body, words",
    [
        ("<html>not json</html>", "not JSON"),
        ('{"choices": []}', "expected an OpenAI chat completion"),
        ('{"choices": [{"message": {"content": 5}}]}', "expected an OpenAI chat completion"),
        ("[1, 2]", "expected an OpenAI chat completion"),
    ],
)
def test_a_body_of_the_wrong_shape_names_the_endpoint(judge, body, words):
    judge.script = [(200, body)]
    with pytest.raises(ScorerError, match=words) as info:
        scorer(judge.url).rank(ask("q"), ["q=1", "q=2"])
    assert f"judge endpoint {judge.url}/chat/completions" in str(info.value) and len(judge.requests) == 1


def test_null_content_is_an_unparseable_answer(judge):
    judge.script = [(200, completion(None))] * 2
    result = scorer(judge.url).rank(ask("q"), ["q=1", "q=2"])
    assert result.scores == [1.0, 2.0] and result.calls == 3


def test_reward_actor_drops_and_counts_a_list_that_fails(judge):
    cfg = RewardConfig(
        kind="listwise", url=judge.url, judge_model="judge-1", api_key_env=KEY_ENV, window=3, window_step=1
    )
    actor = RewardActor(cfg, scorer=ListwiseJudgeScorer.from_config(cfg))
    assert actor.scorer.http.url == f"{judge.url}/chat/completions" and actor.scorer.window == 3
    prompts = {uid: builders.prompt(uid, question=q) for uid, q in [("a", "2 + 2?"), ("j", "JUNK"), ("b", "3 + 3?")]}
    texts = {"a": ["q=1", "q=5", "q=3"], "j": ["q=1", "q=2", "q=3"], "b": ["q=7", "q=7", "q=2", "q=1"]}
    cands = [builders.candidate(uid, text=t) for uid, ts in texts.items() for t in ts]
    report = actor.score(prompts, cands, iteration=0)
    assert report.failures == {"error: UnparseableRanking": 3} and report.n_failed == 3
    assert [(c.candidate.prompt_uid, c.candidate.text, c.reward) for c in report.scored] == [
        ("a", "q=1", 1.0),
        ("a", "q=5", 3.0),
        ("a", "q=3", 2.0),
        ("b", "q=7", 3.0),
        ("b", "q=7", 3.0),
        ("b", "q=2", 2.0),
        ("b", "q=1", 1.0),
    ]
    assert report.lists == 2 and report.calls == 2  # a failed list's requests are not in report.calls
    only_junk = [c for c in cands if c.prompt_uid == "j"]
    with pytest.raises(ScorerError, match="all 3 candidates of iteration 1 failed"):
        actor.score(prompts, only_junk, iteration=1)


# ---- the project's own server on the tiny model (slow) ------------------------------------------

SERVE_KEY = "serve-key-3b8d21"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            return response.status == 200
    except (OSError, ValueError):  # not listening yet, or the proxy has no route yet
        return False


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path, tmp_path_factory):
    """`python -m larpo_ray.serve` on the tiny model with the HF engine; prompt limit sized for a
    judge prompt of 4 short responses (~360 tokens with the strict reminder)."""
    from test_serve import _stop

    port, log = _free_port(), tmp_path_factory.mktemp("judge") / "server.log"
    env = {**os.environ, "LARPO_SERVE_API_KEY": SERVE_KEY, "RAY_worker_niceness": "0"}
    cmd = [sys.executable, "-m", "larpo_ray.serve", tiny_model_path, "--port", str(port), "--engine", "hf"]
    cmd += ["--served-model-name", "tiny", "--max-tokens", "64", "--max-prompt-tokens", "900", "--max-choices", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"judge server not ready (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(2)
    yield url + "/v1"
    _stop(proc)


@pytest.mark.slow
def test_tiny_model_is_an_unparseable_judge_end_to_end(tiny_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SERVE_KEY)
    judge = scorer(tiny_server, "tiny", window=4, window_step=2, parse_retries=2)
    sent, post = [], judge.http._session.post

    def counting_post(*args, **kwargs):  # what went over the wire
        sent.append(kwargs["json"])
        return post(*args, **kwargs)

    monkeypatch.setattr(judge.http._session, "post", counting_post)
    question = ask("What is 2 + 3?")
    with pytest.raises(UnparseableRanking, match="gave no ranking of 3 responses in 3 answers"):
        judge.rank(question, ["The answer is 5.", "2 + 3 = 6. The answer is 6.", "Five."])
    assert len(sent) == 3 and SERVE_KEY not in repr(sent)
    assert [("could not be read" in body["messages"][-1]["content"]) for body in sent] == [False, True, True]

    cfg = RewardConfig(
        kind="listwise", url=tiny_server, judge_model="tiny", api_key_env=KEY_ENV, window=4, window_step=2
    )
    actor = RewardActor(cfg, scorer=ListwiseJudgeScorer.from_config(cfg))
    prompts = {"x": question, "y": ask("What is 1 + 1?")}
    cands = [builders.candidate("x", text=t) for t in ("5", "6", "five")]
    cands += [builders.candidate("y", text="2"), builders.candidate("y", text="2")]  # identical: no request
    report = actor.score(prompts, cands, iteration=0)
    assert report.failures == {"error: UnparseableRanking": 3} and report.n_failed == 3
    assert [c.reward for c in report.scored] == [1.0, 1.0] and report.lists == 1 and report.calls == 0
    with pytest.raises(ScorerError, match="all 3 candidates of iteration 1 failed"):
        actor.score(prompts, cands[:3], iteration=1)


class ArithmeticJudge(Judge):
    """A judge that knows arithmetic: responses whose final answer is right first, the others after,
    each group in its shown order (the tiny preset's "What is a +- b?" questions)."""

    def reply(self, path: str, headers: dict, body: dict) -> tuple[int, str]:
        from larpo_ray.tasks import binary_reward

        with self.lock:
            self.requests.append((path, headers, body))
        user = body["messages"][-1]["content"]
        a, op, b = re.search(r"What is (\d+) ([+-]) (\d+)\?", user).groups()
        answer = str(int(a) + int(b) if op == "+" else int(a) - int(b))
        items = re.findall(r"^\[(\d+)\] (.*?)(?=\n\n\[\d+\] |\n\nAnswer with)", user, re.M | re.S)
        ranked = sorted(items, key=lambda item: -binary_reward(item[1], answer))
        return 200, completion(" > ".join(f"[{k}]" for k, _ in ranked))


@pytest.mark.slow
def test_tiny_preset_run_with_the_listwise_judge(tmp_path):
    """The tiny preset through Ray, reranked by a judge over real HTTP: one request per list of 4,
    one per held-out comparison with the initial policy's reply (none when the replies are equal)."""
    state = ArithmeticJudge()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "larpo_ray.run", "--preset", "tiny", "--loop.iterations", "1"]
    cmd += ["--reward.kind", "listwise", "--reward.url", f"http://127.0.0.1:{server.server_address[1]}/v1"]
    cmd += ["--reward.judge_model", "arithmetic", "--loop.run_dir", str(run_dir), "--logging.progress", "false"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    first, last = rows
    assert first["eval/mean_reward"] == 0.0 and last["lists/n_lists"] > 0
    # k = 4 <= reward.window: one request per list, none for a list whose 4 replies are one text
    assert 0 < last["reward/calls"] <= last["reward/lists"] <= 32 and last["rollout/n_failed_scores"] == 0
    before, after = ([json.loads(x) for x in (run_dir / "eval" / f"iter-00000{i}.jsonl").open()] for i in (0, 1))
    changed = sum(a["response"] != b["response"] for a, b in zip(before, after, strict=True))
    assert len(state.requests) == last["reward/calls"] + changed  # the rest tie without a request
    margins = [row["reward"] for row in after]
    wins = sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)
    assert last["eval/win_rate_vs_initial"] == pytest.approx(wins / len(margins))
    assert sum(m != 0 for m in margins) <= changed
