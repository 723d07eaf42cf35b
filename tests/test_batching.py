"""larpo_ray.batching: collate layout, sequence log-probs, micro-batching and sharding."""

import pytest
import torch
from builders import ranked

from larpo_ray import batching
from larpo_ray.batching import collate, micro_batches, padded_tokens, sequence_length, sequence_logps, shard, to_BK
from larpo_ray.types import RankedList

PAD = 0


def two_lists() -> list[RankedList]:
    return [ranked((5, 6, 7), [(8, 9), (10,), (11, 12, 13)], "a"), ranked((14,), [(15, 16)] * 2, "b")]


def test_collate_layout():
    batch = collate(two_lists(), PAD)
    assert batch.input_ids_NT.shape == (5, 6)  # 3 + 2 sequences, longest 3 + 3 tokens
    assert batch.input_ids_NT[0].tolist() == [5, 6, 7, 8, 9, PAD]
    assert batch.input_ids_NT[4].tolist() == [14, 15, 16, PAD, PAD, PAD]
    assert batch.attention_mask_NT[1].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch.response_mask_NT[2].tolist() == [False, False, False, True, True, True]
    assert batch.response_mask_NT[3].tolist() == [False, True, True, False, False, False]
    assert batch.mask_BK.tolist() == [[True, True, True], [True, True, False]]
    assert batch.seq_index_BK.tolist() == [[0, 1, 2], [3, 4, -1]]
    assert batch.labels_BK.tolist() == [[0.0, -1.0, -2.0], [0.0, -1.0, 0.0]]
    assert batch.labels_BK.dtype == torch.float32 and batch.mask_BK.dtype == torch.bool
    assert batch.num_tokens == 5 + 4 + 6 + 3 + 3


def naive_logps(logits_NTV, ids_NT, response_NT, normalize):
    out = []
    for n in range(ids_NT.shape[0]):
        total, count = 0.0, 0
        for t in range(1, ids_NT.shape[1]):
            if response_NT[n, t]:
                total += torch.log_softmax(logits_NTV[n, t - 1].double(), -1)[ids_NT[n, t]].item()
                count += 1
        out.append(total / max(count, 1) if normalize else total)
    return torch.tensor(out)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_matches_naive(normalize, dtype):
    torch.manual_seed(0)
    batch = collate(two_lists(), PAD)
    logits = torch.randn(*batch.input_ids_NT.shape, 20).to(dtype)
    got = sequence_logps(logits, batch.input_ids_NT, batch.response_mask_NT, normalize)
    want = naive_logps(logits.float(), batch.input_ids_NT, batch.response_mask_NT, normalize)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_sequence_logps_gradient_only_through_response_tokens():
    batch = collate(two_lists(), PAD)
    logits = torch.randn(*batch.input_ids_NT.shape, 20, requires_grad=True)
    sequence_logps(logits, batch.input_ids_NT, batch.response_mask_NT, False).sum().backward()
    used_NT = torch.zeros_like(batch.response_mask_NT)
    used_NT[:, :-1] = batch.response_mask_NT[:, 1:]  # position t predicts token t + 1
    assert (logits.grad.abs().sum(-1) > 0).equal(used_NT)


def test_to_BK_fills_padding_with_zero():
    batch = collate(two_lists(), PAD)
    logp_BK = to_BK(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), batch.seq_index_BK)
    assert logp_BK.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]


def test_micro_batches_respect_budget_and_keep_lists_whole():
    lists = [ranked(tuple(range(1, 2 + i % 5)), [(1,) * (1 + i % 3)] * (2 + i % 2), str(i)) for i in range(23)]
    budget = 40
    groups = micro_batches(lists, budget)
    assert sorted(i for g in groups for i in g) == list(range(23))  # each list exactly once
    assert [i for g in groups for i in g] == list(range(23))  # order kept
    for g in groups:
        assert padded_tokens([lists[i] for i in g]) <= budget
        assert padded_tokens([lists[i] for i in g]) == collate([lists[i] for i in g], PAD).input_ids_NT.numel()
    assert len(micro_batches(lists, 10**6)) == 1


def test_oversized_list_gets_its_own_micro_batch(monkeypatch):
    monkeypatch.setattr(batching, "_warned_oversize", False)  # warns once per process
    big = ranked(tuple(range(1, 40)), [(1, 2)] * 4, "big")
    small = ranked((1,), [(2,), (3,)], "small")
    assert sequence_length(big, 0) == 41
    with pytest.warns(UserWarning, match="micro_batch_tokens"):
        groups = micro_batches([small, big, small], 64)
    assert groups == [[0], [1], [2]]


@pytest.mark.parametrize("n,world", [(0, 1), (1, 2), (7, 3), (8, 2), (5, 8)])
def test_shard_covers_every_item_once(n, world):
    parts = [list(shard(n, r, world)) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [list(shard(n, r, world)) for r in range(world)]  # deterministic


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard(4, 2, 2)
