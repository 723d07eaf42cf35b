"""Weight sync: bytes, seconds and GB/s of each learner -> generator transport on this machine.

The weights are the policy's full state dict as numpy arrays with HF names, as the learner's
`get_weights` returns them (a tied head is the same array under both keys). Transports:

    object_store   ray.put of the weights dict, then a Ray actor receives the ObjectRef as a
                   top-level argument (Ray resolves it; numpy arrays are zero-copy views of the
                   node's shared-memory store) and wraps them as torch tensors (`as_tensors`):
                   what RayRuntime.sync_weights ships to each generator. put and receive are
                   timed apart.
    vllm_shm       `Generator(engine="vllm").load_weights`: `VLLMEngine._load_from_file`
                   writes a safetensors file in /dev/shm and the engine's worker reloads it in
                   place (`reload_weights` + re-packing tied modules). The file write alone is
                   timed too, by the same `save_file` call, so the reload is the difference.
    hf_load_state_dict  `Generator(engine="hf").load_weights`: `load_state_dict` into the
                   in-process HF model.

    gloo_broadcast `larpo_ray.weight_transport` (generation.weight_transport = gloo): this
                   process as the learner's rank 0 broadcasts the unique tensors in buckets of
                   --bucket-mb over a gloo group to a Ray actor, which unpacks them as tensors.
                   Over TCP, so it works across nodes (the object store's zero-copy does not).

NCCL broadcast and CUDA IPC (vLLM's weight-transfer API, `VLLMEngine._load_native`) need GPUs:
not measured on a CPU machine, and the JSON says so. GB/s = bytes / seconds; bytes = the unique
bytes of the state dict (a tied head counted once; Generator.load_weights reports the keyed sum).

    python benchmarks/weight_sync.py                  # SmolLM2-135M (~540 MB fp32) + tiny
    python benchmarks/weight_sync.py --smoke          # CI: tiny model, one repetition
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_environment, describe, save, table  # noqa: E402

TRANSPORTS = ("object_store", "gloo_broadcast", "vllm_shm", "hf_load_state_dict")
NOT_AVAILABLE = {
    "nccl_broadcast": "needs CUDA GPUs (NCCL); this machine has none, so it is not measured",
    "cuda_ipc": "vLLM's weight-transfer API with the IPC backend (VLLMEngine._load_native) needs a "
    "CUDA GPU shared by learner and generator; not measured on this CPU machine",
}


def policy_weights(path: str) -> dict:
    """The model's state dict as numpy, tied tensors sharing one array (as actors.learner.WeightPublisher)."""
    from larpo_ray.models import load_causal_lm

    model = load_causal_lm(path)
    by_id, out = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in by_id:
            by_id[id(tensor)] = tensor.detach().numpy().copy()
        out[name] = by_id[id(tensor)]
    return out


def unique_bytes(weights: dict) -> int:
    return sum(a.nbytes for a in {id(a): a for a in weights.values()}.values())


class Receiver:
    """A Ray actor standing in for a generator: takes the weights as torch tensors."""

    def receive(self, weights: dict) -> float:
        from actors.generator import as_tensors

        start = time.perf_counter()
        tensors = as_tensors(weights, tied_embeddings=False)
        return time.perf_counter() - start + 0.0 * len(tensors)

    def join(self, port: int, world_size: int) -> None:
        from larpo_ray import weight_transport

        self.group = weight_transport.join("127.0.0.1", port, 1, world_size, "gloo", 120)

    def receive_broadcast(self, meta: list, bucket_bytes: int) -> float:
        from larpo_ray import weight_transport

        start = time.perf_counter()
        tensors = weight_transport.receive(self.group, meta, bucket_bytes)
        return time.perf_counter() - start + 0.0 * len(tensors)

    def ping(self) -> int:
        return os.getpid()


def bench_object_store(weights: dict, reps: int) -> list[dict]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(Receiver).options(num_cpus=0).remote()
        ray.get(actor.ping.remote())
        out = []
        for _ in range(reps + 1):  # the first round is a warm-up
            t0 = time.perf_counter()
            ref = ray.put(weights)
            t1 = time.perf_counter()
            wrap_s = ray.get(actor.receive.remote(ref))
            t2 = time.perf_counter()
            del ref
            out.append({"seconds": t2 - t0, "put_s": t1 - t0, "receive_s": t2 - t1, "actor_wrap_s": wrap_s})
        return out[1:]
    finally:
        ray.shutdown()


