"""A study's numbers from its run folders: study.md, study.json, study.png (and W&B when on).

Per variant, over the seeds whose run finished: the mean and 95% Student-t interval of the final
held-out metric (greedy accuracy by default), its gain over the initial policy, win-rate vs the
initial policy, Pass@N, the learner's reward accuracy, lists per iteration, generated and trained
tokens, and wall time. Differences between variants: paired two-stage bootstrap over seeds and
held-out prompts (larpo_ray.stats), Holm-adjusted over all pairs; "significant" = adjusted p < 0.05.
Reads only files (RUN_DIR/metrics.jsonl, RUN_DIR/eval/iter-N.jsonl): no Ray, no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from larpo_ray.stats import mean, paired_bootstrap, t_interval

if TYPE_CHECKING:
    from larpo_ray.study import PlannedRun, Study

ALPHA = 0.05
# (column, how to get it from one run's summary, format)
COLUMNS = (
    ("final", "{:.3f}"),
    ("gain", "{:+.3f}"),
    ("win_rate", "{:.3f}"),
    ("pass_at", "{:.3f}"),
    ("reward_accuracy", "{:.3f}"),
    ("lists_per_iteration", "{:.1f}"),
    ("generated_tokens", "{:,.0f}"),
    ("trained_tokens", "{:,.0f}"),
    ("loop_minutes", "{:.1f}"),
)
HEADERS = {
    "final": "final {metric}",
    "gain": "gain vs initial",
    "win_rate": "win-rate vs initial",
    "pass_at": "Pass@N",
    "reward_accuracy": "reward acc (train)",
    "lists_per_iteration": "lists / iter",
    "generated_tokens": "generated tokens",
    "trained_tokens": "trained tokens",
    "loop_minutes": "wall (min)",
}


def read_run(run_dir: Path, metric: str, iterations: int) -> dict[str, Any] | None:
    """One finished run's summary, or None if it has not reached `iterations`."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[int(rec["iteration"])] = rec
    if iterations not in records:
        return None
    last, its = records[iterations], [records[i] for i in sorted(records) if i >= 1]
    elapsed, curve = records.get(0, {}).get("timing/eval") or 0.0, []
    for i in sorted(records):
        rec = records[i]
        if i >= 1:
            elapsed += (rec.get("timing/iteration") or 0.0) + (rec.get("timing/checkpoint") or 0.0)
        if rec.get(metric) is not None:
            curve.append((i, rec[metric], elapsed))
    pass_keys = sorted(k for k in last if k.startswith("eval/pass@"))
    initial = records.get(0, {}).get(metric)
    return {
        "final": last.get(metric),
        "initial": initial,
        "gain": None if initial is None or last.get(metric) is None else last[metric] - initial,
        "win_rate": last.get("eval/win_rate_vs_initial"),
        "pass_at": last.get(pass_keys[-1]) if pass_keys else None,
        "pass_key": pass_keys[-1] if pass_keys else None,
        "reward_accuracy": last.get("train/reward_accuracy"),
        "lists_per_iteration": mean([r.get("lists/n_lists") or 0.0 for r in its]),
        "generated_tokens": sum(r.get("rollout/tokens") or 0.0 for r in its),
        "trained_tokens": sum(r.get("train/tokens") or 0.0 for r in its),
        "loop_minutes": elapsed / 60,
        "curve": curve,
        "per_prompt": _per_prompt(run_dir, iterations, metric),
    }


def _per_prompt(run_dir: Path, iteration: int, metric: str) -> dict[str, float]:
    """{uid: score} of the greedy held-out answers at `iteration` (RUN_DIR/eval/iter-N.jsonl)."""
    path = run_dir / "eval" / f"iter-{iteration:06d}.jsonl"
    if not path.is_file():
        return {}
    field = "correct" if metric == "eval/accuracy" else "reward"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["uid"]: float(r[field]) for r in rows if r.get(field) is not None}


