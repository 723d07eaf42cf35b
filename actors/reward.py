"""The reward role: the reranker r(x, y) that scores sampled candidates (LARPO Algorithm 1, step 3).

Three scorers sit behind one small interface, `score(prompts, responses) -> list[float]` (one score
per (prompt, response) pair):

- `RuleScorer`: the verifiable-task rule (final-answer match, `larpo_ray.tasks.REWARDS`).
- `RewardModelScorer`: a sequence-classification reward model with a scalar head (hub id or folder).
- `HTTPScorer`: a remote scoring service; the protocol is in its docstring, so you can serve any RM.

`RewardActor` wraps a scorer for the driver. Failure semantics: a score that is NaN, inf or not a
number, a batch whose scorer raises, or a batch with the wrong number of scores is counted in the
`ScoreReport` (by reason) and dropped, never trained on; the run goes on. If every candidate of a
call fails, the scorer is broken rather than unlucky, so the actor raises `ScorerError`.

Plain classes, no Ray (Ray is applied where the topology is built); torch, transformers and
requests are imported only by the scorers that need them.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from larpo_ray import tasks
from larpo_ray.config import RewardConfig
from larpo_ray.models import require_safetensors
from larpo_ray.tasks import REWARDS
from larpo_ray.types import Candidate, Prompt, ScoredCandidate, ScorerError

log = logging.getLogger(__name__)


class Scorer(Protocol):
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response) pair; may contain NaN/inf or raise."""
        ...


class RuleScorer:
    """Rule-based verifier: `tasks.REWARDS[rule](response, reference)` against `prompt.answer`."""

    def __init__(self, rule: str):
        if rule not in REWARDS:
            raise ValueError(f"unknown reward rule {rule!r}: choose one of {sorted(REWARDS)}")
        self.reward_fn = REWARDS[rule]

    @classmethod
    def from_config(cls, cfg: RewardConfig, trust_remote_code: bool = False) -> RuleScorer:
        return cls(cfg.rule)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return [self.reward_fn(text, reference_answer(p)) for p, text in zip(prompts, responses, strict=True)]


def reference_answer(prompt: Prompt) -> str:
    """The prompt's reference as the rule matches it (`tasks.reference_answer`: GSM8K-style
    "rationale #### 72" becomes "72"; a text answer stays text)."""
    if prompt.answer is None:
        raise ValueError(
            f"prompt {prompt.uid} has no reference answer, but reward.kind = rule needs one: "
            f"point data.answer_column at the answer column, or use reward.kind = model/http"
        )
    return tasks.reference_answer(prompt.answer)


