"""`ray job submit` of the tiny preset against a local cluster started with `ray start --head`,
as the README shows (Ray 2.60 enables token auth by default: the cluster starts without it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _ray(*args, env, timeout=600):
    ray_bin = Path(sys.executable).parent / "ray"
    return subprocess.run([str(ray_bin), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_the_tiny_preset(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    start = _ray("start", "--head", "--port", "6391", "--dashboard-port", "8276", "--num-cpus", "4",
                 "--include-dashboard", "true", "--disable-usage-stats", env=env)
    assert start.returncode == 0, start.stderr
    try:
        run_dir = tmp_path / "job-run"
        job = _ray("job", "submit", "--address", "http://127.0.0.1:8276", "--working-dir", ".", "--",
                   "python", "-m", "larpo_ray.run", "--preset", "tiny", "--loop.run_dir", str(run_dir),
                   "--logging.progress", "false", env=env, timeout=900)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in lines] == [0, 1, 2]
        assert (run_dir / "policy" / "config.json").is_file()
    finally:
        _ray("stop", "--force", env=env)
