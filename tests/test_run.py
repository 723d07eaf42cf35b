"""The CLI entry point: --help, and what bad input gets (exit 2, a message naming the problem)."""

import pytest
from builders import TINY_IN_PROCESS

from larpo_ray.run import main


def test_help_lists_the_runbook_and_every_knob(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Algorithm as implemented" in out and "--loss.name" in out and "--generation.k" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loss.nam", "listmle"], "ConfigError: unknown key loss.nam (did you mean loss.name?)"),
        (["--generation.k", "2", "--loss.name", "lambdarank"], "needs lists of >= 3 candidates"),
        (["--config", "/nonexistent/recipe.yaml"], "config file '/nonexistent/recipe.yaml' does not exist"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_bad_config_exits_2_before_anything_starts(argv, message, capsys, tmp_path):
    assert main(argv + ["--loop.run_dir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was created


def test_missing_model_exits_2_naming_the_path(capsys, tmp_path):
    argv = [
        "--model.name_or_path",
        str(tmp_path / "no-model"),
        "--resources.use_ray",
        "false",
        "--loop.run_dir",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ModelError" in err and str(tmp_path / "no-model") in err


def test_bad_data_file_exits_2_naming_the_file(capsys, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    argv = [
        "--model.name_or_path",
        "tiny",
        "--resources.use_ray",
        "false",
        "--data.source",
        str(data),
        "--data.num_eval",
        "1",
        "--loop.run_dir",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "DataError" in err and "prompts.jsonl" in err and "line 2" in err


def test_a_run_folder_with_a_run_is_not_overwritten(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 0}\n')
    assert main(["--loop.run_dir", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == '{"iteration": 0}\n'


def test_the_run_folder_is_resolved_once_against_the_launch_directory(tmp_path, monkeypatch, capsys):
    """Relative run folders are absolute before any role sees them; in a job Ray runs in its
    temporary copy of --working-dir (deleted with the session) they go under ~/larpo-ray."""
    from larpo_ray import run as run_mod

    monkeypatch.chdir(tmp_path)
    assert run_mod.resolve_folder("runs/x") == tmp_path / "runs" / "x"
    assert run_mod.resolve_folder(str(tmp_path / "abs")) == tmp_path / "abs"
    copy = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setattr(run_mod, "JOB_RUNS_ROOT", tmp_path / "home" / "larpo-ray")
    assert run_mod.resolve_folder("runs/x") == tmp_path / "home" / "larpo-ray" / "runs" / "x"
    assert "Ray's temporary copy of its --working-dir" in capsys.readouterr().out
    storage = run_mod.resolve_location("s3://bucket/runs/x?endpoint_override=h:1")
    assert storage.remote and storage.display == "s3://bucket/runs/x"


def test_a_dataset_with_text_answers_runs_end_to_end(capsys, tmp_path):
    """Text references ("Paris") are string-matched everywhere: the rule scorer, the held-out
    accuracy and Pass@N. Before, a reply with a number made evaluation raise InvalidOperation."""
    import json

    data = tmp_path / "capitals.jsonl"
    rows = [
        ("France", "Paris"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Peru", "Lima"),
        ("Chile", "Santiago"),
        ("Japan", "Tokyo"),
    ]
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is the capital of {c}? What is 3 + 4?", "answer": a}) + "\n" for c, a in rows
        )
    )
    run = tmp_path / "run"
    argv = [
        *TINY_IN_PROCESS,
        "--data.source",
        str(data),
        "--data.num_train",
        "4",
        "--data.num_eval",
        "2",
        "--loop.iterations",
        "1",
        "--loop.prompts_per_iteration",
        "4",
        "--loop.pass_at_n",
        "2",
        "--logging.wandb_mode",
        "disabled",
        "--logging.progress",
        "false",
        "--loop.run_dir",
        str(run),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    # The tiny model answers with numbers, so nothing is right, and that is measured, not raised.
    assert all(m["eval/accuracy"] == 0.0 and m["eval/pass@2"] == 0.0 for m in metrics)
    answers = [json.loads(line) for line in (run / "eval" / "iter-000001.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and all(a["correct"] == 0.0 and a["reward"] == 0.0 for a in answers)
