"""Fault handling of the rollout (RayRuntime: larpo_ray/dispatch.py over larpo_ray/fleet.py), with
real Ray actors.

The actors here are small stand-ins with the generator and reward interfaces (no model), so each
fault is exact and quick: a shared `Script` actor tells the n-th call to die (`os._exit`, the
process is gone as after an OOM kill), hang, or raise. What must hold after every fault: each
prompt has exactly its k candidates, scored once; a restarted generator re-loads the current
weight version before it generates; the run says what happened (`Rollout.faults`).
The same faults on the real roles (vLLM, DeepSpeed) are in tests/test_fault_injection.py.
"""

import os
import time
import warnings

import pytest

from actors.reward import ScoreReport
from larpo_ray.config import Config
from larpo_ray.topology import RayRuntime
from larpo_ray.types import Candidate, Prompt, ScoredCandidate

K = 3


class Script:
    """Counts calls per role and says what the n-th one does: "ok", "die", "hang" or "raise"."""

    def __init__(self, plan: dict[str, dict[int, str]]):
        self.plan, self.calls = plan, {}

    def next(self, role: str) -> str:
        self.calls[role] = self.calls.get(role, 0) + 1
        return self.plan.get(role, {}).get(self.calls[role], self.plan.get(role, {}).get(0, "ok"))

    def count(self, role: str) -> int:
        return self.calls.get(role, 0)


def _act(script, role: str) -> None:
    import ray

    action = ray.get(script.next.remote(role))
    if action == "die":
        os._exit(1)
    if action == "hang":
        time.sleep(3600)
    if action == "raise":
        raise ValueError(f"{role}: bad input in this batch")


class FakeGenerator:
    def __init__(self, script, delay_s: float = 0.0):
        self.script, self.version, self.loads = script, 0, 0
        self.delay_s, self.batches = delay_s, 0

    def ping(self) -> int:
        return os.getpid()

    def generate(self, batch, temperatures, max_new_tokens=None, seed=None):
        _act(self.script, "generate")
        time.sleep(self.delay_s)
        self.batches += 1
        return [
            Candidate(p.uid, (1, 2), f"{p.uid}/{j}", (-0.5, -0.5), t, self.version)
            for p in batch
            for j, t in enumerate(temperatures)
        ]

    def load_weights(self, version, weights) -> dict:
        self.version, self.loads = version, self.loads + 1
        return {"version": version, "bytes": 8, "seconds": 0.0}

    def generated(self) -> int:
        return self.batches


class FakeReward:
    def __init__(self, script):
        self.script = script

    def ping(self) -> int:
        return os.getpid()

    def score(self, by_uid, candidates, iteration) -> ScoreReport:
        _act(self.script, "score")
        return ScoreReport([ScoredCandidate(c, float(len(c.text)), iteration) for c in candidates], 0, {})


class FakeRuntime(RayRuntime):
    """The real RayRuntime (dispatch, fault handling) over the stand-in actors."""

    def __init__(self, cfg: Config, script, delays: dict[int, float] | None = None):
        self.script, self.delays = script, delays or {}  # generator slot -> seconds per batch
        super().__init__(cfg, "unused", with_learner=False)

    def _spawn(self, role: str, slot: int = 0):
        import ray

        restarts = {"max_restarts": self.cfg.faults.actor_max_restarts, "max_task_retries": 0}
        if role == "reward":
            return ray.remote(FakeReward).options(num_cpus=0, **restarts).remote(self.script)
        return ray.remote(FakeGenerator).options(num_cpus=0, **restarts).remote(self.script, self.delays.get(slot, 0.0))


@pytest.fixture(scope="module")
def ray_local():
    import sys

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a stray cluster
    yield ray
    ray.shutdown()


def make(ray_local, plan: dict, actors: int = 2, delays: dict[int, float] | None = None, **faults) -> FakeRuntime:
    cfg = Config.from_dict(
        {
            "generation": {"num_generators": actors, "batch_prompts": 2, "k": K},
            "reward": {"num_actors": actors},
            "faults": {"call_timeout_s": 5.0, "actor_max_restarts": 2, **faults},
        }
    )
    script = ray_local.remote(Script).options(num_cpus=0).remote(plan)
    return FakeRuntime(cfg, script, delays)


PROMPTS = [Prompt(f"q{i}", f"question {i}", (5, 6, 7)) for i in range(12)]  # 6 batches of 2


def assert_complete(rollout, version: int) -> None:
    """Every prompt exactly K candidates, each scored once, all from weights `version`."""
    per_prompt = {}
    for sc in rollout.scored:
        per_prompt.setdefault(sc.candidate.prompt_uid, []).append(sc.candidate.text)
    assert sorted(per_prompt) == sorted(p.uid for p in PROMPTS)
    for uid, texts in per_prompt.items():
        assert sorted(texts) == [f"{uid}/{j}" for j in range(K)]
    assert len(rollout.candidates) == len(PROMPTS) * K
    assert {sc.candidate.policy_version for sc in rollout.scored} == {version}


def test_no_fault_baseline(ray_local):
    rt = make(ray_local, {})
    try:
        out = rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
        assert_complete(out, 0)
        assert out.faults == {}
    finally:
        rt.shutdown()


def test_a_slow_generator_gets_fewer_batches(ray_local):
    """First-free dispatch: generator 1 takes 2 s a batch, generator 0 no time. Each holds at most
    two batches, so generator 1 gets its first two and generator 0 all the others (round-robin
    would give each 3 of the 6 and the rollout would wait 6 s for generator 1)."""
    rt = make(ray_local, {}, delays={1: 2.0})
    try:
        start = time.monotonic()
        out = rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
        wall = time.monotonic() - start
        assert_complete(out, 0)
        assert ray_local.get([g.generated.remote() for g in rt.generators]) == [4, 2]
        assert wall < 5.5
    finally:
        rt.shutdown()


