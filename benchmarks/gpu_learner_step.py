"""GPU learner step: training tokens/s and MFU of LARPO's learner step, against the matmul peak
measured in the same run.

Needs only PyTorch + transformers and this repo's pure modules (`larpo_ray.batching`,
`larpo_ray.losses`, `larpo_ray.types`): no Ray, vLLM or DeepSpeed, so it runs on a bare GPU box.
One step = collate ranked lists -> policy forward with grad -> sequence log-probs -> ranking loss
against fixed reference log-probs -> backward -> AdamW. The reference pass (no grad, once per
iteration in the real learner) is timed separately.

MFU = achieved FLOP/s / peak, with the useful FLOPs of larpo_ray/flops.py (6 x block matmul
params x real tokens + attention scores + the LM head on response tokens only: the logits the loss
reads); the peak is a large square bf16 matmul timed here, not the datasheet. Results written
before that count (LM head over every token: twice the useful head work here) are re-stated from
their recorded timings with `--restate`: `mfu` is the corrected figure, `mfu_old_count` the old.

    python benchmarks/gpu_learner_step.py --model 1b --out results.json      # on a GPU
    python benchmarks/gpu_learner_step.py --smoke                            # CPU, seconds (CI)
    python benchmarks/gpu_learner_step.py --restate benchmarks/results/gpu_learner_step_h200_*.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from larpo_ray.batching import collate, model_logps, to_BK  # noqa: E402
from larpo_ray.flops import training_flops  # noqa: E402
from larpo_ray.losses import LOSSES  # noqa: E402
from larpo_ray.types import Candidate, Prompt, RankedList, ScoredCandidate  # noqa: E402

# Llama-shaped models: (hidden, layers, heads, kv heads, intermediate, vocab)
SHAPES = {
    "tiny": (256, 4, 4, 4, 1024, 2048),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "3b": (3072, 28, 24, 8, 8192, 128256),
}


def build_model(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    cfg = shape_config(name)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype), cfg


def make_lists(n_lists: int, k: int, prompt_len: int, response_len: int, vocab: int, seed: int) -> list[RankedList]:
    """Random-token lists with distinct rewards (every pair strict), lengths jittered +-25%."""
    rng = random.Random(seed)
    lists = []
    for i in range(n_lists):
        p_len = rng.randint(prompt_len * 3 // 4, prompt_len)
        prompt = Prompt(uid=f"p{i}", text="", token_ids=tuple(rng.randrange(vocab) for _ in range(p_len)))
        cands = []
        for j in range(k):
            r_len = rng.randint(response_len * 3 // 4, response_len)
            cand = Candidate(
                prompt_uid=prompt.uid,
                token_ids=tuple(rng.randrange(vocab) for _ in range(r_len)),
                text="",
                sample_logps=(),
                temperature=1.0,
                policy_version=0,
            )
            cands.append(ScoredCandidate(candidate=cand, reward=float(k - j), iteration=0))
        lists.append(RankedList(prompt=prompt, candidates=tuple(cands), labels=tuple(c.reward for c in cands)))
    return lists


def matmul_peak(device: str, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n matmul: the practical peak the MFU is measured against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def shape_config(name: str):
    """The Llama config of a SHAPES entry (the benchmark's model, and FLOP counts without weights)."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter, vocab = SHAPES[name]
    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


def restate(path: Path) -> dict:
    """Recompute a recorded result's MFU with the useful-FLOP count (module docstring) from its
    timings and shapes: its lists are rebuilt from the seed (default lengths unless recorded),
    checked against the recorded token counts, and the file is rewritten with `mfu` and
    `achieved_tflops` corrected, the old figures kept as `mfu_old_count` / `achieved_tflops_old_count`."""
    result = json.loads(path.read_text())
    if "mfu_old_count" in result:
        return result  # already re-stated
    cfg = shape_config(result["model"])
    lists = make_lists(
        result["lists"], result["k"], result.get("prompt_len", 256), result.get("response_len", 256), cfg.vocab_size, 0
    )
    batch = collate(lists, pad_id=0)
    if (batch.num_tokens, batch.input_ids_ST.numel()) != (result["tokens_per_step"], result["padded_tokens"]):
        raise ValueError(f"{path}: the rebuilt lists do not match the recorded token counts; cannot re-state")
    achieved = training_flops(lists, cfg) / result["step_seconds_median"]
    result["achieved_tflops_old_count"] = result.pop("achieved_tflops")
    result["mfu_old_count"] = result.pop("mfu_vs_measured_peak")
    result["achieved_tflops"] = achieved / 1e12
    result["mfu"] = achieved / (result["matmul_peak_tflops"] * 1e12)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, cfg = build_model(args.model, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda")
    lists = make_lists(args.lists, args.k, args.prompt_len, args.response_len, cfg.vocab_size, 0)
    batch = collate(lists, pad_id=0).to(device)
    with torch.no_grad():
        ref_BK = to_BK(model_logps(model, batch, False), batch.seq_index_BK)  # warm-up (kernels, allocator)
        _sync(device)
        t0 = time.perf_counter()
        ref_BK = to_BK(model_logps(model, batch, False), batch.seq_index_BK)
        _sync(device)
        ref_s = time.perf_counter() - t0
    times, loss = [], None
    for step in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        logp_BK = to_BK(model_logps(model, batch, False), batch.seq_index_BK)
        loss, _ = LOSSES[args.loss](logp_BK, ref_BK, batch.labels_BK, batch.mask_BK, 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = batch.num_tokens
    step_s = sorted(times)[len(times) // 2]
    achieved = training_flops(lists, cfg) / step_s
    peak = matmul_peak(device, dtype, args.peak_n, args.peak_reps)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "model": args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "loss_name": args.loss,
        "lists": args.lists,
        "k": args.k,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "tokens_per_step": tokens,
        "padded_tokens": batch.input_ids_ST.numel(),
        "step_seconds_median": step_s,
        "train_tokens_per_s": tokens / step_s,
        "reference_seconds": ref_s,
        "reference_tokens_per_s": tokens / ref_s,
        "achieved_tflops": achieved / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "mfu": achieved / peak,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        "final_loss": float(loss.detach()),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--loss", choices=sorted(LOSSES), default="listmle")
    parser.add_argument("--lists", type=int, default=8, help="prompts (lists) per step")
    parser.add_argument("--k", type=int, default=4, help="candidates per list")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-n", type=int, default=8192)
    parser.add_argument("--peak-reps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps (CPU, CI)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--restate", nargs="+", type=Path, help="re-state these result files' MFU (no run)")
    args = parser.parse_args(argv)
    if args.restate:
        for path in args.restate:
            r = restate(path)
            print(f"{path}: mfu {r['mfu']:.3f} (old count {r['mfu_old_count']:.3f})")
        return 0
    if args.smoke:
        args.model, args.lists, args.k, args.prompt_len, args.response_len = "tiny", 2, 3, 16, 16
        args.steps, args.warmup, args.peak_n, args.peak_reps = 2, 1, 256, 2
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
