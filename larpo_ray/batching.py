"""From ranked lists to token tensors and back: the learner's batch builder. Pure torch.

Shapes use suffixes : B lists (prompts) by K candidate slots; N = sum of the list
lengths, the flattened sequences (prompt + one candidate each); S token rows of T tokens; V
vocabulary.

    lists --collate--> ListBatch --model--> logits_STV --sequence_logps--> logp_N --to_BK--> logp_BK

Two layouts of the same sequences (`collate(..., row_tokens=)`, `learner.packing`):
- padded: one sequence per row (S = N), right-padded to the longest;
- packed: sequences concatenated (first-fit decreasing) into rows of at most `row_tokens` tokens
  (or the longest sequence, if longer; the row width that leaves the least padding), position
  ids restarting at 0 for each; the model gets no attention mask, and transformers derives from
  the position ids a causal mask restricted to each sequence
  (`masking_utils.find_packed_sequence_indices`; sdpa, eager, flex). Rows stay
  short because sdpa and eager compute a row's full T x T scores: one row for a whole 4096-token
  micro-batch made the tiny model's step 1.8x slower on CPU. The learner uses rows of
  hidden_size tokens: per token, scores over a row of c tokens cost about c / (6 x hidden) of the
  block matmuls, so such rows add at most ~1/6 attention work while removing most padding.

`logp_BK` is what `larpo_ray.losses` takes (log pi(y|x) summed over response tokens, docs/algorithm.md
"The losses"). `micro_batches` bounds the tokens of one forward/backward without ever splitting a
list, because every loss is computed per prompt over its whole list. `shard` is the deterministic
data-parallel split every rank computes on its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from larpo_ray.types import RankedList

_LOGSUMEXP_CHUNK = 1 << 24  # elements (rows x V) upcast to float32 at once in sequence_logps


@dataclass
class ListBatch:
    """One micro-batch of candidate lists as token rows, padded or packed (module docstring)."""

    input_ids_ST: Tensor  # long: each sequence's prompt tokens then response tokens; padding
    position_ids_ST: Tensor  # long: position within its sequence (padding: a run of its own)
    seq_ST: Tensor  # long: which of the N sequences a token belongs to, -1 at padding
    response_mask_ST: Tensor  # bool: response tokens, whose log-probs make up log pi(y|x)
    labels_BK: Tensor  # float: RankedList.labels, what the loss orders by (0 at padding)
    mask_BK: Tensor  # bool: real candidates
    seq_index_BK: Tensor  # long: sequence (0..N-1) of each candidate, -1 at padding
    packed: bool  # layout: packed rows (attend within each sequence), or one padded sequence per row

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens, for throughput metrics."""
        return int((self.seq_ST >= 0).sum())

    @property
    def num_seqs(self) -> int:
        return int(self.mask_BK.sum())

    def to(self, device: torch.device | str) -> ListBatch:
        return ListBatch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()})


