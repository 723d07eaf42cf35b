"""Run folders on a URI (larpo_ray.storage), against a real S3 API served locally by moto's
server: the storage layer on its own, then (slow) a tiny run through Ray whose loop.run_dir is an
s3:// URI, resumed from that URI on a machine that has no local copy of it, and reported from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from larpo_ray import checkpoint
from larpo_ray.storage import RunStorage, is_uri

ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port with a bucket 'runs'; yields the URI query that
    points pyarrow at it."""
    from moto.server import ThreadedMotoServer

    old = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="runs")
    yield f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def staging(tmp_path, monkeypatch):
    monkeypatch.setenv("LARPO_STAGING", str(tmp_path / "staging"))
    return tmp_path / "staging"


def test_a_local_folder_is_used_as_is_and_never_copied(tmp_path):
    st = RunStorage.at(str(tmp_path / "run"))
    assert st.local == str(tmp_path / "run") and not st.remote and st.display == st.local
    st.push("anything")  # nothing to do, nothing raised
    assert not is_uri("/a/b") and not is_uri("file:///a/b") and is_uri("s3://b/k") and is_uri("gs://b/k")
    assert RunStorage.at("file:///a/b").local == "/a/b"


def test_push_pull_list_delete_against_s3(s3, staging):
    st = RunStorage.at(f"s3://runs/exp/one?{s3}")
    assert st.local == str(staging / "s3" / "runs" / "exp" / "one") and st.display == "s3://runs/exp/one"
    local = Path(st.local)
    (local / "eval").mkdir(parents=True)
    (local / "eval" / "iter-000001.jsonl").write_text('{"uid": "a"}\n')
    (local / "metrics.jsonl").write_text('{"iteration": 0}\n')
    st.push("metrics.jsonl")
    st.push("eval")
    st.push("missing")  # nothing there yet: nothing copied
    assert st.listdir(".") == ["eval", "metrics.jsonl"] and st.listdir("eval") == ["iter-000001.jsonl"]
    assert st.exists("eval/iter-000001.jsonl") and not st.exists("nope")
    shutil.rmtree(local)
    assert st.pull("eval") and (local / "eval" / "iter-000001.jsonl").read_text() == '{"uid": "a"}\n'
    assert st.pull("metrics.jsonl") and not st.pull("nope")
    st.delete("eval")
    assert st.listdir(".") == ["metrics.jsonl"]


def test_checkpoint_index_on_a_uri_is_the_record(s3, staging):
    """A checkpoint is complete on the URI once its state.json is there; a resume pulls the
    index and drops local folders the URI does not have (e.g. left by a crash before upload)."""
    st = RunStorage.at(f"s3://runs/exp/ckpt?{s3}")
    root = Path(st.local) / "checkpoints"
    state = checkpoint.LoopState(iteration=1, config={"loop": {}})
    tmp = checkpoint.begin(root, 1)
    (tmp / "policy").mkdir()
    (tmp / "policy" / "model.safetensors").write_bytes(b"w")
    (tmp / "learner").mkdir()
    for ext in ("json", "safetensors"):
        (tmp / "learner" / f"rank-0.{ext}").write_text("{}")
    checkpoint.push_part(st, tmp, "checkpoints/iter-000001", 0)
    assert "state.json" not in st.listdir("checkpoints/iter-000001")  # not complete yet
    final = checkpoint.commit(root, tmp, state, keep=2)
    checkpoint.push_commit(st, root, final)
    assert st.listdir("checkpoints") == ["iter-000001", "latest.json"]
    assert st.listdir("checkpoints/iter-000001") == ["learner", "policy", "state.json"]
    shutil.rmtree(Path(st.local))
    (root / "iter-000009").mkdir(parents=True)  # a local leftover the URI never got
    (root / "iter-000009" / "state.json").write_text(json.dumps({"format": 1, "iteration": 9}))
    checkpoint.pull_index(st)
    assert not (root / "iter-000009").exists()
    newest = checkpoint.latest(root)
    assert newest.name == "iter-000001" and not (newest / "policy").exists()
    checkpoint.pull_part(st, newest, 0)
    assert (newest / "policy" / "model.safetensors").read_bytes() == b"w"


@pytest.mark.slow
def test_a_run_on_s3_writes_everything_there_resumes_from_there_and_reports(s3, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), LARPO_STAGING=str(tmp_path / "staging"), **CREDENTIALS)
    env.pop("RAY_ADDRESS", None)
    uri = f"s3://runs/tiny/run-1?{s3}"
    run = [sys.executable, "-m", "larpo_ray.run"]
    first = subprocess.run(
        run + ["--preset", "tiny", "--loop.run_dir", uri, "--loop.iterations", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "larpo-ray: run folder s3://runs/tiny/run-1 (staged on this node in" in first.stdout
    assert "python -m larpo_ray.report s3://runs/tiny/run-1" in first.stdout
    st = RunStorage(str(tmp_path / "elsewhere"), uri)  # read the bucket into a fresh folder
    for name in ("config.yaml", "metrics.jsonl", "steps.jsonl", "eval", "checkpoints", "policy", "wandb", "logs"):
        assert st.pull(name), f"{name} is not on S3"
    local = Path(st.local)
    assert [json.loads(x)["iteration"] for x in (local / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert sorted(p.name for p in (local / "eval").iterdir()) == [f"iter-00000{i}.jsonl" for i in range(3)]
    assert json.loads((local / "checkpoints" / "latest.json").read_text())["dir"] == "iter-000002"
    for it in (1, 2):
        ckpt = local / "checkpoints" / f"iter-00000{it}"
        assert (ckpt / "state.json").is_file() and (ckpt / "policy" / "model.safetensors").is_file()
        assert sorted(p.name for p in (ckpt / "learner").iterdir()) == [
            "rank-0.json",
            "rank-0.safetensors",
            "rank-1.json",
            "rank-1.safetensors",
        ]
    assert (local / "policy" / "model.safetensors").is_file() and list((local / "wandb").glob("offline-run-*/*.wandb"))
    assert (local / "logs" / "generator-0.log").stat().st_size > 0

    shutil.rmtree(tmp_path / "staging")  # another machine: nothing of the run on its disk
    again = subprocess.run(
        run + ["--resume", uri, "--loop.iterations", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming s3://runs/tiny/run-1 after iteration 2" in again.stdout
    assert st.pull("metrics.jsonl") and st.pull("checkpoints")
    assert [json.loads(x)["iteration"] for x in (local / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert st.listdir("checkpoints") == ["iter-000002", "iter-000003", "latest.json"]  # keep_checkpoints = 2
    assert (local / "checkpoints" / "iter-000003" / "learner" / "rank-1.safetensors").is_file()

    report = subprocess.run(
        [sys.executable, "-m", "larpo_ray.report", uri],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr
    assert "report" in st.listdir(".") and "summary.md" in st.listdir("report")