def summarize(study: Study, runs: list[PlannedRun], status: dict[str, dict]) -> dict[str, Any]:
    """Everything study.md / .json / .png show, from the run folders."""
    variants, per_run = {}, []
    for run in runs:
        summary = read_run(run.run_dir, study.metric, run.config.loop.iterations)
        state = "done" if summary else status.get(f"{run.variant}/seed-{run.seed}", {}).get("state", "missing")
        state = "partial" if state == "done" and not summary else state
        process_s = status.get(f"{run.variant}/seed-{run.seed}", {}).get("seconds")
        per_run.append(
            {
                "variant": run.variant,
                "seed": run.seed,
                "state": state,
                "run_dir": str(run.run_dir),
                "process_minutes": None if process_s is None else process_s / 60,
                **({k: v for k, v in summary.items() if k not in ("per_prompt", "curve")} if summary else {}),
            }
        )
        if summary:
            variants.setdefault(run.variant, {})[run.seed] = summary
    rows = []
    for v in study.variants:
        done = variants.get(v.name, {})
        row = {"variant": v.name, "description": v.description, "seeds_done": sorted(done), "n": len(done)}
        for col, _ in COLUMNS + (("initial", ""),):
            m, lo, hi = t_interval([s[col] for s in done.values() if s.get(col) is not None])
            row[col] = {"mean": _num(m), "low": _num(lo), "high": _num(hi)}
        row["pass_key"] = next((s["pass_key"] for s in done.values() if s.get("pass_key")), None)
        row["curve"] = _mean_curve(list(done.values()))
        rows.append(row)
    return {
        "study": study.name,
        "description": study.description,
        "metric": study.metric,
        "seeds": study.seeds,
        "baseline": study.baseline,
        "variants": rows,
        "differences": differences(study, variants),
        "runs": per_run,
        "held_out_prompts": _held_out(variants),
    }


def differences(study: Study, variants: dict[str, dict[int, dict]]) -> list[dict[str, Any]]:
    """Every pair of variants with per-prompt results (baseline pairs first): paired bootstrap of
    the final metric, Holm-adjusted p-values."""
    names = [v.name for v in study.variants if variants.get(v.name)]
    names.sort(key=lambda n: n != study.baseline)
    pairs = [(a, b) for i, b in enumerate(names) for a in names[i + 1 :]]
    out = []
    for a, b in pairs:
        pa = {s: r["per_prompt"] for s, r in variants[a].items() if r["per_prompt"]}
        pb = {s: r["per_prompt"] for s, r in variants[b].items() if r["per_prompt"]}
        if set(pa) & set(pb):
            out.append({"a": a, "b": b, **paired_bootstrap(pa, pb)})
    order = sorted(range(len(out)), key=lambda i: out[i]["p"])
    running = 0.0
    for rank, i in enumerate(order):  # Holm's step-down adjustment
        running = max(running, min(1.0, (len(out) - rank) * out[i]["p"]))
        out[i]["p_holm"] = running
        out[i]["significant"] = running < ALPHA
    return out


def _mean_curve(summaries: list[dict]) -> list[dict[str, float]]:
    """Per iteration: mean metric with its t-interval, and mean elapsed minutes."""
    by_iter: dict[int, list[tuple[float, float]]] = {}
    for s in summaries:
        for i, value, seconds in s["curve"]:
            by_iter.setdefault(i, []).append((value, seconds))
    out = []
    for i in sorted(by_iter):
        m, lo, hi = t_interval([v for v, _ in by_iter[i]])
        out.append(
            {
                "iteration": i,
                "mean": _num(m),
                "low": _num(lo),
                "high": _num(hi),
                "minutes": mean([t for _, t in by_iter[i]]) / 60,
                "n": len(by_iter[i]),
            }
        )
    return out


def _held_out(variants: dict[str, dict[int, dict]]) -> int:
    sizes = [len(r["per_prompt"]) for runs in variants.values() for r in runs.values() if r["per_prompt"]]
    return max(sizes) if sizes else 0


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


# ---- writing ------------------------------------------------------------------------------------


