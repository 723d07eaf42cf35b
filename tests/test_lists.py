"""Tests for larpo_ray/lists.py: list rules, tie handling, memory windows, cap, dedup, state."""

import dataclasses
import json
import random

import pytest
from builders import prompt, scored

from larpo_ray.lists import LIST_RULES, WINDOWS, CandidateMemory, prompt_rng
from larpo_ray.types import Candidate, RankedList, ScoredCandidate


def sc(uid: str, tok: int, reward: float, iteration: int = 0) -> ScoredCandidate:
    """A scored candidate whose response is the single token `tok`."""
    return scored(uid, (tok,), reward, iteration, text=f"r{tok}")


def toks(cands) -> list[int]:
    return [c.candidate.token_ids[0] for c in cands]


def build(cands, rule, prompts=("p",), iteration=0, **kw):
    """Lists from one memory holding `cands` (window "all", no cap)."""
    mem = CandidateMemory(window="all")
    mem.add(cands)
    return mem.build_lists([prompt(u) for u in prompts], iteration, rule, **kw)


TEN = [sc("p", t, r) for t, r in enumerate([0.3, 0.9, 0.1, 0.5, 0.7, 0.0, 0.8, 0.2, 0.6, 0.4])]


def test_rule_top_bottom_ordered():
    lists, stats = build(TEN, "top_bottom", top=2, bottom=2, keep_order=True)
    assert toks(lists[0].candidates) == [1, 6, 2, 5]
    assert lists[0].labels == (0.9, 0.8, 0.1, 0.0)
    assert (stats.n_lists, stats.n_candidates, stats.mean_list_len) == (1, 10, 4.0)


def test_rule_top_bottom_partition():
    lists, _ = build(TEN, "top_bottom", top=1, bottom=3, keep_order=False)
    assert toks(lists[0].candidates) == [1, 7, 2, 5]
    assert lists[0].labels == (1.0, 0.0, 0.0, 0.0)


def test_rule_top_bottom_fewer_than_requested_uses_all():
    cands = [sc("p", 0, 0.2), sc("p", 1, 0.9), sc("p", 2, 0.5)]
    lists, _ = build(cands, "top_bottom", top=2, bottom=2, keep_order=True)
    assert toks(lists[0].candidates) == [1, 2, 0]
    lists, _ = build(cands, "top_bottom", top=1, bottom=3, keep_order=False)
    assert toks(lists[0].candidates) == [1, 2, 0] and lists[0].labels == (1.0, 0.0, 0.0)


def test_rule_best_worst():
    lists, _ = build(TEN, "best_worst", top=3, bottom=3, keep_order=False)
    assert toks(lists[0].candidates) == [1, 5] and lists[0].labels == (0.9, 0.0)


def test_rule_all():
    lists, _ = build(TEN[:4], "all")
    assert toks(lists[0].candidates) == [1, 3, 0, 2] and lists[0].labels == (0.9, 0.5, 0.3, 0.1)


def test_rule_correct_incorrect():
    cands = [sc("p", 0, 1.0), sc("p", 1, 0.0), sc("p", 2, 1.0), sc("p", 3, 0.0)]
    lists, _ = build(cands, "correct_incorrect", seed=3)
    (c_pos, c_neg), labels = lists[0].candidates, lists[0].labels
    assert c_pos.reward == 1.0 and c_neg.reward == 0.0 and labels == (1.0, 0.0)
    only_correct = [sc("p", 0, 1.0), sc("p", 1, 1.0)]
    lists, stats = build(only_correct, "correct_incorrect")
    assert lists == [] and stats.n_no_pair == 1
    lists, _ = build(cands[:2], "correct_incorrect", correct_threshold=0.5)
    assert toks(lists[0].candidates) == [0, 1]


def test_correct_incorrect_seeded_and_independent_of_prompt_order():
    uids = [f"p{i}" for i in range(8)]
    cands = [sc(u, t, float(t % 2)) for u in uids for t in range(10)]
    a, _ = build(cands, "correct_incorrect", prompts=uids, seed=7)
    b, _ = build(list(reversed(cands)), "correct_incorrect", prompts=uids[::-1], seed=7)
    pick = {r.prompt.uid: toks(r.candidates) for r in a}
    assert pick == {r.prompt.uid: toks(r.candidates) for r in b}
    c, _ = build(cands, "correct_incorrect", prompts=uids, seed=8)
    assert pick != {r.prompt.uid: toks(r.candidates) for r in c}
    assert prompt_rng(7, 0, "p0").random() == prompt_rng(7, 0, "p0").random()


@pytest.mark.parametrize(
    "rewards, top, bottom, pos, neg",
    [
        ([1, 1, 0, 0], 1, 3, [0], [2, 3]),  # negative tied with the positive is dropped
        ([5, 0, 0, 0], 2, 2, [0], [2, 3]),  # no negative would remain: tied positive dropped
        ([2, 1, 1, 1, 0], 2, 2, [0, 1], [4]),
    ],
)
def test_partition_drops_ties_across_split(rewards, top, bottom, pos, neg):
    cands = [sc("p", t, float(r)) for t, r in enumerate(rewards)]
    lists, _ = build(cands, "top_bottom", top=top, bottom=bottom, keep_order=False)
    got = lists[0]
    assert toks(got.candidates) == pos + neg
    assert got.labels == tuple([1.0] * len(pos) + [0.0] * len(neg))
    # Every (positive, negative) pair is strictly better by raw reward.
    ps = [c for c, y in zip(got.candidates, got.labels) if y == 1.0]
    ns = [c for c, y in zip(got.candidates, got.labels) if y == 0.0]
    assert min(c.reward for c in ps) > max(c.reward for c in ns)


