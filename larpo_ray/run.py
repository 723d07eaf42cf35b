"""larpo-ray main job: align a causal LM with LARPO (Jin et al., ICML 2025) on Ray.

Algorithm as implemented (Algorithm 1 of the paper; `larpo_ray/driver.py`):

    for s in 0..T-1:                                   loop.iterations
        prompts  <- M prompts from the train split        loop.prompts_per_iteration (seeded stream)
        y_1..y_k ~ pi_s(.|x) at temperature t_s           generation.k, generation.temperature[s]
                                                          (or generation.mixed_temperatures)
        r(x, y_j) for every candidate                     reward.kind: rule | model | http
        lists    <- memory pool of x (current / +previous / all iterations), re-ranked,
                    cut by lists.rule (top-a + bottom-b, best/worst, correct/incorrect, all)
        pi_ref   <- pi_s (loss.reference = iteration_start; `initial` = classic iterative DPO)
        for epoch in 1..E: minimise loss.name (pairwise | contrastive | lambdarank | listmle | ipo)
                                                          over the lists, reference log-probs
                                                          computed once per iteration
        pi_{s+1} <- pi_theta; sync weights to the generators; evaluate on the held-out split
        checkpoint RUN_DIR/checkpoints/iter-(s+1)                loop.checkpoint_every

Where it departs from the paper or fills what the paper leaves open (all config knobs):
    beta = 0.1 (not given); optimizer AdamW with a per-iteration schedule (not given); ties in
    reward carry no order (a tied pair is never trained as better/worse; all-tied prompts are
    skipped and counted); optional SimPO length normalization and LiPO |DeltaNDCG| weights;
    IPO as an extra loss; evaluation uses the run's own scorer (win-rate vs the initial policy)
    instead of a GPT-4 judge; export generations for a judge with the report tool.

Launch:
    python -m larpo_ray.run                          # embedded default: SmolLM2-135M-Instruct, CPU
    python -m larpo_ray.run --preset tiny            # tiny model, ~3 min (tests, quick checks)
    python -m larpo_ray.run --config configs/paper-mistral7b-base-contrastive.yaml
    python -m larpo_ray.run --loss.name listmle --generation.k 6    # dotted overrides
    python -m larpo_ray.run --eval-only --model.name_or_path runs/X/policy   # held-out metrics only
    python -m larpo_ray.run --help                   # every knob with its doc and default
    python -m larpo_ray.run --resume runs/X          # continue after X's last checkpoint
    python -m larpo_ray.run --resume runs/X --loop.iterations 5    # ... and run longer
    python -m larpo_ray.run --config configs/paper-mistral7b-base-contrastive.yaml --dry-run
                                                     # resource plan: actors, resources, nodes; starts nothing
On a cluster (Ray 2.60 enables token auth by default; see README):
    ray job submit --working-dir . -- python -m larpo_ray.run --preset tiny
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from larpo_ray.config import Config, ConfigError, help_text, load_config
from larpo_ray.data import DataError
from larpo_ray.models import ModelError
from larpo_ray.storage import RunStorage, is_uri
from larpo_ray.types import ScorerError

if TYPE_CHECKING:  # heavy modules: imported when a run starts, not for --help
    from larpo_ray.data import PromptSplits
    from larpo_ray.topology import Runtime
    from larpo_ray.tracking import Tracker


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m larpo_ray.run", add_help=False, description="Align a causal LM with LARPO on Ray."
    )
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--preset", help="a recipe name in configs/, e.g. tiny")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the policy on the held-out split")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resource plan (resources.nodes) and start nothing"
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR after its last checkpoint")
    parser.add_argument(
        "--verbose", action="store_true", help="the actors' output on the console too (logging.console = all)"
    )
    parser.add_argument("--help", "-h", action="store_true", help="list every config knob")
    return parser.parse_known_args(argv)


RAY_WORKING_DIR_COPY = "runtime_resources/working_dir_files"  # where `ray job submit --working-dir` runs a job
JOB_RUNS_ROOT = Path("~/larpo-ray").expanduser()


def resolve_folder(path: str) -> Path:
    """An absolute run folder, resolved once here and handed to every role. A relative path is
    relative to the working directory, except in a job that Ray runs in its temporary copy of
    the submitted --working-dir (deleted with the Ray session): there it goes under ~/larpo-ray."""
    folder = Path(path).expanduser()
    if folder.is_absolute():
        return folder
    if RAY_WORKING_DIR_COPY in str(Path.cwd()):
        print(
            f"larpo-ray: this job runs in Ray's temporary copy of its --working-dir, which Ray deletes; "
            f"the relative run folder {path!r} goes under {JOB_RUNS_ROOT} instead (give loop.run_dir "
            f"as an absolute path to choose)",
            flush=True,
        )
        return JOB_RUNS_ROOT / folder
    return folder.absolute()


def resolve_location(location: str) -> RunStorage:
    """The run folder: a URI (its files staged locally, larpo_ray.storage), or a local folder."""
    return RunStorage.at(location) if is_uri(location) else RunStorage(str(resolve_folder(location)))


def make_run_folder(cfg: Config) -> RunStorage:
    storage = resolve_location(cfg.loop.run_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S")))
    if storage.exists("metrics.jsonl") or (Path(storage.local) / "metrics.jsonl").exists():
        raise ConfigError(
            f"loop.run_dir {storage.display!r} already holds a run: choose another folder, "
            f"or continue it with --resume {storage.display}"
        )
    Path(storage.local).mkdir(parents=True, exist_ok=True)
    return storage


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(__doc__)
        print("Options: --config PATH | --preset NAME, then any of:" + help_text())
        return 0
    if args.verbose:
        rest = [*rest, "--logging.console", "all"]
    try:
        if args.resume:
            return resume(args.resume, args.config, args.preset, rest)
        cfg = load_config(args.config, args.preset, rest)
        if args.dry_run:  # the resource plan only: no Ray, no model, no run folder
            from larpo_ray.plan import format_plan, make_plan

            print(format_plan(make_plan(cfg), args.config or args.preset or "the defaults"))
            return 0
        return align(cfg, eval_only=args.eval_only)
    except (ConfigError, DataError, ModelError) as err:
        print(f"larpo-ray: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except ScorerError as err:  # the reward role cannot score at all: its message names the fix
        print(f"larpo-ray: ScorerError: {err}", file=sys.stderr)
        return 3


@dataclass
class Session:
    """What a run works with: the resolved policy, the prompts, the roles, the tracker and the
    run folder."""

    policy_path: str
    splits: PromptSplits
    runtime: Runtime
    tracker: Tracker
    storage: RunStorage

    def close(self) -> None:
        self.runtime.shutdown()
        self.tracker.finish()
        for folder in ("wandb", "logs"):  # a run on a URI: what was only written locally so far
            self.storage.push(folder)


def start(
    cfg: Config, run_dir: Path | RunStorage, with_learner: bool = True, wandb_id: str | None = None, before_roles=None
) -> Session:
    """Resolve the model, load the prompts, start the roles (on Ray unless use_ray = false),
    handing every role the run folder. The learner starts on the newest checkpoint in
    RUN_DIR/checkpoints if there is one; `before_roles(splits)` may refuse the run before
    anything heavy starts."""
    from larpo_ray.data import load_prompts
    from larpo_ray.models import load_tokenizer, resolve_model
    from larpo_ray.topology import build_runtime
    from larpo_ray.tracking import Tracker

    policy_path = str(resolve_model(cfg.model.name_or_path, cfg.model.trust_remote_code))
    splits = load_prompts(cfg.data, load_tokenizer(policy_path, cfg.model.trust_remote_code))
    print(f"larpo-ray: {len(splits.train)} train / {len(splits.eval)} held-out prompts")
    print(splits.report.summary())
    if before_roles is not None:
        before_roles(splits)
    storage = run_dir if isinstance(run_dir, RunStorage) else RunStorage(str(run_dir))
    tracker = Tracker(cfg, Path(storage.local), wandb_id, storage)
    try:
        runtime = build_runtime(cfg, policy_path, with_learner, storage)
    except BaseException:
        tracker.finish()
        raise
    return Session(policy_path, splits, runtime, tracker, storage)


def align(cfg: Config, eval_only: bool = False) -> int:
    """Set up the run folder and the roles, then run the loop (or only evaluate)."""
    from larpo_ray.driver import evaluate_only

    storage = make_run_folder(cfg)
    run_dir = Path(storage.local)
    cfg.save(run_dir / "config.yaml")
    storage.push("config.yaml")
    print(
        f"larpo-ray: run folder {storage.display}" + (f" (staged on this node in {run_dir})" if storage.remote else "")
    )
    session = start(cfg, storage, with_learner=not eval_only)
    with finishing(session):
        if eval_only:
            evaluate_only(cfg, session.runtime, session.splits.eval, session.tracker, cfg.logging.progress)
        else:
            train_and_save(cfg, session)
    return 0


@contextlib.contextmanager
def finishing(session: Session):
    """Close the roles and print the results table, and where everything is: on success the
    commands to go on from here; on an error, where the actors' logs are."""
    where = session.storage.display
    try:
        yield
    except BaseException:
        session.close()
        print(session.tracker.table())
        print(
            f"larpo-ray: the run stopped with the error below; each actor's output is in {where}/logs/, "
            f"what finished is in {where} (--resume {where} continues after its last checkpoint)",
            flush=True,
        )
        raise
    session.close()
    print(session.tracker.table())
    print(next_steps(session.storage), flush=True)


