"""Learner throughput and MFU: the project's `LearnerWorker` (actors/learner.py; DeepSpeed, world
size 1, in this process) against this machine's fp32 matmul peak measured in the same run.

Lists: real built-in task prompts (chat-templated) with k random-token responses of 16..64
tokens and distinct rewards, as the default run trains them (pairwise loss, top/bottom lists of
k = 2, `learner.prompts_per_step` lists per optimizer step, one epoch). Each configuration builds a
fresh worker, warms up on one optimizer step, then trains one timed iteration; the worker's own
metrics give the times: `ref_seconds` (reference log-probs, no grad, once per iteration) and
`train_seconds` (forward + backward + optimizer steps).

FLOPs: useful work on real tokens (larpo_ray/flops.py: 6 x block matmul params x tokens +
attention scores + the LM head on response positions only; padding excluded). The reference pass
is forward only (a third of that). `mfu_6n` is the usual 6 x all params x tokens, for comparison.
Peak = a large square fp32 `torch.matmul` with the same thread count, the best of a measurement
before and after the sweep (`larpo_ray.flops.matmul_peak`; the worker's own `mfu` metric uses a
shorter one taken at its start). `padding_frac` is the worker's: padding / forward tokens.
`--layouts packed padded` compares `learner.packing` on and off (the first is used for the sweeps).

    python benchmarks/learner.py                       # SmolLM2-135M + tiny, ZeRO 0-3, micro-batch sweep
    python benchmarks/learner.py --models tiny --zero-stages 0 --layouts packed padded
    python benchmarks/learner.py --models tiny --zero-stages 0 2
    python benchmarks/learner.py --smoke               # CI: tiny model, ZeRO 0 and 3, seconds
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_environment, describe, save, table  # noqa: E402

TARGET_MFU = 0.5  # issue 5: MFU >= 50% of the measured peak


def matmul_peak(n: int, seconds: float) -> float:
    """fp32 FLOP/s of an n x n matmul on the CPU with torch's current thread count."""
    import torch

    from larpo_ray.flops import matmul_peak as measure

    return measure("cpu", torch.float32, n, seconds)


def make_lists(prompts, n_lists: int, k: int, vocab: int, seed: int, resp_range=(16, 64)):
    from larpo_ray.types import Candidate, RankedList, ScoredCandidate

    rng = random.Random(seed)
    lists = []
    for i in range(n_lists):
        prompt = prompts[i % len(prompts)]
        cands = []
        for j in range(k):
            ids = tuple(rng.randrange(vocab) for _ in range(rng.randint(*resp_range)))
            cand = Candidate(
                prompt_uid=prompt.uid, token_ids=ids, text="", sample_logps=(), temperature=0.7, policy_version=0
            )
            cands.append(ScoredCandidate(cand, reward=float(k - j), iteration=0))
        lists.append(RankedList(prompt, tuple(cands), tuple(c.reward for c in cands)))
    return lists


def bench_config(path: str, lists, warm, zero: int, mbt: int, layout: str, args) -> dict:
    import torch

    from actors.learner import LearnerWorker
    from larpo_ray.batching import real_tokens
    from larpo_ray.config import LearnerConfig, LossConfig, ModelConfig
    from larpo_ray.flops import training_flops

    learner_cfg = LearnerConfig(
        zero_stage=zero,
        micro_batch_tokens=mbt,
        packing=layout == "packed",
        epochs=1,
        prompts_per_step=args.prompts_per_step,
        num_workers=1,
        lr=1e-6,
    )
    start = time.perf_counter()
    worker = LearnerWorker(path, ModelConfig(name_or_path=path), LossConfig(), learner_cfg, seed=0)
    build_s = time.perf_counter() - start
    worker.train_iteration(0, warm)  # first step allocates; not timed
    m = worker.train_iteration(1, lists).metrics
    hf_cfg = worker.engine.module.config
    params = sum(p.numel() for p in worker.engine.module.parameters())
    if zero == 3:  # partitioned: numel() of the local shard is 0; ds_numel is the full size
        params = sum(getattr(p, "ds_numel", p.numel()) for p in worker.engine.module.parameters())
    flops, tokens = training_flops(lists, hf_cfg), real_tokens(lists)
    del worker
    gc.collect()
    return {
        "zero_stage": zero,
        "micro_batch_tokens": mbt,
        "layout": layout,
        "build_s": build_s,
        "params": params,
        "lists": len(lists),
        "steps": m["steps"],
        "tokens": tokens,
        "forward_tokens": m["forward_tokens"],
        "padding_frac": m["padding_frac"],
        "worker_mfu": m["mfu"],
        "worker_peak_gflops": m["peak_gflops"],
        "train_seconds": m["train_seconds"],
        "ref_seconds": m["ref_seconds"],
        "train_tokens_per_s": tokens / m["train_seconds"],
        "ref_tokens_per_s": tokens / m["ref_seconds"],
        "train_gflops": flops / m["train_seconds"] / 1e9,
        "ref_gflops": flops / 3 / m["ref_seconds"] / 1e9,
        "flops_per_token": flops / tokens,
        "six_n_gflops": 6 * params * tokens / m["train_seconds"] / 1e9,
        "torch_threads": torch.get_num_threads(),
        "loss": m["loss"],
    }


