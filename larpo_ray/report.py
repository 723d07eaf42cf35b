"""Run report: plots and a Markdown summary of a finished (or running) larpo-ray run.

Usage:
    python -m larpo_ray.report RUN_DIR
    python -m larpo_ray.report RUN_DIR --export-alpacaeval [--checkpoint PATH] [--generator NAME]

Writes into RUN_DIR/report/:
    eval.png      held-out reward, accuracy, win-rate vs the initial policy (and Pass@N) per iteration
    loss.png      loss per learner step (RUN_DIR/steps.jsonl); without it, the per-iteration
                  mean `train/loss`
    timings.png   seconds per phase (generate, lists, train, sync, eval, checkpoint, overhead)
                  stacked per iteration
    summary.md    the config's key knobs, a per-iteration table, start -> end deltas, the plots
Metrics a run did not record (accuracy on non-verifiable tasks, iterations without evaluation) are
skipped and listed in summary.md.

--export-alpacaeval writes the greedy held-out generations of a checkpoint (default RUN_DIR/policy)
as AlpacaEval's JSON list of {instruction, output, generator} to RUN_DIR/report/alpacaeval_<name>.json
(<name>: the checkpoint folder's name). It regenerates with the run's config.yaml except that
model.name_or_path = the checkpoint, resources.use_ray = false and generation.engine = hf: one
process, no Ray or vLLM start-up, the same output on any machine (slower than vLLM for big models).
`instruction` is the prompt's last user message; `generator` defaults to <run folder>-<checkpoint>.
Exit code 2 with a message for a missing run folder, metrics file, config or checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from larpo_ray.config import Config, ConfigError, load_config
from larpo_ray.data import DataError
from larpo_ray.models import ModelError
from larpo_ray.storage import RunStorage
from larpo_ray.tracking import TABLE_COLUMNS

EVAL_KEYS = ("eval/mean_reward", "eval/accuracy", "eval/win_rate_vs_initial")
PHASES = ("generate", "lists", "train", "sync", "eval", "checkpoint", "overhead")
KNOBS = (
    "model.name_or_path",
    "loss.name",
    "loss.beta",
    "generation.k",
    "generation.temperature",
    "generation.mixed_temperatures",
    "lists.rule",
    "lists.memory",
    "learner.lr",
    "learner.epochs",
    "loop.iterations",
)
Records = list[dict[str, Any]]


class ReportError(ValueError):
    """Input the report cannot read; the message names the file and what is expected."""


def read_metrics(run_dir: Path) -> Records:
    """RUN_DIR/metrics.jsonl, one record per line (blank lines skipped)."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ReportError(
            f"run folder {str(run_dir)!r} does not exist: give a folder written by python -m larpo_ray.run"
        )
    if not path.is_file():
        raise ReportError(
            f"run folder {str(run_dir)!r} has no metrics.jsonl: expected a folder written by python -m larpo_ray.run"
        )
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path} line {n} is not valid JSON ({err.msg}): fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise ReportError(f"{path} line {n} is not a metrics record with an integer 'iteration'")
        records.append(record)
    if not records:
        raise ReportError(f"{path} holds no records yet: wait for the initial evaluation")
    return records


