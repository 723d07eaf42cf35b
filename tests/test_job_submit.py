"""`ray job submit` of the tiny preset against a local cluster started with `ray start --head`,
as the README shows (Ray 2.60 enables token auth by default: the cluster starts without it)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _ray(*args, env, timeout=600):
    ray_bin = Path(sys.executable).parent / "ray"
    return subprocess.run([str(ray_bin), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _stop(temp_dir: str) -> None:
    """End this cluster only: every process whose command line names its temp dir (`ray stop`
    would end every Ray instance on the machine)."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            mine.append(proc)
    for proc in mine:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=30)
    for proc in alive:
        proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_tiny_preset(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="larpo-js-", dir="/tmp")  # short: Ray's socket paths live under it
    start = _ray("start", "--head", "--port", "6391", "--dashboard-port", "8276", "--num-cpus", "4",
                 "--include-dashboard", "true", "--disable-usage-stats", f"--temp-dir={temp_dir}", env=env)
    assert start.returncode == 0, start.stderr
    try:
        run_dir = tmp_path / "job-run"
        for _ in range(12):  # the dashboard's job agent may need a while after `ray start`
            job = _ray("job", "submit", "--address", "http://127.0.0.1:8276", "--working-dir", ".", "--",
                       "python", "-m", "larpo_ray.run", "--preset", "tiny", "--loop.run_dir", str(run_dir),
                       "--logging.progress", "false", env=env, timeout=900)
            if "No available agent to submit job" not in job.stdout + job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in lines] == [0, 1, 2]
        assert (run_dir / "policy" / "config.json").is_file()
    finally:
        _stop(temp_dir)
