"""The study runner for real (CI): a smoke study on the tiny model through Ray, 2 variants x 2
seeds x 1 iteration, each run a real `python -m larpo_ray.run`; then the same study again (every
run skipped), and once more one iteration longer for one variant (its runs resume from their
checkpoints and train one more iteration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SMOKE = """
name: smoke
description: tiny model, 2 variants x 2 seeds, 1 iteration (CI)
recipe: tiny
overrides: {loop.iterations: 1, logging.progress: false, logging.wandb_mode: offline}
seeds: [0, 1]
baseline: pairwise
variants:
  pairwise:
    description: best vs worst of 4
    overrides: {loss.name: pairwise}
  listmle:
    description: ListMLE over the list of 4
    overrides: {loss.name: listmle, lists.rule: all}
"""


def _study(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "larpo_ray.study", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=2400
    )


def test_smoke_study_runs_reports_skips_and_resumes(tmp_path):
    spec = tmp_path / "smoke.yaml"
    spec.write_text(textwrap.dedent(SMOKE))
    proc = _study([str(spec)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "study-smoke"  # the default folder, relative to where it was launched
    for variant in ("pairwise", "listmle"):
        for seed in (0, 1):
            run = out / variant / f"seed-{seed}"
            assert (run / "policy" / "model.safetensors").is_file()
            assert (run / "eval" / "iter-000001.jsonl").is_file()
            cfg = (run / "config.yaml").read_text()
            assert f"seed: {seed}" in cfg and "wandb_group: smoke" in cfg
    assert sum("done in" in ln for ln in proc.stdout.splitlines()) == 4
    summary = json.loads((out / "study.json").read_text())
    rows = {r["variant"]: r for r in summary["variants"]}
    assert rows["pairwise"]["n"] == rows["listmle"]["n"] == 2
    for row in rows.values():
        finals = [r["final"] for r in summary["runs"] if r["variant"] == row["variant"]]
        assert row["final"]["mean"] == pytest.approx(sum(finals) / 2)
        assert row["generated_tokens"]["mean"] > 0 and row["loop_minutes"]["mean"] > 0
    num_eval = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["data"]["num_eval"]
    assert summary["held_out_prompts"] == num_eval and len(summary["differences"]) == 1
    md = (out / "study.md").read_text()
    assert "| **pairwise** | 2 |" in md and "| listmle - pairwise |" in md
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(out.glob("*/seed-*/wandb/offline-run-*/*.wandb"))) == 4  # a W&B run each (group: smoke)
    assert list((out / "wandb").glob("offline-run-*/*.wandb"))  # and the study's summary run

    # again: every run is finished, nothing runs
    start = time.monotonic()
    again = _study([str(spec)], tmp_path)
    assert again.returncode == 0 and again.stdout.count("done already") == 4
    assert time.monotonic() - start < 120

    # one iteration longer for one variant: its runs resume from their checkpoints
    longer = _study([str(spec), "--variants", "listmle", "--loop.iterations", "2"], tmp_path)
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert longer.stdout.count("resuming listmle seed") == 2
    for seed in (0, 1):
        run = out / "listmle" / f"seed-{seed}"
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [0, 1, 2]
        assert (run / "checkpoints" / "iter-000002" / "state.json").is_file()
        assert "--resume" in (run / "console.log").read_text()
    assert not (out / "pairwise" / "seed-0" / "checkpoints" / "iter-000002").exists()
