"""Where an iteration's candidates come from: sampled when the iteration starts (loop.mode = sync),
or ahead of time while the learner trains (loop.mode = async).

    sync    iteration s: generate+score (policy s) -> lists -> train -> sync weights s+1 -> eval
    async   iteration s: take the rollout sampled ahead -> lists -> train  ─┐ at the same time
            a producer thread: generate+score iteration s+1's prompts ──────┘ with the weights the
            generators hold (policy s) -> wait for both -> sync weights s+1 -> eval

In async mode iteration s trains on candidates of policy s-1 against the reference the learner
has (the iteration-start policy s, or the initial one): the learner computes the reference
log-probs with its own forward pass, never from the sampling policy. LARPO's memory already
trains on candidates of earlier policies; `loop.max_staleness` bounds how far a fresh one may lag.

The producer is the only user of the generators between the driver's weight syncs and held-out
evaluations, which take them with `generators()`: a rollout is never interrupted, and a sync waits
for the one in flight. With max_staleness = 1 the producer runs one rollout ahead and starts it
only when the driver takes the previous one, so rollout s+1 is always sampled by policy s and an
async run is as reproducible as a sync one, resumes included (the rollout sampled ahead is kept in
the checkpoint). With more, the producer runs up to that many rollouts ahead; which weights
sample a rollout then depends on timing, and a rollout in flight at a checkpoint is sampled again
after a resume.

No Ray here: `produce(iteration, cursor)` is the driver's generate-and-score step, whatever runs it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from larpo_ray.config import ConfigError
from larpo_ray.lists import candidate_from_record, scored_from_record, scored_record
from larpo_ray.topology import Rollout
from larpo_ray.types import Prompt


@dataclasses.dataclass
class Drawn:
    """One iteration's rollout: every prompt drawn from the stream, the prompts to build lists
    from (dynamic sampling keeps those with a pair), draw counts, its own wall time, and the
    weight version the generators held when it started."""

    iteration: int
    rollout: Rollout
    drawn: list[Prompt]
    prompts: list[Prompt]
    draws: dict[str, float]
    seconds: float
    version: int

    def to_json(self) -> dict[str, Any]:
        r = self.rollout
        return {
            "iteration": self.iteration,
            "drawn": [p.uid for p in self.drawn],
            "prompts": [p.uid for p in self.prompts],
            "draws": self.draws,
            "seconds": self.seconds,
            "version": self.version,
            "rollout": {
                **{k: v for k, v in vars(r).items() if k not in ("scored", "candidates")},
                "scored": [scored_record(sc) for sc in r.scored],
                "candidates": [dataclasses.asdict(c) for c in r.candidates],
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], prompts: Mapping[str, Prompt]) -> Drawn:
        """Inverse of `to_json`; `prompts` by uid (the training split)."""
        r = dict(data["rollout"])
        rollout = Rollout(
            **{k: v for k, v in r.items() if k not in ("scored", "candidates")},
            scored=[scored_from_record(x) for x in r["scored"]],
            candidates=[candidate_from_record(x) for x in r["candidates"]],
        )
        try:
            return cls(
                iteration=data["iteration"],
                rollout=rollout,
                drawn=[prompts[u] for u in data["drawn"]],
                prompts=[prompts[u] for u in data["prompts"]],
                draws=data["draws"],
                seconds=data["seconds"],
                version=data["version"],
            )
        except KeyError as err:
            raise ConfigError(
                f"the checkpoint's rollout for iteration {data['iteration']} has prompt {err} that the training data "
                f"no longer holds: resume with the original data or start a new run"
            ) from None


Produce = Callable[[int, int], Drawn]  # (iteration, stream cursor) -> its rollout


class Inline:
    """loop.mode = sync: each iteration's rollout is sampled when the driver takes it (after any
    rollouts a checkpoint of an async run left pending)."""

    def __init__(self, produce: Produce, cursor: int, pending: Sequence[Drawn] = ()) -> None:
        self._produce, self._cursor, self._pending = produce, cursor, collections.deque(pending)
        self._cursor += sum(len(d.drawn) for d in self._pending)

    def take(self, iteration: int) -> Drawn:
        if self._pending:
            return _expect(self._pending.popleft(), iteration)
        drawn = self._produce(iteration, self._cursor)
        self._cursor += len(drawn.drawn)
        return drawn

    def generators(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def pending(self) -> list[Drawn]:
        return list(self._pending)

    def close(self, wait: bool = True) -> None:
        pass


class Prefetch:
    """loop.mode = async: a producer thread samples rollouts for iterations `start`.. `end`-1 up
    to `depth` ahead of the one the driver takes; see the module docstring for the rules."""

    def __init__(
        self, produce: Produce, start: int, end: int, cursor: int, depth: int, pending: Sequence[Drawn] = ()
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._produce, self._end, self._depth = produce, end, depth
        self._ready: collections.deque[Drawn] = collections.deque(pending)
        self._next = start + len(self._ready)
        self._cursor = cursor + sum(len(d.drawn) for d in self._ready)
        self._cond = threading.Condition()
        self._generators = threading.Lock()  # held by a rollout in flight, a weight sync or an eval
        self._wanted = 0  # driver calls waiting for the generators: the producer starts nothing new
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="larpo-rollout-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or (len(self._ready) < self._depth and not self._wanted))
                    if self._stop or self._next >= self._end:
                        return
                    iteration, cursor = self._next, self._cursor
                with self._generators:
                    drawn = self._produce(iteration, cursor)
                    with self._cond:  # still holding the generators: a sync after this sees it ready
                        self._ready.append(drawn)
                        self._next, self._cursor = iteration + 1, cursor + len(drawn.drawn)
                        self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 (handed to the driver at its next take)
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def take(self, iteration: int) -> Drawn:
        """The rollout of `iteration`, waiting for it if it is not ready; the producer's error, if
        it failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._error is not None or not self._thread.is_alive())
            if self._ready:
                drawn = self._ready.popleft()
                self._cond.notify_all()
                return _expect(drawn, iteration)
            if self._error is not None:
                raise self._error
        raise RuntimeError(f"the rollout producer stopped before iteration {iteration + 1}'s rollout")

    @contextlib.contextmanager
    def generators(self) -> Iterator[None]:
        """The generators to the caller alone (weight sync, evaluation): waits for the rollout in
        flight, and the producer starts no new one until the caller is done."""
        with self._cond:
            self._wanted += 1
        try:
            with self._generators:
                yield
        finally:
            with self._cond:
                self._wanted -= 1
                self._cond.notify_all()

    def pending(self) -> list[Drawn]:
        """The rollouts sampled ahead and not taken yet (what a checkpoint keeps)."""
        with self._cond:
            return list(self._ready)

    def close(self, wait: bool = True) -> None:
        """Stop the producer; with `wait`, until the rollout in flight (if any) finished, so the
        generators are free for whoever comes next."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if wait:
            self._thread.join()


def _expect(drawn: Drawn, iteration: int) -> Drawn:
    if drawn.iteration != iteration:
        raise RuntimeError(f"rollout of iteration {drawn.iteration + 1} where iteration {iteration + 1}'s was due")
    return drawn


def rollouts(cfg, produce: Produce, start: int, cursor: int, pending: Sequence[Drawn] = ()) -> Inline | Prefetch:
    """The rollout source loop.mode asks for, from iteration `start` and stream position `cursor`."""
    if cfg.loop.mode == "async":
        return Prefetch(produce, start, cfg.loop.iterations, cursor, cfg.loop.max_staleness, pending)
    return Inline(produce, cursor, pending)
