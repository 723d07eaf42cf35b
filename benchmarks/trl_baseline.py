"""larpo-ray side by side with the field: one pairwise iteration against HF generate + TRL DPO.

The same iteration (model, prompts, k = 2, epochs, beta, lr, seed, temperature, max new tokens)
run two ways, each in its own process:

    larpo   a real `python -m larpo_ray.run` with loss.name pairwise, generation.k 2,
            loop.iterations 1 (Ray, vLLM generators, DeepSpeed learner group): its
            metrics.jsonl times the phases. Iteration = generate + lists + train + sync (the
            held-out evaluation and the checkpoint are left out: the baseline has neither).
    trl     what users assemble today (benchmarks/trl_side.py, in the TRL venv): HF `generate`,
            the built-in reward (larpo_ray.tasks.binary_reward), best/worst pairs, TRL
            `DPOTrainer` (fp32, no gradient checkpointing, reference forward in every step).
            Iteration = generate + score + pairs + trainer set-up + train.

Target: larpo iteration <= 0.6 x TRL iteration wall time.

    steps   our learner step against TRL's DPO step on identical batches: the same token-id
            pairs, in the order our learner draws them, the same initial weights, beta, lr and
            AdamW settings. The reference is the initial model with seeded noise added (saved to
            a temporary folder), so the first step's loss is not the trivial log 2 of policy ==
            reference; both sides are given that reference (ours: the LearnerWorker's frozen
            reference copy is replaced, there is no API to pass one). Compared: the first step's
            loss (before any update; target |ours - TRL| <= 1e-4), every later step's loss, and
            the wall time per step. Without the TRL venv the first step is checked against a
            plain forward + the sigmoid DPO formula written out here instead.

Data goes between the two venvs as JSON files. Build the TRL venv first (benchmarks/README.md):

    python benchmarks/trl_baseline.py                       # SmolLM2-135M, 64 prompts, ~15 min
    python benchmarks/trl_baseline.py --smoke               # tiny model, in-process roles, HF engine
    python benchmarks/trl_baseline.py --smoke --no-trl      # what needs no TRL venv (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, cpu_environment, describe, save, table  # noqa: E402

cpu_environment()

TRL_PYTHON = ROOT / "benchmarks" / ".venv-trl" / "bin" / "python"
PARTS = ("larpo", "trl", "steps")
# One pairwise iteration; the learner settings are the project's defaults (config.py).
FULL = {
    "model": "smollm2-135m-instruct",
    "prompts": 64,
    "k": 2,
    "epochs": 2,
    "beta": 0.1,
    "lr": 5e-6,
    "seed": 0,
    "temperature": 0.7,
    "top_p": 1.0,
    "max_new_tokens": 64,
    "batch_prompts": 16,
    "prompts_per_step": 8,
    "max_grad_norm": 1.0,
    "num_eval": 16,
    "noise": 0.1,
    "larpo_args": [],
}
# CI: the tiny model, roles in this process with the HF engine (no Ray, no vLLM start-up).
SMOKE = {
    **FULL,
    "model": "tiny",
    "prompts": 8,
    "epochs": 1,
    "lr": 1e-4,
    "temperature": 1.0,
    "max_new_tokens": 24,
    "batch_prompts": 8,
    "prompts_per_step": 4,
    "num_eval": 4,
    "larpo_args": ["--resources.use_ray", "false", "--generation.engine", "hf"],
}
ITERATION_PHASES = ("generate", "lists", "train", "sync")


def larpo_overrides(s: dict, run_dir: Path) -> list[str]:
    pairs = {
        "model.name_or_path": s["model"],
        "loss.name": "pairwise",
        "loss.beta": s["beta"],
        "generation.k": s["k"],
        "generation.temperature": s["temperature"],
        "generation.top_p": s["top_p"],
        "generation.max_new_tokens": s["max_new_tokens"],
        "generation.batch_prompts": s["batch_prompts"],
        "generation.seed": s["seed"],
        "lists.rule": "top_bottom",
        "lists.top": 1,
        "lists.bottom": 1,
        "learner.lr": s["lr"],
        "learner.epochs": s["epochs"],
        "learner.prompts_per_step": s["prompts_per_step"],
        "learner.max_grad_norm": s["max_grad_norm"],
        "loop.iterations": 1,
        "loop.prompts_per_iteration": s["prompts"],
        "loop.dynamic_sampling": "false",  # TRL trains the prompts it is given: the same ones here
        "loop.seed": s["seed"],
        "loop.save_model": "false",
        "loop.run_dir": str(run_dir),
        "data.num_eval": s["num_eval"],
        "logging.progress": "false",
    }
    return [x for key, value in pairs.items() for x in (f"--{key}", str(value))] + s["larpo_args"]


def iteration_prompts(s: dict) -> tuple[str, list[dict]]:
    """The model folder and the prompts the run's iteration 0 samples (driver.sample_prompts)."""
    from actors.reward import reference_answer
    from larpo_ray.config import load_config
    from larpo_ray.data import load_prompts
    from larpo_ray.driver import sample_prompts
    from larpo_ray.models import load_tokenizer, resolve_model

    cfg = load_config(overrides=larpo_overrides(s, Path("unused")))
    path = resolve_model(cfg.model.name_or_path)
    splits = load_prompts(cfg.data, load_tokenizer(path))
    prompts = sample_prompts(splits.train, 0, cfg)
    return path, [
        {"uid": p.uid, "text": p.text, "token_ids": list(p.token_ids), "answer": reference_answer(p)} for p in prompts
    ]


