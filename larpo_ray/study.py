"""larpo-ray studies: compare variants of a run over seeds, the way a method like LARPO is judged.

A study file (YAML, see configs/study-*.yaml) names variants and seeds:

    name: objectives                    # the study folder is runs/study-<name> unless --out says
    recipe: default                     # optional: a preset name or a recipe path for every run
    overrides: {data.num_eval: 200}     # optional: dotted overrides for every run
    seeds: [0, 1, 2]                    # each sets loop.seed and generation.seed (seed_keys)
    baseline: pairwise                  # optional: the variant the others are compared with
    variants:
      pairwise:
        description: best vs worst of 4
        overrides: {loss.name: pairwise}
      listmle:
        recipe: configs/my-listmle.yaml # optional, replaces the study's recipe
        overrides: {loss.name: listmle, lists.rule: all}

Each variant x seed is a normal larpo-ray run (`python -m larpo_ray.run`, the same code path, in a
child process) in STUDY/<variant>/seed-<s>/, its console in console.log there. Config sources,
later wins: defaults < recipe < study overrides < variant overrides < command-line overrides <
the seed keys and the run folder. Every run's config is validated before the first one starts.

Resumable: a finished run is skipped, an interrupted one resumes from its checkpoint
(`--resume`), a failed one is reported (STUDY/status.json, the end of its console) and does not
stop the others; running the study again retries it. A run folder whose config no longer matches
the study (keys that change what it computes) is refused, naming the keys: use another --out.

Output: STUDY/study.md, study.json and study.png (larpo_ray.study_report): per variant the mean
and 95% interval over seeds of the final held-out accuracy, win-rate vs the initial policy, Pass@N,
reward accuracy, generated tokens and wall time, and which differences are significant. With W&B
on (logging.wandb_mode), every run is logged in one group named after the study, plus a summary run.

Launch:
    python -m larpo_ray.study configs/study-objectives.yaml             # one run after another
    python -m larpo_ray.study configs/study-objectives.yaml --dry-run   # list the runs, start nothing
    python -m larpo_ray.study configs/study-objectives.yaml --loop.iterations 1   # override every run
    python -m larpo_ray.study configs/study-objectives.yaml --report-only         # tables + plot again
On a Ray cluster, several runs at once (each joins the cluster through RAY_ADDRESS, which Ray
sets for a job; each has its own run folder, which must be on storage the workers share):
    ray job submit --working-dir . -- python -m larpo_ray.study configs/study-objectives.yaml --parallel 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from larpo_ray.config import Config, ConfigError, load_config, parse_overrides, preset_path, read_yaml

STUDY_KEYS = ("name", "description", "recipe", "overrides", "seeds", "seed_keys", "baseline", "metric", "variants")
VARIANT_KEYS = ("description", "recipe", "overrides")
DEFAULT_SEED_KEYS = ("loop.seed", "generation.seed")
STATUS = "status.json"


@dataclass
class Variant:
    name: str
    description: str = ""
    recipe: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Study:
    """A parsed study file."""

    name: str
    variants: list[Variant]
    seeds: list[int]
    recipe: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    seed_keys: tuple[str, ...] = DEFAULT_SEED_KEYS
    baseline: str | None = None
    metric: str = "eval/accuracy"
    description: str = ""
    source: str = ""


@dataclass
class PlannedRun:
    """One variant x seed: its folder and the command-line arguments of `larpo_ray.run`."""

    variant: str
    seed: int
    run_dir: Path
    args: list[str]
    config: Config

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"


# ---- the study file -----------------------------------------------------------------------------


def load_study(path: str) -> Study:
    """Parse and check a study file; errors name the key and what to write instead."""
    data = read_yaml(path)
    where = f"study file {path!r}"
    _check_keys(data, STUDY_KEYS, where)
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{where} needs 'variants:', a mapping of variant names to {{overrides: ..., recipe: ...}}")
    seeds = data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"{where}: seeds = {seeds!r} must be a non-empty list of integers, e.g. [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds = {seeds!r} repeats a seed")
    parsed = []
    for name, body in variants.items():
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise ConfigError(
                f"{where}: variant {name!r} must be a mapping with overrides: and/or recipe:, got {body!r}"
            )
        _check_keys(body, VARIANT_KEYS, f"{where}, variant {name!r}")
        if not str(name).replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: variant name {name!r} must be letters, digits, '-' or '_' (it names a folder)")
        parsed.append(
            Variant(
                str(name),
                str(body.get("description", "")),
                body.get("recipe"),
                _overrides(body.get("overrides"), f"{where}, variant {name!r}"),
            )
        )
    study = Study(
        name=str(data.get("name") or Path(path).stem),
        variants=parsed,
        seeds=seeds,
        recipe=data.get("recipe"),
        overrides=_overrides(data.get("overrides"), where),
        seed_keys=tuple(data.get("seed_keys", DEFAULT_SEED_KEYS)),
        baseline=data.get("baseline"),
        metric=str(data.get("metric", "eval/accuracy")),
        description=str(data.get("description", "")),
        source=str(path),
    )
    if study.baseline is not None and study.baseline not in [v.name for v in parsed]:
        raise ConfigError(
            f"{where}: baseline = {study.baseline!r} is not a variant; variants: {[v.name for v in parsed]}"
        )
    return study


def _check_keys(data: dict, allowed: tuple[str, ...], where: str) -> None:
    import difflib

    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _overrides(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and "." in k for k in value):
        raise ConfigError(
            f"{where}: overrides must map dotted keys to values, e.g. {{loss.name: listmle, learner.lr: 1.0e-5}}"
        )
    return dict(value)


# ---- planning -----------------------------------------------------------------------------------


def plan_runs(study: Study, out: Path, cli_overrides: list[str]) -> list[PlannedRun]:
    """Every variant x seed with its arguments, each config validated now (ConfigError names
    the variant and seed)."""
    cli = {k: str(v) for k, v in parse_overrides(cli_overrides).items()}
    runs = []  # seed by seed: an interrupted study has every variant on the seeds it finished
    for seed in study.seeds:
        for variant in study.variants:
            recipe = variant.recipe or study.recipe
            recipe_path = _recipe_path(recipe) if recipe else None
            run_dir = out / variant.name / f"seed-{seed}"
            values = {
                **study.overrides,
                **variant.overrides,
                **cli,
                **{k: seed for k in study.seed_keys},
                "loop.run_dir": str(run_dir),
            }
            args = ([] if recipe_path is None else ["--config", recipe_path]) + _as_args(values)
            try:
                cfg = load_config(recipe_path, None, args[2:] if recipe_path else args)
            except ConfigError as err:
                raise ConfigError(f"variant {variant.name!r} seed {seed}: {err}") from None
            runs.append(PlannedRun(variant.name, seed, run_dir, args, cfg))
    return runs


def _recipe_path(recipe: str) -> str:
    """A preset name (configs/NAME.yaml) or a path to a recipe file."""
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        return str(Path(recipe).absolute())
    return str(preset_path(recipe))


def _as_args(values: dict[str, Any]) -> list[str]:
    """Dotted overrides as `--key value` tokens that larpo_ray.config parses back to the same
    values (lists and mappings in YAML flow style)."""
    out = []
    for key, value in values.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        if text.endswith("\n...") or text.endswith("..."):
            text = text.removesuffix("...").strip()
        out += [f"--{key}", text]
    return out


# ---- the state of a run folder ------------------------------------------------------------------


def run_state(run: PlannedRun) -> str:
    """'done' (metrics.jsonl reached the last iteration), 'partial' (a run folder to resume) or
    'new'. A folder whose config changes what the run computes raises ConfigError."""
    from larpo_ray.checkpoint import incompatible_keys

    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return "new"
    differing = incompatible_keys(read_yaml(saved), run.config.to_dict())
    if differing:
        raise ConfigError(
            f"{run.label}: {run.run_dir} holds a run whose config differs from the study in keys "
            f"that change it: {'; '.join(differing)}. Give the study another --out folder, or "
            f"remove that run folder to run it again"
        )
    return "done" if last_iteration(run.run_dir) >= run.config.loop.iterations else "partial"


def last_iteration(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return -1
    last = -1
    for line in path.read_text().splitlines():
        try:
            last = max(last, int(json.loads(line)["iteration"]))
        except (ValueError, KeyError, TypeError):
            continue
    return last


# ---- running ------------------------------------------------------------------------------------


def command(run: PlannedRun, state: str) -> list[str]:
    """The larpo_ray.run command line of a run: a fresh start, or `--resume` of its folder with
    the keys a resume may change (iterations, logging)."""
    base = [sys.executable, "-m", "larpo_ray.run"]
    if state == "partial":
        cfg = run.config
        keep = {
            "loop.iterations": cfg.loop.iterations,
            "logging.wandb_mode": cfg.logging.wandb_mode,
            "logging.wandb_group": cfg.logging.wandb_group,
            "logging.run_name": cfg.logging.run_name,
            "logging.progress": cfg.logging.progress,
        }
        return base + ["--resume", str(run.run_dir)] + _as_args({k: v for k, v in keep.items() if v is not None})
    return base + run.args


def execute(run: PlannedRun, state: str) -> dict[str, Any]:
    """Run (or resume) one run in a child process; its console goes to RUN_DIR/console.log."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir / "console.log"
    start = time.time()
    with log_path.open("a") as log:
        log.write(f"\n==== larpo-ray study: {' '.join(command(run, state))} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        log.flush()
        proc = subprocess.run(command(run, state), stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
    status = {
        "state": "done" if proc.returncode == 0 else "failed",
        "returncode": proc.returncode,
        "seconds": time.time() - start,
        "resumed": state == "partial",
    }
    if proc.returncode != 0:
        status["error"] = _tail(log_path)
    return status


def _tail(path: Path, n: int = 12) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def run_all(runs: list[PlannedRun], out: Path, parallel: int = 1, echo=print) -> dict[str, dict]:
    """Every run not yet done, `parallel` at a time; returns the status of every run, also kept
    in STUDY/status.json (seconds add up over the invocations that worked on a run)."""
    status = _read_status(out)
    states = {r.label: run_state(r) for r in runs}  # before anything runs: a conflict stops all
    todo = deque(r for r in runs if states[r.label] != "done")
    for r in runs:
        if states[r.label] == "done":
            status.setdefault(_key(r), {}).update(state="done")
            echo(f"larpo-ray study: {r.label}: done already ({r.run_dir}), skipped")
    lock, total = threading.Lock(), len(todo)

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                run = todo.popleft()
                n = total - len(todo)
                verb = "resuming" if states[run.label] == "partial" else "starting"
                echo(f"larpo-ray study: [{n}/{total}] {verb} {run.label} in {run.run_dir}")
            result = execute(run, states[run.label])
            with lock:
                before = status.get(_key(run), {})
                result["seconds"] += before.get("seconds", 0.0) if before.get("state") != "done" else 0.0
                status[_key(run)] = result
                _write_status(out, status)
                echo(f"larpo-ray study: {run.label}: {_outcome(run, result)}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _write_status(out, status)
    return status


def _outcome(run: PlannedRun, result: dict) -> str:
    minutes = result["seconds"] / 60
    if result["state"] == "done":
        return f"done in {minutes:.1f} min"
    lines = result["error"].splitlines() if result.get("error") else [""]
    # the error itself, not Ray's noise after it: the last line naming an error, else the last
    last = next((ln for ln in reversed(lines) if "Error" in ln or ln.startswith("larpo-ray:")), lines[-1])
    last = last if len(last) <= 300 else last[:300] + " ..."  # Ray's errors can run to pages
    return (
        f"FAILED (exit {result['returncode']}) after {minutes:.1f} min: {last} "
        f"(console: {run.run_dir / 'console.log'}); the other runs go on"
    )


def _key(run: PlannedRun) -> str:
    return f"{run.variant}/seed-{run.seed}"


def _read_status(out: Path) -> dict[str, dict]:
    path = out / STATUS
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _write_status(out: Path, status: dict) -> None:
    from larpo_ray.checkpoint import write_lines

    write_lines(out / STATUS, [json.dumps(status, indent=1, sort_keys=True)])


# ---- the command line ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m larpo_ray.study", description="Compare larpo-ray variants over seeds."
    )
    parser.add_argument("study", help="a study file (YAML), e.g. configs/study-objectives.yaml")
    parser.add_argument("--out", help="study folder (default: runs/study-<name>)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state; start nothing")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (on a Ray cluster; default 1)")
    parser.add_argument(
        "--report-only", action="store_true", help="only write study.md / .json / .png from the runs so far"
    )
    parser.add_argument("--variants", help="comma-separated variant names: run and report only these")
    parser.add_argument(
        "--export",
        metavar="DIR",
        help="also copy the report and each run's small files (config, metrics, "
        "held-out answers; no weights) to DIR, from which --out DIR --report-only rebuilds the report",
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.parallel < 1:
            raise ConfigError(f"--parallel {args.parallel}: give 1 or more runs at once")
        study = load_study(args.study)
        if args.variants:
            study = select(study, args.variants.split(","))
        out = Path(args.out or f"runs/study-{study.name}").absolute()
        group = ["--logging.wandb_group", study.name]
        runs = plan_runs(study, out, group + rest)
        _name_runs(runs)
        if args.dry_run:
            print(format_plan(study, runs, out))
            return 0
        if not args.report_only:
            out.mkdir(parents=True, exist_ok=True)
            (out / "study.yaml").write_text(Path(args.study).read_text())
            print(
                f"larpo-ray study {study.name!r}: {len(runs)} runs ({len(study.variants)} variants x "
                f"{len(study.seeds)} seeds) in {out}",
                flush=True,
            )
            status = run_all(runs, out, args.parallel, echo=lambda s: print(s, flush=True))
        else:
            status = _read_status(out)
    except ConfigError as err:
        print(f"larpo-ray study: ConfigError: {err}", file=sys.stderr)
        return 2
    from larpo_ray.study_report import write_report

    paths = write_report(study, runs, out, status)
    print("\n".join(f"larpo-ray study: wrote {p}" for p in paths))
    if args.export:
        print(
            f"larpo-ray study: exported the report and {export(runs, out, Path(args.export).absolute())} run folders' "
            f"small files to {args.export}"
        )
    failed = [k for k, v in status.items() if v.get("state") == "failed"]
    if failed:
        print(
            f"larpo-ray study: {len(failed)} run(s) failed: {', '.join(sorted(failed))}; run the same command "
            f"again to retry them (finished runs are skipped)",
            file=sys.stderr,
        )
        return 1
    return 0


EXPORTED = ("config.yaml", "metrics.jsonl", "console.log")


def export(runs: list[PlannedRun], out: Path, dest: Path) -> int:
    """Copy study.md / .json / .png / status.json and, per run, what the report reads (no
    weights, checkpoints or W&B files): a few MB to commit."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("study.md", "study.json", "study.png", STATUS, "study.yaml"):
        if (out / name).is_file():
            shutil.copy2(out / name, dest / name)
    copied = 0
    for run in runs:
        target = dest / run.run_dir.relative_to(out)
        if not (run.run_dir / "metrics.jsonl").is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in EXPORTED:
            if (run.run_dir / name).is_file():
                shutil.copy2(run.run_dir / name, target / name)
        if (run.run_dir / "eval").is_dir():
            shutil.copytree(run.run_dir / "eval", target / "eval", dirs_exist_ok=True)
        copied += 1
    return copied


def select(study: Study, names: list[str]) -> Study:
    """The study with only the named variants (--variants)."""
    known = [v.name for v in study.variants]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--variants: {unknown} not in the study; its variants: {known}")
    baseline = study.baseline if study.baseline in names else None
    return dataclasses.replace(study, variants=[v for v in study.variants if v.name in names], baseline=baseline)


def _name_runs(runs: list[PlannedRun]) -> None:
    """W&B run names: <variant>-seed<s> (a run's own logging.run_name wins)."""
    for run in runs:
        if run.config.logging.run_name is None:
            run.config.logging.run_name = f"{run.variant}-seed{run.seed}"
            run.args += ["--logging.run_name", run.config.logging.run_name]


def format_plan(study: Study, runs: list[PlannedRun], out: Path) -> str:
    lines = [
        f"larpo-ray study {study.name!r} ({study.source}): {len(runs)} runs in {out} (dry run: nothing started)",
        "each: python -m larpo_ray.run [args] --loop.run_dir STUDY/<variant>/seed-<s>",
        "",
    ]
    width = max(len(r.label) for r in runs)
    hidden = {"--loop.run_dir", "--logging.run_name", "--logging.wandb_group"}
    for run in runs:
        try:
            state = run_state(run)
        except ConfigError:
            state = "conflict"
        pairs = list(zip(run.args[::2], run.args[1::2]))
        args = " ".join(f"{k} {_short(v)}" for k, v in pairs if k not in hidden)
        lines.append(f"{run.label:<{width}}  {state:<8}  {args}")
    return "\n".join(lines)


def _short(value: str) -> str:
    """A recipe path relative to the working directory when it is below it."""
    try:
        return str(Path(value).relative_to(Path.cwd())) if value.startswith("/") else value
    except ValueError:
        return value


if __name__ == "__main__":
    sys.exit(main())