def bench_gloo(weights: dict, reps: int, bucket_mb: int) -> list[dict]:
    import ray
    import torch

    from larpo_ray import weight_transport

    named = [(name, torch.from_numpy(a)) for name, a in {id(a): (n, a) for n, a in weights.items()}.values()]
    meta = [weight_transport.meta_of(name, t) for name, t in named]
    bucket = bucket_mb << 20
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(Receiver).options(num_cpus=0).remote()
        ray.get(actor.ping.remote())
        store, port = weight_transport.open_endpoint(120)
        joined = actor.join.remote(port, 2)
        group = weight_transport.join("", 0, 0, 2, "gloo", 120, store=store)
        ray.get(joined)
        out = []
        for _ in range(reps + 1):  # the first round is a warm-up
            t0 = time.perf_counter()
            received = actor.receive_broadcast.remote(meta, bucket)
            weight_transport.send(group, meta, named, bucket)
            t1 = time.perf_counter()
            receive_s = ray.get(received)
            out.append({"seconds": time.perf_counter() - t0, "put_s": t1 - t0, "receive_s": receive_s})
        return out[1:]
    finally:
        ray.shutdown()


def bench_generator(model: str, engine: str, weights: dict, reps: int, args) -> tuple[list[dict], float]:
    from actors.generator import Generator, as_tensors
    from larpo_ray.config import GenerationConfig, ModelConfig

    start = time.perf_counter()
    gen = Generator(
        model, GenerationConfig(engine=engine), ModelConfig(name_or_path=model, max_model_len=args.max_model_len)
    )
    startup = time.perf_counter() - start
    out = []
    try:
        for version in range(reps + 1):
            t0 = time.perf_counter()
            report = gen.load_weights(version + 1, weights)
            row = {
                "seconds": time.perf_counter() - t0,
                "generator_reported_s": report["seconds"],
                "generator_reported_bytes": report["bytes"],
            }
            if engine == "vllm":  # the file write of _load_from_file, on its own
                from safetensors.torch import save_file

                folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
                fd, path = tempfile.mkstemp(suffix=".safetensors", dir=folder)
                os.close(fd)
                t0 = time.perf_counter()
                save_file(as_tensors(weights, gen.engine.facts.tied_embeddings), path)
                row["shm_write_s"] = time.perf_counter() - t0
                os.unlink(path)
                row["reload_s"] = row["seconds"] - row["shm_write_s"]
            out.append(row)
        return out[1:], startup
    finally:
        gen.close()


def bench_model(model: str, args) -> dict:
    from larpo_ray.models import resolve_model

    path = resolve_model(model)
    weights = policy_weights(path)
    n_bytes = unique_bytes(weights)
    rows, startup = {}, {}
    for transport in args.transports:
        if transport == "object_store":
            reps = bench_object_store(weights, args.reps)
        elif transport == "gloo_broadcast":
            reps = bench_gloo(weights, args.reps, args.bucket_mb)
        else:
            engine = "vllm" if transport == "vllm_shm" else "hf"
            reps, startup[transport] = bench_generator(model, engine, weights, args.reps, args)
        seconds = statistics.median(r["seconds"] for r in reps)
        rows[transport] = {"bytes": n_bytes, "seconds": seconds, "gb_per_s": n_bytes / seconds / 1e9, "reps": reps}
        for key in ("put_s", "receive_s", "shm_write_s", "reload_s"):
            if key in reps[0]:
                rows[transport][key] = statistics.median(r[key] for r in reps)
        print(
            f"  {model} {transport}: {n_bytes / 1e6:.0f} MB in {seconds:.3f} s = {rows[transport]['gb_per_s']:.2f} "
            "GB/s",
            flush=True,
        )
    return {
        "model": model,
        "tensors": len(weights),
        "bytes": n_bytes,
        "keyed_bytes": sum(a.nbytes for a in weights.values()),
        "engine_startup_s": startup,
        "transports": rows,
        "not_available": NOT_AVAILABLE,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "tiny"])
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per transport (after one warm-up)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument(
        "--bucket-mb", type=int, default=256, help="gloo_broadcast: MB per bucket (generation.weight_bucket_mb)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition (CI)")
    parser.add_argument(
        "--out", type=Path, help="JSON result (default benchmarks/results/weight_sync_<machine>_<date>.json)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.reps, args.max_model_len = ["tiny"], 1, 192
    cpu_environment()
    result = {
        "benchmark": "weight_sync",
        "machine": describe(),
        "smoke": args.smoke,
        "models": [bench_model(m, args) for m in args.models],
        "not_available": NOT_AVAILABLE,
    }
    rows = [
        {"model": m["model"], "transport": t, "MB": v["bytes"] / 1e6, **v}
        for m in result["models"]
        for t, v in m["transports"].items()
    ]
    cols = [
        ("model", "model", "{}"),
        ("transport", "transport", "{}"),
        ("MB", "MB", "{:.0f}"),
        ("seconds", "seconds", "{:.3f}"),
        ("GB/s", "gb_per_s", "{:.2f}"),
        ("put s", "put_s", "{:.3f}"),
        ("receive s", "receive_s", "{:.3f}"),
        ("shm write s", "shm_write_s", "{:.3f}"),
        ("reload s", "reload_s", "{:.3f}"),
    ]
    print(table(rows, cols))
    for name, why in NOT_AVAILABLE.items():
        print(f"{name}: {why}")
    save(result, args.out, "weight_sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
