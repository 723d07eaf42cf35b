"""Weight sync over a collective group: the learner's rank 0 broadcasts the policy to every
generator, NCCL between GPUs on any nodes, or gloo over TCP anywhere (what the CPU tests run).

No Ray here: `larpo_ray.topology` opens the group and drives the sync; this module is the wire.

A group is a torch.distributed process group of its own (`ProcessGroupGloo` / `ProcessGroupNCCL`
on a TCPStore that the sender serves), not the default group: it lives beside Ray Train's
data-parallel group on the learner and beside vLLM's groups on the generators. Rank 0 sends;
ranks 1..N (one per generator) receive.

Tensors travel in buckets: consecutive tensors of one dtype packed into one flat buffer of at most
`bucket_bytes` (a bigger tensor gets a bucket of its own), so a 135M model is a few broadcasts
rather than ~270. Both sides cut the buckets from the same metadata (`plan_buckets`), so nothing
but the tensor data travels, and the sender checks every tensor against that metadata first (a
mismatch would otherwise hang a receiver or load garbage).

Runbook:
    store, port = open_endpoint(timeout_s)                               # sender (learner rank 0)
    group = join(addr, port, 0, world_size, "gloo", timeout_s, store)    # rank 0, with its store ...
    group = join(addr, port, rank, world_size, "gloo", timeout_s)        # ... ranks 1..N concurrently
    n_bytes = send(group, meta, named_tensors, bucket_bytes)             # rank 0 ...
    tensors = receive(group, meta, bucket_bytes, device)                 # ... while ranks 1..N receive
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of the broadcast, in send order."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # a torch dtype name: "float32", "bfloat16", ...

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


def meta_of(name: str, tensor: torch.Tensor, shape: Sequence[int] | None = None) -> TensorMeta:
    """`shape`: the full shape where `tensor` is a shard (ZeRO-3's `ds_shape`)."""
    return TensorMeta(
        name,
        tuple(int(d) for d in (tensor.shape if shape is None else shape)),
        str(tensor.dtype).removeprefix("torch."),
    )


def plan_buckets(meta: Sequence[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Indices into `meta` per bucket: consecutive, one dtype, at most `bucket_bytes` unless a
    single tensor is bigger."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, m in enumerate(meta):
        if not buckets or m.dtype != dtype or size + m.nbytes > bucket_bytes:
            buckets.append([])
            size, dtype = 0, m.dtype
        buckets[-1].append(i)
        size += m.nbytes
    return buckets


def open_endpoint(timeout_s: float) -> tuple[dist.TCPStore, int]:
    """The sender's rendezvous store on a free port of this host (all interfaces)."""
    store = dist.TCPStore(
        "0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return store, store.port


def join(
    addr: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float, store: dist.Store | None = None
):
    """This process's member of the group; blocks until all `world_size` members joined (gloo).
    The sender passes its own store; the others connect to `addr:port`. NCCL uses the current
    CUDA device (set it first)."""
    if backend not in BACKENDS:
        raise ValueError(f"weight transport backend {backend!r}: use one of {BACKENDS}")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
    store = dist.PrefixStore("larpo-weights", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def _broadcast(group, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    group.broadcast([tensor], options).wait()


def send(
    group,
    meta: Sequence[TensorMeta],
    tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    device: torch.device | str | None = None,
) -> int:
    """Broadcast `tensors` (name, tensor) in `meta`'s order from rank 0; the bytes sent. The
    buckets are packed on `device` (default: where the tensors are; NCCL needs CUDA).

    A tensor that does not match its metadata raises before its bucket goes out."""
    buckets = plan_buckets(meta, bucket_bytes)
    source = iter(tensors)
    sent = 0
    for bucket in buckets:
        parts = []
        for i in bucket:
            name, tensor = next(source, (None, None))
            got = None if tensor is None else meta_of(name, tensor)
            if got != meta[i]:
                raise ValueError(
                    f"weight {i} to send is {got}, but the receivers expect {meta[i]}: "
                    f"the model's parameters changed since the metadata was taken"
                )
            part = tensor.detach().reshape(-1)
            parts.append(part if device is None else part.to(device))
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        _broadcast(group, flat)
        sent += flat.numel() * flat.element_size()
        if flat.is_cuda:
            torch.cuda.synchronize()  # the bucket may be freed once the broadcast completed
    if next(source, None) is not None:
        raise ValueError(f"more weights to send than the {len(meta)} in the metadata")
    return sent


def receive(
    group, meta: Sequence[TensorMeta], bucket_bytes: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors rank 0 sends, by name (views into the received buckets)."""
    out: dict[str, torch.Tensor] = {}
    for bucket in plan_buckets(meta, bucket_bytes):
        flat = torch.empty(sum(meta[i].numel for i in bucket), dtype=meta[bucket[0]].torch_dtype, device=device)
        _broadcast(group, flat)
        offset = 0
        for i in bucket:
            out[meta[i].name] = flat[offset : offset + meta[i].numel].view(meta[i].shape)
            offset += meta[i].numel
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out
