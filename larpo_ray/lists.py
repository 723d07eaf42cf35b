"""Candidate lists: from scored candidates to each prompt's training list (Algorithm 1, "rank" and
"merge(D_0..D_s)").

Two parts:
- List rules (`LIST_RULES`): pure functions that pick and order one prompt's candidates, best
  first, with the labels the loss orders by (docs/algorithm.md, "How lists were built in the paper").
- `CandidateMemory`: stores scored candidates per prompt and iteration and merges a window of
  iterations into one pool that is re-ranked together (docs/algorithm.md, "Keeping earlier iterations'
  responses in the pool and re-ranking helps").

Reference log-probs are never stored here. The reference is the policy at the start of the
iteration (docs/algorithm.md, Algorithm 1: pi_beta <- pi_s), so a response sampled two iterations ago has a
stale reference log-prob; the learner recomputes log pi_ref for every pooled response.

Ties carry no order (docs/algorithm.md, "The losses"): a list is returned only if it has at least one
strictly ordered pair; prompts without one are counted in `ListStats.n_no_pair`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from larpo_ray.types import Candidate, Prompt, RankedList, ScoredCandidate

Selection = tuple[list[ScoredCandidate], list[float]]

# Memory windows (lists.memory): the oldest iteration each one pools at iteration s, Algorithm 1's merge(D_0..D_s).
WINDOWS: dict[str, Callable[[int], int]] = {"current": lambda s: s, "previous": lambda s: s - 1, "all": lambda s: 0}


def _ranked(candidates: Iterable[ScoredCandidate]) -> list[ScoredCandidate]:
    """Best first by reward; equal rewards put the newer iteration first (more on-policy), then
    token ids, so the order never depends on arrival order."""
    return sorted(candidates, key=lambda c: (-c.reward, -c.iteration, c.candidate.token_ids))


def top_bottom(
    candidates: list[ScoredCandidate],
    *,
    top: int,
    bottom: int,
    keep_order: bool,
    rng: random.Random,
    correct_threshold: float,
) -> Selection | None:
    """Top-`top` positives and bottom-`bottom` negatives by reward (disjoint; with fewer than
    top + bottom candidates, all are used: everything below the top-`top` is a negative).

    keep_order=True: labels are the rewards (LambdaRank / ListMLE "top-2 + bottom-2 ordered by
    reward"). keep_order=False: labels 1.0 / 0.0 (contrastive "top-1 vs bottom-3"), see
    `_strict_split` for how ties across the split are dropped.
    """
    ranked = _ranked(candidates)
    pos, neg = ranked[:top], ranked[top:][-bottom:]
    if keep_order:
        chosen = pos + neg
        return chosen, [c.reward for c in chosen]
    split = _strict_split(pos, neg)
    if split is None:
        return None
    pos, neg = split
    return pos + neg, [1.0] * len(pos) + [0.0] * len(neg)


def _strict_split(
    pos: list[ScoredCandidate], neg: list[ScoredCandidate]
) -> tuple[list[ScoredCandidate], list[ScoredCandidate]] | None:
    """Make every (positive, negative) pair strictly better by raw reward, or return None.

    Both lists come from one best-first ranking, so the only violation is a tie at the split.
    Rule: (1) drop negatives whose reward >= the lowest positive's (a response tied with a
    positive is not a negative); (2) if that leaves no negative, keep the negatives and drop
    instead the positives whose reward <= the highest negative's; (3) if neither side survives,
    no list. E.g. rewards [1, 1, 0, 0], top 1 / bottom 3 -> [1] vs [0, 0];
    [5, 0, 0, 0], top 2 / bottom 2 -> [5] vs [0, 0].
    """
    if not pos or not neg:
        return None
    lowest_pos, highest_neg = pos[-1].reward, neg[0].reward
    kept_neg = [c for c in neg if c.reward < lowest_pos]
    if kept_neg:
        return pos, kept_neg
    kept_pos = [c for c in pos if c.reward > highest_neg]
    return (kept_pos, neg) if kept_pos else None


def best_worst(
    candidates: list[ScoredCandidate],
    *,
    top: int,
    bottom: int,
    keep_order: bool,
    rng: random.Random,
    correct_threshold: float,
) -> Selection | None:
    """Top-1 vs bottom-1 by reward (paper's pairwise / DPO setting); ignores top/bottom."""
    return top_bottom(candidates, top=1, bottom=1, keep_order=True, rng=rng, correct_threshold=correct_threshold)


def correct_incorrect(
    candidates: list[ScoredCandidate],
    *,
    top: int,
    bottom: int,
    keep_order: bool,
    rng: random.Random,
    correct_threshold: float,
) -> Selection | None:
    """One random correct vs one random incorrect response (binary rule-based reward, docs/algorithm.md
    math setting). Correct means reward >= correct_threshold (default 1.0: the verifier gives 1.0
    for a matching final answer). Labels 1.0 / 0.0; None unless both kinds exist."""
    ranked = _ranked(candidates)  # fixed order before sampling, so only the seed matters
    correct = [c for c in ranked if c.reward >= correct_threshold]
    incorrect = [c for c in ranked if c.reward < correct_threshold]
    if not correct or not incorrect:
        return None
    return [rng.choice(correct), rng.choice(incorrect)], [1.0, 0.0]


def all_candidates(
    candidates: list[ScoredCandidate],
    *,
    top: int,
    bottom: int,
    keep_order: bool,
    rng: random.Random,
    correct_threshold: float,
) -> Selection | None:
    """The whole list in reward order, labels = rewards (objective study: "the whole list of 4")."""
    ranked = _ranked(candidates)
    return ranked, [c.reward for c in ranked]


LIST_RULES: dict[str, Callable[..., Selection | None]] = {
    "top_bottom": top_bottom,
    "best_worst": best_worst,
    "correct_incorrect": correct_incorrect,
    "all": all_candidates,
}
PAIR_RULES = ("best_worst", "correct_incorrect")  # rules that keep 2 candidates: no list for a listwise loss


@dataclass
class ListStats:
    """Counts of one build, for logging (`dataclasses.asdict` gives a metrics dict)."""

    n_prompts: int = 0  # prompts asked for
    n_lists: int = 0  # lists returned
    n_no_pair: int = 0  # prompts with no strictly ordered pair (all tied, too few, no correct)
    n_candidates: int = 0  # pooled candidates considered, after dedup and cap
    n_duplicates_removed: int = 0  # identical responses dropped by dedup
    mean_list_len: float = 0.0  # mean length of the returned lists (0.0 if none)


def prompt_rng(seed: int, iteration: int, prompt_uid: str) -> random.Random:
    """RNG for one prompt's list, from a stable hash (not Python's salted hash()), so a list
    does not depend on prompt order, process or machine."""
    digest = hashlib.sha256(f"{seed}:{iteration}:{prompt_uid}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class CandidateMemory:
    """Scored candidates per prompt and iteration; merges a window of iterations per prompt.

    window: "current" (this iteration only), "previous" (this + the previous one), "all" (every
    iteration up to this one). max_pool: per-prompt cap after merging (None = no cap). When
    capping, newer iterations fill the pool first; inside the iteration that overflows, the
    candidates are taken from the reward extremes inwards (best, worst, 2nd best, 2nd worst, ...):
    those are what top/bottom rules select and they keep both correct and incorrect answers when
    both exist. dedup: identical response token ids keep only the newest copy.
    """

    def __init__(self, window: str = "current", max_pool: int | None = None, dedup: bool = True):
        if window not in WINDOWS:
            raise ValueError(f"unknown memory window {window!r}; allowed: {', '.join(WINDOWS)}")
        if max_pool is not None and max_pool < 2:
            raise ValueError(f"max_pool={max_pool}: a list needs >= 2 candidates; use >= 2 or None")
        self.window, self.max_pool, self.dedup = window, max_pool, dedup
        self._store: dict[int, dict[str, list[ScoredCandidate]]] = {}  # iteration -> uid -> cands

    def add(self, scored: Iterable[ScoredCandidate]) -> None:
        """Store candidates under their prompt uid and the iteration that sampled them."""
        for c in scored:
            self._store.setdefault(c.iteration, {}).setdefault(c.candidate.prompt_uid, []).append(c)

    def _oldest(self, iteration: int) -> int:
        """Oldest iteration the window covers at `iteration` (Algorithm 1's merge(D_0..D_s))."""
        return WINDOWS[self.window](iteration)

    def _iterations(self, iteration: int) -> list[int]:
        """Stored iterations the window covers at `iteration`, newest first."""
        oldest = self._oldest(iteration)
        return sorted((s for s in self._store if oldest <= s <= iteration), reverse=True)

    def pool(self, prompt_uid: str, iteration: int) -> tuple[list[ScoredCandidate], int]:
        """The prompt's merged, de-duplicated and capped candidates at `iteration` (newest
        iteration first), and the number of duplicates dropped."""
        pool: list[ScoredCandidate] = []
        seen: set[tuple[int, ...]] = set()
        n_dup = 0
        for s in self._iterations(iteration):
            fresh = []
            for c in self._store[s].get(prompt_uid, []):
                if self.dedup and c.candidate.token_ids in seen:
                    n_dup += 1  # newest copy already kept: iterations are visited newest first
                    continue
                seen.add(c.candidate.token_ids)
                fresh.append(c)
            room = len(fresh) if self.max_pool is None else self.max_pool - len(pool)
            pool.extend(fresh if len(fresh) <= room else _extremes(fresh, room))
        return pool, n_dup

    def build_lists(
        self,
        prompts: Sequence[Prompt],
        iteration: int,
        rule: str,
        top: int = 1,
        bottom: int = 1,
        keep_order: bool = True,
        correct_threshold: float = 1.0,
        seed: int = 0,
    ) -> tuple[list[RankedList], ListStats]:
        """Re-rank each prompt's pooled candidates together and apply `rule` (see LIST_RULES)."""
        if rule not in LIST_RULES:
            raise ValueError(f"unknown list rule {rule!r}; allowed: {', '.join(LIST_RULES)}")
        if top < 1 or bottom < 1:
            raise ValueError(f"top={top}, bottom={bottom}: both must be >= 1")
        rule_fn, stats, lists = LIST_RULES[rule], ListStats(n_prompts=len(prompts)), []
        for prompt in prompts:
            pool, n_dup = self.pool(prompt.uid, iteration)
            stats.n_candidates += len(pool)
            stats.n_duplicates_removed += n_dup
            chosen = rule_fn(
                pool,
                top=top,
                bottom=bottom,
                keep_order=keep_order,
                rng=prompt_rng(seed, iteration, prompt.uid),
                correct_threshold=correct_threshold,
            )
            # Ties are not an order (docs/algorithm.md, "The losses"): need one strictly ordered pair.
            if chosen is None or len(chosen[1]) < 2 or max(chosen[1]) == min(chosen[1]):
                stats.n_no_pair += 1
                continue
            lists.append(RankedList(prompt, tuple(chosen[0]), tuple(chosen[1])))
        stats.n_lists = len(lists)
        stats.mean_list_len = sum(len(r.candidates) for r in lists) / len(lists) if lists else 0.0
        return lists, stats

    def prune(self, iteration: int) -> int:
        """Drop iterations no window needs from `iteration` on; returns candidates dropped."""
        old = [s for s in self._store if s < self._oldest(iteration)]
        n = sum(len(cs) for s in old for cs in self._store[s].values())
        for s in old:
            del self._store[s]
        return n

    def state_dict(self) -> dict:
        """Plain JSON types (for checkpoints): a flat list of candidate records."""
        records = [scored_record(c) for s in sorted(self._store) for cs in self._store[s].values() for c in cs]
        return {"format": 1, "candidates": records}

    def load_state_dict(self, state: dict) -> None:
        """Replace the stored candidates with those of `state_dict()`; config stays as built."""
        if state.get("format") != 1:
            raise ValueError(f"unknown CandidateMemory state format {state.get('format')!r}; expected 1")
        self._store = {}
        self.add(scored_from_record(r) for r in state["candidates"])


def _extremes(candidates: list[ScoredCandidate], n: int) -> list[ScoredCandidate]:
    """`n` candidates from the reward extremes inwards: best, worst, 2nd best, 2nd worst, ..."""
    ranked = _ranked(candidates)
    order = [ranked[i // 2] if i % 2 == 0 else ranked[-1 - i // 2] for i in range(len(ranked))]
    return order[:n]


def scored_record(sc: ScoredCandidate) -> dict:
    """A scored candidate as plain JSON types (checkpoints: the memory, async mode's pending rollouts)."""
    return {**dataclasses.asdict(sc.candidate), "reward": sc.reward, "iteration": sc.iteration}


def candidate_from_record(r: dict) -> Candidate:
    """Inverse of `dataclasses.asdict(candidate)` after JSON (lists back to tuples)."""
    fields = {f.name: r[f.name] for f in dataclasses.fields(Candidate)}
    fields["token_ids"] = tuple(fields["token_ids"])
    fields["sample_logps"] = tuple(fields["sample_logps"])
    return Candidate(**fields)


def scored_from_record(r: dict) -> ScoredCandidate:
    """Inverse of `scored_record`."""
    return ScoredCandidate(candidate_from_record(r), reward=r["reward"], iteration=r["iteration"])
