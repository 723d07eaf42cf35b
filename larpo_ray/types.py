"""Messages that cross process boundaries, defined once.

Flow of one LARPO iteration (Algorithm 1):
    Prompt --generator--> Candidate --scorer--> ScoredCandidate --lists--> RankedList --learner-->
    TrainResult
Plain dataclasses of Python scalars and lists so they pickle cheaply through Ray and read well in
tests; token ids are lists of ints (tensors are built by the learner's batch builder).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prompt:
    """One query x: the chat-templated text the engine sees and what the scorer needs."""

    uid: str  # stable id of the prompt (hash of its content); keys the candidate memory
    text: str  # prompt after the chat template, ready for generation
    token_ids: tuple[int, ...]  # `text` tokenized (no special tokens added twice)
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) before templating, for judges
    answer: str | None = None  # reference answer for verifiable tasks; None otherwise

    @property
    def question(self) -> str:
        """What a reranker that reads the prompt is shown: the last user turn (the templated text
        when the prompt has no messages, e.g. a bare-text prompt column)."""
        users = [content for role, content in self.messages if role == "user"]
        return users[-1] if users else self.text


@dataclass(frozen=True)
class Candidate:
    """One sampled response y ~ pi(.|x)."""

    prompt_uid: str
    token_ids: tuple[int, ...]  # response tokens only, EOS included when the engine stopped on it
    text: str  # decoded response (special tokens skipped)
    sample_logps: tuple[float, ...]  # per-token log-probs under the sampling policy
    temperature: float
    policy_version: int  # weight version of the generator that sampled it
    finish_reason: str = "stop"  # "stop" (EOS / stop string) or "length"


@dataclass(frozen=True)
class ScoredCandidate:
    """A candidate with the reranker's score r(x, y)."""

    candidate: Candidate
    reward: float  # finite; failed / NaN scores never become ScoredCandidates
    iteration: int  # LARPO iteration s that sampled it (memory windows key on this)


@dataclass(frozen=True)
class RankedList:
    """One prompt's training list, best first. `labels` are what the loss orders by.

    With the full-order rules labels equal the rewards; with the partition rule positives and
    negatives get two levels so order within each group is not trained (docs/algorithm.md, list rules).
    """

    prompt: Prompt
    candidates: tuple[ScoredCandidate, ...]
    labels: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.candidates):
            raise ValueError(
                f"RankedList for prompt {self.prompt.uid}: {len(self.candidates)} candidates but "
                f"{len(self.labels)} labels; give one label per candidate"
            )


@dataclass
class TrainResult:
    """What the learner hands back after one iteration's training."""

    policy_version: int
    metrics: dict[str, float]  # iteration means: loss, reward_accuracy, margin, ...
    step_metrics: list[dict[str, float]] = field(default_factory=list)  # one dict per optimizer step


class ScorerError(RuntimeError):
    """A scorer that cannot produce scores (down, misconfigured, returning garbage)."""


@dataclass
class GroupScores:
    """What a relative reranker (actors.reward.GroupScorer) answers for one prompt's responses."""

    scores: list[float]  # one per response, higher is better; equal scores are a tie
    calls: int  # model forwards (pairwise: ordered pairs) or judge answers (listwise, re-asks included)
