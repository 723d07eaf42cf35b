"""What a user finds after a run, checked the same way for every launch path (CLI, make, ray job
submit): the files the console names exist, the saved policy gives the answers the run's last
evaluation reported (in transformers and in vLLM), every checkpoint is complete, and nothing of
the run is left in Ray's session folder."""

from __future__ import annotations

import json
import re
from pathlib import Path


def run_folder_from_console(console: str) -> Path:
    """The folder the console names ('larpo-ray: run folder X')."""
    match = re.search(r"larpo-ray: run folder (\S+)", console)
    assert match, f"the console names no run folder:\n{console[-3000:]}"
    return Path(match.group(1))


def last_evaluation(run_dir: Path) -> tuple[int, dict[str, str]]:
    """(iteration, {prompt uid: greedy response}) of the newest RUN_DIR/eval/iter-N.jsonl."""
    newest = max((run_dir / "eval").glob("iter-*.jsonl"))
    rows = [json.loads(line) for line in newest.read_text().splitlines()]
    return int(newest.stem.split("-")[1]), {r["uid"]: r["response"] for r in rows}


def check_run_folder(run_dir: Path, iterations: int, ray_temp: Path | None = None) -> None:
    """Everything the run's closing lines promise is in `run_dir`, complete and usable."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(iterations + 1))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "steps.jsonl").is_file()
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [
        "generator-0.log",
        "learner-rank-0.log",
        "learner-rank-1.log",
        "reward-0.log",
    ]
    assert "Reloading" in (run_dir / "logs" / "generator-0.log").read_text()  # vLLM's own lines land there
    assert list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    checkpoints = sorted((run_dir / "checkpoints").glob("iter-*"))
    assert checkpoints and checkpoints[-1].name == f"iter-{iterations:06d}"
    for ckpt in checkpoints:  # each holds the policy and every rank's optimizer state
        assert (ckpt / "state.json").is_file() and (ckpt / "policy" / "model.safetensors").is_file()
        assert sorted(p.name for p in (ckpt / "learner").iterdir()) == [
            "rank-0.json",
            "rank-0.safetensors",
            "rank-1.json",
            "rank-1.safetensors",
        ]
    assert not list((run_dir / "checkpoints").glob(".*tmp*")), "a checkpoint was never committed"
    iteration, reported = last_evaluation(run_dir)
    assert iteration == iterations
    for engine in ("hf", "vllm"):
        assert greedy_answers(run_dir, engine) == reported, f"{engine} answers differ from the run's last evaluation"
    if ray_temp is not None:
        left = [p for p in ray_temp.glob("**/session_*/artifacts/**/*") if p.is_file()]
        assert not left, f"run files left in Ray's session folder: {left[:5]}"


def greedy_answers(run_dir: Path, engine: str) -> dict[str, str]:
    """Greedy answers of RUN_DIR/policy on the run's held-out prompts, through the project's own
    engine wrapper (vLLM or transformers), loaded fresh in this process."""
    from actors.generator import Generator
    from larpo_ray.config import load_config
    from larpo_ray.data import load_prompts
    from larpo_ray.models import load_tokenizer

    cfg = load_config(str(run_dir / "config.yaml"), None, ["--generation.engine", engine])
    policy = str(run_dir / "policy")
    held_out = load_prompts(cfg.data, load_tokenizer(policy, False)).eval
    gen = Generator(policy, cfg.generation, cfg.model)
    try:
        return {c.prompt_uid: c.text for c in gen.generate(held_out, [0.0], None, None)}
    finally:
        gen.close()