def series(records: Records, key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) where `key` was measured (absent, None and NaN skipped)."""
    pts = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def read_steps(run_dir: Path, key: str = "loss") -> tuple[list[int], list[float]]:
    """(learner step, value) from RUN_DIR/steps.jsonl (one line per optimizer step, written by
    the tracker); empty when the run has none. A resumed run may log a step twice: the later
    value wins. A half-written last line (a live run) is skipped."""
    path = run_dir / "steps.jsonl"
    if not path.is_file():
        return [], []
    by_step: dict[int, float] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec.get("step"), (int, float)) and isinstance(rec.get(key), (int, float)):
            by_step[int(rec["step"])] = float(rec[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return fig, ax


def plot_eval(records: Records, out: Path, notes: list[str]) -> None:
    keys = list(EVAL_KEYS) + sorted({k for r in records for k in r if k.startswith("eval/pass@")})
    fig, ax = _figure("Held-out evaluation", "iteration", "value")
    for i, key in enumerate(keys):
        xs, ys = series(records, key)
        if xs:  # distinct markers and dashes: reward and accuracy coincide under binary rewards
            ax.plot(xs, ys, marker="os^vD"[i % 5], linestyle=("-", "--", ":")[i % 3], label=key.removeprefix("eval/"))
        else:
            notes.append(f"`{key}` not in metrics.jsonl (e.g. a non-verifiable task): not plotted")
    iters = [r["iteration"] for r in records if "eval/mean_reward" not in r]
    if iters:
        notes.append(f"no evaluation on iteration(s) {iters} (loop.eval_every): those points are missing")
    if ax.lines:
        ax.legend()
    fig.savefig(out / "eval.png")


def plot_loss(run_dir: Path, records: Records, out: Path, notes: list[str]) -> str:
    """Per learner step if the run has steps.jsonl, else per iteration; returns which."""
    xs, ys = read_steps(run_dir)
    per_step = bool(xs)
    if not per_step:
        xs, ys = series(records, "train/loss")
    fig, ax = _figure("Training loss", "learner step" if per_step else "iteration", "loss")
    ax.plot(xs, ys, marker="" if per_step and len(xs) > 50 else "o")
    if per_step:  # dashed lines where each LARPO iteration's training ends
        _, steps = series(records, "train/steps")
        for end in [sum(steps[: i + 1]) - 0.5 for i in range(len(steps) - 1)]:
            ax.axvline(end, color="grey", linestyle="--", linewidth=0.8)
    fig.savefig(out / "loss.png")
    if per_step:
        return "per learner step (`loss` from steps.jsonl)"
    notes.append("no steps.jsonl in the run folder: loss.png shows the per-iteration mean `train/loss`")
    return "per iteration (mean `train/loss` from metrics.jsonl)"


def plot_timings(records: Records, out: Path, notes: list[str]) -> None:
    fig, ax = _figure("Seconds per phase", "iteration", "seconds")
    iters = [r["iteration"] for r in records]
    bottom = [0.0] * len(records)
    for phase in PHASES:
        values = [float(r.get(f"timing/{phase}") or 0.0) for r in records]
        if not any(values):
            notes.append(f"`timing/{phase}` never recorded: left out of timings.png")
            continue
        ax.bar(iters, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(iters)
    if ax.patches:
        ax.legend()
    fig.savefig(out / "timings.png")


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return str(value) if isinstance(value, int) else f"{value:.4g}"
    return "-"


def deltas(records: Records) -> list[str]:
    rows = ["| metric | start | end | change |", "|---|---|---|---|"]
    for key in EVAL_KEYS:
        xs, ys = series(records, key)
        if xs:
            rows.append(
                f"| {key} | {ys[0]:.4g} (iter {xs[0]}) | {ys[-1]:.4g} (iter {xs[-1]}) | {ys[-1] - ys[0]:+.4g} |"
            )
        else:
            rows.append(f"| {key} | - | - | not measured |")
    return rows


def knobs(run_dir: Path) -> list[str]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return [f"(no config.yaml in {run_dir})"]
    cfg = load_config(str(path)).to_dict()
    rows = ["| knob | value |", "|---|---|"]
    for dotted in KNOBS:
        group, name = dotted.split(".")
        rows.append(f"| {dotted} | `{cfg[group][name]}` |")
    return rows


def write_summary(run_dir: Path, records: Records, out: Path, loss_kind: str, notes: list[str]) -> None:
    table = ["| " + " | ".join(name for name, _, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    table += ["| " + " | ".join(_cell(r.get(key)) for _, key, _ in TABLE_COLUMNS) + " |" for r in records]
    lines = [
        f"# larpo-ray run report: {run_dir.name}",
        "",
        f"Run folder: `{run_dir}`",
        "",
        "## Config",
        "",
        *knobs(run_dir),
        "",
        "## Start -> end",
        "",
        *deltas(records),
        "",
        "## Per iteration",
        "",
        "Iteration 0 is the initial policy's evaluation.",
        "",
        *table,
        "",
        "## Plots",
        "",
        "![evaluation](eval.png)",
        "",
        f"![loss](loss.png) Loss {loss_kind}.",
        "",
        "![timings](timings.png)",
        "",
        "## Not shown",
        "",
        *([f"- {n}" for n in notes] or ["- nothing: every metric was recorded"]),
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))


def report(run_dir: Path) -> Path:
    """Write the plots and summary.md into RUN_DIR/report/; returns that folder."""
    records = read_metrics(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    notes: list[str] = []
    plot_eval(records, out, notes)
    loss_kind = plot_loss(run_dir, records, out, notes)
    plot_timings(records, out, notes)
    write_summary(run_dir, records, out, loss_kind, notes)
    return out


def export_alpacaeval(run_dir: Path, checkpoint: Path | None = None, generator: str | None = None) -> Path:
    """Greedy held-out generations of a checkpoint as AlpacaEval JSON; returns the file."""
    from larpo_ray.run import start

    checkpoint = (checkpoint or run_dir / "policy").absolute()
    if not checkpoint.is_dir():
        raise ReportError(
            f"checkpoint {str(checkpoint)!r} is not a folder: give an HF model folder with --checkpoint (default "
            "RUN_DIR/policy)"
        )
    if not (run_dir / "config.yaml").is_file():
        raise ReportError(
            f"run folder {str(run_dir)!r} has no config.yaml: the export regenerates with the run's config"
        )
    data = load_config(str(run_dir / "config.yaml")).to_dict()
    data["model"]["name_or_path"] = str(checkpoint)
    data["resources"]["use_ray"] = False
    data["generation"]["engine"] = "hf"
    data["logging"]["wandb_mode"] = "disabled"
    cfg = Config.from_dict(data)
    generator = generator or f"{run_dir.absolute().name}-{checkpoint.name}"
    with tempfile.TemporaryDirectory() as scratch:  # start() writes a metrics.jsonl; keep the run's own untouched
        session = start(cfg, Path(scratch), with_learner=False)
        try:
            prompts = session.splits.eval
            texts = {c.prompt_uid: c.text for c in session.runtime.rollout(prompts, [0.0], -1).candidates}
        finally:
            session.close()
    rows = [
        {"instruction": _instruction(p.messages, p.text), "output": texts.get(p.uid, ""), "generator": generator}
        for p in prompts
    ]
    out = run_dir / "report" / f"alpacaeval_{checkpoint.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return out


def _instruction(messages: tuple[tuple[str, str], ...], fallback: str) -> str:
    users = [content for role, content in messages if role == "user"]
    return users[-1] if users else fallback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m larpo_ray.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a run folder (holds metrics.jsonl and config.yaml), or its URI (s3://...)")
    parser.add_argument(
        "--export-alpacaeval", action="store_true", help="also write held-out generations for AlpacaEval"
    )
    parser.add_argument("--checkpoint", type=Path, help="HF model folder to export (default RUN_DIR/policy)")
    parser.add_argument("--generator", help="AlpacaEval generator name (default <run folder>-<checkpoint>)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        storage = RunStorage.at(args.run_dir)
        for name in ("metrics.jsonl", "steps.jsonl", "config.yaml") + (("policy",) if args.export_alpacaeval else ()):
            storage.pull(name)  # a run on a URI: read from there
        run_dir = Path(storage.local)
        out = report(run_dir)
        storage.push("report")
        print(
            f"larpo-ray report: wrote {storage.display}/report/summary.md and its plots"
            + (f" (staged in {out})" if storage.remote else "")
        )
        if args.export_alpacaeval:
            path = export_alpacaeval(run_dir, args.checkpoint, args.generator)
            storage.push("report")
            print(f"larpo-ray report: wrote {path}")
    except (ReportError, ConfigError, DataError, ModelError) as err:
        print(f"larpo-ray report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
