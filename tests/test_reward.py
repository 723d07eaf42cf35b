"""Tests for actors/reward.py: rule, reward-model and HTTP scorers, and the RewardActor's failure
accounting. The RM is a tiny Llama built here with a locally trained tokenizer; the HTTP scorer
talks to a real stdlib server on 127.0.0.1."""

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import builders
import pytest

from actors.reward import HTTPScorer, RewardActor, RewardModelScorer, RuleScorer, ScorerError, make_scorer
from larpo_ray.config import RewardConfig
from larpo_ray.tasks import win_rate
from larpo_ray.types import Candidate, Prompt

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prompt(uid="p", answer=None, question="What is 12 + 7?") -> Prompt:
    return builders.prompt(uid, question=question, answer=answer)


def cand(text: str, uid="p") -> Candidate:
    return builders.candidate(uid, text=text, logp=-0.1)


# ---- rule scorer ---------------------------------------------------------------------------------


def test_rule_binary_and_graded():
    ps = [prompt(answer="19")] * 3
    texts = ["12 + 7 = 19. The answer is 19.", "The answer is 20.", "no idea"]
    assert RuleScorer("binary").score(ps, texts) == [1.0, 0.0, 0.0]
    graded = RuleScorer("graded").score(ps, texts)
    assert graded[0] == 1.0 and 0.0 < graded[1] < 0.5 and graded[2] == 0.0


def test_rule_canonicalizes_gsm8k_reference():
    gsm8k = prompt(answer="Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72")
    thousands = prompt(answer="1,000")
    scores = RuleScorer("binary").score([gsm8k, gsm8k, thousands], ["So 72 in all.", "24", "The answer is 1000."])
    assert scores == [1.0, 0.0, 1.0]


def test_rule_without_answer_is_a_clear_error():
    with pytest.raises(ValueError, match="answer_column"):
        RuleScorer("binary").score([prompt(answer=None)], ["19"])
    with pytest.raises(ValueError, match="binary"):
        RuleScorer("fuzzy")


# ---- reward-model scorer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory):
    """A tiny random GPT-2 RM (scalar head) and a byte-level BPE tokenizer, saved as an HF folder.

    GPT-2, not Llama: its absolute position embeddings make wrong (left) padding change scores,
    while RoPE is shift-invariant and would let that bug pass the batch-mates test."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["What is 12 + 7? The answer is 19.", "user assistant system hello world"] * 20
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=CHATML
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=96, num_labels=1, pad_token_id=tok.pad_token_id
    )
    path = tmp_path_factory.mktemp("rm")
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


RESPONSES = ["The answer is 19.", "20", "12 + 7 = 19, so the answer is 19. Done and checked twice.", "hm"]


def test_rm_scores_shape_determinism_and_batch_invariance(rm_path):
    ps = [prompt(answer="19")] * len(RESPONSES)
    one = RewardModelScorer(rm_path, batch_size=1)
    scores = one.score(ps, RESPONSES)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores) and len(set(scores)) == 4
    assert one.score(ps, RESPONSES) == scores
    batched = RewardModelScorer(rm_path, batch_size=4).score(ps, RESPONSES)
    assert batched == pytest.approx(scores, abs=1e-5)


def test_rm_score_ignores_batch_mates(rm_path):
    """Right padding: a short response's score is the same alone and next to a long one."""
    scorer = RewardModelScorer(rm_path, batch_size=8)
    alone = scorer.score([prompt()], ["hm"])[0]
    mixed = scorer.score([prompt(), prompt()], ["hm", "a much longer response " * 3])
    assert mixed[0] == pytest.approx(alone, abs=1e-5)


def test_rm_renders_chat_template_falls_back_and_truncates(rm_path):
    scorer = make_scorer(RewardConfig(kind="model", model_path=rm_path))
    assert isinstance(scorer, RewardModelScorer) and scorer.max_length == 96
    text = scorer.render(prompt(), "19")
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n19<|im_end|>\n")
    bare = Prompt(uid="b", text="Q: 1+1? A: ", token_ids=(1,))
    assert scorer.render(bare, "2") == "Q: 1+1? A: 2"
    # Far past the 96 positions: cut on the left, so the differing starts are dropped, the ends read.
    long = scorer.score([prompt()] * 3, ["world " * 50 + "19 " * 200, "hello " * 50 + "19 " * 200, "20 " * 250])
    assert long[0] == pytest.approx(long[1], abs=1e-5) and long[1] != pytest.approx(long[2], abs=1e-5)


