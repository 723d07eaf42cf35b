"""larpo_ray.pipeline: rollouts sampled in turn (sync) or ahead while the learner trains (async).
A fake `produce` stands in for generate+score; `weights` stands in for the generators' version."""

import threading
import time

import pytest

from larpo_ray.config import ConfigError
from larpo_ray.pipeline import Drawn, Inline, Prefetch
from larpo_ray.topology import Rollout
from larpo_ray.types import Candidate, Prompt, ScoredCandidate


def _prompt(i):
    return Prompt(uid=f"p{i}", text=f"q{i}", token_ids=(i,))


class _Generators:
    """The generators' weight version; `produce` records which version sampled each rollout and
    fails the test if two rollouts or a rollout and a sync ever overlap."""

    def __init__(self, seconds=0.02, fail_at=None):
        self.version, self.busy, self.seconds, self.fail_at = 0, threading.Lock(), seconds, fail_at
        self.calls = []

    def produce(self, s, cursor):
        assert self.busy.acquire(blocking=False), "two users of the generators at once"
        try:
            if s == self.fail_at:
                raise RuntimeError(f"generator died in iteration {s}")
            version = self.version
            time.sleep(self.seconds)
            self.calls.append((s, cursor, version))
            prompts = [_prompt(cursor), _prompt(cursor + 1)]
            c = Candidate(prompts[0].uid, (1, 2), "a", (-0.5, -0.25), 1.0, version)
            rollout = Rollout(scored=[ScoredCandidate(c, 1.0, s)], candidates=[c], generated_tokens=2)
            return Drawn(s, rollout, prompts, prompts[:1], {"rollout/draw_rounds": 1.0}, self.seconds, version)
        finally:
            self.busy.release()

    def sync(self, version):
        assert self.busy.acquire(blocking=False), "a weight sync during a rollout"
        self.version = version
        self.busy.release()


def _loop(source, gens, iterations, train_s=0.03, start=0):
    """The driver's order: take, train (sleep), then sync under generators()."""
    taken = []
    for s in range(start, iterations):
        taken.append(source.take(s))
        time.sleep(train_s)
        with source.generators():
            gens.sync(s + 1)
    return taken


def test_async_depth_one_samples_each_rollout_with_the_previous_policy():
    gens = _Generators()
    source = Prefetch(gens.produce, start=0, end=4, cursor=10, depth=1)
    taken = _loop(source, gens, 4)
    source.close()
    assert [d.iteration for d in taken] == [0, 1, 2, 3]
    assert [d.version for d in taken] == [0, 0, 1, 2]  # iteration s+1 sampled by policy s
    assert [c for _, c, _ in gens.calls] == [10, 12, 14, 16]  # the stream cursor advances by the drawn
    assert len(gens.calls) == 4  # nothing past the last iteration


def test_async_overlaps_the_rollout_with_training():
    gens = _Generators(seconds=0.2)
    start = time.perf_counter()
    source = Prefetch(gens.produce, 0, 4, 0, 1)
    _loop(source, gens, 4, train_s=0.2)
    overlapped = time.perf_counter() - start
    source.close()
    gens = _Generators(seconds=0.2)
    start = time.perf_counter()
    _loop(Inline(gens.produce, 0), gens, 4, train_s=0.2)
    in_turn = time.perf_counter() - start
    assert overlapped < 0.8 * in_turn  # ideal 1.0 s against 1.6 s


def test_sync_samples_each_rollout_with_the_current_policy():
    gens = _Generators()
    taken = _loop(Inline(gens.produce, 0), gens, 3)
    assert [d.version for d in taken] == [0, 1, 2]


def test_deeper_pipeline_runs_ahead_but_never_beyond_its_depth():
    gens = _Generators(seconds=0.01)
    source = Prefetch(gens.produce, 0, 6, 0, depth=3)
    time.sleep(0.3)  # the driver is slow to take: the producer stops at 3 ready
    assert [d.iteration for d in source.pending()] == [0, 1, 2]
    taken = _loop(source, gens, 6)
    source.close()
    assert [d.iteration for d in taken] == list(range(6))
    assert all(s - d.version <= 3 for s, d in enumerate(taken))


def test_pending_rollouts_survive_a_checkpoint_and_resume_in_order():
    gens = _Generators()
    source = Prefetch(gens.produce, 0, 4, 0, 1)
    _loop(source, gens, 2)
    pending = source.pending()
    source.close()
    assert [d.iteration for d in pending] == [2]  # sampled ahead during iteration 2's training
    by_uid = {_prompt(i).uid: _prompt(i) for i in range(20)}
    restored = [Drawn.from_json(d.to_json(), by_uid) for d in pending]
    assert restored == pending
    again = _Generators()
    again.version = 2
    resumed = Prefetch(again.produce, start=2, end=4, cursor=4, depth=1, pending=restored)
    rest = _loop(resumed, again, 4, start=2)
    resumed.close()
    assert [d.iteration for d in rest] == [2, 3]
    assert again.calls == [(3, 6, 2)]  # only iteration 3 sampled again, after the kept one's prompts


def test_sync_mode_takes_an_async_checkpoints_pending_rollout_first():
    gens = _Generators()
    kept = gens.produce(1, 2)
    source = Inline(gens.produce, 2, [kept])
    assert source.take(1) is kept
    assert source.take(2).drawn[0].uid == "p4"  # after the kept rollout's 2 prompts


def test_a_producer_error_reaches_the_driver_at_its_next_take():
    gens = _Generators(fail_at=1)
    source = Prefetch(gens.produce, 0, 3, 0, 1)
    assert source.take(0).iteration == 0
    with pytest.raises(RuntimeError, match="generator died in iteration 1"):
        source.take(1)


def test_a_rollout_out_of_order_is_refused():
    gens = _Generators()
    source = Inline(gens.produce, 0, [gens.produce(3, 0)])
    with pytest.raises(RuntimeError, match="rollout of iteration 4 where iteration 2's was due"):
        source.take(1)


def test_a_kept_rollout_whose_prompts_left_the_data_is_refused():
    gens = _Generators()
    data = gens.produce(0, 0).to_json()
    with pytest.raises(ConfigError, match="prompt 'p1' that the training data no longer holds"):
        Drawn.from_json(data, {"p0": _prompt(0)})


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetch(lambda s, c: None, 0, 1, 0, 0)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            ["--loop.mode", "asynch"],
            "loop.mode = 'asynch' is not allowed: choose one of 'sync', 'async' (did you mean async?)",
        ),
        (["--loop.max_staleness", "0"], "loop.max_staleness = 0 is not allowed: >= 1"),
    ],
)
def test_bad_loop_mode_settings_are_refused_by_name(override, message):
    from larpo_ray.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    assert message in str(err.value)
