"""The gloo / NCCL weight transport (larpo_ray.weight_transport) on a GPU machine, torch only.

The CPU suite runs the transport over gloo between CPU processes. This checks what needs CUDA,
on the one-GPU machine that is sometimes lent (no Ray or vLLM there):

    nccl_world_1     an NCCL group built by `join` (its options, the TCPStore rendezvous) and a
                     bucketed `send` of a SmolLM2-sized bf16 state dict from CUDA tensors
    nccl_world_2     sender and receiver as two processes on the same GPU (NCCL usually refuses
                     two ranks on one device; recorded either way)
    gloo_cuda_to_cpu a GPU learner's rank 0 sending CUDA tensors over gloo to a CPU receiver
                     (weight_transport = gloo on GPU nodes), bit-exact

    python benchmarks/gpu_weight_transport.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from larpo_ray import weight_transport as wt  # noqa: E402

BUCKET = 256 << 20


def state_dict(device: str, dtype=torch.bfloat16, layers: int = 30, hidden: int = 576) -> dict:
    """SmolLM2-135M's shapes (30 layers, hidden 576, vocab 49152): ~270 MB in bf16."""
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {"model.embed_tokens.weight": torch.randn(49152, hidden, generator=g)}
    for i in range(layers):
        for name, shape in (
            ("q_proj", (hidden, hidden)),
            ("k_proj", (192, hidden)),
            ("v_proj", (192, hidden)),
            ("o_proj", (hidden, hidden)),
            ("gate_proj", (1536, hidden)),
            ("up_proj", (1536, hidden)),
            ("down_proj", (hidden, 1536)),
            ("input_layernorm", (hidden,)),
        ):
            out[f"model.layers.{i}.{name}.weight"] = torch.randn(*shape, generator=g)
    return {k: v.to(dtype).to(device) for k, v in out.items()}


def _receiver(port: int, backend: str, device: str, queue) -> None:
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(0)
        meta = [wt.meta_of(n, t) for n, t in state_dict("cpu").items()]
        group = wt.join("127.0.0.1", port, 1, 2, backend, 120)
        start = time.perf_counter()
        got = wt.receive(group, meta, BUCKET, device)
        seconds = time.perf_counter() - start
        want = state_dict("cpu")
        exact = all(torch.equal(got[k].cpu(), want[k]) for k in want)
        queue.put({"ok": True, "exact": exact, "receive_s": seconds})
    except BaseException:  # noqa: BLE001 - reported
        queue.put({"ok": False, "error": traceback.format_exc()[-2000:]})


def pair(backend: str, receive_device: str) -> dict:
    """Rank 0 here sends CUDA tensors; rank 1 in a child process receives on `receive_device`."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store, port = wt.open_endpoint(120)
    child = ctx.Process(target=_receiver, args=(port, backend, receive_device, queue))
    child.start()
    try:
        torch.cuda.set_device(0)
        tensors = state_dict("cuda")
        meta = [wt.meta_of(n, t) for n, t in tensors.items()]
        group = wt.join("", 0, 0, 2, backend, 120, store=store)
        start = time.perf_counter()
        n = wt.send(group, meta, tensors.items(), BUCKET)
        seconds = time.perf_counter() - start
        child.join(timeout=300)
        return {
            "ok": True,
            "bytes": n,
            "send_s": seconds,
            "gb_per_s": n / seconds / 1e9,
            "receiver": queue.get(timeout=10),
        }
    except BaseException:  # noqa: BLE001 - reported
        child.kill()
        return {"ok": False, "error": traceback.format_exc()[-2000:]}


def world_1() -> dict:
    try:
        torch.cuda.set_device(0)
        tensors = state_dict("cuda")
        meta = [wt.meta_of(n, t) for n, t in tensors.items()]
        store, _ = wt.open_endpoint(60)
        group = wt.join("", 0, 0, 1, "nccl", 60, store=store)
        start = time.perf_counter()
        n = wt.send(group, meta, tensors.items(), BUCKET)
        return {
            "ok": True,
            "bytes": n,
            "buckets": len(wt.plan_buckets(meta, BUCKET)),
            "seconds": time.perf_counter() - start,
            "group": type(group).__name__,
        }
    except BaseException:  # noqa: BLE001 - reported
        return {"ok": False, "error": traceback.format_exc()[-2000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "nccl": str(torch.cuda.nccl.version())}
    result["nccl_world_1"] = world_1()
    print("nccl_world_1", json.dumps(result["nccl_world_1"])[:500], flush=True)
    result["gloo_cuda_to_cpu"] = pair("gloo", "cpu")
    print("gloo_cuda_to_cpu", json.dumps(result["gloo_cuda_to_cpu"])[:500], flush=True)
    result["nccl_world_2"] = pair("nccl", "cuda")
    print("nccl_world_2", json.dumps(result["nccl_world_2"])[:800], flush=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
