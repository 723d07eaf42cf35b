"""Launch the tiny preset the way users do and open what the console says exists: the CLI with its
default relative run folder from a directory of the user's, `make run` from the repo root, and
`ray job submit` (tests/test_job_submit.py). Each run is then resumed for one more iteration from
another working directory. Also: a Ray cluster recorded on this machine, live or dead."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from run_folder_checks import check_run_folder, run_folder_from_console

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
MAX_CONSOLE_LINES = 40  # issue: a default run prints <= 40 lines besides progress bars
ACTOR_LINE = re.compile(r"\((raylet|[\w:.]+ pid=\d+)[^)]*\)")  # Ray's prefix of an actor's output line


def _env(ray_temp: Path, **extra) -> dict[str, str]:
    env = dict(os.environ, RAY_TMPDIR=str(ray_temp), PYTHONPATH=str(ROOT), **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _console_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """What the user reads, progress bars left out (tqdm redraws lines with \\r on stderr)."""
    text = proc.stdout + proc.stderr
    lines = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines()]
    return [ln for ln in lines if ln.strip() and "prompt/s]" not in ln and "it/s]" not in ln]


@pytest.fixture
def ray_temp():
    path = Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp"))  # short: Ray's socket paths live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_cli_default_run_folder_is_where_the_console_says_and_resumes(tmp_path, ray_temp):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    proc = _run([sys.executable, "-m", "larpo_ray.run", "--preset", "tiny"], home, _env(ray_temp))
    run_dir = run_folder_from_console(proc.stdout)
    assert run_dir.parent == home / "runs"  # relative to the directory it was launched from
    lines = _console_lines(proc)
    assert len(lines) <= MAX_CONSOLE_LINES, "\n".join(lines)
    assert not any("pid=" in ln for ln in lines), "actor output reached the quiet console"
    assert f"python -m larpo_ray.run --resume {run_dir}" in proc.stdout
    check_run_folder(run_dir, 3, ray_temp)  # the tiny preset's 3 iterations
    # resume from another directory, naming the folder relative to it
    relative = os.path.relpath(run_dir, elsewhere)
    _run(
        [sys.executable, "-m", "larpo_ray.run", "--resume", relative, "--loop.iterations", "4"],
        elsewhere,
        _env(ray_temp),
    )
    check_run_folder(run_dir, 4, ray_temp)
    assert not (elsewhere / "runs").exists()


def test_make_run_tiny_from_the_repo_root(ray_temp):
    env = _env(ray_temp)
    proc = _run(["make", "run", "ARGS=--preset tiny"], ROOT, env)
    run_dir = run_folder_from_console(proc.stdout)
    try:
        assert run_dir.parent == ROOT / "runs"
        check_run_folder(run_dir, 3, ray_temp)
        _run(["make", "run", f"ARGS=--resume {run_dir.relative_to(ROOT)} --loop.iterations 4"], ROOT, env)
        check_run_folder(run_dir, 4, ray_temp)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _ray(*args, env, cwd=ROOT, timeout=300):
    return subprocess.run(
        [str(Path(sys.executable).parent / "ray"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_live_local_cluster_is_joined_and_a_dead_one_passed_over(tmp_path, ray_temp):
    """`ray start --head` records its address in <temp>/ray_current_cluster. While it runs, a run
    joins it and says so; once its processes are killed (no `ray stop`), the record stays and a
    run starts its own instance with a warning, never a traceback."""
    import psutil

    env = _env(ray_temp, RAY_AUTH_MODE="disabled")
    with socket.socket() as sock:  # a free port: a fixed one may be held by another Ray on a CI machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = _ray(
        "start",
        "--head",
        "--port",
        str(port),
        "--num-cpus",
        "4",
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
        env=env,
    )  # RAY_TMPDIR: under ray_temp/ray
    assert start.returncode == 0, start.stderr
    args = [
        sys.executable,
        "-m",
        "larpo_ray.run",
        "--preset",
        "tiny",
        "--loop.iterations",
        "1",
        "--data.num_eval",
        "8",
        "--logging.wandb_mode",
        "disabled",
    ]
    try:
        live = _run(args + ["--loop.run_dir", str(tmp_path / "live")], tmp_path, env)
        assert "larpo-ray: joining the Ray cluster running on this machine at" in live.stdout
        assert (tmp_path / "live" / "policy" / "model.safetensors").is_file()
    finally:
        head = [p for p in psutil.process_iter(["cmdline"]) if any(str(ray_temp) in c for c in p.info["cmdline"] or [])]
        for proc in head:  # killed by process id, as a crash or a reboot would
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(head, timeout=30)
    assert (ray_temp / "ray" / "ray_current_cluster").is_file()  # the stale record Ray leaves behind
    time.sleep(1)
    dead = _run(args + ["--loop.run_dir", str(tmp_path / "dead"), "--verbose"], tmp_path, env)
    assert "nothing answers there" in dead.stderr and "starting a local Ray instance" in dead.stderr
    # the run's own output: no traceback. (--verbose also streams Ray's own processes, prefixed
    # "(Name pid=N)"; on a loaded machine Ray Train's controller may log a timed-out stop of its
    # placement-group cleaner there at shutdown: Ray's noise, not the run's.)
    own = [ln for ln in (dead.stdout + dead.stderr).splitlines() if not ACTOR_LINE.search(ln)]
    assert not any("Traceback" in ln for ln in own), "\n".join(own)
    assert (tmp_path / "dead" / "policy" / "model.safetensors").is_file()
    # --verbose: the actors' output reaches the console and still lands in their log files
    console = dead.stdout + dead.stderr
    assert "(Generator pid=" in console and "(RayTrainWorker pid=" in console
    assert "Reloading" in (tmp_path / "dead" / "logs" / "generator-0.log").read_text()
    assert "(Generator pid=" not in live.stdout + live.stderr  # quiet by default