def next_steps(storage: RunStorage) -> str:
    """The closing lines: where the run's files are and the commands that use them."""
    where, local = storage.display, Path(storage.local)
    trained = (local / "policy").is_dir()
    lines = [
        f"larpo-ray: done. Run folder {where}:",
        "  metrics.jsonl (a line per iteration), eval/ (held-out answers), logs/ (each actor's output)",
    ]
    if trained:
        lines.append("  policy/ (the aligned model, HF format), checkpoints/")
    lines += [f"  report:  python -m larpo_ray.report {where}"]
    if trained:
        lines += [
            f"  serve:   python -m larpo_ray.serve {local / 'policy'}",
            f"  longer:  python -m larpo_ray.run --resume {where} --loop.iterations N",
        ]
    return "\n".join(lines)


def train_and_save(cfg: Config, session: Session, state=None) -> None:
    """The LARPO loop (from `state`, a checkpoint's, if given), then the aligned policy's folder."""
    from larpo_ray.driver import run_loop, save_final

    run_dir = Path(session.storage.local)
    run_loop(
        cfg,
        session.runtime,
        session.splits.train,
        session.splits.eval,
        session.tracker,
        cfg.logging.progress,
        run_dir,
        state,
        session.storage,
    )
    if cfg.loop.save_model:
        save_final(session.runtime, run_dir, session.storage)
        print(f"larpo-ray: aligned policy saved to {session.storage.display}/policy")


