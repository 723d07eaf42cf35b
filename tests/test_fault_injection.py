"""Fault injection on the real roles (tiny preset through Ray: vLLM generator, rule reward actor,
2-worker DeepSpeed learner group), compared with an uninterrupted run of the same config.

- the driver is SIGKILLed after iteration 1's checkpoint; `--resume RUN_DIR` finishes the run;
- a generator's process is killed mid-generation (iteration 1), a reward actor's during scoring
  and a learner worker's during training (iteration 2), all in one run.
Every test runs in both loop modes (loop.mode = sync, async: the next rollout sampled while the
learner trains, and kept in the checkpoint). Both runs must end with every iteration in
metrics.jsonl and the same numbers as the uninterrupted run (timings aside): every candidate's
sampling seed derives from (seed, iteration, prompt, slot), so re-dispatched batches and redone
iterations reproduce exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--preset", "tiny", "--loop.iterations", "2", "--logging.progress", "false", "--loop.save_model", "false"]
pytestmark = pytest.mark.slow


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what depends on the clock or on faults."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append(
            {
                k: v
                for k, v in row.items()
                if not k.startswith(("timing/", "sync/", "faults/", "system/"))
                and "per_s" not in k
                and "seconds" not in k
                and k not in ("train/peak_gflops", "train/mfu")  # a matmul timed at start-up
            }
        )
    return rows


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = comparable(a), comparable(b)
    assert [r["iteration"] for r in rb] == [0, 1, 2]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys(), x["iteration"]
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["iteration"], key)


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "larpo_ray.run", *args], cwd=ROOT, timeout=timeout, capture_output=True, text=True
    )


@pytest.fixture(scope="module", params=["sync", "async"])
def base(request) -> list[str]:
    return [*BASE, "--loop.mode", request.param]


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "clean"
    proc = run_cli(*base, "--loop.run_dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the local instance has no dashboard: Ray Train's placement-group cleaner would warn about
    # its state API every second (topology.quiet_without_dashboard)
    assert "Failed to query Ray Train Controller" not in proc.stdout + proc.stderr
    return run_dir


def test_driver_killed_after_iteration_1_then_resumed(base, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "larpo_ray.run", *base, "--loop.run_dir", str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 900
    while not (latest.exists() and json.loads(latest.read_text())["iteration"] == 1):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    import psutil

    started = psutil.Process(proc.pid).children(recursive=True)  # its local Ray instance
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Ray's processes follow their driver (fate sharing) within seconds; wait, so the resumed run
    # does not meet two live local instances (Ray's own tools then refuse to pick one).
    _, alive = psutil.wait_procs(started, timeout=60)
    for leftover in alive:
        leftover.kill()
    assert [r["iteration"] for r in comparable(run_dir)][-1] <= 1

    resumed = run_cli("--resume", str(run_dir), "--logging.progress", "false")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "after iteration 1" in resumed.stdout
    assert_same_run(uninterrupted, run_dir)
    assert len(list((run_dir / "checkpoints").glob("iter-*"))) == 2  # loop.keep_checkpoints
    assert not list((run_dir / "checkpoints").glob(".iter-*"))  # no half-written checkpoint left
    if "async" in base:  # iteration 2's rollout, sampled ahead by policy 0, was kept in checkpoint 1
        kept = json.loads((run_dir / "checkpoints" / "iter-000001" / "state.json").read_text())["pending"]
        assert [d["iteration"] for d in kept] == [1] and kept[0]["version"] == 0
        assert comparable(run_dir)[2]["rollout/staleness"] == 1
    steps = [json.loads(line)["iteration"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and set(steps) == {1, 2}  # no step logged twice
    state = json.loads((run_dir / "checkpoints" / "iter-000002" / "state.json").read_text())
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(state["wandb_id"]) for name in wandb_runs)  # one W&B run


def test_resume_refuses_a_config_that_changes_the_run(uninterrupted, tmp_path):
    proc = run_cli("--resume", str(uninterrupted), "--loss.beta", "0.5", "--learner.lr", "0.01")
    assert proc.returncode == 2
    assert "loss.beta (checkpoint: 0.1, now: 0.5)" in proc.stderr and "learner.lr" in proc.stderr
    proc = run_cli("--resume", str(tmp_path))
    assert proc.returncode == 2 and "not a larpo-ray run folder" in proc.stderr


def test_actors_killed_mid_iteration_lose_nothing(base, uninterrupted, tmp_path, monkeypatch, capsys):
    """One run: generator 0 dies while generating (iteration 1), reward actor 0 while scoring
    and learner rank 1 as its training starts (iteration 2). Ray restarts the actors, the generator
    re-loads the current weights, the batches are re-dispatched; Ray Train restarts the learner
    group from the iteration-1 checkpoint and the loop redoes iteration 2."""
    import ray

    from larpo_ray import learner_group, topology
    from larpo_ray.config import load_config
    from larpo_ray.run import align

    killed: list[str] = []

    def kill(pid: int, what: str) -> None:
        os.kill(pid, signal.SIGKILL)
        killed.append(what)

    rollout = topology.RayRuntime.rollout

    def faulty_rollout(
        self, prompts, temperatures, iteration, max_new_tokens=None, on_batch=None, seed=None, batch_prompts=None
    ):
        plan = {0: ("generator", self.generators), 1: ("reward", self.rewards)}.get(iteration)
        if plan and not any(k.startswith(plan[0]) for k in killed):
            role, actors = plan
            pid = ray.get(actors[0].ping.remote())
            inner = on_batch

            def on_batch(n, _inner=inner):  # first batch generated: the next is in flight
                if not any(k.startswith(role) for k in killed):
                    kill(pid, f"{role} {pid}")
                if _inner:
                    _inner(n)

        return rollout(self, prompts, temperatures, iteration, max_new_tokens, on_batch, seed, batch_prompts)

    train = learner_group.RayLearnerGroup.train

    def faulty_train(self, iteration, lists):
        if iteration == 1 and not any(k.startswith("learner") for k in killed):
            pid = self.worker_info()[1]["pid"]
            # Killed as the train request goes out (not on a timer: on a fast or a loaded machine
            # a timer fired before or after the training): rank 0 meets a dead peer in its first
            # collective, or Ray Train restarts the group first; the request is void either way.
            kill(pid, f"learner rank 1 {pid}")
        return train(self, iteration, lists)

    monkeypatch.setattr(topology.RayRuntime, "rollout", faulty_rollout)
    monkeypatch.setattr(learner_group.RayLearnerGroup, "train", faulty_train)
    run_dir = tmp_path / "faulty"
    cfg = load_config(None, "tiny", [*base[2:], "--loop.run_dir", str(run_dir)])
    try:
        assert align(cfg) == 0
    finally:
        ray.shutdown()
    assert [k.split()[0] for k in killed] == ["generator", "reward", "learner"], killed
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["faults/generator_failures"] == 1 and rows[1]["faults/generator_redispatched"] >= 1
    assert_same_run(uninterrupted, run_dir)  # iteration 2 was redone after the learner restart
    assert "rolling back to iteration 1" in capsys.readouterr().out
