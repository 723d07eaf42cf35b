"""First-free dispatch (larpo_ray/dispatch.py `Dispatcher.fill`) without Ray: which generator each
queued batch goes to. The same policy with real Ray actors and a slow generator is in
tests/test_faults.py (`test_a_slow_generator_gets_fewer_batches`)."""

from larpo_ray.config import FaultsConfig
from larpo_ray.dispatch import Dispatcher
from larpo_ray.fleet import Fleet
from larpo_ray.types import Prompt


class _Method:
    def __init__(self, sent: list, slot: int):
        self.sent, self.slot = sent, slot

    def remote(self, batch, *args):
        self.sent.append((self.slot, batch[0].uid))
        return object()  # stands in for the ObjectRef


class FakeGenerator:
    """Records (slot, first prompt uid) of every generate call sent to it."""

    def __init__(self, sent: list, slot: int):
        self.generate = _Method(sent, slot)


def make(generators: int, batches: int) -> tuple[Dispatcher, list]:
    sent: list = []
    fleet = Fleet(
        {"generator": [FakeGenerator(sent, i) for i in range(generators)], "reward": []},
        spawn=None,
        max_restarts=0,
        fetch_weights=lambda: None,
    )
    work = [[Prompt(f"b{b}", "q", (1,))] for b in range(batches)]
    pool = Dispatcher(fleet, FaultsConfig(), lambda role, slot: "log", work, ([1.0], None, 0), 0)
    for b in range(batches):
        pool.generate(b)
    return pool, sent


def finish(pool: Dispatcher, slot: int):
    """Generator `slot`'s oldest call returns (what next_outcome does to the bookkeeping)."""
    call = pool.calls.pop(next(r for r, c in pool.calls.items() if c.slot == slot))
    pool.load[("generator", slot)] -= 1
    return call


def test_generate_only_queues_and_fill_spreads_two_calls_per_generator():
    pool, sent = make(generators=3, batches=10)
    assert sent == [] and len(pool.queue) == 10  # nothing goes out before results() asks
    pool.fill()
    # one each first, then a second each while more batches wait than there are generators
    assert sent == [(0, "b0"), (1, "b1"), (2, "b2"), (0, "b3"), (1, "b4"), (2, "b5")]
    assert [b for b, _ in pool.queue] == [6, 7, 8, 9]


def test_the_next_batch_goes_to_the_generator_that_frees_first():
    pool, sent = make(generators=3, batches=12)
    pool.fill()
    sent.clear()
    finish(pool, 2)
    finish(pool, 2)  # generator 2 is fast: both its calls returned
    pool.fill()
    assert sent == [(2, "b6"), (2, "b7")]  # round-robin would have sent b6 to generator 0
    pool.fill()
    assert sent == [(2, "b6"), (2, "b7")]  # 0 and 1 are full: the rest waits


def test_near_the_end_a_generator_gets_a_batch_only_when_idle():
    """With no more batches waiting than generators, a queued second call could wait behind a
    slow one while another generator idles."""
    pool, sent = make(generators=3, batches=8)
    pool.fill()
    sent.clear()
    finish(pool, 0)
    pool.fill()
    assert sent == [] and [b for b, _ in pool.queue] == [5, 6, 7]  # generator 0 still runs b3
    finish(pool, 0)
    pool.fill()
    assert sent == [(0, "b5")]


def test_a_redispatched_batch_goes_first_and_avoids_its_failed_generator():
    pool, sent = make(generators=2, batches=6)
    pool.fill()
    sent.clear()
    failed = finish(pool, 0)
    finish(pool, 0)  # generator 0 is free again (e.g. restarted); b0 failed on it
    pool.redispatch(failed)
    finish(pool, 1)
    pool.fill()
    assert sent == [(1, "b0"), (0, "b4")]  # b0 first, to generator 1; generator 0 takes fresh work
    assert pool.faults == {"generator_redispatched": 1}