def test_rm_refuses_checkpoint_without_trained_head(rm_path, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(rm_path)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(rm_path).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="scalar head"):
        RewardModelScorer(str(tmp_path))


# ---- HTTP scorer ---------------------------------------------------------------------------------


class Server:
    """A loopback HTTP server; `plan(attempt, body) -> (status, payload bytes, delay_s)` decides each
    answer. Records every request's body and Authorization header."""

    def __init__(self, plan):
        self.plan, self.requests, self.auth = plan, [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.auth.append(self.headers.get("Authorization"))
                status, payload, delay = server.plan(len(server.requests), body, self.headers)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(plan):
        servers.append(Server(plan))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def ok(body):
    """A correct answer: each response's score is its length."""
    return 200, json.dumps({"scores": [len(r) for r in body["responses"]]}).encode(), 0.0


def http(url, **kw):
    return HTTPScorer(url, **{"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.001, **kw})


def test_http_success_in_batches(serve):
    server = serve(lambda n, body, headers: ok(body))
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    assert http(server.url, batch_size=2).score([prompt()] * 5, texts) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [len(r["responses"]) for r in server.requests] == [2, 2, 1]
    assert server.requests[0]["prompts"][0] == prompt().text
    assert server.requests[0]["messages"][0] == [{"role": "user", "content": "What is 12 + 7?"}]


def test_http_retries_5xx_and_429_then_succeeds(serve):
    server = serve(lambda n, body, headers: (500, b"oops", 0.0) if n == 1 else (429, b"", 0.0) if n == 2 else ok(body))
    assert http(server.url, max_retries=3).score([prompt()], ["abc"]) == [3.0]
    assert len(server.requests) == 3


def test_http_gives_up_after_max_retries(serve):
    server = serve(lambda n, body, headers: (503, b"busy", 0.0))
    with pytest.raises(ScorerError, match="down or too slow.*3 attempts.*HTTP 503") as err:
        http(server.url, max_retries=2).score([prompt()], ["abc"])
    assert len(server.requests) == 3 and server.url in str(err.value)


def test_http_timeout(serve):
    server = serve(lambda n, body, headers: (*ok(body)[:2], 1.0))
    start = time.monotonic()
    with pytest.raises(ScorerError, match="timed out"):
        http(server.url, timeout_s=0.2, max_retries=1).score([prompt()], ["abc"])
    assert time.monotonic() - start < 1.5 and len(server.requests) == 2


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b"<html>not json</html>", "not JSON"),
        (b'{"score": [1, 2]}', "expected"),
        (b"[1, 2]", "expected"),
        (b'{"scores": [1]}', "1 scores for 2 responses"),
        (b'{"scores": [1, "x"]}', "non-numeric"),
        (b'{"scores": [1, true]}', "non-numeric"),
    ],
)
def test_http_garbage_raises(serve, payload, problem):
    server = serve(lambda n, body, headers: (200, payload, 0.0))
    with pytest.raises(ScorerError, match=problem) as err:
        http(server.url).score([prompt()] * 2, ["a", "b"])
    assert server.url in str(err.value) and len(server.requests) == 1  # garbage is not retried


def test_http_400_is_not_retried_and_key_never_leaks(serve, monkeypatch):
    monkeypatch.setenv("LARPO_REWARD_API_KEY", "sekret-123")
    # A server that echoes the header back in its error body: the message must still not show it.
    server = serve(lambda n, body, headers: (400, f"bad request, you sent {headers['Authorization']}".encode(), 0.0))
    with pytest.raises(ScorerError, match="HTTP 400") as err:
        http(server.url).score([prompt()], ["a"])
    assert len(server.requests) == 1 and server.auth == ["Bearer sekret-123"]
    assert "sekret-123" not in str(err.value) and "***" in str(err.value)


