"""From ranked lists to padded token tensors and back: the learner's batch builder. Pure torch.

Shapes use suffixes : B lists (prompts) by K candidate slots; N = sum of the list
lengths, the flattened sequences (prompt + one candidate each); T tokens; V vocabulary.

    lists --collate--> ListBatch --model--> logits_NTV --sequence_logps--> logp_N --to_BK--> logp_BK

`logp_BK` is what `larpo_ray.losses` takes (log pi(y|x) summed over response tokens, docs/algorithm.md
"The losses"). `micro_batches` bounds the padded tokens of one forward/backward without ever
splitting a list, because every loss is computed per prompt over its whole list. `shard` is the
deterministic data-parallel split every rank computes on its own.
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
    """One micro-batch of candidate lists as tensors (right-padded)."""

    input_ids_NT: Tensor  # long: prompt tokens then response tokens, then padding
    attention_mask_NT: Tensor  # long 0/1: real tokens
    response_mask_NT: Tensor  # bool: response tokens, whose log-probs make up log pi(y|x)
    labels_BK: Tensor  # float: RankedList.labels, what the loss orders by (0 at padding)
    mask_BK: Tensor  # bool: real candidates
    seq_index_BK: Tensor  # long: row in the N sequences of each candidate, -1 at padding

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens, for throughput metrics."""
        return int(self.attention_mask_NT.sum())

    def to(self, device: torch.device | str) -> ListBatch:
        return ListBatch(*(t.to(device) for t in vars(self).values()))


def sequence_length(ranked: RankedList, j: int) -> int:
    """Tokens of candidate j's sequence: prompt + response."""
    return len(ranked.prompt.token_ids) + len(ranked.candidates[j].candidate.token_ids)


