"""The collective weight transport (larpo_ray.weight_transport) over real gloo groups, no Ray:
the members are threads of this process, each with its own process group over TCP."""

from __future__ import annotations

import threading

import pytest
import torch

from larpo_ray.weight_transport import TensorMeta, join, meta_of, open_endpoint, plan_buckets, receive, send


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 8, generator=g),
        "layer.0.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layer.0.bias": torch.randn(8, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(8, generator=g),
        "step": torch.tensor([7], dtype=torch.int64),
    }


def test_buckets_keep_order_split_on_dtype_and_size():
    meta = [meta_of(n, t) for n, t in weights().items()]
    # 1600 B fp32 | 128 B + 16 B bf16 | 32 B fp32 | 8 B int64
    assert plan_buckets(meta, 4096) == [[0], [1, 2], [3], [4]]
    assert plan_buckets(meta, 100) == [[0], [1], [2], [3], [4]]  # a tensor over the limit: alone
    assert [i for b in plan_buckets(meta, 1) for i in b] == list(range(5))
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1"):
        plan_buckets(meta, 0)


def broadcast(tensors: dict[str, torch.Tensor], n_receivers: int, bucket_bytes: int, sent=None):
    """Rank 0 sends `sent` (default: `tensors`), ranks 1.. receive; (bytes sent, received dicts,
    receiver errors)."""
    meta = [meta_of(n, t) for n, t in tensors.items()]
    world = n_receivers + 1
    store, port = open_endpoint(timeout_s=30)
    got: dict[int, dict] = {}
    errors: list[BaseException] = []

    def member(rank: int) -> None:
        try:
            group = join("127.0.0.1", port, rank, world, "gloo", 30)
            got[rank] = receive(group, meta, bucket_bytes)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            errors.append(err)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(1, world)]
    for t in threads:
        t.start()
    group = join("127.0.0.1", port, 0, world, "gloo", 30, store=store)
    try:
        n = send(group, meta, (sent or tensors).items(), bucket_bytes)
    finally:
        for t in threads:
            t.join(timeout=60)
    return n, got, errors


@pytest.mark.parametrize("bucket_bytes", [1, 4096, 1 << 20])
def test_every_receiver_gets_every_tensor_bit_exact(bucket_bytes):
    sent = weights()
    n, got, errors = broadcast(sent, n_receivers=2, bucket_bytes=bucket_bytes)
    assert errors == [] and sorted(got) == [1, 2]
    assert n == sum(t.numel() * t.element_size() for t in sent.values())
    for received in got.values():
        assert list(received) == list(sent)
        for name, tensor in sent.items():
            assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape
            assert torch.equal(received[name], tensor), name


def test_a_tensor_unlike_the_metadata_is_refused_before_it_is_sent():
    """The receivers size their buffers from the metadata: a changed tensor would hang them or
    load garbage, so the sender refuses it, naming the tensor."""
    sent = weights()
    meta = [meta_of(n, t) for n, t in sent.items()]
    store, port = open_endpoint(timeout_s=30)
    group = join("127.0.0.1", port, 0, 1, "gloo", 30, store=store)  # no receivers: nothing blocks
    wrong = dict(sent, **{"norm.weight": torch.zeros(9)})
    with pytest.raises(ValueError, match=r"norm.weight.*shape=\(9,\).*receivers expect.*shape=\(8,\)"):
        send(group, meta, wrong.items(), 4096)
    with pytest.raises(ValueError, match="more weights to send than the 5"):
        send(group, meta, [*sent.items(), ("extra", torch.zeros(1))], 4096)
    with pytest.raises(ValueError, match="weight 3 to send is None"):
        send(group, meta, list(sent.items())[:3], 4096)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend 'mpi': use one of \\('gloo', 'nccl'\\)"):
        join("127.0.0.1", 1, 0, 1, "mpi", 1)


def test_meta_nbytes_per_dtype():
    assert TensorMeta("a", (3, 4), "bfloat16").nbytes == 24
    assert TensorMeta("a", (3, 4), "float32").nbytes == 48
    assert meta_of("w", torch.zeros(2), shape=(4, 2)).shape == (4, 2)  # a ZeRO-3 shard's full shape
