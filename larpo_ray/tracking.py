"""Where a run's numbers go: `RUN_DIR/metrics.jsonl` (+ `steps.jsonl`, one line per learner
step), W&B (offline by default) and the console.

One JSON object per line: the initial evaluation as iteration 0, then one per LARPO iteration with
`train/*`, `eval/*`, `timing/*` (seconds per phase) and throughput. W&B gets the same numbers, with
per-iteration metrics plotted against `iteration` and per-step learner metrics against
`learner_step`, plus a table of sample generations.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from larpo_ray.config import Config
from larpo_ray.storage import RunStorage

TABLE_COLUMNS = (
    ("iter", "iteration", "{:>4d}"),
    ("reward", "eval/mean_reward", "{:>7.3f}"),
    ("acc", "eval/accuracy", "{:>6.3f}"),
    ("win", "eval/win_rate_vs_initial", "{:>6.3f}"),
    ("loss", "train/loss", "{:>7.4f}"),
    ("r_acc", "train/reward_accuracy", "{:>6.3f}"),
    ("lists", "lists/n_lists", "{:>6.0f}"),
    ("gen_s", "timing/generate", "{:>6.1f}"),
    ("train_s", "timing/train", "{:>7.1f}"),
    ("sync_GB/s", "sync/gb_per_s", "{:>9.2f}"),
    ("total_s", "timing/iteration", "{:>7.1f}"),
)


class Tracker:
    """Appends metrics to metrics.jsonl and mirrors them to W&B."""

    def __init__(
        self, cfg: Config, run_dir: Path, wandb_id: str | None = None, storage: RunStorage | None = None
    ) -> None:
        self.storage = storage  # a run folder on a URI: every file written here is copied there
        self.path = run_dir / "metrics.jsonl"
        self.steps_path = run_dir / "steps.jsonl"  # one line per learner optimizer step
        self.records: list[dict[str, Any]] = []
        self.wandb = _start_wandb(cfg, run_dir, wandb_id)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(
        self,
        record: dict[str, Any],
        step_metrics: list[dict[str, float]] = (),
        samples: list[dict] = (),
        eval_rows: list[dict[str, Any]] = (),
    ) -> None:
        """One iteration's row (+ its learner steps, W&B samples, and the held-out answers, one
        row per prompt, written to RUN_DIR/eval/iter-N.jsonl when the iteration was evaluated)."""
        record = {k: jsonable(v) for k, v in record.items()}
        if eval_rows:
            from larpo_ray.checkpoint import write_lines

            self.eval_path(0).parent.mkdir(exist_ok=True)
            write_lines(self.eval_path(record["iteration"]), [json.dumps(r) for r in eval_rows])
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        with self.steps_path.open("a") as f:
            for step in step_metrics:
                f.write(
                    json.dumps({"iteration": record["iteration"], **{k: jsonable(v) for k, v in step.items()}}) + "\n"
                )
        self.records.append(record)
        self._push(
            "metrics.jsonl", "steps.jsonl", *([f"eval/{self.eval_path(record['iteration']).name}"] if eval_rows else [])
        )
        if self.wandb is None:
            return
        for step in step_metrics:
            self.wandb.log(
                {"learner_step": step["step"], **{f"train_step/{k}": v for k, v in step.items() if k != "step"}}
            )
        payload = dict(record)
        if samples:
            import wandb

            table = wandb.Table(columns=list(samples[0]))
            for row in samples:
                table.add_data(*row.values())
            payload["samples"] = table
        self.wandb.log(payload)

    def restore(self, records: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
        """Make metrics.jsonl / steps.jsonl hold exactly these rows (a resume or a rollback to a
        checkpoint: rows written after it are dropped, rows it has but the files lost come back).
        Each file is replaced atomically."""
        from larpo_ray.checkpoint import write_lines

        write_lines(self.path, [json.dumps(r) for r in records])
        write_lines(self.steps_path, [json.dumps(r) for r in steps])
        self.records = [dict(r) for r in records]
        last = max((int(r["iteration"]) for r in records), default=-1)
        for path in self.path.parent.glob("eval/iter-*.jsonl"):  # answers of iterations now undone
            if int(path.stem.split("-")[1]) > last:
                path.unlink()
                if self.storage is not None:
                    self.storage.delete(f"eval/{path.name}")
        self._push("metrics.jsonl", "steps.jsonl")

    def _push(self, *names: str) -> None:
        if self.storage is not None:
            for name in names:
                self.storage.push(name)

    def eval_path(self, iteration: int) -> Path:
        """The held-out answers of an evaluated iteration: {uid, reward, correct, response} per line."""
        return self.path.parent / "eval" / f"iter-{iteration:06d}.jsonl"

    def table(self) -> str:
        """The per-iteration table printed at the end of a run."""
        head = " ".join(
            f"{name:>{len(fmt.format(0) if 'd' in fmt else fmt.format(0.0))}}" for name, _, fmt in TABLE_COLUMNS
        )
        rows = [head]
        for rec in self.records:
            cells = []
            for name, key, fmt in TABLE_COLUMNS:
                width = len(fmt.format(0) if "d" in fmt else fmt.format(0.0))
                value = rec.get(key)
                cells.append(
                    fmt.format(value) if isinstance(value, (int, float)) and not _nan(value) else f"{'-':>{width}}"
                )
            rows.append(" ".join(cells))
        return "\n".join(rows)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg: Config, run_dir: Path, wandb_id: str | None):
    if cfg.logging.wandb_mode == "disabled":
        return None
    import wandb

    # The run gets a W&B service of its own. One inherited from a parent process (its address in
    # WANDB_SERVICE, e.g. a notebook or test runner that used wandb) outlives a killed driver and
    # keeps holding the run id, so `--resume` would fail with "run ID ... is in use".
    os.environ.pop("WANDB_SERVICE", None)
    quiet = cfg.logging.console != "all"
    run = wandb.init(
        project=cfg.logging.wandb_project,
        entity=cfg.logging.wandb_entity,
        name=cfg.logging.run_name or run_dir.name,
        group=cfg.logging.wandb_group,
        mode=cfg.logging.wandb_mode,
        dir=str(run_dir),
        config=cfg.to_dict(),
        id=wandb_id,
        resume="allow" if wandb_id else None,
        settings=wandb.Settings(silent=quiet),
    )
    if quiet:  # W&B's own banner is a dozen lines; one says what a user needs
        where = (
            run.url
            if cfg.logging.wandb_mode == "online"
            else f"{run.dir.removesuffix('/files')} (offline; upload with: wandb sync {run.dir.removesuffix('/files')})"
        )
        print(f"larpo-ray: W&B run {run.id}: {where}", flush=True)
    run.define_metric("iteration")
    run.define_metric("learner_step")
    for prefix in ("train", "eval", "timing", "lists", "sync", "rollout", "system", "faults"):
        run.define_metric(f"{prefix}/*", step_metric="iteration")
    run.define_metric("train_step/*", step_metric="learner_step")
    return run


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; None reads as "not measured"
    return value
