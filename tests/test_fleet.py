"""Actor health (larpo_ray/fleet.py) without Ray: restarts, replacement, weight versions. The same
rules with real Ray actors and real faults are in tests/test_faults.py."""

import pytest

from larpo_ray.fleet import Fleet


def make(generators: int = 2, rewards: int = 1, max_restarts: int = 1, fetch=lambda: "fetched") -> Fleet:
    spawned = iter(range(1, 100))
    return Fleet(
        {"generator": [f"g{i}" for i in range(generators)], "reward": [f"r{i}" for i in range(rewards)]},
        spawn=lambda role, slot: f"{role[0]}{slot}-new{next(spawned)}",
        max_restarts=max_restarts,
        fetch_weights=fetch,
    )


def test_a_slot_restarts_in_place_then_a_new_actor_replaces_it():
    fleet = make(max_restarts=2)
    assert [fleet.record_death("reward", 0) for _ in range(2)] == ["restarting", "restarting"]
    assert (fleet.actor("reward", 0), fleet.incarnation("reward", 0)) == ("r0", 0)
    assert fleet.record_death("reward", 0) == "replaced"  # the third death: restarts spent
    assert (fleet.actor("reward", 0), fleet.incarnation("reward", 0)) == ("r0-new1", 1)
    assert fleet.record_death("reward", 0) == "restarting"  # the new actor has its own restarts
    assert fleet.actors("generator") == ["g0", "g1"] and fleet.incarnation("generator", 0) == 0  # other slots


def test_actors_is_a_copy():
    fleet = make()
    fleet.actors("generator")[0] = "intruder"
    assert fleet.actor("generator", 0) == "g0"


def test_before_the_first_sync_every_generator_holds_the_current_weights():
    fleet = make(max_restarts=0)
    assert fleet.version == 0 and fleet.weights is None
    fleet.record_death("generator", 1)  # replaced: the new actor starts on the initial policy too
    assert not any(fleet.needs_weights(i) for i in range(2))
    with pytest.raises(RuntimeError, match="no weights were synced"):
        fleet.current_weights()


def test_a_generator_that_died_or_missed_a_sync_must_load_the_current_weights():
    fleet = make(generators=3)
    fleet.set_weights(2, "v2")
    assert all(fleet.needs_weights(i) for i in range(3))  # until each one is told to have loaded them
    for i in range(3):
        fleet.loaded(i, 2)
    fleet.record_death("generator", 0)
    fleet.mark_stale(2)  # e.g. it answered with another version
    fleet.record_death("reward", 0)  # reward actors hold no weights
    assert [fleet.needs_weights(i) for i in range(3)] == [True, False, True]
    fleet.set_weights(3, "v3")
    fleet.loaded(0, 3)
    assert [fleet.needs_weights(i) for i in range(3)] == [False, True, True]


def test_weights_without_a_reference_are_fetched_once_when_needed():
    calls = []
    fleet = make(fetch=lambda: calls.append(1) or "ref")
    fleet.set_weights(4, None)  # a broadcast leaves no reference
    assert calls == [] and fleet.weights == (4, None)
    assert fleet.current_weights() == (4, "ref") and fleet.current_weights() == (4, "ref")
    assert calls == [1] and fleet.weights == (4, "ref")