class RewardModelScorer:
    """A reward model: `AutoModelForSequenceClassification` with one output (num_labels = 1).

    Input: the RM tokenizer's chat template over the prompt's messages plus the assistant response.
    If the RM tokenizer has no chat template (or the prompt has no messages), the input is the
    prompt's text (already templated for the policy) followed by the response. Padding is on the
    right, so with causal attention a sequence's score never depends on its batch-mates; long
    inputs are cut on the left so the response's end, where the score is read, is kept.
    """

    def __init__(self, model_path: str, batch_size: int = 16, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.batch_size = batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if Path(model_path).is_dir():
            require_safetensors(Path(model_path), "reward.model_path")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        # use_safetensors: pickled .bin weights can run code when loaded; they are never read.
        self.model, info = AutoModelForSequenceClassification.from_pretrained(
            model_path, trust_remote_code=trust_remote_code, output_loading_info=True, use_safetensors=True
        )
        # A policy checkpoint loads "fine" with a randomly initialised head: refuse it, since
        # training on a random reranker's scores would fail silently.
        if self.model.config.num_labels != 1 or info["missing_keys"]:
            raise ValueError(
                f"{model_path!r} is not a reward model with a trained scalar head "
                f"(num_labels = {self.model.config.num_labels}, missing weights: "
                f"{sorted(info['missing_keys'])[:4]}): give a sequence-classification RM "
                f"with num_labels = 1"
            )
        self.model.to(self.device).eval()
        self._set_padding()
        self.max_length = self._max_length()

    @classmethod
    def from_config(cls, cfg: RewardConfig, trust_remote_code: bool = False) -> RewardModelScorer:
        return cls(cfg.model_path, cfg.batch_size, trust_remote_code)

    def _set_padding(self) -> None:
        """Pad with the id the model's pooling skips (it reads the last non-pad token)."""
        text_cfg, tok = self.model.config.get_text_config(), self.tokenizer
        pad_id = next(i for i in (text_cfg.pad_token_id, tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        tok.pad_token = tok.convert_ids_to_tokens(pad_id)
        text_cfg.pad_token_id = pad_id
        tok.padding_side, tok.truncation_side = "right", "left"

    def _max_length(self) -> int | None:
        text_cfg = self.model.config.get_text_config()
        limits = (self.tokenizer.model_max_length, getattr(text_cfg, "max_position_embeddings", None))
        valid = [n for n in limits if n is not None and n < 10**7]  # HF uses ~1e30 for "no limit"
        return min(valid) if valid else None

    def render(self, prompt: Prompt, response: str) -> str:
        """The text the RM reads for one pair (see the class docstring)."""
        if self.tokenizer.chat_template and prompt.messages:
            chat = [{"role": r, "content": c} for r, c in prompt.messages]
            chat.append({"role": "assistant", "content": response})
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return prompt.text + response

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        import torch

        texts = [self.render(p, r) for p, r in zip(prompts, responses, strict=True)]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                # add_special_tokens=False: the chat template already carries BOS where the RM wants it.
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    return_tensors="pt",
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    add_special_tokens=False,
                ).to(self.device)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                scores += logits[:, 0].float().cpu().tolist()
        return scores


class HTTPScorer:
    """A remote scorer. Protocol (one POST per batch of at most `batch_size` pairs):

        POST <url>    Content-Type: application/json    [Authorization: Bearer <key>]
        {"prompts":   ["<prompt text, chat-templated for the policy>", ...],
         "messages":  [[{"role": "user", "content": "..."}, ...], ...],   # same prompts, untemplated
         "responses": ["<response text>", ...]}
        -> 200 {"scores": [0.7, -1.2, ...]}    # one number per response, same order

    Connection errors, timeouts, 5xx and 429 are retried `max_retries` times with capped exponential
    backoff plus jitter; other 4xx fail at once (the request is wrong, retrying will not help). A
    body that is not that JSON shape raises `ScorerError`. The API key is read from the env var
    named `api_key_env` (reward.api_key_env; a config holds the name, never the key), sent only as
    a header, and never logged or put in an error message. TLS certificates are verified against
    the system's CAs, or `ca_bundle` (reward.ca_bundle); verify_tls = False accepts any
    certificate and warns.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        verify_tls: bool = True,
        batch_size: int = 16,
        api_key_env: str = "LARPO_REWARD_API_KEY",
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        ca_bundle: str | None = None,
    ):
        import requests

        self.url, self.timeout_s, self.max_retries, self.verify_tls = url, timeout_s, max_retries, verify_tls
        self.batch_size, self.backoff_s, self.max_backoff_s = batch_size, backoff_s, max_backoff_s
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise ScorerError(
                f"reward.ca_bundle {ca_bundle!r} is not a file on this node: give the path of a "
                f"PEM file with the CA certificate(s) of {url}"
            )
        self.verify: bool | str = (ca_bundle or True) if verify_tls else False  # requests' `verify`
        if not verify_tls:
            log.warning(
                "reward.verify_tls = false: the reward server %s is not authenticated, so anyone on the "
                "network path can read the API key and forge scores; set reward.ca_bundle to its CA "
                "certificate instead",
                url,
            )
        self._session = requests.Session()
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key:
            self._session.headers["Authorization"] = f"Bearer {self._api_key}"

    @classmethod
    def from_config(cls, cfg: RewardConfig, trust_remote_code: bool = False) -> HTTPScorer:
        return cls(
            cfg.url,
            cfg.timeout_s,
            cfg.max_retries,
            cfg.verify_tls,
            cfg.batch_size,
            cfg.api_key_env,
            ca_bundle=cfg.ca_bundle,
        )

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: give one prompt per response")
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            ps, rs = prompts[start : start + self.batch_size], list(responses[start : start + self.batch_size])
            payload = {
                "prompts": [p.text for p in ps],
                "responses": rs,
                "messages": [[{"role": r, "content": c} for r, c in p.messages] for p in ps],
            }
            scores += self._post(payload, len(rs))
        return scores

    def _post(self, payload: dict, n: int) -> list[float]:
        """One batch, with retries on the failures that can be transient."""
        import requests

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
            try:
                resp = self._session.post(self.url, json=payload, timeout=self.timeout_s, verify=self.verify)
            except requests.exceptions.SSLError as err:  # a certificate will not fix itself: no retry
                raise ScorerError(
                    f"reward server {self.url}: TLS verification failed ({self._redact(err)}); "
                    f"fix the server's certificate, or point reward.ca_bundle at the PEM of the "
                    f"CA that signed it (for a self-signed server: its certificate)"
                ) from None
            except requests.Timeout:
                last = f"timed out after reward.timeout_s = {self.timeout_s} s"
                continue
            except requests.ConnectionError as err:
                last = f"connection failed: {self._redact(err)}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {self._redact(resp.text)[:200]}"
                continue
            if resp.status_code >= 400:
                raise ScorerError(
                    f"reward server {self.url} rejected the request with HTTP {resp.status_code} "
                    f"({self._redact(resp.text)[:200]}); check the URL, the API key in the env "
                    f"and that the server speaks the HTTPScorer protocol"
                )
            return self._parse(resp, n)
        raise ScorerError(
            f"reward server {self.url} is down or too slow: {self.max_retries + 1} attempts failed, "
            f"last: {last}. Check that it is running and reachable from this node, or raise "
            f"reward.timeout_s / reward.max_retries"
        )

    def _parse(self, resp, n: int) -> list[float]:
        """Validate the `{"scores": [...]}` body; anything else is the server's bug, named."""
        where = f"reward server {self.url} (HTTP {resp.status_code})"
        try:
            body = resp.json()
        except ValueError:
            raise ScorerError(
                f"{where} returned a body that is not JSON: {self._redact(resp.text)[:100]!r}; "
                f'expected {{"scores": [...]}}'
            ) from None
        scores = body.get("scores") if isinstance(body, dict) else None
        if not isinstance(scores, list):
            raise ScorerError(f'{where} returned {self._redact(body)[:100]!r}; expected {{"scores": [...]}}')
        if len(scores) != n:
            raise ScorerError(f"{where} returned {len(scores)} scores for {n} responses; expected one per response")
        bad = next((s for s in scores if isinstance(s, bool) or not isinstance(s, (int, float))), None)
        if bad is not None:
            raise ScorerError(
                f"{where} returned a non-numeric score {self._redact(bad)[:50]!r}; scores must be numbers"
            )
        return [float(s) for s in scores]

    def _redact(self, text: object) -> str:
        """Servers and exceptions may echo headers back: the key never leaves this object."""
        return str(text).replace(self._api_key, "***") if self._api_key else str(text)


# Keys: larpo_ray.choices.SCORER_KINDS, the names reward.kind accepts (tests/test_config.py checks they agree).
SCORERS: dict[str, type] = {"rule": RuleScorer, "model": RewardModelScorer, "http": HTTPScorer}


def make_scorer(cfg: RewardConfig, trust_remote_code: bool = False) -> Scorer:
    """The scorer `cfg.kind` names, built from its config group."""
    return SCORERS[cfg.kind].from_config(cfg, trust_remote_code)


@dataclass
class ScoreReport:
    """What one `RewardActor.score` call hands back."""

    scored: list[ScoredCandidate]  # finite scores only, in input order
    n_failed: int  # candidates dropped (never trained on)
    failures: dict[str, int]  # reason -> count: "nan", "inf", "non_numeric", "wrong_count", "error: <Type>"
    seconds: float = 0.0  # time the scorer spent on this call (not queueing)


class RewardActor:
    """The reward role: scores candidates in batches, drops and counts what fails."""

    def __init__(self, cfg: RewardConfig, trust_remote_code: bool = False, scorer: Scorer | None = None):
        self.cfg = cfg
        self.scorer = scorer if scorer is not None else make_scorer(cfg, trust_remote_code)  # injectable for tests

    def ping(self) -> int:
        return os.getpid()

    def score(self, prompts: Mapping[str, Prompt], candidates: Sequence[Candidate], iteration: int) -> ScoreReport:
        """Score `candidates` against their prompts (keyed by uid); see the module docstring."""
        unknown = sorted({c.prompt_uid for c in candidates} - set(prompts))
        if unknown:
            raise ValueError(
                f"{len(unknown)} candidates' prompt uids are not among the {len(prompts)} prompts "
                f"given (e.g. {unknown[0]!r}): pass the prompts the candidates were sampled for"
            )
        scored, failures, first_error, start_s = [], Counter(), None, time.perf_counter()
        for start in range(0, len(candidates), self.cfg.batch_size):
            batch = candidates[start : start + self.cfg.batch_size]
            try:
                scores = self.scorer.score([prompts[c.prompt_uid] for c in batch], [c.text for c in batch])
            except Exception as err:  # one bad batch costs its candidates, not the run
                failures[f"error: {type(err).__name__}"] += len(batch)
                first_error = first_error or err
                continue
            if len(scores) != len(batch):
                failures["wrong_count"] += len(batch)
                continue
            for cand, raw in zip(batch, scores):
                value, reason = _check(raw)
                if reason:
                    failures[reason] += 1
                else:
                    scored.append(ScoredCandidate(candidate=cand, reward=value, iteration=iteration))
        report = self._report(scored, dict(failures), first_error, len(candidates), iteration)
        report.seconds = time.perf_counter() - start_s
        return report

    def _report(self, scored, failures, first_error, total, iteration) -> ScoreReport:
        n_failed = sum(failures.values())
        if total and n_failed == total:
            where = f"iteration {iteration}" if iteration >= 0 else "the held-out evaluation"
            raise ScorerError(
                f"all {total} candidates of {where} failed to score ({failures}); "
                f"first error: {first_error!r}. The reward.kind = {self.cfg.kind} scorer looks "
                f"broken: fix it (the first error says how) and run again; nothing unscored "
                f"was trained on"
            ) from first_error
        if n_failed:
            log.warning(
                "iteration %d: %d/%d candidates failed to score and are dropped: %s%s",
                iteration,
                n_failed,
                total,
                failures,
                f" (first error: {first_error})" if first_error else "",
            )
        return ScoreReport(scored=scored, n_failed=n_failed, failures=failures)


def _check(raw: object) -> tuple[float, str]:
    """(value, "") for a finite number, else (value, reason) with reason "nan", "inf" or "non_numeric"."""
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan, "non_numeric"
    if math.isnan(value):
        return value, "nan"
    return (value, "inf") if math.isinf(value) else (value, "")
