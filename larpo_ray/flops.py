"""Useful training FLOPs of ranked lists, and the matmul peak MFU is measured against. Pure torch.

The count is of the work the loss needs, on real tokens only (padding, and LM-head logits the
loss never reads, are waste, not work), per sequence of L tokens with R response tokens:

    forward + backward   6 x block matmul params (q, k, v, o, MLP) x L
                         + 12 x layers x hidden x L x L   (attention scores and values)
                         + 6 x hidden x vocab x R         (LM head: only the logits that predict
                                                           a response token enter log pi(y|x))

A forward-only pass (the reference log-probs) is a third of it. MFU = these FLOPs / seconds /
peak, where the peak is an n x n matmul timed on the same device in the same dtype: the
practical peak of this machine, not a datasheet figure.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch

from larpo_ray.types import RankedList


def sequence_flops(hf_cfg, lengths: Iterable[tuple[int, int]]) -> float:
    """Training FLOPs (forward + backward) of sequences given as (prompt tokens, response tokens),
    for a Llama-shaped `hf_cfg` (hidden_size, num_hidden_layers, num_(key_value_)heads,
    intermediate_size, vocab_size)."""
    h, layers = hf_cfg.hidden_size, hf_cfg.num_hidden_layers
    kv_ratio = hf_cfg.num_key_value_heads / hf_cfg.num_attention_heads
    block = layers * (h * h * (2 + 2 * kv_ratio) + 3 * h * hf_cfg.intermediate_size)  # q, o, k, v, MLP
    total = 0.0
    for prompt, response in lengths:
        length = prompt + response
        total += 6 * block * length + 12 * layers * h * length * length + 6 * h * hf_cfg.vocab_size * response
    return total


def training_flops(lists: Sequence[RankedList], hf_cfg) -> float:
    """Training FLOPs of one forward + backward over every candidate of `lists` (sequence_flops)."""
    lengths = ((len(lst.prompt.token_ids), len(sc.candidate.token_ids)) for lst in lists for sc in lst.candidates)
    return sequence_flops(hf_cfg, lengths)


def matmul_peak(device: torch.device | str, dtype: torch.dtype, n: int | None = None, seconds: float = 0.2) -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device`, the best of repeats over about `seconds`.

    n defaults to 8192 on CUDA (big enough to saturate a GPU's tensor cores) and 1024 on CPU
    (a few tens of milliseconds a matmul on a few cores); uses torch's current thread count.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, allocation
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