# ---- the two iterations ---------------------------------------------------------------------------


def run_larpo(s: dict, work: Path) -> dict:
    run_dir = work / "larpo-run"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "larpo_ray.run", *larpo_overrides(s, run_dir)], cwd=ROOT, capture_output=True, text=True
    )
    process_s = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"larpo_ray.run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    timing = {k.removeprefix("timing/"): v for k, v in record.items() if k.startswith("timing/")}
    timing["run_iteration"] = timing.pop("iteration", None)  # the driver's: eval, checkpoint etc. included
    timing["iteration"] = sum(timing[p] for p in ITERATION_PHASES)
    return {
        "timing": timing,
        "process_s": process_s,
        "generated_tokens": record["rollout/tokens"],
        "n_samples": record["rollout/n_candidates"],
        "n_pairs": record["train/n_active"],
        "train_steps": record["train/steps"],
        "ref_seconds": record["train/ref_seconds"],
        "train_seconds": record["train/train_seconds"],
        "loss": record["train/loss"],
        "mean_reward": record["rollout/mean_reward"],
    }


def run_trl(mode: str, job: dict, work: Path, trl_python: Path) -> dict:
    job_path, out_path = work / f"trl_{mode}_job.json", work / f"trl_{mode}_result.json"
    job_path.write_text(json.dumps(job))
    # Not LOCAL_RANK (set for DeepSpeed by our in-process learner): accelerate reads it.
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    start = time.perf_counter()
    proc = subprocess.run(
        [str(trl_python), str(ROOT / "benchmarks" / "trl_side.py"), mode, str(job_path), str(out_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"trl_side.py {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out_path.read_text())
    result["process_wall_s"] = time.perf_counter() - start
    return result


# ---- identical batches ----------------------------------------------------------------------------


def step_pairs(s: dict, prompts: list[dict], trl_samples: list[dict] | None, tokenizer) -> list[dict]:
    """Token-id pairs: from the TRL run's samples (best vs worst by reward, else sample 0 vs 1;
    identical responses skipped), or, without them, a right and a wrong written reply per prompt.
    Cut to whole optimizer steps so both sides see the same batches."""
    pairs = []
    if trl_samples:
        for sample in trl_samples:
            rs, rw = sample["responses"], sample["rewards"]
            chosen, rejected = (rs[rw.index(max(rw))], rs[rw.index(min(rw))]) if max(rw) > min(rw) else (rs[0], rs[1])
            if chosen != rejected:
                pairs.append({"prompt_ids": sample["prompt_ids"], "chosen_ids": chosen, "rejected_ids": rejected})
    else:
        eos = [tokenizer.eos_token_id]
        for p in prompts:
            pairs.append(
                {
                    "prompt_ids": p["token_ids"],
                    "chosen_ids": tokenizer.encode(f"The answer is {p['answer']}.", add_special_tokens=False) + eos,
                    "rejected_ids": tokenizer.encode("I am not sure, maybe 0.", add_special_tokens=False) + eos,
                }
            )
    return pairs[: len(pairs) // s["prompts_per_step"] * s["prompts_per_step"]]


def noisy_reference(path: str, noise: float, seed: int, out: Path):
    """The initial model plus seeded Gaussian noise (noise x each tensor's std), saved to `out`."""
    import torch

    from larpo_ray.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(path, "float32")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    model.save_pretrained(out)
    load_tokenizer(path).save_pretrained(out)
    return model


def formula_loss(policy, ref, pairs: list[dict], beta: float) -> float:
    """Sigmoid DPO written out (as in TRL): full-vocabulary log-softmax, response tokens summed,
    -log sigmoid(beta x (chosen log-ratio - rejected log-ratio)), mean over the pairs."""
    import torch
    import torch.nn.functional as F

    def logp(model, prompt: list[int], response: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).sum()

    losses = []
    for pair in pairs:
        ratio = {
            side: logp(policy, pair["prompt_ids"], pair[f"{side}_ids"])
            - logp(ref, pair["prompt_ids"], pair[f"{side}_ids"])
            for side in ("chosen", "rejected")
        }
        losses.append(-F.logsigmoid(beta * (ratio["chosen"] - ratio["rejected"])))
    return float(torch.stack(losses).mean())


def our_steps(s: dict, model_path: str, ref_model, pairs: list[dict]) -> tuple[dict, list[dict]]:
    """Our LearnerWorker (DeepSpeed, one rank) on the pairs; returns its numbers and the pairs in
    the order its steps draw them (what TRL is then given)."""
    from actors.learner import LearnerWorker, disable_dropout
    from larpo_ray.config import LearnerConfig, LossConfig, ModelConfig
    from larpo_ray.types import Candidate, Prompt, RankedList, ScoredCandidate

    def cand(uid: str, ids: list[int]) -> Candidate:
        return Candidate(
            prompt_uid=uid, token_ids=tuple(ids), text="", sample_logps=(), temperature=1.0, policy_version=0
        )

    lists = [
        RankedList(
            Prompt(uid=f"pair{i}", text="", token_ids=tuple(p["prompt_ids"])),
            (
                ScoredCandidate(cand(f"pair{i}", p["chosen_ids"]), 1.0, 0),
                ScoredCandidate(cand(f"pair{i}", p["rejected_ids"]), 0.0, 0),
            ),
            (1.0, 0.0),
        )
        for i, p in enumerate(pairs)
    ]
    worker = LearnerWorker(
        model_path,
        ModelConfig(name_or_path=model_path),
        LossConfig(name="pairwise", beta=s["beta"], reference="initial"),
        LearnerConfig(
            lr=s["lr"],
            epochs=1,
            prompts_per_step=s["prompts_per_step"],
            max_grad_norm=s["max_grad_norm"],
            num_workers=1,
            precision="fp32",
        ),
        seed=s["seed"],
    )
    # No API takes a reference model: replace the frozen copy that loss.reference = initial makes.
    worker.initial = ref_model.requires_grad_(False).eval()
    disable_dropout(worker.initial)
    ordered = [pairs[i] for step in worker._steps(0, len(lists)) for i in step]
    first = ordered[: s["prompts_per_step"]]
    check = formula_loss(worker.engine.module, ref_model, first, s["beta"])  # before any update
    result = worker.train_iteration(0, lists)
    m = result.metrics
    return {
        "step_losses": [sm["loss"] for sm in result.step_metrics],
        "steps": int(m["steps"]),
        "ref_seconds": m["ref_seconds"],
        "train_seconds": m["train_seconds"],
        "step_s": m["train_seconds"] / m["steps"],
        "step_s_with_ref": (m["train_seconds"] + m["ref_seconds"]) / m["steps"],
        "formula_first_loss": check,
    }, ordered


def compare_steps(
    s: dict,
    model_path: str,
    prompts: list[dict],
    trl_samples,
    work: Path,
    trl_python: Path | None,
    trl_threads: int | None,
) -> dict:
    from larpo_ray.models import load_tokenizer

    pairs = step_pairs(s, prompts, trl_samples, load_tokenizer(model_path))
    if not pairs:
        raise RuntimeError(f"no pairs for the step comparison: raise --prompts to at least {s['prompts_per_step']}")
    ref_path = work / "noisy-reference"
    ref_model = noisy_reference(model_path, s["noise"], s["seed"], ref_path)
    ours, ordered = our_steps(s, model_path, ref_model, pairs)
    del ref_model
    out = {
        "pairs_from": "trl samples" if trl_samples else "written replies",
        "n_pairs": len(pairs),
        "reference": f"initial model + {s['noise']} x std Gaussian noise",
        "ours": ours,
        "first_loss_ours_minus_formula": ours["step_losses"][0] - ours["formula_first_loss"],
    }
    if trl_python:
        job = {
            "model_path": model_path,
            "ref_path": str(ref_path),
            "pairs": ordered,
            "beta": s["beta"],
            "lr": s["lr"],
            "batch_size": s["prompts_per_step"],
            "seed": s["seed"],
            "max_grad_norm": s["max_grad_norm"],
            "threads": trl_threads,
        }
        trl = run_trl("steps", job, work, trl_python)
        n = min(len(trl["step_losses"]), len(ours["step_losses"]))
        out["trl"] = {k: trl[k] for k in ("step_losses", "step_seconds", "train_s", "trainer_init_s", "versions")}
        out["trl"]["step_s"] = sum(trl["step_seconds"]) / len(trl["step_seconds"])
        out["first_loss_ours_minus_trl"] = ours["step_losses"][0] - trl["step_losses"][0]
        out["max_abs_loss_diff_all_steps"] = max(
            abs(a - b) for a, b in zip(ours["step_losses"][:n], trl["step_losses"][:n])
        )
        out["step_time_ratio"] = ours["step_s"] / out["trl"]["step_s"]
        out["step_time_ratio_with_ref"] = ours["step_s_with_ref"] / out["trl"]["step_s"]
    return out


def with_load(fn, *args) -> dict:
    """fn's result with the 1-minute load average before and after: other jobs on the machine
    show up there, and multi-threaded torch slows down far more than its share under them."""
    before = os.getloadavg()[0]
    out = fn(*args)
    out["load_avg_1m"] = [before, os.getloadavg()[0]]
    return out


# ---- report ----------------------------------------------------------------------------------------


def summarize(result: dict) -> dict:
    out = {}
    larpo, trl = result.get("larpo"), result.get("trl")
    if larpo and trl:
        out["iteration_ratio"] = larpo["timing"]["iteration"] / trl["timing"]["iteration"]
        out["iteration_target_met"] = out["iteration_ratio"] <= 0.6
        out["process_ratio"] = larpo["process_s"] / trl["process_wall_s"]
        out["generate_ratio"] = larpo["timing"]["generate"] / trl["timing"]["generate"]
        if "train" in trl["timing"]:
            trl_train = trl["timing"]["trainer_init"] + trl["timing"]["train"]
            out["train_ratio"] = larpo["timing"]["train"] / trl_train
            # the two runs sample differently, so they find different numbers of pairs to train on
            out["train_ratio_per_pair"] = (larpo["timing"]["train"] / larpo["n_pairs"]) / (trl_train / trl["n_pairs"])
    steps = result.get("steps")
    if steps:
        out["first_loss_ours_minus_formula"] = steps["first_loss_ours_minus_formula"]
        if "trl" in steps:
            out["first_loss_ours_minus_trl"] = steps["first_loss_ours_minus_trl"]
            out["loss_target_met"] = abs(steps["first_loss_ours_minus_trl"]) <= 1e-4
            out["step_time_ratio"] = steps["step_time_ratio"]
            out["step_time_ratio_with_ref"] = steps["step_time_ratio_with_ref"]
    return out


def print_report(result: dict) -> None:
    larpo, trl, steps = result.get("larpo"), result.get("trl"), result.get("steps")
    rows = []
    for name, r, phases in (
        ("larpo-ray", larpo, ("generate", "lists", "train", "sync")),
        ("HF + TRL", trl, ("generate", "score", "pairs", "trainer_init", "train")),
    ):
        if r:
            t = r["timing"]
            rows.append(
                {
                    "side": name,
                    "phases": ", ".join(f"{p} {t[p]:.1f}" for p in phases if p in t),
                    "iteration": t["iteration"],
                    "process": r.get("process_wall_s", r.get("process_s")),
                    "samples": r["n_samples"],
                    "tokens": r["generated_tokens"],
                    "pairs": r["n_pairs"],
                    "load": "{:.1f} -> {:.1f}".format(*r.get("load_avg_1m", (math.nan, math.nan))),
                }
            )
    if rows:
        print(
            table(
                rows,
                [
                    ("side", "side", "{}"),
                    ("iteration s", "iteration", "{:.1f}"),
                    ("phases (s)", "phases", "{}"),
                    ("process s", "process", "{:.1f}"),
                    ("samples", "samples", "{:.0f}"),
                    ("tokens", "tokens", "{:.0f}"),
                    ("pairs", "pairs", "{:.0f}"),
                    ("load avg", "load", "{}"),
                ],
            )
        )
    if steps:
        ours = steps["ours"]
        print(
            f"identical batches ({steps['n_pairs']} pairs from {steps['pairs_from']}, {ours['steps']} steps): "
            f"ours {ours['step_s']:.3f} s/step (+ reference pass {ours['ref_seconds']:.2f} s once)"
        )
        print(
            f"  first-step loss: ours {ours['step_losses'][0]:.6f}, written-out formula "
            f"{ours['formula_first_loss']:.6f}"
        )
        if "trl" in steps:
            print(
                f"  TRL {steps['trl']['step_s']:.3f} s/step (reference forward inside); first-step loss TRL "
                f"{steps['trl']['step_losses'][0]:.6f}; max |diff| over all steps "
                f"{steps['max_abs_loss_diff_all_steps']:.2e}"
            )
            print(f"  per-step losses ours {[round(x, 5) for x in ours['step_losses']]}")
            print(f"  per-step losses TRL  {[round(x, 5) for x in steps['trl']['step_losses']]}")
    for key, value in result["summary"].items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, in-process roles (CI)")
    parser.add_argument(
        "--out", type=Path, help="result JSON (default benchmarks/results/trl_baseline_<machine>_<date>.json)"
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)")
    parser.add_argument("--trl-python", type=Path, default=TRL_PYTHON, help="python of the TRL venv")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL out even if its venv exists")
    parser.add_argument("--prompts", type=int, help="prompts of the iteration")
    parser.add_argument("--trl-threads", type=int, help="torch threads of the TRL side (default: torch's, all cores)")
    args = parser.parse_args(argv)
    s = dict(SMOKE if args.smoke else FULL)
    if args.prompts:
        s["prompts"] = args.prompts
    trl_python = args.trl_python if args.trl_python.exists() and not args.no_trl else None
    if trl_python is None and not args.no_trl:
        print(f"no TRL venv at {args.trl_python} (benchmarks/README.md builds it): the TRL parts are skipped")
    result: dict = {
        "benchmark": "trl_baseline",
        "smoke": args.smoke,
        "machine": describe(),
        "settings": s,
        "parts": args.parts,
        "trl_venv": str(trl_python) if trl_python else None,
    }
    model_path, prompts = iteration_prompts(s)
    with tempfile.TemporaryDirectory(prefix="trl-baseline-") as tmp:
        work = Path(tmp)
        if "trl" in args.parts and trl_python:
            job = {
                **{
                    k: s[k]
                    for k in (
                        "k",
                        "temperature",
                        "top_p",
                        "max_new_tokens",
                        "batch_prompts",
                        "beta",
                        "lr",
                        "epochs",
                        "seed",
                        "max_grad_norm",
                    )
                },
                "model_path": model_path,
                "prompts": prompts,
                "batch_size": s["prompts_per_step"],
                "threads": args.trl_threads,
            }
            result["trl"] = with_load(run_trl, "iteration", job, work, trl_python)
            print(f"TRL iteration: {result['trl']['timing']['iteration']:.1f} s", flush=True)
        if "larpo" in args.parts:
            result["larpo"] = with_load(run_larpo, s, work)
            print(f"larpo-ray iteration: {result['larpo']['timing']['iteration']:.1f} s", flush=True)
        if "steps" in args.parts:
            samples = result.get("trl", {}).get("samples")
            result["steps"] = with_load(
                compare_steps, s, model_path, prompts, samples, work, trl_python, args.trl_threads
            )
    result.get("trl", {}).pop("samples", None)  # token ids: large, and only an input of the steps part
    result["summary"] = summarize(result)
    print_report(result)
    save(result, args.out, "trl_baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