@pytest.mark.parametrize("actors", [2, 1])
def test_generator_killed_mid_generation_is_restarted_and_reloads_weights(ray_local, actors):
    """With one generator its batches wait while Ray restarts it ("unavailable"), using no
    attempt; with two they go to the other one."""
    rt = make(ray_local, {"generate": {2: "die"}}, actors=actors)
    try:
        rt.load_weights(3, "weights-v3")
        out = rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
        assert_complete(out, 3)  # the restarted generator loaded version 3 before generating
        assert out.faults["generator_failures"] == 1 and out.faults["generator_redispatched"] >= 1
        assert ray_local.get(rt.script.count.remote("score")) == 6  # each batch scored once
    finally:
        rt.shutdown()


def test_reward_actor_killed_rescored_elsewhere(ray_local):
    rt = make(ray_local, {"score": {1: "die"}})
    try:
        out = rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
        assert_complete(out, 0)
        assert out.faults["reward_failures"] == 1  # one death, however many calls it had queued
        assert out.faults["reward_redispatched"] >= 1
        assert ray_local.get(rt.script.count.remote("generate")) == 6  # no batch generated twice
    finally:
        rt.shutdown()


def test_hung_generator_is_killed_after_the_call_timeout(ray_local):
    rt = make(ray_local, {"generate": {1: "hang"}}, call_timeout_s=3.0)
    try:
        start = time.monotonic()
        with pytest.warns(UserWarning, match="returned nothing for 3 s"):
            out = rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
        assert_complete(out, 0)
        assert out.faults["generator_timeouts"] == 1
        assert time.monotonic() - start < 60
    finally:
        rt.shutdown()


def test_actor_out_of_restarts_is_replaced(ray_local):
    rt = make(ray_local, {"generate": {1: "die"}}, actor_max_restarts=0)
    try:
        out = rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
        assert_complete(out, 0)
        assert out.faults["generator_replaced"] == 1
        assert all(ray_local.get([g.ping.remote() for g in rt.generators]))  # both slots alive
    finally:
        rt.shutdown()


def test_batch_that_always_kills_its_actor_stops_with_a_clear_error(ray_local):
    rt = make(ray_local, {"generate": {0: "die"}}, max_attempts=3)
    try:
        with pytest.raises(
            RuntimeError,
            match=r"prompt batch \d+ \(2 prompts\) failed 3 times on generator actors.*faults.max_attempts",
        ):
            rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
    finally:
        rt.shutdown()


def test_error_raised_by_the_work_is_not_retried(ray_local):
    """An exception from generate itself (e.g. a prompt too long) is the input's fault: the
    rollout stops with it at once instead of re-running it on every actor."""
    rt = make(ray_local, {"generate": {1: "raise"}})
    try:
        with pytest.raises(ValueError, match="bad input in this batch"):
            rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
        assert ray_local.get(rt.script.count.remote("generate")) <= 6
    finally:
        rt.shutdown()


def test_generator_restarted_between_rollouts_is_caught_by_its_weight_version(ray_local):
    """A generator that died while idle comes back silently with the initial weights; its
    first answer carries version 0, so the batch is redone after a reload."""
    rt = make(ray_local, {})
    try:
        rt.load_weights(2, "weights-v2")
        ray_local.kill(rt.generators[0], no_restart=False)  # restarted by Ray, weights lost
        time.sleep(1.0)
        out = rt.rollout(PROMPTS, [1.0] * K, 1, seed=1)
        assert_complete(out, 2)
        assert out.faults.get("generator_stale_weights", 0) + out.faults.get("generator_failures", 0) >= 1
    finally:
        rt.shutdown()


def _wait_until_dead(ray, actor, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.2)
    raise AssertionError(f"the killed actor still answers after {timeout_s:.0f} s")


def test_weight_sync_survives_a_dead_generator(ray_local):
    """A generator that is dead for good (restarts spent) when the weights go out: the sync warns
    and marks it stale; the rollout replaces it and the new actor loads version 1 first."""
    rt = make(ray_local, {}, actor_max_restarts=2)
    try:
        ray_local.kill(rt.generators[1], no_restart=True)
        _wait_until_dead(ray_local, rt.generators[1])  # ray.kill is asynchronous: a call sent now may still land
        with pytest.warns(UserWarning, match="could not load weights version 1"):
            reports = rt.load_weights(1, "weights-v1")
        assert len(reports) == 1 and [rt.fleet.needs_weights(i) for i in range(2)] == [False, True]
        out = rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
        assert_complete(out, 1)
    finally:
        rt.shutdown()


def test_weight_sync_to_a_restarting_generator(ray_local):
    """Killed with a restart left: depending on timing the load reaches the restarted actor or
    fails and marks it stale; either way the rollout generates with version 1 everywhere."""
    rt = make(ray_local, {}, actor_max_restarts=2)
    try:
        ray_local.kill(rt.generators[1], no_restart=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports = rt.load_weights(1, "weights-v1")
        warned = any("could not load weights version 1" in str(w.message) for w in caught)
        stale = [rt.fleet.needs_weights(i) for i in range(2)]
        assert (len(reports), stale) == ((1, [False, True]) if warned else (2, [False, False]))
        out = rt.rollout(PROMPTS, [1.0] * K, 0, seed=1)
        assert_complete(out, 1)
    finally:
        rt.shutdown()