def write_report(study: Study, runs: list[PlannedRun], out: Path, status: dict[str, dict]) -> list[Path]:
    """study.json, study.md and study.png in the study folder (and a W&B summary run when on)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(study, runs, status)
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    (out / "study.md").write_text(markdown(study, summary))
    paths = [out / "study.md", out / "study.json"]
    if any(r["curve"] for r in summary["variants"]):
        plot(summary, out / "study.png")
        paths.append(out / "study.png")
    modes = {r.config.logging.wandb_mode for r in runs}
    if modes - {"disabled"} and any(r["n"] for r in summary["variants"]):
        _log_wandb(study, runs[0].config, summary, out, paths)
    return paths


def _cell(stat: dict[str, float | None], fmt: str) -> str:
    if stat["mean"] is None:
        return "-"
    if stat["low"] is None:
        return fmt.format(stat["mean"])
    return f"{fmt.format(stat['mean'])} [{fmt.format(stat['low'])}, {fmt.format(stat['high'])}]"


def markdown(study: Study, summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    states = [r["state"] for r in summary["runs"]]
    lines = [f"# larpo-ray study: {study.name}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        f"Study file: `{study.source}`; seeds {study.seeds}; runs: {states.count('done')} done, "
        f"{states.count('failed')} failed, {len(states) - states.count('done') - states.count('failed')} not finished. "
        f"Held-out prompts: {summary['held_out_prompts']} (one prompt = "
        f"{100 / max(summary['held_out_prompts'], 1):.2f} points). Cells: mean over seeds [95% Student-t interval]; "
        f"wall = initial evaluation + iterations + checkpoints (start-up excluded).",
        "",
        "| variant | seeds | " + " | ".join(HEADERS[c].format(metric=metric) for c, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in summary["variants"]:
        cells = [_cell(row[c], fmt) for c, fmt in COLUMNS]
        name = f"**{row['variant']}**" if row["variant"] == study.baseline else row["variant"]
        lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
    pass_keys = {r["pass_key"] for r in summary["variants"] if r["pass_key"]}
    if pass_keys:
        lines += ["", f"Pass@N column: {', '.join(sorted(pass_keys))} (greedy eval is separate)."]
    lines += ["", "Variants:", ""] + [
        f"- `{v.name}`: {v.description or ''} overrides `{v.overrides}`"
        + (f", recipe `{v.recipe}`" if v.recipe else "")
        for v in study.variants
    ]
    lines += [
        "",
        f"## Differences in final {metric}",
        "",
        "A - B over the same seeds and held-out prompts; interval and p from a paired two-stage bootstrap "
        "(resample seeds, then prompts); p (Holm) adjusts for all pairs; significant: p (Holm) < 0.05.",
        "",
        "| A - B | difference | 95% interval | p | p (Holm) | significant |",
        "|---|---|---|---|---|---|",
    ]
    for d in summary["differences"]:
        lines.append(
            f"| {d['a']} - {d['b']} | {d['diff']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | "
            f"{d['p']:.3f} | {d['p_holm']:.3f} | {'yes' if d['significant'] else 'no'} |"
        )
    if not summary["differences"]:
        lines.append("| (no two variants with per-prompt results yet) | | | | | |")
    its = sorted({c["iteration"] for r in summary["variants"] for c in r["curve"]})
    lines += [
        "",
        f"## {metric} per iteration (mean over seeds; minutes since the start in brackets)",
        "",
        "| variant | " + " | ".join(f"iter {i}" for i in its) + " |",
        "|---|" + "---|" * len(its),
    ]
    for row in summary["variants"]:
        by = {c["iteration"]: c for c in row["curve"]}
        lines.append(
            f"| {row['variant']} | "
            + " | ".join(f"{by[i]['mean']:.3f} ({by[i]['minutes']:.1f})" if i in by else "-" for i in its)
            + " |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "Process = the run's own wall clock, start-up included (summed over resumes).",
        "",
        "| run | state | final | gain | wall (min) | process (min) | folder |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        f = lambda k, fmt: fmt.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['variant']} seed {r['seed']} | {r['state']} | {f('final', '{:.3f}')} | {f('gain', '{:+.3f}')} | "
            f"{f('loop_minutes', '{:.1f}')} | {f('process_minutes', '{:.1f}')} | `{r['variant']}/seed-{r['seed']}` |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Held-out metric against iteration and against minutes, a line per variant with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for row in summary["variants"]:
        curve = row["curve"]
        if not curve:
            continue
        ys = [c["mean"] for c in curve]
        lows = [c["low"] if c["low"] is not None else c["mean"] for c in curve]
        highs = [c["high"] if c["high"] is not None else c["mean"] for c in curve]
        for ax, xs in ((axes[0], [c["iteration"] for c in curve]), (axes[1], [c["minutes"] for c in curve])):
            (line,) = ax.plot(xs, ys, marker="o", label=f"{row['variant']} (n={row['n']})")
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("minutes (initial eval + iterations + checkpoints)")
    axes[0].set_ylabel(f"held-out {summary['metric']} (greedy)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"larpo-ray study {summary['study']}: mean over seeds, 95% t-interval bands")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_wandb(study: Study, cfg, summary: dict[str, Any], out: Path, paths: list[Path]) -> None:
    """A summary run in the study's W&B group: the variant table and the plot."""
    import os

    import wandb

    os.environ.pop("WANDB_SERVICE", None)
    run = wandb.init(
        project=cfg.logging.wandb_project,
        entity=cfg.logging.wandb_entity,
        group=study.name,
        name=f"{study.name}-summary",
        job_type="study-summary",
        mode=cfg.logging.wandb_mode,
        dir=str(out),
    )
    cols = ["variant", "seeds"] + [c for c, _ in COLUMNS]
    table = wandb.Table(columns=cols)
    for row in summary["variants"]:
        table.add_data(row["variant"], row["n"], *[row[c]["mean"] for c, _ in COLUMNS])
    payload = {"study/variants": table}
    if out / "study.png" in paths:
        payload["study/plot"] = wandb.Image(str(out / "study.png"))
    run.log(payload)
    run.finish()
