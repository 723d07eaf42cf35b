"""larpo_ray.batching: collate layouts (padded, packed), sequence log-probs, micro-batching and sharding."""

import pytest
import torch
from builders import ranked

from larpo_ray import batching
from larpo_ray.batching import (
    collate,
    micro_batches,
    model_logps,
    pack_rows,
    padded_tokens,
    real_tokens,
    sequence_length,
    sequence_logps,
    shard,
    to_BK,
)
from larpo_ray.types import RankedList

PAD = 0


def two_lists() -> list[RankedList]:
    return [ranked((5, 6, 7), [(8, 9), (10,), (11, 12, 13)], "a"), ranked((14,), [(15, 16)] * 2, "b")]


def test_collate_layout():
    batch = collate(two_lists(), PAD)
    assert batch.input_ids_ST.shape == (5, 6)  # 3 + 2 sequences, longest 3 + 3 tokens
    assert batch.input_ids_ST[0].tolist() == [5, 6, 7, 8, 9, PAD]
    assert batch.input_ids_ST[4].tolist() == [14, 15, 16, PAD, PAD, PAD]
    assert batch.seq_ST[1].tolist() == [1, 1, 1, 1, -1, -1]
    assert batch.response_mask_ST[2].tolist() == [False, False, False, True, True, True]
    assert batch.response_mask_ST[3].tolist() == [False, True, True, False, False, False]
    assert batch.mask_BK.tolist() == [[True, True, True], [True, True, False]]
    assert batch.seq_index_BK.tolist() == [[0, 1, 2], [3, 4, -1]]
    assert batch.labels_BK.tolist() == [[0.0, -1.0, -2.0], [0.0, -1.0, 0.0]]
    assert batch.labels_BK.dtype == torch.float32 and batch.mask_BK.dtype == torch.bool
    assert batch.num_tokens == 5 + 4 + 6 + 3 + 3 and batch.num_seqs == 5 and not batch.packed


def test_collate_packed_layout():
    """Rows of at most 6 tokens (row_tokens 2 < the longest sequence, 6), filled first-fit
    decreasing: sequences of 5, 4, 6, 3 and 3 tokens make rows [2], [0], [1], [3, 4]; every token
    of every sequence once, with positions restarting at 0, and padding a run of its own."""
    lists = two_lists()
    batch = collate(lists, PAD, row_tokens=2)
    padded = collate(lists, PAD)
    assert batch.packed and batch.input_ids_ST.shape == (4, 6)
    assert batch.seq_ST[3].tolist() == [3, 3, 3, 4, 4, 4] and batch.position_ids_ST[3].tolist() == [0, 1, 2] * 2
    # up to 12 tokens a row: the least padding is at capacity 11, rows [2, 0] and [1, 3, 4]
    assert collate(lists, PAD, row_tokens=12).input_ids_ST.shape == (2, 11)
    unpackable = [ranked((1, 2), [(3,), (4,)])]  # 3 + 3 tokens > 5: one sequence a row is padded
    assert not collate(unpackable, PAD, row_tokens=5).packed
    assert batch.num_tokens == padded.num_tokens and batch.num_seqs == 5
    assert batch.labels_BK.equal(padded.labels_BK) and batch.seq_index_BK.equal(padded.seq_index_BK)
    for n in range(5):  # sequence n: the same tokens, positions 0.., response mask as padded
        where = batch.seq_ST == n
        assert batch.input_ids_ST[where].tolist() == padded.input_ids_ST[n][padded.seq_ST[n] == n].tolist()
        assert batch.position_ids_ST[where].tolist() == list(range(int(where.sum())))
        assert batch.response_mask_ST[where].tolist() == padded.response_mask_ST[n][padded.seq_ST[n] == n].tolist()
    for row_pos, row_seq in zip(batch.position_ids_ST.tolist(), batch.seq_ST.tolist()):
        pad = [p for p, q in zip(row_pos, row_seq) if q < 0]
        assert pad == list(range(len(pad)))


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 4, 6, 3, 3, 1], 6)
    assert sorted(n for row in rows for n in row) == list(range(6))
    assert rows == [[2], [0, 5], [1], [3, 4]]
    assert pack_rows([9, 2], 6) == [[0], [1]]  # too long: a row of its own


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
    logits = torch.randn(*batch.input_ids_ST.shape, 20).to(dtype)
    got = sequence_logps(logits, batch.input_ids_ST, batch.response_mask_ST, batch.seq_ST, 5, normalize)
    want = naive_logps(logits.float(), batch.input_ids_ST, batch.response_mask_ST, normalize)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_sequence_logps_gradient_only_through_response_tokens():
    batch = collate(two_lists(), PAD)
    logits = torch.randn(*batch.input_ids_ST.shape, 20, requires_grad=True)
    sequence_logps(logits, batch.input_ids_ST, batch.response_mask_ST, batch.seq_ST, 5, False).sum().backward()
    used_NT = torch.zeros_like(batch.response_mask_ST)
    used_NT[:, :-1] = batch.response_mask_ST[:, 1:]  # position t predicts token t + 1
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
        assert padded_tokens([lists[i] for i in g]) == collate([lists[i] for i in g], PAD).input_ids_ST.numel()
    assert len(micro_batches(lists, 10**6)) == 1
    packed = micro_batches(lists, budget, packed=True)  # the budget counts real tokens
    assert [i for g in packed for i in g] == list(range(23)) and len(packed) < len(groups)
    assert all(real_tokens([lists[i] for i in g]) <= budget for g in packed)
    assert all(real_tokens([lists[i] for i in g] + [lists[g[-1] + 1]]) > budget for g in packed[:-1])


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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_logps_equal_padded_logps(tiny_model_path, attn, dtype):
    """transformers restricts attention to each packed sequence (position ids restarting at 0, no
    attention mask): packed and padded log-probs agree to float64 round-off on the tiny Llama, so
    no token sees another sequence (a leak changes log-probs by far more)."""
    from larpo_ray.models import load_causal_lm

    model = load_causal_lm(tiny_model_path).to(dtype).eval()
    model.config._attn_implementation = attn
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(1, 900, (n,), generator=g).tolist())

    lists = [ranked(ids(7 + 5 * i), [ids(3 + 4 * j + i) for j in range(2 + i % 2)], str(i)) for i in range(5)]
    padded, packed = collate(lists, PAD), collate(lists, PAD, row_tokens=48)
    assert packed.input_ids_ST.shape[0] < padded.input_ids_ST.shape[0]  # rows do hold several sequences
    with torch.no_grad():
        want, got = model_logps(model, padded, False), model_logps(model, packed, False)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]  # |logp| ~ 10-100: fp32 sums differ by ~1e-5
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
