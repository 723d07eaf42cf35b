"""`ray job submit` of the tiny preset against a local cluster started with `ray start --head`,
as the README shows (Ray 2.60 enables token auth by default: the cluster starts without it), and
what the user then finds in the run folder the job's console names."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from run_folder_checks import check_run_folder, run_folder_from_console

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


def _submit(args: list[str], env: dict) -> str:
    """Submit a job and wait for it; its console (the job's logs) comes back in the output."""
    for _ in range(12):  # the dashboard's job agent may need a while after `ray start`
        job = _ray("job", "submit", "--address", "http://127.0.0.1:8276", *args, env=env, timeout=1200)
        if "No available agent to submit job" not in job.stdout + job.stderr:
            break
        time.sleep(5)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    return job.stdout


def test_ray_job_submit_runs_the_tiny_preset_where_the_console_says(tmp_path):
    """As the README shows: `ray start --head` in the repo, then `ray job submit -- python -m
    larpo_ray.run --preset tiny`: the default relative run folder is the repo's runs/ (the job runs
    where the cluster was started), the run resumes through another job, and nothing of it stays
    in Ray's session folder. With --working-dir the job runs in Ray's temporary copy of it: the
    relative run folder then goes under ~/larpo-ray, not into that copy."""
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="larpo-js-", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        HOME=str(home),
        RAY_TMPDIR=temp_dir,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    env.pop("RAY_ADDRESS", None)
    start = _ray(
        "start",
        "--head",
        "--port",
        "6391",
        "--dashboard-port",
        "8276",
        "--dashboard-agent-listen-port",
        "52376",
        "--num-cpus",
        "4",
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
        env=env,
    )
    assert start.returncode == 0, start.stderr
    run_dir = None
    try:
        console = _submit(["--", "python", "-m", "larpo_ray.run", "--preset", "tiny"], env)
        run_dir = run_folder_from_console(console)
        assert run_dir.parent == ROOT / "runs"
        check_run_folder(run_dir, 3, Path(temp_dir))  # the tiny preset's 3 iterations
        _submit(
            [
                "--",
                "python",
                "-m",
                "larpo_ray.run",
                "--resume",
                str(run_dir.relative_to(ROOT)),
                "--loop.iterations",
                "4",
            ],
            env,
        )
        check_run_folder(run_dir, 4, Path(temp_dir))

        console = _submit(
            ["--working-dir", ".", "--", "python", "-m", "larpo_ray.run", "--preset", "tiny", "--loop.iterations", "1"],
            env,
        )
        copied = run_folder_from_console(console)
        assert copied.parent == home / "larpo-ray" / "runs" and "Ray's temporary copy" in console
        check_run_folder(copied, 1, Path(temp_dir))
        assert not list(Path(temp_dir).glob("**/working_dir_files/*/runs"))
    finally:
        _stop(temp_dir)
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
