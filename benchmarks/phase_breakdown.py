"""Phase breakdown of a LARPO iteration: where the wall-clock time of `python -m larpo_ray.run` goes.

Runs the real job (`larpo_ray.run.main`, through Ray as configured) once per preset, each in a
child process, and splits every iteration's true wall-clock time into the driver's phases
(larpo_ray/driver.py `run_loop`, keys of RUN_DIR/metrics.jsonl):

    generate   timing/generate: rollout = generation + scoring of every batch (on Ray the reward
               actors score batch i while batch i+1 generates); timing/score_actor is the reward
               actors' summed busy time inside it, shown as a sub-row, not added
    lists      timing/lists: memory update + list building (driver process)
    train      timing/train: the learner group's train request; sub-rows: train/ref_seconds
               (reference log-probs, once per iteration) and train/train_seconds (optimizer steps),
               both measured inside the learner rank; the rest is the request's round trip
               (Ray queues, putting the lists in the object store, Ray Train worker wake-up)
    sync       timing/sync: learner.get_weights (gather + ray.put) + every generator's load
    eval       timing/eval: greedy held-out rollout + scoring
    overhead   wall - (generate + lists + train + sync + eval): what the driver does between
               phases (sampling prompts, building the record, metrics.jsonl + W&B logging, the
               console line)

The driver records each iteration's wall clock (`timing/iteration`, from sampling the prompts to
the end of the evaluation) and `timing/overhead` = wall - phases; the checkpoint written after it
is `timing/checkpoint`, reported apart. For runs of older versions, whose `timing/iteration` was
the sum of the phases, this script stamps `Tracker.log` (patched in the child process) and takes
the gap between consecutive iteration records as the wall time. Start-up (model, prompts, Ray,
actors, learner group) and shut-down are reported apart from the iterations.

    python benchmarks/phase_breakdown.py                         # default model + tiny preset
    python benchmarks/phase_breakdown.py --presets tiny          # ~3 min
    python benchmarks/phase_breakdown.py --analyse RUN_DIR       # an existing run's metrics.jsonl
    python benchmarks/phase_breakdown.py --smoke                 # CI: tiny, in-process roles, HF
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, cpu_environment, describe, save, table  # noqa: E402

PHASES = ("generate", "lists", "train", "sync", "eval")
PRESETS = {"default": [], "tiny": ["--preset", "tiny"]}  # default = the embedded recipe
SMOKE = [
    "--resources.use_ray",
    "false",
    "--generation.engine",
    "hf",
    "--loop.iterations",
    "1",
    "--loop.prompts_per_iteration",
    "4",
    "--data.num_eval",
    "4",
    "--logging.wandb_mode",
    "disabled",
]
TARGET_OVERHEAD = 0.10  # issue 5: orchestration overhead <= 10% of iteration wall time


def run_job(preset: str, extra: list[str], run_dir: Path) -> dict:
    """Run larpo_ray.run in this process with Tracker.log stamped; returns wall-clock facts."""
    cpu_environment()
    from larpo_ray import run
    from larpo_ray.tracking import Tracker

    argv = PRESETS[preset] + ["--loop.run_dir", str(run_dir), "--loop.save_model", "false", *extra]
    wall: dict = {"argv": argv, "total_s": None, "stamps": []}
    original = Tracker.log

    def write() -> None:  # after every record, so a run that dies keeps its finished iterations
        (run_dir / "wall_clock.json").write_text(json.dumps(wall, indent=2) + "\n")

    def stamped_log(self, record, *args, **kwargs):
        original(self, record, *args, **kwargs)
        wall["stamps"].append({"iteration": record["iteration"], "since_start_s": time.perf_counter() - start})
        write()

    Tracker.log = stamped_log
    start = time.perf_counter()
    rc = run.main(argv)
    wall["total_s"] = time.perf_counter() - start
    write()
    if rc != 0:
        raise RuntimeError(f"larpo_ray.run {' '.join(argv)} exited {rc}")
    return wall


def analyse(run_dir: Path) -> dict:
    """Per-iteration phases (and overhead where wall_clock.json exists) of a run folder."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    wall_path = run_dir / "wall_clock.json"
    wall = json.loads(wall_path.read_text()) if wall_path.exists() else None
    at = {s["iteration"]: s["since_start_s"] for s in wall["stamps"]} if wall else {}
    iterations = []
    for rec in records:
        s = rec["iteration"]
        if s == 0:
            continue
        row = {
            "iteration": s,
            **{p: rec.get(f"timing/{p}") or 0.0 for p in PHASES},
            "score_actor": rec.get("timing/score_actor"),
            "reference": rec.get("train/ref_seconds"),
            "train_steps": rec.get("train/train_seconds"),
            "sync_bytes": rec.get("sync/bytes"),
            "sync_gb_per_s": rec.get("sync/gb_per_s"),
            "sum_of_phases": rec.get("timing/iteration"),
            "generated_tokens": rec.get("rollout/tokens"),
            "trained_tokens": rec.get("train/tokens"),
        }
        if row["reference"] is not None and row["train_steps"] is not None:
            row["train_request_overhead"] = row["train"] - row["reference"] - row["train_steps"]
        if "timing/overhead" in rec:  # the driver's own wall clock
            row["wall"], row["overhead"] = rec["timing/iteration"], rec["timing/overhead"]
            row["checkpoint"] = rec.get("timing/checkpoint") or 0.0
            row["overhead_fraction"] = row["overhead"] / row["wall"]
        elif s in at and s - 1 in at:
            row["wall"] = at[s] - at[s - 1]
            row["overhead"] = row["wall"] - sum(row[p] for p in PHASES)
            row["overhead_fraction"] = row["overhead"] / row["wall"]
        iterations.append(row)
    out = {"run_dir": str(run_dir), "iterations": iterations, "totals": _totals(iterations)}
    if wall:
        first, last = at.get(0), max(at.values())
        initial_eval = next((r.get("timing/eval", 0.0) for r in records if r["iteration"] == 0), 0.0)
        out.update(
            {
                "argv": wall["argv"],
                "total_s": wall["total_s"],  # None: the run did not finish
                "startup_s": first - initial_eval if first is not None else None,
                "initial_eval_s": initial_eval,
                "shutdown_s": wall["total_s"] - last if wall["total_s"] is not None else None,
            }
        )
    return out