def resume(run_dir: str, config_path: str | None, preset: str | None, overrides: list[str]) -> int:
    """`--resume RUN_DIR`: the run's own config.yaml (or --config/--preset) plus overrides,
    checked against the newest checkpoint, continues after it with the same W&B run. Without a
    checkpoint the run starts over in the same folder."""
    from larpo_ray import checkpoint
    from larpo_ray.driver import prompt_stream

    storage = resolve_location(run_dir)
    folder = Path(storage.local)
    for name in ("config.yaml", "metrics.jsonl", "steps.jsonl", "eval"):  # a URI: what the driver reads
        storage.pull(name)
    checkpoint.pull_index(storage)
    if not (folder / "config.yaml").is_file():
        raise ConfigError(
            f"--resume {run_dir!r}: no config.yaml there, so it is not a larpo-ray run "
            f"folder; give the RUN_DIR a run printed as 'run folder ...'"
        )
    if config_path is None and preset is None:
        config_path = str(folder / "config.yaml")
    cfg = load_config(config_path, preset, [*overrides, "--loop.run_dir", storage.uri or str(folder)])
    latest = checkpoint.latest(folder / "checkpoints")
    state = checkpoint.read_state(latest) if latest is not None else None
    if state is not None:
        checkpoint.check_compatible(state, cfg.to_dict(), latest)
        checkpoint.set_rng_state(state.rng)
        print(f"larpo-ray: resuming {storage.display} after iteration {state.iteration} ({latest.name})")
    else:
        print(f"larpo-ray: {storage.display} has no checkpoint: starting the run over in it")

    def same_prompts(splits) -> None:  # data order: the checkpoint's iterations must replay
        cursor = 0
        for s, uids in enumerate(state.prompt_uids if state else []):
            if [p.uid for p in prompt_stream(splits.train, cursor, len(uids), cfg.loop.seed)] != uids:
                raise ConfigError(
                    f"iteration {s + 1} of the checkpoint sampled other prompts than "
                    f"the data gives now: the prompt data (data.*) changed since; "
                    f"resume with the original data or start a new run"
                )
            cursor += len(uids)

    cfg.save(folder / "config.yaml")
    storage.push("config.yaml")
    session = start(cfg, storage, True, state.wandb_id if state else None, same_prompts)
    with finishing(session):
        if state is not None:
            session.tracker.restore(state.records, state.steps)
            if session.runtime.resumed_from != state.iteration:
                raise RuntimeError(
                    f"the learner loaded checkpoint {session.runtime.resumed_from}, the driver {state.iteration}"
                )
        else:
            session.tracker.restore([], [])
        train_and_save(cfg, session, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
