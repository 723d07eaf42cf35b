"""Soak: the tiny preset through Ray for LARPO_SOAK_MINUTES (default 30) while a random actor
(generator, reward actor or learner worker) is SIGKILLed every LARPO_SOAK_KILL_EVERY_S seconds
(default 180), for ~LARPO_SOAK_MINUTES * 60 / 3 iterations (LARPO_SOAK_ITERATIONS overrides).
Not part of `make test` (marker `soak`): run it with `make soak`.

The run must end on its own with exit 0, every iteration in metrics.jsonl exactly once, and no
lost prompts: each iteration generated k candidates for each of its M prompts and scored them
all, and each evaluation scored every held-out prompt.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("ray::Generator", "ray::RewardActor", "ray::RayTrainWorker")


def actor_processes(driver_pid: int) -> list[tuple[str, int]]:
    """(role, pid) of this run's actor processes: descendants of its driver (a local Ray instance
    is started by the driver) that Ray titles ray::<Class>. Other runs' actors are never touched."""
    import psutil

    found = []
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for role in ROLES:
            if title.startswith(role):
                found.append((role, proc.pid))
    return found


@pytest.mark.soak
def test_soak_kills_random_actors_and_loses_nothing(tmp_path):
    minutes = float(os.environ.get("LARPO_SOAK_MINUTES", "30"))
    every = float(os.environ.get("LARPO_SOAK_KILL_EVERY_S", "180"))
    # a tiny iteration (16 prompts, k = 4) takes ~2-3 s here (measured); restarts add more
    iterations = int(os.environ.get("LARPO_SOAK_ITERATIONS", max(2, int(minutes * 60 / 3))))
    run_dir = tmp_path / "soak"
    k, m, n_eval = 4, 16, 16
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "larpo_ray.run",
            "--preset",
            "tiny",
            "--loop.run_dir",
            str(run_dir),
            "--loop.iterations",
            str(iterations),
            "--generation.temperature",
            "1.0",
            "--logging.progress",
            "false",
            "--generation.k",
            str(k),
            "--loop.prompts_per_iteration",
            str(m),
            "--data.num_eval",
            str(n_eval),
            "--data.num_train",
            "512",
            "--faults.learner_max_failures",
            "100",
            "--faults.actor_max_restarts",
            "100",
        ],
        cwd=ROOT,
        stdout=open(tmp_path / "run.log", "w"),
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # its own local Ray
    rng = random.Random(0)
    kills: list[str] = []
    deadline = time.monotonic() + minutes * 60
    next_kill = time.monotonic() + every
    while proc.poll() is None and time.monotonic() < deadline + 3600:
        if time.monotonic() >= next_kill and time.monotonic() < deadline:
            victims = actor_processes(proc.pid)
            if victims:
                role, pid = rng.choice(victims)
                os.kill(pid, signal.SIGKILL)
                kills.append(f"{time.strftime('%H:%M:%S')} {role} {pid}")
            next_kill = time.monotonic() + every
        time.sleep(2)
    if proc.poll() is None:
        proc.kill()
    log = (tmp_path / "run.log").read_text()
    print("\n".join(kills))
    assert proc.returncode == 0, log[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(iterations + 1))
    for row in rows[1:]:
        assert row["rollout/n_candidates"] == k * m, row["iteration"]
        assert row["rollout/n_scored"] + row["rollout/n_failed_scores"] == k * m, row["iteration"]
    assert all(r["eval/n_scored"] == n_eval for r in rows)
    assert kills, "the run ended before the first kill: raise LARPO_SOAK_ITERATIONS"
