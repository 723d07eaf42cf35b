"""The run report tool: plots, summary.md, bad input, per-step loss from W&B, AlpacaEval export."""

import json
from pathlib import Path

import pytest

from larpo_ray.config import Config
from larpo_ray.report import main, read_steps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("eval.png", "loss.png", "timings.png")


def record(it: int, accuracy: bool = True, evaluated: bool = True) -> dict:
    """One metrics.jsonl line as the driver writes it (iteration 0: the initial evaluation)."""
    rec = {"iteration": it}
    if evaluated:
        rec |= {"eval/mean_reward": 0.2 + 0.1 * it, "eval/n_scored": 64.0, "timing/eval": 30.0 + it}
        if accuracy:
            rec["eval/accuracy"] = 0.15 + 0.1 * it
        if it:
            rec["eval/win_rate_vs_initial"] = 0.5 + 0.05 * it
    if it:
        rec |= {
            "train/loss": 0.69 - 0.05 * it,
            "train/reward_accuracy": 0.6 + 0.05 * it,
            "train/steps": 6.0,
            "lists/n_lists": 20.0 + it,
            "sync/gb_per_s": 0.3,
            "timing/generate": 90.0 - it,
            "timing/lists": 0.01,
            "timing/train": 110.0 + 5 * it,
            "timing/sync": 2.0,
            "timing/iteration": 240.0,
        }
    return rec


def make_run(tmp_path: Path, records: list[dict], name: str = "run") -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    Config().save(run_dir / "config.yaml")
    return run_dir


def check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert path.stat().st_size > 5000, path
    assert matplotlib.image.imread(str(path))[..., :3].var() > 1e-3, f"{path} is a blank image"


def test_report_writes_plots_and_summary(tmp_path):
    run_dir = make_run(tmp_path, [record(i) for i in range(4)])
    assert main([str(run_dir)]) == 0
    for name in PLOTS:
        check_png(run_dir / "report" / name)
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "| 0 | 0.2 | 0.15 | - | - |" in summary  # initial evaluation row
    assert "| 3 | 0.5 | 0.45 | 0.65 | 0.54 |" in summary
    assert "| eval/mean_reward | 0.2 (iter 0) | 0.5 (iter 3) | +0.3 |" in summary
    assert "| eval/win_rate_vs_initial | 0.55 (iter 1) | 0.65 (iter 3) | +0.1 |" in summary
    assert "| loss.name | `contrastive` |" in summary and "| generation.k | `4` |" in summary
    assert all(f"({name})" in summary for name in PLOTS)
    assert "per-iteration mean `train/loss`" in summary  # no W&B run in this folder


def test_missing_metrics_are_skipped_and_listed(tmp_path):
    records = [
        record(0, accuracy=False),
        record(1, accuracy=False),
        record(2, accuracy=False, evaluated=False),
        record(3, accuracy=False),
    ]
    for rec in records:
        rec.pop("timing/sync", None)
    run_dir = make_run(tmp_path, records)
    assert main([str(run_dir)]) == 0
    for name in PLOTS:
        check_png(run_dir / "report" / name)
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "`eval/accuracy` not in metrics.jsonl" in summary
    assert "no evaluation on iteration(s) [2]" in summary
    assert "`timing/sync` never recorded" in summary
    assert "| eval/accuracy | - | - | not measured |" in summary
    assert "| 2 | - | - | - | 0.59 |" in summary


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert main([str(tmp_path / "absent")]) == 2
    assert "absent' does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    run_dir = make_run(tmp_path, [record(0), record(1)])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 2, "eval/mean_re\n')
    assert main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line 3 is not valid JSON" in err


def test_export_needs_a_checkpoint(tmp_path, capsys):
    run_dir = make_run(tmp_path, [record(0)])
    assert main([str(run_dir), "--export-alpacaeval"]) == 2
    assert "policy' is not a folder" in capsys.readouterr().err
    assert (run_dir / "report" / "summary.md").is_file()  # the report itself was still written


def test_loss_per_learner_step_from_the_trackers_steps_file(tmp_path):
    """The Tracker writes steps.jsonl; the report reads the per-step loss back."""
    from larpo_ray.tracking import Tracker

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = Config()
    cfg.logging.wandb_mode = "disabled"
    tracker = Tracker(cfg, run_dir)
    n_steps = 0
    for it in range(4):
        steps = [{"step": n_steps + j, "loss": 0.7 - 0.001 * (n_steps + j), "lr": 5e-6} for j in range(60 if it else 0)]
        n_steps += len(steps)
        tracker.log(record(it) | ({"train/steps": float(len(steps))} if it else {}), step_metrics=steps)
    tracker.finish()
    with (run_dir / "steps.jsonl").open("a") as f:
        f.write('{"step": 180, "loss"')  # a live run's half-written line is skipped
    steps, losses = read_steps(run_dir)
    assert steps == list(range(180))
    assert losses == pytest.approx([0.7 - 0.001 * s for s in range(180)])
    assert main([str(run_dir)]) == 0
    check_png(run_dir / "report" / "loss.png")
    assert "per learner step" in (run_dir / "report" / "summary.md").read_text()


def test_export_alpacaeval_on_the_tiny_model(tmp_path, tiny_model_path):
    cfg = Config.from_dict(
        {
            "model": {"name_or_path": tiny_model_path},
            "data": {"levels": [1], "num_eval": 4, "num_train": 8},
            "generation": {"max_new_tokens": 8},
            "logging": {"wandb_mode": "disabled"},
        }
    )
    run_dir = tmp_path / "tiny-run"
    run_dir.mkdir()
    cfg.save(run_dir / "config.yaml")
    metrics = "".join(json.dumps(r) + "\n" for r in [record(0), record(1)])
    (run_dir / "metrics.jsonl").write_text(metrics)
    assert main([str(run_dir), "--export-alpacaeval", "--checkpoint", tiny_model_path]) == 0
    out = run_dir / "report" / f"alpacaeval_{Path(tiny_model_path).name}.json"
    rows = json.loads(out.read_text())
    assert len(rows) == 4
    for row in rows:
        assert set(row) == {"instruction", "output", "generator"}
        assert isinstance(row["output"], str) and row["instruction"] and "<|" not in row["instruction"]
        assert row["generator"] == f"tiny-run-{Path(tiny_model_path).name}"
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # the run's own metrics untouched