def collate(lists: Sequence[RankedList], pad_id: int) -> ListBatch:
    """Pad the lists into one batch: one row per candidate, prompt + response, right-padded.

    Sequences are not truncated: the generator's max_new_tokens and the data's max_prompt_tokens
    keep them within the model's length.
    """
    if not lists:
        raise ValueError("collate needs at least one RankedList")
    seqs = [(lst.prompt.token_ids, sc.candidate.token_ids) for lst in lists for sc in lst.candidates]
    n, t = len(seqs), max(len(p) + len(r) for p, r in seqs)
    b, k = len(lists), max(len(lst.candidates) for lst in lists)
    input_ids_NT = torch.full((n, t), pad_id, dtype=torch.long)
    attention_mask_NT = torch.zeros((n, t), dtype=torch.long)
    response_mask_NT = torch.zeros((n, t), dtype=torch.bool)
    for row, (prompt, response) in enumerate(seqs):
        length = len(prompt) + len(response)
        input_ids_NT[row, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask_NT[row, :length] = 1
        response_mask_NT[row, len(prompt) : length] = True
    labels_BK = torch.zeros((b, k), dtype=torch.float32)
    seq_index_BK = torch.full((b, k), -1, dtype=torch.long)
    row = 0
    for i, lst in enumerate(lists):
        size = len(lst.candidates)
        labels_BK[i, :size] = torch.tensor(lst.labels, dtype=torch.float32)
        seq_index_BK[i, :size] = torch.arange(row, row + size)
        row += size
    return ListBatch(input_ids_NT, attention_mask_NT, response_mask_NT, labels_BK, seq_index_BK >= 0, seq_index_BK)


def sequence_logps(
    logits_NTV: Tensor, input_ids_NT: Tensor, response_mask_NT: Tensor, length_normalize: bool
) -> Tensor:
    """log pi(y|x) per sequence, float32 [N]: the sum of response-token log-probs.

    Token t is predicted by the logits at t - 1. Only the R response positions are gathered
    (an [R, V] copy, not [N, T, V]), and their log-softmax normaliser is a logsumexp taken in
    chunks upcast to float32, so bf16 logits lose no precision. `length_normalize` divides by the
    response length (SimPO-style; off in the paper, LossConfig.length_normalize).
    """
    target_mask_NT = response_mask_NT[:, 1:]
    rows_R = target_mask_NT.nonzero()[:, 0]
    logits_RV = logits_NTV[:, :-1][target_mask_NT]
    targets_R = input_ids_NT[:, 1:][target_mask_NT]
    chunk = max(1, _LOGSUMEXP_CHUNK // max(1, logits_RV.shape[-1]))
    token_logps = []
    for start in range(0, logits_RV.shape[0], chunk):
        part_RV = logits_RV[start : start + chunk].float()
        picked_R = part_RV.gather(1, targets_R[start : start + chunk, None]).squeeze(1)
        token_logps.append(picked_R - torch.logsumexp(part_RV, dim=-1))
    logp_R = torch.cat(token_logps) if token_logps else logits_RV.new_zeros(0, dtype=torch.float32)
    logp_N = logp_R.new_zeros(input_ids_NT.shape[0]).index_add(0, rows_R, logp_R)
    if length_normalize:
        logp_N = logp_N / target_mask_NT.sum(dim=1).clamp(min=1)
    return logp_N


def model_logps(model, batch: ListBatch, length_normalize: bool) -> Tensor:
    """Sequence log-probs [N] of `batch` (already on the model's device) under a causal LM.

    Logits are computed only from the position before the earliest response token on
    (`logits_to_keep`): prompt positions never enter log pi(y|x), and the [N, T, V] logits are the
    largest activation of a small model with a big vocabulary.
    """
    first = int(batch.response_mask_NT.int().argmax(dim=1).min())
    start = max(first - 1, 0)
    logits = model(
        input_ids=batch.input_ids_NT,
        attention_mask=batch.attention_mask_NT,
        use_cache=False,
        logits_to_keep=batch.input_ids_NT.shape[1] - start,
    ).logits
    return sequence_logps(logits, batch.input_ids_NT[:, start:], batch.response_mask_NT[:, start:], length_normalize)


def to_BK(logp_N: Tensor, seq_index_BK: Tensor) -> Tensor:
    """Scatter per-sequence values into the [B, K] list layout; 0.0 at padding (the loss masks it)."""
    picked_BK = logp_N[seq_index_BK.clamp(min=0)]
    return torch.where(seq_index_BK >= 0, picked_BK, torch.zeros_like(picked_BK))


def padded_tokens(lists: Sequence[RankedList]) -> int:
    """Tokens of the collated batch: sequences x longest sequence (what bounds memory)."""
    lengths = [sequence_length(lst, j) for lst in lists for j in range(len(lst.candidates))]
    return len(lengths) * max(lengths, default=0)


_warned_oversize = False


def micro_batches(lists: Sequence[RankedList], micro_batch_tokens: int) -> list[list[int]]:
    """Group list indices, in order, so each group's padded tokens stay <= micro_batch_tokens.

    A list is never split (the losses are per prompt over the whole list). A list larger than the
    budget gets a micro-batch of its own, with a warning the first time.
    """
    global _warned_oversize
    groups: list[list[int]] = []
    n_seqs = longest = 0  # of the open group
    for i, lst in enumerate(lists):
        size = len(lst.candidates)
        length = max(sequence_length(lst, j) for j in range(size))
        if groups and (n_seqs + size) * max(longest, length) <= micro_batch_tokens:
            groups[-1].append(i)
            n_seqs, longest = n_seqs + size, max(longest, length)
            continue
        if size * length > micro_batch_tokens and not _warned_oversize:
            _warned_oversize = True
            warnings.warn(
                f"a list of {size * length} padded tokens exceeds "
                f"learner.micro_batch_tokens = {micro_batch_tokens}; it gets a micro-batch "
                f"of its own (raise micro_batch_tokens if memory allows)",
                stacklevel=2,
            )
        groups.append([i])
        n_seqs, longest = size, length
    return groups


def shard(n_items: int, rank: int, world_size: int) -> range:
    """Rank's contiguous share of n_items; sizes differ by at most one, all ranks together cover
    every item exactly once (the same answer on every rank, so no communication is needed)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return range(rank * n_items // world_size, (rank + 1) * n_items // world_size)
