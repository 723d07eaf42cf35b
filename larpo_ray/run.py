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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from actors.reward import ScorerError
from larpo_ray.config import Config, ConfigError, help_text, load_config
from larpo_ray.data import DataError
from larpo_ray.models import ModelError

if TYPE_CHECKING:  # heavy modules: imported when a run starts, not for --help
    from larpo_ray.data import PromptSplits
    from larpo_ray.topology import Runtime
    from larpo_ray.tracking import Tracker


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m larpo_ray.run", add_help=False,
                                     description="Align a causal LM with LARPO on Ray.")
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--preset", help="a recipe name in configs/, e.g. tiny")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the policy on the held-out split")
    parser.add_argument("--dry-run", action="store_true", help="print the resource plan (resources.nodes) and start nothing")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR after its last checkpoint")
    parser.add_argument("--help", "-h", action="store_true", help="list every config knob")
    return parser.parse_known_args(argv)


def make_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.loop.run_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S")))
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"loop.run_dir {str(run_dir)!r} already holds a run: choose another folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(__doc__)
        print("Options: --config PATH | --preset NAME, then any of:" + help_text())
        return 0
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
    """What a run works with: the resolved policy, the prompts, the roles and the tracker."""

    policy_path: str
    splits: PromptSplits
    runtime: Runtime
    tracker: Tracker

    def close(self) -> None:
        self.runtime.shutdown()
        self.tracker.finish()


def start(cfg: Config, run_dir: Path, with_learner: bool = True, wandb_id: str | None = None,
          before_roles=None) -> Session:
    """Resolve the model, load the prompts, start the roles (on Ray unless use_ray = false).
    The learner starts on the newest checkpoint in RUN_DIR/checkpoints if there is one;
    `before_roles(splits)` may refuse the run before anything heavy starts."""
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
    tracker = Tracker(cfg, run_dir, wandb_id)
    try:
        runtime = build_runtime(cfg, policy_path, with_learner, str(run_dir / "checkpoints"))
    except BaseException:
        tracker.finish()
        raise
    return Session(policy_path, splits, runtime, tracker)


def align(cfg: Config, eval_only: bool = False) -> int:
    """Set up the run folder and the roles, then run the loop (or only evaluate)."""
    from larpo_ray.driver import evaluate_only

    run_dir = make_run_dir(cfg)
    cfg.save(run_dir / "config.yaml")
    print(f"larpo-ray: run folder {run_dir}")
    session = start(cfg, run_dir, with_learner=not eval_only)
    try:
        if eval_only:
            evaluate_only(cfg, session.runtime, session.splits.eval, session.tracker, cfg.logging.progress)
        else:
            train_and_save(cfg, session, run_dir)
    finally:
        session.close()
        print(session.tracker.table())
    return 0


def train_and_save(cfg: Config, session: Session, run_dir: Path, state=None) -> None:
    """The LARPO loop (from `state`, a checkpoint's, if given), then the aligned policy's folder."""
    from larpo_ray.driver import run_loop, save_final

    run_loop(cfg, session.runtime, session.splits.train, session.splits.eval, session.tracker,
             cfg.logging.progress, run_dir, state)
    if cfg.loop.save_model:
        print(f"larpo-ray: aligned policy saved to {save_final(session.runtime, run_dir)}")


def resume(run_dir: str, config_path: str | None, preset: str | None, overrides: list[str]) -> int:
    """`--resume RUN_DIR`: the run's own config.yaml (or --config/--preset) plus overrides,
    checked against the newest checkpoint, continues after it with the same W&B run. Without a
    checkpoint the run starts over in the same folder."""
    from larpo_ray import checkpoint
    from larpo_ray.driver import sample_prompts

    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir!r}: no config.yaml there, so it is not a larpo-ray run "
                          f"folder; give the RUN_DIR a run printed as 'run folder ...'")
    if config_path is None and preset is None:
        config_path = str(folder / "config.yaml")
    cfg = load_config(config_path, preset, [*overrides, "--loop.run_dir", str(folder)])
    latest = checkpoint.latest(folder / "checkpoints")
    state = checkpoint.read_state(latest) if latest is not None else None
    if state is not None:
        checkpoint.check_compatible(state, cfg.to_dict(), latest)
        checkpoint.set_rng_state(state.rng)
        print(f"larpo-ray: resuming {folder} after iteration {state.iteration} ({latest.name})")
    else:
        print(f"larpo-ray: {folder} has no checkpoint: starting the run over in it")

    def same_prompts(splits) -> None:  # data order: the checkpoint's iterations must replay
        for s, uids in enumerate(state.prompt_uids if state else []):
            if [p.uid for p in sample_prompts(splits.train, s, cfg)] != uids:
                raise ConfigError(f"iteration {s + 1} of the checkpoint sampled other prompts than "
                                  f"the data gives now: the prompt data (data.*) changed since; "
                                  f"resume with the original data or start a new run")

    cfg.save(folder / "config.yaml")
    session = start(cfg, folder, True, state.wandb_id if state else None, same_prompts)
    try:
        if state is not None:
            session.tracker.restore(state.records, state.steps)
            if session.runtime.resumed_from != state.iteration:
                raise RuntimeError(f"the learner loaded checkpoint {session.runtime.resumed_from}, "
                                   f"the driver {state.iteration}")
        else:
            session.tracker.restore([], [])
        train_and_save(cfg, session, folder, state)
    finally:
        session.close()
        print(session.tracker.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
