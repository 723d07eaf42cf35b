"""Benchmarks must not rot: each script's smoke mode runs on CPU in seconds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_learner_step_smoke(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_learner_step.py"), "--smoke", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["train_tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["tokens_per_step"] <= result["padded_tokens"]


def test_gpu_inprocess_loop_smoke(tmp_path):
    """The in-process loop (HF engine, reward model, DeepSpeed ZeRO-3 learner) on the tiny shape."""
    result = _run("gpu_inprocess_loop.py", tmp_path)
    assert result["rc"] == 0 and result["shape"] == "tiny" and result["metrics"]["lists/n_lists"] > 0
    assert result["metrics"]["train/tokens"] > 0 and 0 < result["mfu"] < 1


def _run(script: str, tmp_path) -> dict:
    """Run benchmarks/<script> --smoke and return its JSON."""
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _smoke(script: str, tmp_path) -> dict:
    """`_run` for the scripts of issue 5 (CPU), which describe the machine they ran on."""
    result = _run(script, tmp_path)
    assert result["smoke"] and result["machine"]["cpu_cores"] > 0 and result["machine"]["torch_threads"] > 0
    return result


def test_phase_breakdown_smoke(tmp_path):
    run = _smoke("phase_breakdown.py", tmp_path)["runs"]["tiny"]
    (it,) = run["iterations"]
    assert it["wall"] > 0 and all(it[p] >= 0 for p in ("generate", "lists", "train", "sync", "eval"))
    assert it["train"] >= it["reference"] + it["train_steps"] > 0
    # the phases are measured inside the wall time: overhead is small and never hugely negative
    assert 0 <= it["overhead"] < it["wall"]
    assert run["startup_s"] > 0 and 0 <= run["totals"]["overhead_fraction"] < 1


def test_generation_smoke(tmp_path):
    (model,) = _smoke("generation.py", tmp_path)["models"]
    assert model["hf_tokens_per_s"] > 0 and model["vllm_tokens_per_s"] > 0
    assert model["vllm_over_hf"] > 0 and isinstance(model["target_met"], bool)
    assert all(r[e]["tokens"] > 0 for r in model["rounds"] for e in ("hf", "vllm"))


def test_learner_smoke(tmp_path):
    result = _smoke("learner.py", tmp_path)
    assert result["matmul_peak_gflops"] > 0
    configs = result["models"][0]["configs"]
    assert {c["zero_stage"] for c in configs} == {0, 3} and len(configs) == 4
    assert [c["layout"] for c in configs] == ["packed"] * 3 + ["padded"]
    for c in configs:
        assert c["train_tokens_per_s"] > 0 and c["ref_tokens_per_s"] > 0 and 0 < c["mfu"] < 1
        assert 0 <= c["padding_frac"] < 1 and c["params"] > 0 and 0 < c["worker_mfu"] <= 1


def test_weight_sync_smoke(tmp_path):
    result = _smoke("weight_sync.py", tmp_path)
    (model,) = result["models"]
    assert set(model["transports"]) == {"object_store", "gloo_broadcast", "vllm_shm", "hf_load_state_dict"}
    for t in model["transports"].values():
        assert t["bytes"] == model["bytes"] > 0 and t["seconds"] > 0 and t["gb_per_s"] > 0
    assert "nccl_broadcast" in result["not_available"]


def _run_benchmark(script: str, tmp_path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_trl_baseline_smoke_without_trl(tmp_path):
    """The larpo-ray iteration and our learner's loss against the DPO formula written out."""
    result = _run_benchmark("trl_baseline.py", tmp_path, "--no-trl")
    larpo = result["larpo"]
    assert larpo["timing"]["iteration"] > 0 and larpo["n_samples"] == 2 * result["settings"]["prompts"]
    steps = result["steps"]
    assert steps["ours"]["steps"] >= 2 and steps["ours"]["step_s"] > 0
    assert abs(steps["first_loss_ours_minus_formula"]) < 1e-4 and "trl" not in steps
    assert result["machine"]["cpu_cores"] > 0