def _totals(rows: list[dict]) -> dict:
    """Sums over iterations and each phase's share of the summed wall time."""
    keys = [*PHASES, "score_actor", "reference", "train_steps", "train_request_overhead", "wall", "overhead"]
    tot = {k: sum(r[k] for r in rows) for k in keys if rows and all(r.get(k) is not None for r in rows)}
    if tot.get("wall"):
        tot["fractions_of_wall"] = {k: v / tot["wall"] for k, v in tot.items() if k != "wall"}
        tot["overhead_fraction"] = tot["overhead"] / tot["wall"]
        # Stricter reading: the learner request's round trip is orchestration too.
        tot["overhead_incl_train_request_fraction"] = (tot["overhead"] + tot.get("train_request_overhead", 0.0)) / tot[
            "wall"
        ]
    return tot


def report(name: str, result: dict) -> str:
    rows = []
    for r in result["iterations"]:
        rows.append({**r, "phase_sum": sum(r[p] for p in PHASES)})
    t = result["totals"]
    if "wall" in t:
        rows.append(
            {
                "iteration": "all",
                **{k: t[k] for k in t if isinstance(t[k], float)},
                "phase_sum": sum(t[p] for p in PHASES),
                "overhead_fraction": t["overhead_fraction"],
            }
        )
    cols = [
        ("iter", "iteration", "{}"),
        ("wall s", "wall", "{:.1f}"),
        ("generate", "generate", "{:.1f}"),
        ("(score)", "score_actor", "{:.2f}"),
        ("lists", "lists", "{:.2f}"),
        ("train", "train", "{:.1f}"),
        ("(ref)", "reference", "{:.1f}"),
        ("(steps)", "train_steps", "{:.1f}"),
        ("(request)", "train_request_overhead", "{:.2f}"),
        ("sync", "sync", "{:.2f}"),
        ("eval", "eval", "{:.1f}"),
        ("overhead", "overhead", "{:.2f}"),
        ("ovh %", "overhead_fraction", "{:.1%}"),
    ]
    startup, total = result.get("startup_s") or float("nan"), result.get("total_s") or float("nan")
    head = f"== {name}: start-up {startup:.1f} s, total {total:.1f} s"
    return head + "\n" + table(rows, cols)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["default", "tiny"])
    parser.add_argument("--analyse", type=Path, metavar="RUN_DIR", help="only analyse an existing run folder")
    parser.add_argument("--keep-runs", type=Path, metavar="DIR", help="keep the run folders here (default: deleted)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny preset, 1 iteration, in-process roles, HF engine (CI)"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON result (default benchmarks/results/phase_breakdown_<machine>_<date>.json)"
    )
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "RUN_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more larpo_ray.run overrides")
    args = parser.parse_args(argv)
    if args.child:  # one job in this process: its Ray, vLLM and learner go when it exits
        run_job(args.child[0], args.extra, Path(args.child[1]))
        return 0
    cpu_environment()
    result: dict = {
        "benchmark": "phase_breakdown",
        "machine": describe(),
        "smoke": args.smoke,
        "target_overhead_fraction": TARGET_OVERHEAD,
        "runs": {},
    }
    if args.analyse:
        result["runs"][args.analyse.name] = analyse(args.analyse)
    else:
        presets = ["tiny"] if args.smoke else args.presets
        extra = (SMOKE if args.smoke else []) + args.extra
        root = Path(tempfile.mkdtemp(prefix="larpo-phases-")) if args.keep_runs is None else args.keep_runs
        for preset in presets:
            run_dir = root / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
            cmd = [sys.executable, __file__, "--child", preset, str(run_dir), "--extra", *extra]
            print(f"running {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
            result["runs"][preset] = analyse(run_dir)
        if args.keep_runs is None:
            shutil.rmtree(root, ignore_errors=True)
    for name, run in result["runs"].items():
        print(report(name, run))
        frac = run["totals"].get("overhead_fraction")
        if frac is not None:
            run["target_met"] = frac <= TARGET_OVERHEAD
            print(
                f"orchestration overhead {frac:.1%} of iteration wall time (target <= {TARGET_OVERHEAD:.0%}: "
                f"{'met' if run['target_met'] else 'NOT met'}); counting the learner request's round trip: "
                f"{run['totals']['overhead_incl_train_request_fraction']:.1%}"
            )
    save(result, args.out, "phase_breakdown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