def bench_model(model: str, args) -> dict:
    from larpo_ray.config import DataConfig
    from larpo_ray.data import load_prompts
    from larpo_ray.models import load_tokenizer, resolve_model

    path = resolve_model(model)
    tok = load_tokenizer(path)
    prompts = load_prompts(DataConfig(num_train=args.lists, num_eval=1), tok).train
    lists = make_lists(prompts, args.lists, args.k, len(tok), seed=1)
    warm = make_lists(prompts, args.prompts_per_step, args.k, len(tok), seed=2)
    first = (args.zero_stages[0], args.micro_batch_tokens[0], args.layouts[0])
    configs = [(z, first[1], first[2]) for z in args.zero_stages]
    configs += [(first[0], t, first[2]) for t in args.micro_batch_tokens[1:]]
    configs += [(first[0], first[1], layout) for layout in args.layouts[1:]]
    rows = []
    for zero, mbt, layout in configs:
        rows.append({"model": model, **bench_config(path, lists, warm, zero, mbt, layout, args)})
        r = rows[-1]
        print(
            f"  {model} zero {zero} micro {mbt} {layout}: train {r['train_tokens_per_s']:.0f} tok/s "
            f"{r['train_gflops']:.1f} GFLOP/s, ref {r['ref_tokens_per_s']:.0f} tok/s",
            flush=True,
        )
    return {
        "model": model,
        "mean_prompt_tokens": sum(len(lst.prompt.token_ids) for lst in lists) / len(lists),
        "k": args.k,
        "configs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "tiny"])
    parser.add_argument("--zero-stages", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument(
        "--micro-batch-tokens",
        nargs="+",
        type=int,
        default=[4096, 1024, 2048, 8192],
        help="the first is used for the ZeRO sweep; the rest are swept at the first ZeRO stage",
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=["packed", "padded"],
        default=["packed", "padded"],
        help="learner.packing on / off; the first is used for the sweeps, the rest at the first ZeRO stage",
    )
    parser.add_argument("--lists", type=int, default=16, help="lists in the timed iteration")
    parser.add_argument("--k", type=int, default=2, help="candidates per list (default run: top/bottom = 2)")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--peak-n", type=int, default=2048)
    parser.add_argument("--peak-seconds", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, ZeRO 0 and 3, 4 lists (CI)")
    parser.add_argument(
        "--out", type=Path, help="JSON result (default benchmarks/results/learner_<machine>_<date>.json)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.zero_stages, args.micro_batch_tokens = ["tiny"], [0, 3], [4096, 1024]
        args.lists, args.prompts_per_step, args.peak_n, args.peak_seconds = 4, 2, 512, 0.2
    cpu_environment()
    peak_before = matmul_peak(args.peak_n, args.peak_seconds)
    models = [bench_model(m, args) for m in args.models]
    peak_after = matmul_peak(args.peak_n, args.peak_seconds)
    peak = max(peak_before, peak_after)
    for m in models:
        for r in m["configs"]:
            r["mfu"] = r["train_gflops"] * 1e9 / peak
            r["ref_mfu"] = r["ref_gflops"] * 1e9 / peak
            r["mfu_6n"] = r["six_n_gflops"] * 1e9 / peak
        best = max(m["configs"], key=lambda r: r["mfu"])
        m["best_mfu"], m["target_met"] = best["mfu"], best["mfu"] >= TARGET_MFU
    result = {
        "benchmark": "learner",
        "machine": describe(),
        "smoke": args.smoke,
        "target_mfu": TARGET_MFU,
        "matmul_peak_gflops": peak / 1e9,
        "matmul_peak_before_gflops": peak_before / 1e9,
        "matmul_peak_after_gflops": peak_after / 1e9,
        "peak_n": args.peak_n,
        "flops_formula": "6 x block matmul params x tokens + 12 x layers x hidden x seq_len x tokens "
        "+ 6 x hidden x vocab x response tokens; real tokens only (larpo_ray/flops.py)",
        "models": models,
    }
    cols = [
        ("model", "model", "{}"),
        ("ZeRO", "zero_stage", "{}"),
        ("micro tok", "micro_batch_tokens", "{}"),
        ("layout", "layout", "{}"),
        ("padding", "padding_frac", "{:.0%}"),
        ("train tok/s", "train_tokens_per_s", "{:.0f}"),
        ("GFLOP/s", "train_gflops", "{:.1f}"),
        ("MFU", "mfu", "{:.1%}"),
        ("MFU 6N", "mfu_6n", "{:.1%}"),
        ("ref tok/s", "ref_tokens_per_s", "{:.0f}"),
        ("ref MFU", "ref_mfu", "{:.1%}"),
    ]
    print(
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (n = {args.peak_n}, before {peak_before / 1e9:.1f}, "
        f"after {peak_after / 1e9:.1f})"
    )
    print(table([r for m in models for r in m["configs"]], cols))
    for m in models:
        print(
            f"{m['model']}: best MFU {m['best_mfu']:.1%} (target >= {TARGET_MFU:.0%}: "
            f"{'met' if m['target_met'] else 'NOT met'})"
        )
    save(result, args.out, "learner")
    return 0


if __name__ == "__main__":
    sys.exit(main())
