"""Benchmarks must not rot: each script's smoke mode runs on CPU in seconds."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_learner_step_smoke(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_learner_step.py"), "--smoke", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["train_tokens_per_s"] > 0 and 0 < result["mfu_vs_measured_peak"] < 1
    assert result["tokens_per_step"] <= result["padded_tokens"]
