"""The reward role: the reranker r(x, y) that scores sampled candidates (LARPO Algorithm 1, step 3).

In retrieval terms the reranker can be pointwise, pairwise or listwise. Pointwise scorers sit
behind `score(prompts, responses) -> list[float]` (one score per (prompt, response) pair):

- `RuleScorer`: the verifiable-task rule (final-answer match, `larpo_ray.tasks.REWARDS`).
- `RewardModelScorer`: a sequence-classification reward model with a scalar head (hub id or folder).
- `HTTPScorer` (actors/http_scorer.py): a remote scoring service; the protocol is in its docstring.

Relative rerankers (`GroupScorer`) rank one prompt's responses as a list, `rank(prompt, responses)
-> GroupScores`; their scores order that list and mean nothing across prompts:

- `PairwiseScorer` (actors/pairwise.py): PairRM, every pair in both orders.
- `ListwiseJudgeScorer` (actors/listwise.py): an LLM judge over an OpenAI-compatible endpoint.

`RewardActor` wraps a scorer for the driver. Failure semantics: a score that is NaN, inf or not a
number, a batch (relative: a list) whose scorer raises, or one with the wrong number of scores is
counted in the `ScoreReport` (by reason) and dropped, never trained on; the run goes on. If every
candidate of a call fails, the scorer is broken rather than unlucky, so the actor raises
`ScorerError`.

Plain classes, no Ray (Ray is applied where the topology is built); torch, transformers and
requests are imported only by the scorers that need them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from actors.http_scorer import HTTPScorer
from actors.listwise import ListwiseJudgeScorer
from actors.pairwise import PairwiseScorer
from larpo_ray import tasks
from larpo_ray.config import RewardConfig
from larpo_ray.models import require_safetensors
from larpo_ray.tasks import REWARDS
from larpo_ray.types import Candidate, GroupScores, Prompt, ScoredCandidate, ScorerError

log = logging.getLogger(__name__)


class Scorer(Protocol):
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response) pair; may contain NaN/inf or raise."""
        ...


class GroupScorer(Protocol):
    """A reranker whose scores compare the responses to one prompt (pairwise, listwise): they
    order that list and mean nothing across prompts or across calls."""

    def rank(self, prompt: Prompt, responses: Sequence[str]) -> GroupScores:
        """Scores for >= 2 responses to `prompt`; raises when it cannot rank them."""
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


# Keys: larpo_ray.choices.SCORER_KINDS, the names reward.kind accepts (tests/test_config.py checks they agree).
SCORERS: dict[str, type] = {
    "rule": RuleScorer,
    "model": RewardModelScorer,
    "http": HTTPScorer,
    "pairwise": PairwiseScorer,
    "listwise": ListwiseJudgeScorer,
}


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
    calls: int = 0  # relative rerankers: pair forwards (pairwise) or judge requests (listwise)
    lists: int = 0  # relative rerankers: prompts' lists ranked (each a group of >= 2 responses)


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
        if hasattr(self.scorer, "rank"):
            return self._score_lists(prompts, candidates, iteration)
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

    def _score_lists(
        self, prompts: Mapping[str, Prompt], candidates: Sequence[Candidate], iteration: int
    ) -> ScoreReport:
        """A relative reranker ranks each prompt's candidates as one list (the candidates of a prompt
        arrive in one call: a generator batch holds all k). A lone candidate has nothing to be
        compared with and scores 0.0; a list the reranker cannot rank is dropped whole."""
        groups: dict[str, list[Candidate]] = {}
        for c in candidates:
            groups.setdefault(c.prompt_uid, []).append(c)
        scored, failures, first_error, start_s = [], Counter(), None, time.perf_counter()
        calls = lists = 0
        for uid, group in groups.items():
            if len(group) == 1:
                scored.append(ScoredCandidate(candidate=group[0], reward=0.0, iteration=iteration))
                continue
            try:
                ranked = self.scorer.rank(prompts[uid], [c.text for c in group])
            except Exception as err:  # one list the reranker cannot rank costs that list, not the run
                failures[f"error: {type(err).__name__}"] += len(group)
                first_error = first_error or err
                continue
            calls, lists = calls + ranked.calls, lists + 1
            if len(ranked.scores) != len(group):
                failures["wrong_count"] += len(group)
                continue
            checked = [_check(raw) for raw in ranked.scores]
            bad = Counter(reason for _, reason in checked if reason)
            if bad:  # a list with a hole has no order to train on
                failures.update({reason: len(group) for reason in bad})
                continue
            scored += [ScoredCandidate(candidate=c, reward=v, iteration=iteration) for c, (v, _) in zip(group, checked)]
        report = self._report(scored, dict(failures), first_error, len(candidates), iteration)
        report.seconds, report.calls, report.lists = time.perf_counter() - start_s, calls, lists
        return report

    def compare(
        self, prompts: Sequence[Prompt], responses: Sequence[str], baselines: Sequence[str]
    ) -> list[float | None]:
        """A relative reranker's margin of each response over its baseline (held-out win-rate
        against the initial policy): > 0 the response wins, 0 a tie (identical texts tie without a
        call), None when the reranker could not compare them (left out of the win-rate)."""
        out: list[float | None] = []
        for prompt, response, baseline in zip(prompts, responses, baselines, strict=True):
            if response == baseline:
                out.append(0.0)
                continue
            try:
                a, b = self.scorer.rank(prompt, [response, baseline]).scores
                value, reason = _check(float(a) - float(b))
            except Exception as err:
                value, reason = math.nan, f"error: {err!r}"
            if reason:
                log.warning("held-out comparison of prompt %s failed and is left out: %s", prompt.uid, reason)
            out.append(None if reason else value)
        return out

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