def test_http_no_key_no_header(serve, monkeypatch):
    monkeypatch.delenv("LARPO_REWARD_API_KEY", raising=False)
    server = serve(lambda n, body, headers: ok(body))
    http(server.url).score([prompt()], ["a"])
    assert server.auth == [None]


def test_http_server_down():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ScorerError, match="down or too slow.*connection failed"):
        http(f"http://127.0.0.1:{port}/score", max_retries=1).score([prompt()], ["a"])


def test_make_scorer_http_uses_config():
    cfg = RewardConfig(
        kind="http", url="https://rm.example/score", timeout_s=5.0, max_retries=1, verify_tls=False, batch_size=3
    )
    scorer = make_scorer(cfg)
    assert isinstance(scorer, HTTPScorer)
    assert (scorer.url, scorer.timeout_s, scorer.max_retries, scorer.verify_tls, scorer.batch_size) == (
        "https://rm.example/score",
        5.0,
        1,
        False,
        3,
    )


# ---- reward actor --------------------------------------------------------------------------------


class TextScorer:
    """Fake scorer: a response's score is float(text); "boom" in a batch raises; "short" drops one."""

    def score(self, prompts, responses):
        if "boom" in responses:
            raise ConnectionError("scorer fell over")
        scores = [float(r) if r not in ("short", "x") else 0.0 for r in responses]
        return scores[:-1] if "short" in responses else scores


def actor(batch_size=2, scorer=None):
    return RewardActor(RewardConfig(batch_size=batch_size), scorer=scorer or TextScorer())


def test_actor_drops_and_counts_nan_inf():
    cands = [cand(t) for t in ["1.5", "nan", "inf", "-inf", "-2", "0"]]
    report = actor().score({"p": prompt()}, cands, iteration=3)
    assert [s.reward for s in report.scored] == [1.5, -2.0, 0.0]
    assert [s.candidate.text for s in report.scored] == ["1.5", "-2", "0"]
    assert all(s.iteration == 3 for s in report.scored)
    assert report.n_failed == 3 and report.failures == {"nan": 1, "inf": 2}


def test_actor_counts_raising_batch_and_wrong_count():
    cands = [cand(t) for t in ["1", "boom", "2", "short", "3"]]  # batches: [1, boom] [2, short] [3]
    report = actor().score({"p": prompt()}, cands, iteration=0)
    assert [s.reward for s in report.scored] == [3.0]
    assert report.failures == {"error: ConnectionError": 2, "wrong_count": 2} and report.n_failed == 4


def test_actor_raises_when_every_candidate_fails():
    with pytest.raises(ScorerError, match="all 3 candidates.*scorer fell over") as err:
        actor().score({"p": prompt()}, [cand("boom")] * 3, iteration=1)
    assert isinstance(err.value.__cause__, ConnectionError)
    with pytest.raises(ScorerError, match="'nan': 2"):
        actor().score({"p": prompt()}, [cand("nan")] * 2, iteration=1)


def test_actor_unknown_uid_empty_call_and_ping():
    with pytest.raises(ValueError, match="'q'"):
        actor().score({"p": prompt()}, [cand("1"), cand("1", uid="q")], iteration=0)
    report = actor().score({}, [], iteration=0)
    assert (report.scored, report.n_failed, report.failures) == ([], 0, {})
    assert isinstance(actor().ping(), int)


def test_actor_with_rule_scorer_from_config():
    ps = {"a": prompt("a", answer="19"), "b": prompt("b", answer="#### 5")}
    cands = [cand("The answer is 19.", "a"), cand("7", "a"), cand("5", "b")]
    report = RewardActor(RewardConfig(kind="rule", rule="binary", batch_size=2)).score(ps, cands, iteration=0)
    assert [s.reward for s in report.scored] == [1.0, 0.0, 1.0] and report.n_failed == 0


def test_win_rate():
    assert win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert win_rate([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="equal"):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        win_rate([], [])
