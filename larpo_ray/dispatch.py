"""One rollout's generate and score calls over the runtime's actors (larpo_ray/topology.py
`RayRuntime.rollout`), with fault handling: re-dispatch, waiting for restarts, killing hung calls,
re-loading weights. Which actor holds a slot and how often it died is the `Fleet`'s
(larpo_ray/fleet.py); what is kept here lives for one rollout.

Prompt batches go to the first generator with room, not round-robin: a generator holds at most
`GENERATOR_DEPTH` calls (one running, one queued behind it so it never idles between calls), so one
that drew slow batches gets fewer instead of becoming the straggler. Which generator runs a batch
does not change its candidates: their seeds derive from (seed, prompt, slot).
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from larpo_ray.config import FaultsConfig
from larpo_ray.fleet import Fleet
from larpo_ray.types import Candidate, Prompt

POLL_S = 1.0  # how often a rollout checks for hung actors
RESTART_BACKOFF_S = 2.0  # wait before calling an actor Ray is restarting again
GENERATOR_DEPTH = 2  # calls a generator may hold while more batches wait than there are generators

Outcome = Literal["idle", "actor_down", "stale_weights", "generated", "scored"]  # Dispatcher.next_outcome


@dataclass(frozen=True)
class _Call:
    """One generate or score call in flight: which actor slot runs it, for which batch, and the
    slot's incarnation when it was sent (a failure of a replaced actor is not the new one's)."""

    role: str
    slot: int
    batch: int
    cands: list[Candidate] | None  # a score call's candidates
    incarnation: int


class Dispatcher:
    """One rollout: `generate(b)` queues each prompt batch, `results()` sends them to generators as
    they have room and yields the scores."""

    def __init__(
        self,
        fleet: Fleet,
        faults: FaultsConfig,
        log_file: Callable[[str, int], str],
        work: list[list[Prompt]],
        args: tuple,
        iteration: int,
    ) -> None:
        """`work`: the prompt batches; `args`: generate's (temperatures, max_new_tokens, seed);
        `log_file(role, slot)`: where an actor's output goes, for error messages."""
        self.fleet, self.faults_cfg, self.log_file, self.work = fleet, faults, log_file, work
        self.args, self.iteration = args, iteration
        self.calls: dict[object, _Call] = {}  # ObjectRef -> its call
        self.load: Counter[tuple[str, int]] = Counter()  # (role, slot) -> its calls in flight
        self.queue: list[tuple[int, int | None]] = []  # (batch, slot to avoid) not yet sent, oldest first
        self.attempts = [0] * len(work)
        self.busy_since: dict[tuple[str, int], float] = {}  # (role, slot) -> start of its current call
        self.version = self.fleet.version  # what every generator must answer with
        self.down: set[tuple[str, int]] = set()  # slots whose last call failed: their death is counted
        self.waiting: list[tuple[float, _Call]] = []  # (due time, call) whose actor is restarting
        self.unavailable_since: dict[int, float] = {}  # batch -> first time its actor was restarting
        self.faults: dict[str, int] = {}
        self.next = {"generator": 0, "reward": 0}

    def pick(self, role: str, avoid: int | None = None) -> int:
        """Round-robin for first calls; after a failure the least busy other actor (reward calls:
        batches to generate go by `fill`)."""
        n = len(self.fleet.actors(role))
        if avoid is None:
            i = self.next[role] % n
            self.next[role] += 1
            return i
        return min(range(n), key=lambda i: (i == avoid and n > 1, self.load[(role, i)]))

    def fill(self) -> None:
        """Send queued batches, oldest first, to the least busy generators with room. A second call
        is queued on a generator only while more batches wait than there are generators: near the
        end it would commit a batch to a generator that may free up after another one."""
        n = len(self.fleet.actors("generator"))
        while self.queue:
            depth = GENERATOR_DEPTH if len(self.queue) > n else 1
            room = sorted((self.load[("generator", i)], i) for i in range(n) if self.load[("generator", i)] < depth)
            for j, (b, avoid) in enumerate(self.queue):
                i = next((i for _, i in room if i != avoid or n == 1), None)
                if i is not None:
                    del self.queue[j]
                    self.submit("generator", i, b)
                    break
            else:
                return  # no room, or only on the generators these batches must avoid

    def submit(self, role: str, i: int, b: int, cands=None) -> None:
        actor = self.fleet.actor(role, i)
        if role == "generator":
            if self.fleet.needs_weights(i):
                version, ref = self.fleet.current_weights()
                actor.load_weights.remote(version, ref)  # ordered before the generate below
                self.fleet.loaded(i, version)
            ref = actor.generate.remote(self.work[b], *self.args)
        else:
            ref = actor.score.remote({p.uid: p for p in self.work[b]}, cands, self.iteration)
        self.busy_since.setdefault((role, i), time.monotonic())
        self.calls[ref] = _Call(role, i, b, cands, self.fleet.incarnation(role, i))
        self.load[(role, i)] += 1

    def generate(self, b: int) -> None:
        """Queue batch b; `results()` sends it when a generator has room."""
        self.queue.append((b, None))

    def results(self, on_batch):
        """Yield (batch index, candidates, ScoreReport) for every batch, in completion order: each
        turn acts on what the next finished call came to (`next_outcome`)."""
        done: set[int] = set()
        while self.calls or self.waiting or self.queue:
            self.resubmit_due()
            self.fill()
            call, outcome, value = self.next_outcome()
            if outcome == "idle":
                self.kill_hung()
            elif outcome == "actor_down":
                self.actor_failed(call, value)
            elif outcome == "stale_weights":
                self.count("generator_stale_weights")
                self.fleet.mark_stale(call.slot)
                self.retry(call, value)
            elif outcome == "generated":
                self.submit("reward", self.pick("reward"), call.batch, value)
                if on_batch:
                    on_batch(len(self.work[call.batch]))
            elif call.batch not in done:  # "scored" (a batch scored twice counts once)
                done.add(call.batch)
                yield call.batch, call.cands, value
        if len(done) != len(self.work):  # cannot happen: every failure re-dispatches or raises
            raise RuntimeError(f"rollout finished {len(done)} of {len(self.work)} batches")

    def next_outcome(self) -> tuple[_Call | None, Outcome, object]:
        """The next call to finish within POLL_S, what it came to, and its value:
        "idle" (none finished: time to look for hung actors), "actor_down" (its actor died, is
        restarting or timed out; value: the error), "stale_weights" (a generator restarted between
        calls answered with the initial weights; value: the error to report), "generated" or
        "scored" (value: the answer). An error raised by the work itself stops the rollout."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        ready, _ = ray.wait(list(self.calls), num_returns=1, timeout=POLL_S) if self.calls else ([], [])
        if not ready:
            if not self.calls:
                time.sleep(POLL_S)
            return None, "idle", None
        call = self.calls.pop(ready[0])
        self.load[(call.role, call.slot)] -= 1
        try:
            value = ray.get(ready[0], timeout=0)
        except (RayActorError, GetTimeoutError) as err:
            return call, "actor_down", err
        self.progress(call.role, call.slot)
        self.down.discard((call.role, call.slot))
        if call.role == "reward":
            return call, "scored", value
        if any(c.policy_version != self.version for c in value):
            held = value[0].policy_version
            err = RuntimeError(f"generator {call.slot} answered with weights version {held}, expected {self.version}")
            return call, "stale_weights", err
        return call, "generated", value

    def actor_failed(self, call: _Call, err: Exception) -> None:
        """`call` failed with its actor: record the death (unless the slot's actor was replaced
        since), then send the call elsewhere, or wait for a restart when Ray says it is under way."""
        from ray.exceptions import ActorUnavailableError

        if call.incarnation == self.fleet.incarnation(call.role, call.slot):
            self.actor_down(call.role, call.slot)
        if isinstance(err, ActorUnavailableError) and self.still_patient(call.batch):
            # Ray is restarting it: the call may not have run; go elsewhere now, or wait for the
            # restart when it is the only actor, without using an attempt
            self.count(f"{call.role}_unavailable")
            alone = len(self.fleet.actors(call.role)) == 1
            self.waiting.append((time.monotonic() + RESTART_BACKOFF_S * alone, call))
        else:
            self.retry(call, err)

    def progress(self, role: str, i: int) -> None:
        """Actor (role, i) finished a call: its next call (if any) starts now."""
        if self.load[(role, i)]:
            self.busy_since[(role, i)] = time.monotonic()
        else:
            self.busy_since.pop((role, i), None)

    def kill_hung(self) -> None:
        """Kill (for a restart) every actor busy with one call for over faults.call_timeout_s."""
        import ray

        limit = self.faults_cfg.call_timeout_s
        for (role, i), since in list(self.busy_since.items()):
            if time.monotonic() - since > limit:
                self.count(f"{role}_timeouts")
                warnings.warn(
                    f"{role} actor {i} returned nothing for {limit:.0f} s "
                    f"(faults.call_timeout_s): killing it for a restart and re-dispatching its work"
                )
                ray.kill(self.fleet.actor(role, i), no_restart=False)
                self.busy_since[(role, i)] = time.monotonic()  # its calls now fail, not time out again

    def actor_down(self, role: str, i: int) -> None:
        """Actor (role, i) died (a call failed): the fleet counts the death once, however many of
        its calls fail, and replaces it past its restarts; a generator's weights are gone."""
        key = (role, i)
        if role == "generator":
            self.fleet.mark_stale(i)  # on every failure: it may have died again since its reload
        if key not in self.down:
            self.down.add(key)
            self.count(f"{role}_failures")
            if self.fleet.record_death(role, i) == "replaced":
                self.down.discard(key)
                self.count(f"{role}_replaced")
        self.progress(role, i)

    def still_patient(self, b: int) -> bool:
        """Whether batch b may keep waiting for a restarting actor (up to faults.call_timeout_s)."""
        first = self.unavailable_since.setdefault(b, time.monotonic())
        return time.monotonic() - first < self.faults_cfg.call_timeout_s

    def resubmit_due(self) -> None:
        """Send the calls that waited for a restarting actor whose wait is over."""
        now = time.monotonic()
        due = [call for when, call in self.waiting if when <= now]
        self.waiting = [(when, call) for when, call in self.waiting if when > now]
        for call in due:
            self.redispatch(call)

    def retry(self, call: _Call, err: Exception) -> None:
        """Send a failed call to another actor, unless its batch failed max_attempts times."""
        b = call.batch
        self.attempts[b] += 1
        if self.attempts[b] >= self.faults_cfg.max_attempts:
            raise RuntimeError(
                f"prompt batch {b} ({len(self.work[b])} prompts) failed "
                f"{self.attempts[b]} times on {call.role} actors (last: {type(err).__name__}: "
                f"{str(err).strip().splitlines()[0]}); raise faults.max_attempts or check "
                f"the actors' logs (last: {self.log_file(call.role, call.slot)})"
            ) from err
        self.redispatch(call)

    def redispatch(self, call: _Call) -> None:
        """Send a call to another actor of its role than its own (if there is one): a batch to
        generate goes first in the queue, to score to the least busy reward actor."""
        self.count(f"{call.role}_redispatched")
        if call.role == "generator":
            self.queue.insert(0, (call.batch, call.slot))
        else:
            self.submit("reward", self.pick("reward", avoid=call.slot), call.batch, call.cands)

    def count(self, key: str) -> None:
        self.faults[key] = self.faults.get(key, 0) + 1