TRL_PYTHON = ROOT / "benchmarks" / ".venv-trl" / "bin" / "python"


@pytest.mark.skipif(
    not TRL_PYTHON.exists(), reason="no TRL venv at benchmarks/.venv-trl (benchmarks/README.md builds it)"
)
def test_trl_baseline_smoke_trl_side(tmp_path):
    """HF generate + TRL DPOTrainer in the TRL venv; TRL's first-step loss equals ours."""
    result = _run_benchmark("trl_baseline.py", tmp_path, "--parts", "trl", "steps")
    trl = result["trl"]
    assert trl["timing"]["generate"] > 0 and trl["n_samples"] == 2 * result["settings"]["prompts"]
    steps = result["steps"]
    assert steps["pairs_from"] == "trl samples" and len(steps["trl"]["step_losses"]) == steps["ours"]["steps"]
    assert result["summary"]["loss_target_met"] and abs(steps["first_loss_ours_minus_trl"]) <= 1e-4
    assert steps["trl"]["step_s"] > 0 and steps["step_time_ratio"] > 0


def test_scale_sim_smoke(tmp_path):
    """The real RayRuntime.rollout against 2 and 4 simulated generators: both dispatch policies on
    the same work, then the sync and async loops."""
    result = _run_benchmark("scale_sim.py", tmp_path)
    s, rows = result["settings"], result["dispatch_rows"]
    assert [(r["generators"], r["policy"]) for r in rows] == [
        (n, p) for n in (2, 4) for p in ("round_robin", "first_free")
    ]
    for r in rows:
        assert r["samples"] == r["generators"] * s["batches_per_generator"] * s["batch_prompts"] * s["k"]
        assert r["wall_s"] > 0.8 * r["ideal_makespan_s"] > 0 and 0 < r["driver_cpu_ms_per_sample"] < 50
        assert 0 < r["scaling_efficiency"] <= 1.05
        if r["policy"] == "round_robin":  # the same count each, whatever their batches took
            assert r["batches_per_generator_min_max"] == [s["batches_per_generator"]] * 2
    for n in (2, 4):
        sync, async_ = (
            next(r for r in result["loop_rows"] if (r["generators"], r["mode"]) == (n, m)) for m in ("sync", "async")
        )
        assert sync["samples_per_iteration"] == async_["samples_per_iteration"] > 0
        # training lasts about as long as the rollout here: the async loop overlaps the two
        assert async_["iteration_s"] < 0.85 * sync["iteration_s"]
        assert result["summary"][f"async_over_sync_samples_per_s_{n}"] > 1.15


def test_gpu_learner_step_restate(tmp_path):
    """--restate recomputes a recorded result's MFU with the useful-FLOP count (LM head on response
    tokens only): lower than the old all-positions count, which it keeps; and it refuses a file
    whose token counts its rebuilt lists do not reproduce."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_learner_step import restate

    old = {  # results/gpu_learner_step_h200_smollm2-135m.json as first recorded (old count)
        "model": "smollm2-135m",
        "lists": 8,
        "k": 4,
        "tokens_per_step": 14285,
        "padded_tokens": 15808,
        "step_seconds_median": 0.12808706900000288,
        "achieved_tflops": 100.31134811211669,
        "matmul_peak_tflops": 779.6329465758783,
        "mfu_vs_measured_peak": 0.1286648397206413,
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(old))
    result = restate(path)
    assert result["mfu_old_count"] == old["mfu_vs_measured_peak"]
    assert result["mfu"] == pytest.approx(0.1168, abs=1e-4) and result["mfu"] < result["mfu_old_count"]
    assert json.loads(path.read_text()) == result
    bad = {**old, "tokens_per_step": 1}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="token counts"):
        restate(path)
