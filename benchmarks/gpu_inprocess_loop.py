"""One LARPO iteration of the real loop on a GPU: step time, peak memory and MFU.

The path `python -m larpo_ray.run` takes with `resources.use_ray = false` (every role in this
process: the HF generation engine, a reward model, the DeepSpeed learner in bf16 with ZeRO-3 on
one GPU), on a Llama-shaped model built from its config with random weights. It measures the
system, not alignment: the reranker is a tiny random scalar-head reward model whose scores only
make the lists non-trivial.

MFU = training FLOPs / train_seconds / peak, FLOPs = the learner's own `train/flops` (useful work,
larpo_ray/flops.py: the LM head on response tokens only), against a large bf16 matmul timed in
the same process (not the datasheet; the learner's `train/mfu` uses its own shorter one). The
reference pass (one forward) is reported apart (`ref_seconds`), as are generation and evaluation.
Results before that count (6 x parameters x tokens: the head over every token) keep their old
figure as `mfu_old_count`.

    python benchmarks/gpu_inprocess_loop.py --shape 1b --out results.json   # a GPU box
    python benchmarks/gpu_inprocess_loop.py --smoke --out /tmp/x.json       # CPU, seconds (CI)

`--site DIR` appends DIR to sys.path for packages the GPU box lacks (DeepSpeed and its pure-Python
dependencies, copied from this repo's .venv); `--tokenizer` is a chat tokenizer folder (default:
the tiny model's, `larpo_ray.models.resolve_model("tiny")`; on a box that cannot build it, copy its
tokenizer files there).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from gpu_learner_step import SHAPES  # the GPU benchmarks' Llama shapes (1b: Llama-3.2-1B's, tied here)

ROOT = Path(__file__).resolve().parent.parent


def build(shape: str, tokenizer_dir: str, out: Path, device: str):
    """The policy (random, bf16 on GPU) and a tiny random reward model, both saved as HF folders."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=max(vocab, len(tok)),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")
    del model
    rm = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=64,
            n_layer=2,
            n_head=2,
            n_positions=1024,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
        )
    )
    rm.save_pretrained(out / "rm")
    tok.save_pretrained(out / "rm")
    return config, params


def matmul_peak(device: str) -> float:
    """FLOP/s of a large square matmul (bf16 on GPU, fp32 on CPU), best of 5."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best


def run_args(out: Path, device: str) -> list[str]:
    gpu = device == "cuda"
    args = {
        "--model.name_or_path": str(out / "policy"),
        "--model.dtype": "bfloat16" if gpu else "float32",
        "--model.max_model_len": "512",
        "--generation.engine": "hf",
        "--generation.k": "4",
        "--generation.max_new_tokens": "128" if gpu else "16",
        "--generation.batch_prompts": "64",
        "--reward.kind": "model",
        "--reward.model_path": str(out / "rm"),
        "--reward.batch_size": "64",
        "--lists.rule": "top_bottom",
        "--loss.name": "contrastive",
        "--learner.precision": "bf16" if gpu else "fp32",
        "--learner.zero_stage": "3",
        "--learner.num_workers": "1",
        "--learner.epochs": "1",
        "--learner.prompts_per_step": "16",
        "--learner.micro_batch_tokens": "16384",
        "--loop.iterations": "1",
        "--loop.prompts_per_iteration": "64" if gpu else "8",
        "--loop.dynamic_sampling": "false",
        "--data.levels": "[1]",
        "--data.num_train": "128",
        "--data.num_eval": "64" if gpu else "8",
        "--resources.use_ray": "false",
        "--logging.wandb_mode": "disabled",
        "--logging.progress": "false",
        "--loop.checkpoint_every": "0",  # the step, not the checkpoint, is measured
        "--loop.run_dir": str(out / "run"),
    }
    return [x for kv in args.items() for x in kv]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--smoke", action="store_true", help="the tiny shape on CPU, seconds (CI)")
    ap.add_argument("--tokenizer", default=None, help="chat tokenizer folder (default: the tiny model's)")
    ap.add_argument("--site", default=None)
    ap.add_argument("--work", default=None, help="where the models and the run go (default: a temp folder)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.site:
        sys.path.append(a.site)
    sys.path.insert(0, str(ROOT))
    import torch

    if a.smoke:
        a.shape = "tiny"
    if a.tokenizer is None:
        from larpo_ray.models import resolve_model

        a.tokenizer = resolve_model("tiny")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    import tempfile

    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_inprocess_loop-"))
    result: dict = {"shape": a.shape, "device": device, "python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    out_file = Path(a.out)

    def save() -> None:
        out_file.write_text(json.dumps(result, indent=2))

    t0 = time.perf_counter()
    config, params = build(a.shape, a.tokenizer, work, device)
    result["build_seconds"] = time.perf_counter() - t0
    result["params"] = params
    result["peak_flops"] = matmul_peak(device)
    save()
    import deepspeed

    result["deepspeed"] = deepspeed.__version__
    from larpo_ray import run

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rc = run.main(run_args(work, device))
    result["run_seconds"], result["rc"] = time.perf_counter() - t0, rc
    if device == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    result["metrics"] = {k: v for k, v in last.items() if k.startswith(("train/", "timing/", "rollout/", "lists/"))}
    seconds, flops = last["train/train_seconds"], last["train/flops"]
    result["train_flops"] = flops
    result["mfu"] = flops / seconds / result["peak_flops"]
    result["seconds_per_step"] = seconds / max(1.0, last["train/steps"])
    save()
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
