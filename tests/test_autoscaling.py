"""Autoscaling: on Ray's fake multi-node provider (worker nodes simulated on this machine), a tiny run
whose actors ask for a custom resource the head does not offer makes the autoscaler add worker
nodes, and the run completes.

Not `ray.cluster_utils.AutoscalingCluster`: its config template (fake_multi_node/example.yaml) is
missing from the Ray 2.60 wheel, and it runs `ray stop --force`, which kills every Ray instance on
the machine. The same config is written here, the head runs under `ray start --block` on free
ports and its own temp dir, and teardown ends only the processes this test started.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

WORKER_TYPE = "larpo.worker"  # the node type the autoscaler may add
RESOURCE = "larpo_worker"  # custom resource only that node type offers; every role asks for 1
PER_NODE = 2  # so generator + reward fit on one node and the learner worker needs a second


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cluster_config(gcs_address: str) -> dict:
    """Ray's fake_multi_node example config: a head without RESOURCE, a worker type with it."""
    return {
        "cluster_name": "larpo-autoscaling-test",
        "max_workers": 3,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            # Logical CPUs beyond the machine's 2 cores: the simulated nodes share them.
            WORKER_TYPE: {
                "resources": {"CPU": 2, RESOURCE: PER_NODE, "object_store_memory": 200 * 2**20},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 3,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,  # keep added nodes up until the test has counted them
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture
def autoscaling_cluster(tmp_path):
    """A head node (2 CPUs, no RESOURCE) with the fake provider's autoscaler; yields its address."""
    import psutil
    import ray._private.services

    port = free_port()
    address = f"{ray._private.services.get_node_ip_address()}:{port}"
    config = tmp_path / "cluster.json"
    config.write_text(json.dumps(cluster_config(address)))
    temp_dir = tempfile.mkdtemp(prefix="larpo-as-", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--autoscaling-config={config}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (Path(temp_dir) / "ray_current_cluster").exists():  # written once the head is up
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        yield address, Path(temp_dir)
    finally:
        # Only this head and what it started: its descendants include the fake worker nodes, which
        # the autoscaler (a child of the head) runs as its own children.
        started = psutil.Process(head.pid).children(recursive=True)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for proc in started:
            if proc.is_running():
                proc.terminate()
        _, alive = psutil.wait_procs(started, timeout=20)
        for proc in alive:
            proc.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_autoscaler_adds_worker_nodes_and_the_run_completes(autoscaling_cluster, tmp_path, tiny_model_path):
    import ray

    address, temp_dir = autoscaling_cluster
    run_dir = tmp_path / "run"
    need = f"{{{RESOURCE}: 1}}"
    argv = [
        "--preset",
        "tiny",
        "--resources.ray_address",
        address,
        "--loop.run_dir",
        str(run_dir),
        "--loop.iterations",
        "1",
        "--loop.prompts_per_iteration",
        "8",
        "--data.num_eval",
        "4",
        "--generation.engine",
        "hf",
        "--learner.num_workers",
        "1",
        "--loop.save_model",
        "false",
        "--logging.progress",
        "false",
        "--logging.log_samples",
        "0",
        "--resources.generator_resources",
        need,
        "--resources.reward_resources",
        need,
        "--resources.learner_resources_per_worker",
        need,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "-m", "larpo_ray.run", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    monitor = "".join(p.read_text()[-3000:] for p in temp_dir.glob("session_*/logs/monitor.log"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + "\n--- monitor.log\n" + monitor

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1]
    assert lines[-1]["train/loss"] is not None and lines[-1]["lists/n_lists"] > 0

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=address)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
    workers = [n for n in nodes if n["Resources"].get(RESOURCE)]
    # The head offers no RESOURCE: every actor ran on a node the autoscaler added; three actors at
    # PER_NODE = 2 each node take two nodes.
    assert len(nodes) == len(workers) + 1
    assert len(workers) >= 2, monitor