def test_all_tied_or_too_few_gives_no_list_and_is_counted():
    cands = [sc("tied", t, 0.5) for t in range(4)] + [sc("one", 0, 1.0)] + [sc("ok", 0, 1.0), sc("ok", 1, 0.0)]
    for rule, kw in [("all", {}), ("top_bottom", {"keep_order": False}), ("best_worst", {})]:
        lists, stats = build(cands, rule, prompts=("tied", "one", "ok", "none"), **kw)
        assert [r.prompt.uid for r in lists] == ["ok"], rule
        assert (stats.n_prompts, stats.n_lists, stats.n_no_pair) == (4, 1, 3)


def three_iterations(**kw) -> CandidateMemory:
    mem = CandidateMemory(**kw)
    mem.add(sc("p", 10 * s + t, float(t), iteration=s) for s in range(3) for t in range(2))
    return mem


@pytest.mark.parametrize(
    "window, expected", [("current", [20, 21]), ("previous", [20, 21, 10, 11]), ("all", [20, 21, 10, 11, 0, 1])]
)
def test_memory_windows(window, expected):
    assert toks(three_iterations(window=window).pool("p", 2)[0]) == expected


def test_reranking_across_iterations_promotes_older_best():
    mem = CandidateMemory(window="previous")
    mem.add([sc("p", 0, 0.9, 0), sc("p", 1, 0.1, 0), sc("p", 2, 0.5, 1), sc("p", 3, 0.4, 1)])
    lists, _ = mem.build_lists([prompt("p")], 1, "best_worst")
    assert toks(lists[0].candidates) == [0, 1]
    lists, _ = mem.build_lists([prompt("p")], 2, "best_worst")  # iteration 0 left the window
    assert toks(lists[0].candidates) == [2, 3]


def test_cap_keeps_newest_then_extremes():
    mem = CandidateMemory(window="all", max_pool=4)
    mem.add(sc("p", t, float(t), iteration=0) for t in range(4))
    mem.add(sc("p", 10 + t, float(t), iteration=1) for t in range(2))
    assert sorted(toks(mem.pool("p", 1)[0])) == [0, 3, 10, 11]  # newest 2, then best + worst of 0
    mem = CandidateMemory(window="current", max_pool=3)
    mem.add(sc("p", t, float(t)) for t in range(6))
    assert toks(mem.pool("p", 0)[0]) == [5, 0, 4]


def test_dedup_keeps_newest_copy_and_counts():
    mem = CandidateMemory(window="all")
    mem.add([sc("p", 7, 0.2, 0), sc("p", 8, 0.0, 0), sc("p", 7, 0.6, 1), sc("p", 9, 0.3, 1), sc("p", 9, 0.3, 1)])
    pool, n_dup = mem.pool("p", 1)
    assert [(toks([c])[0], c.iteration) for c in pool] == [(7, 1), (9, 1), (8, 0)] and n_dup == 2
    _, stats = mem.build_lists([prompt("p")], 1, "all")
    assert (stats.n_duplicates_removed, stats.n_candidates) == (2, 3)
    nodedup = CandidateMemory(window="all", dedup=False)
    nodedup.add(pool + pool)
    kept, n_dup = nodedup.pool("p", 1)
    assert (len(kept), n_dup) == (6, 0)


def test_prune_drops_only_unneeded_iterations():
    mem = three_iterations(window="previous")
    assert mem.prune(2) == 2 and toks(mem.pool("p", 2)[0]) == [20, 21, 10, 11]
    mem = three_iterations(window="all")
    assert mem.prune(2) == 0 and len(mem.pool("p", 2)[0]) == 6


def test_state_dict_json_round_trip():
    mem = three_iterations(window="all", max_pool=5)
    state = json.loads(json.dumps(mem.state_dict()))
    other = CandidateMemory(window="all", max_pool=5)
    other.load_state_dict(state)
    assert other.state_dict() == mem.state_dict()
    assert other.pool("p", 2)[0] == mem.pool("p", 2)[0]
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict({"format": 99, "candidates": []})


def test_no_reference_logprob_stored():
    # The learner recomputes log pi_ref under the current reference (docs/algorithm.md, Algorithm 1).
    for cls in (Candidate, ScoredCandidate, RankedList):
        assert not [f.name for f in dataclasses.fields(cls) if "ref" in f.name.lower()], cls


def test_bad_names_and_values_raise():
    with pytest.raises(ValueError, match=", ".join(LIST_RULES)):
        build(TEN, "listwise")
    with pytest.raises(ValueError, match=", ".join(WINDOWS)):
        CandidateMemory(window="everything")
    with pytest.raises(ValueError, match="max_pool"):
        CandidateMemory(max_pool=1)
    for top, bottom in [(0, 1), (1, 0)]:
        with pytest.raises(ValueError, match="must be >= 1"):
            build(TEN, "top_bottom", top=top, bottom=bottom)


def test_rules_share_one_signature():
    rng = random.Random(0)
    for name, fn in LIST_RULES.items():
        out = fn(TEN, top=1, bottom=1, keep_order=True, rng=rng, correct_threshold=0.5)
        assert out is not None and len(out[0]) == len(out[1]), name