def sequence_length(ranked: RankedList, j: int) -> int:
    """Tokens of candidate j's sequence: prompt + response."""
    return len(ranked.prompt.token_ids) + len(ranked.candidates[j].candidate.token_ids)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sequence indices per row: first-fit decreasing into rows of at most `capacity` tokens
    (a sequence longer than capacity gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []  # tokens left in each row
    for n in sorted(range(len(lengths)), key=lambda n: -lengths[n]):
        row = next((r for r, left in enumerate(free) if lengths[n] <= left), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(n)
        free[row] -= lengths[n]
    return rows


def packed_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """`pack_rows` at the row capacity, from the longest sequence up to `row_tokens`, that leaves
    the fewest tokens (rows x fullest row); the shortest capacity among equals (less attention).
    The longest sequence's capacity is among them, so this never pads more than the padded layout."""
    longest = max(lengths)
    top = max(row_tokens, longest)
    options = [pack_rows(lengths, longest + (top - longest) * i // 8) for i in range(9)]
    return min(options, key=lambda rows: len(rows) * max(sum(lengths[n] for n in row) for row in rows))


def collate(lists: Sequence[RankedList], pad_id: int, row_tokens: int | None = None) -> ListBatch:
    """The lists as one batch, one sequence (prompt + response) per candidate: padded, or with
    `row_tokens` packed into rows of at most max(row_tokens, longest sequence) tokens
    (`packed_rows`, module docstring). Sequence n is candidate n in list order either way.

    Sequences are not truncated: the generator's max_new_tokens and the data's max_prompt_tokens
    keep them within the model's length.
    """
    if not lists:
        raise ValueError("collate needs at least one RankedList")
    seqs = [(lst.prompt.token_ids, sc.candidate.token_ids) for lst in lists for sc in lst.candidates]
    lengths = [len(p) + len(r) for p, r in seqs]
    rows = packed_rows(lengths, row_tokens) if row_tokens is not None else []
    packed = 0 < len(rows) < len(seqs)  # else one sequence a row: the padded layout
    rows = rows if packed else [[n] for n in range(len(seqs))]
    s, t = len(rows), max(sum(lengths[n] for n in row) for row in rows)
    input_ids_ST = torch.full((s, t), pad_id, dtype=torch.long)
    position_ids_ST = torch.zeros((s, t), dtype=torch.long)
    seq_ST = torch.full((s, t), -1, dtype=torch.long)
    response_mask_ST = torch.zeros((s, t), dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for n in row:
            prompt, response = seqs[n]
            input_ids_ST[r, at : at + lengths[n]] = torch.tensor(prompt + response, dtype=torch.long)
            position_ids_ST[r, at : at + lengths[n]] = torch.arange(lengths[n])
            seq_ST[r, at : at + lengths[n]] = n
            response_mask_ST[r, at + len(prompt) : at + lengths[n]] = True
            at += lengths[n]
        position_ids_ST[r, at:] = torch.arange(t - at)  # padding restarts: a sequence of its own
    b, k = len(lists), max(len(lst.candidates) for lst in lists)
    labels_BK = torch.zeros((b, k), dtype=torch.float32)
    seq_index_BK = torch.full((b, k), -1, dtype=torch.long)
    n = 0
    for i, lst in enumerate(lists):
        size = len(lst.candidates)
        labels_BK[i, :size] = torch.tensor(lst.labels, dtype=torch.float32)
        seq_index_BK[i, :size] = torch.arange(n, n + size)
        n += size
    return ListBatch(
        input_ids_ST, position_ids_ST, seq_ST, response_mask_ST, labels_BK, seq_index_BK >= 0, seq_index_BK, packed
    )


def sequence_logps(
    logits_STV: Tensor,
    input_ids_ST: Tensor,
    response_mask_ST: Tensor,
    seq_ST: Tensor,
    n_seqs: int,
    length_normalize: bool,
) -> Tensor:
    """log pi(y|x) per sequence, float32 [N]: the sum of its response-token log-probs.

    Token t is predicted by the logits at t - 1 of the same row (a response token follows a token
    of its own sequence, so this holds in the packed layout too); `seq_ST` says whose token t is.
    Only the R response positions are gathered (an [R, V] copy, not [S, T, V]), and their
    log-softmax normaliser is a logsumexp taken in chunks upcast to float32, so bf16 logits lose
    no precision. `length_normalize` divides by the response length (SimPO-style; off in the
    paper, LossConfig.length_normalize).
    """
    target_mask_ST = response_mask_ST[:, 1:]
    seq_R = seq_ST[:, 1:][target_mask_ST]
    logits_RV = logits_STV[:, :-1][target_mask_ST]
    targets_R = input_ids_ST[:, 1:][target_mask_ST]
    chunk = max(1, _LOGSUMEXP_CHUNK // max(1, logits_RV.shape[-1]))
    token_logps = []
    for start in range(0, logits_RV.shape[0], chunk):
        part_RV = logits_RV[start : start + chunk].float()
        picked_R = part_RV.gather(1, targets_R[start : start + chunk, None]).squeeze(1)
        token_logps.append(picked_R - torch.logsumexp(part_RV, dim=-1))
    logp_R = torch.cat(token_logps) if token_logps else logits_RV.new_zeros(0, dtype=torch.float32)
    logp_N = logp_R.new_zeros(n_seqs).index_add(0, seq_R, logp_R)
    if length_normalize:
        logp_N = logp_N / torch.bincount(seq_R, minlength=n_seqs).clamp(min=1)
    return logp_N


def model_logps(model, batch: ListBatch, length_normalize: bool) -> Tensor:
    """Sequence log-probs [N] of `batch` (already on the model's device) under a causal LM.

    Logits are computed only from the column before the earliest response token on
    (`logits_to_keep`): prompt positions never enter log pi(y|x), and the [S, T, V] logits are the
    largest activation of a small model with a big vocabulary. A packed batch goes in with
    position ids and no attention mask, from which transformers masks attention to each sequence.
    """
    first = int(batch.response_mask_ST.int().argmax(dim=1).min())
    start = max(first - 1, 0)
    inputs = {"position_ids": batch.position_ids_ST} if batch.packed else {"attention_mask": (batch.seq_ST >= 0).long()}
    logits = model(
        input_ids=batch.input_ids_ST, **inputs, use_cache=False, logits_to_keep=batch.input_ids_ST.shape[1] - start
    ).logits
    return sequence_logps(
        logits,
        batch.input_ids_ST[:, start:],
        batch.response_mask_ST[:, start:],
        batch.seq_ST[:, start:],
        batch.num_seqs,
        length_normalize,
    )


def to_BK(logp_N: Tensor, seq_index_BK: Tensor) -> Tensor:
    """Scatter per-sequence values into the [B, K] list layout; 0.0 at padding (the loss masks it)."""
    picked_BK = logp_N[seq_index_BK.clamp(min=0)]
    return torch.where(seq_index_BK >= 0, picked_BK, torch.zeros_like(picked_BK))


def padded_tokens(lists: Sequence[RankedList]) -> int:
    """Tokens of the padded batch: sequences x longest sequence (what bounds memory)."""
    lengths = [sequence_length(lst, j) for lst in lists for j in range(len(lst.candidates))]
    return len(lengths) * max(lengths, default=0)


def real_tokens(lists: Sequence[RankedList]) -> int:
    """Tokens of the sequences, padding excluded."""
    return sum(sequence_length(lst, j) for lst in lists for j in range(len(lst.candidates)))


_warned_oversize = False


def micro_batches(lists: Sequence[RankedList], micro_batch_tokens: int, packed: bool = False) -> list[list[int]]:
    """Group list indices, in order, so each group's tokens stay <= micro_batch_tokens: padded
    tokens (`padded_tokens`), or with `packed` real tokens (the packed rows add only the free
    tail of each row, measured as the learner's padding_frac).

    A list is never split (the losses are per prompt over the whole list). A list larger than the
    budget gets a micro-batch of its own, with a warning the first time.
    """
    global _warned_oversize
    size_of = real_tokens if packed else padded_tokens
    groups: list[list[int]] = []
    for i, lst in enumerate(lists):
        if groups and size_of([lists[j] for j in groups[-1]] + [lst]) <= micro_batch_tokens:
            groups[-1].append(i)
            continue
        if size_of([lst]) > micro_batch_tokens and not _warned_oversize:
            _warned_oversize = True
            warnings.warn(
                f"a list of {size_of([lst])} tokens exceeds "
                f"learner.micro_batch_tokens = {micro_batch_tokens}; it gets a micro-batch "
                f"of its own (raise micro_batch_tokens if memory allows)",
                stacklevel=2,
            )
        groups.append([i])
    return groups


def shard(n_items: int, rank: int, world_size: int) -> range:
    """Rank's contiguous share of n_items; sizes differ by at most one, all ranks together cover
    every item exactly once (the same answer on every rank, so no communication is needed)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return range(rank * n_items // world_size, (rank + 1) * n_items // world_size)
