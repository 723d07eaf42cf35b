"""The study runner (larpo_ray.study) and its report (larpo_ray.study_report), without Ray: study
files and what each bad one gets, run planning and precedence, run-folder states, the runner's
skip / resume / failure handling over real child processes, statistics and the written report.
The real smoke study through Ray is tests/test_study_e2e.py."""

import json
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest

from larpo_ray import study as study_mod
from larpo_ray.config import ConfigError, load_config
from larpo_ray.stats import paired_bootstrap, t_interval, t_quantile
from larpo_ray.study import load_study, plan_runs, run_all, run_state
from larpo_ray.study_report import summarize, write_report

STUDY = """
name: demo
recipe: tiny
overrides: {loop.iterations: 2, learner.lr: 2.0e-5}
seeds: [0, 1, 2]
baseline: pairwise
variants:
  pairwise:
    description: best vs worst
    overrides: {loss.name: pairwise}
  listmle:
    overrides: {loss.name: listmle, lists.rule: all, generation.temperature: [1.0, 0.8], learner.lr: 1.0e-4}
"""


def _write(tmp_path: Path, text: str, name: str = "study.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_a_study_file_plans_every_variant_and_seed_with_the_right_precedence(tmp_path):
    study = load_study(_write(tmp_path, STUDY))
    runs = plan_runs(study, tmp_path / "out", ["--learner.epochs", "3", "--learner.lr", "3e-5"])
    assert [(r.variant, r.seed) for r in runs] == [
        ("pairwise", 0),
        ("listmle", 0),
        ("pairwise", 1),
        ("listmle", 1),
        ("pairwise", 2),
        ("listmle", 2),
    ]
    pw, lm = runs[0].config, runs[3].config
    assert pw.model.name_or_path == "tiny"  # the recipe
    assert pw.loop.iterations == 2  # study overrides beat the recipe
    assert lm.loss.name == "listmle" and lm.lists.rule == "all"  # variant overrides
    assert lm.generation.temperature == [1.0, 0.8]  # lists survive the command line
    assert pw.learner.lr == lm.learner.lr == 3e-5  # command-line overrides beat the variant's
    assert pw.learner.epochs == 3
    assert (lm.loop.seed, lm.generation.seed) == (1, 1)  # the seed keys
    assert lm.data.seed == 0  # the held-out split is the same for every seed
    assert runs[3].run_dir == tmp_path / "out" / "listmle" / "seed-1"
    assert lm.loop.run_dir == str(tmp_path / "out" / "listmle" / "seed-1")
    # the argument list is what the child process gets: it parses back to the same config
    again = load_config(runs[3].args[1], None, runs[3].args[2:])
    assert again.to_dict() == lm.to_dict()


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nvariants: {}\n", "needs 'variants:'"),
        ("name: x\nvarients: {a: {}}\n", "unknown key 'varients' (did you mean variants?)"),
        ("name: x\nseeds: 3\nvariants: {a: {}}\n", "seeds = 3 must be a non-empty list of integers"),
        ("name: x\nseeds: [1, 1]\nvariants: {a: {}}\n", "repeats a seed"),
        ("name: x\nbaseline: b\nvariants: {a: {}}\n", "baseline = 'b' is not a variant"),
        ("name: x\nvariants: {a: {overides: {}}}\n", "variant 'a': unknown key 'overides' (did you mean overrides?)"),
        ("name: x\nvariants: {a: {overrides: {lr: 1}}}\n", "overrides must map dotted keys"),
        ("name: x\nvariants: {'a b': {}}\n", "variant name 'a b' must be letters"),
        ("name: x\nvariants: [a, b]\n", "needs 'variants:'"),
    ],
)
def test_bad_study_files_are_refused_naming_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_study(_write(tmp_path, text))
    assert message in str(err.value)


def test_a_variant_whose_config_cannot_run_is_refused_before_any_run(tmp_path):
    study = load_study(
        _write(tmp_path, "name: x\nvariants:\n  ok: {}\n  bad: {overrides: {loss.name: listmle, generation.k: 2}}\n")
    )
    with pytest.raises(ConfigError, match="variant 'bad' seed 0: loss.name = 'listmle' is listwise"):
        plan_runs(study, tmp_path / "out", [])
    with pytest.raises(ConfigError, match="variant 'ok' seed 0: unknown key loss.nam"):
        plan_runs(study, tmp_path / "out", ["--loss.nam", "x"])


def test_cli_bad_input_exits_2_and_creates_nothing(tmp_path, capsys):
    assert study_mod.main([str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = _write(tmp_path, STUDY)
    assert study_mod.main([path, "--out", str(tmp_path / "o"), "--loss.name", "nope"]) == 2
    assert "loss.name = 'nope' is not allowed" in capsys.readouterr().err
    assert study_mod.main([path, "--out", str(tmp_path / "o"), "--parallel", "0"]) == 2
    assert not (tmp_path / "o").exists()


def test_dry_run_lists_the_runs_and_starts_nothing(tmp_path, capsys):
    path = _write(tmp_path, STUDY)
    assert study_mod.main([path, "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 runs" in out and "(dry run: nothing started)" in out
    assert (
        re.search(r"listmle seed 2 +new +--config configs/tiny.yaml", out)
        and "--loss.name listmle --lists.rule all" in out
    )
    assert "--loop.seed 2 --generation.seed 2" in out
    assert not (tmp_path / "o").exists()


def _fake_run(
    run_dir: Path,
    iterations: int,
    accuracy: list[float],
    correct: list[list[int]] | None = None,
    config: dict | None = None,
) -> None:
    """A run folder as larpo_ray.run leaves it: config.yaml, metrics.jsonl, eval/iter-N.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config("configs/tiny.yaml" if config is None else None, None, ["--loop.iterations", str(iterations)])
    cfg.save(run_dir / "config.yaml")
    lines = []
    for i, acc in enumerate(accuracy):
        rec = {"iteration": i, "eval/accuracy": acc, "eval/mean_reward": acc}
        if i == 0:
            rec["timing/eval"] = 30.0
        else:
            rec.update(
                {
                    "eval/win_rate_vs_initial": 0.5 + acc / 4,
                    "train/reward_accuracy": 0.7,
                    "lists/n_lists": 10.0,
                    "rollout/tokens": 1000.0,
                    "train/tokens": 500.0,
                    "timing/iteration": 60.0,
                    "timing/checkpoint": 6.0,
                }
            )
        lines.append(json.dumps(rec))
        if correct is not None and i < len(correct):
            (run_dir / "eval").mkdir(exist_ok=True)
            rows = [
                {"uid": f"u{j}", "reward": float(c), "correct": float(c), "response": "x"}
                for j, c in enumerate(correct[i])
            ]
            (run_dir / "eval" / f"iter-{i:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_run_state_tells_new_partial_done_and_a_conflicting_folder(tmp_path):
    study = load_study(_write(tmp_path, STUDY))
    runs = plan_runs(study, tmp_path / "out", [])
    assert run_state(runs[0]) == "new"
    # a finished run: metrics reached loop.iterations with the same config
    runs[1].run_dir.mkdir(parents=True)
    runs[1].config.save(runs[1].run_dir / "config.yaml")
    (runs[1].run_dir / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    assert run_state(runs[1]) == "partial"
    with (runs[1].run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 2}\n')
    assert run_state(runs[1]) == "done"
    # a folder from another study (other lr): refused, naming the key; nothing is overwritten
    other = load_config("configs/tiny.yaml", None, ["--learner.lr", "0.5"])
    runs[2].run_dir.mkdir(parents=True)
    other.save(runs[2].run_dir / "config.yaml")
    with pytest.raises(ConfigError, match=r"learner.lr \(checkpoint: 0.5, now: 2e-05\).*another --out"):
        run_state(runs[2])


FAKE_RUN = """
import json, sys, pathlib
args = sys.argv[1:]
if "--resume" in args:
    run_dir = pathlib.Path(args[args.index("--resume") + 1])
else:
    run_dir = pathlib.Path(args[args.index("--loop.run_dir") + 1])
if "--loss.name" in args and args[args.index("--loss.name") + 1] == "ipo":
    print("larpo-ray: DataError: data file 'missing.jsonl' does not exist", file=sys.stderr)
    sys.exit(2)
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "invocations").open("a").write(" ".join(args[:2]) + "\\n")
from larpo_ray.config import load_config
if "--resume" not in args:
    cfg = load_config(args[1], None, args[2:]) if args[0] == "--config" else load_config(None, None, args)
    cfg.save(run_dir / "config.yaml")
rows = [{"iteration": i, "eval/accuracy": 0.1 * i} for i in range(3)]
(run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
"""


def test_runner_skips_finished_runs_resumes_partial_ones_and_goes_on_after_a_failure(tmp_path, monkeypatch):
    """Real child processes (a stand-in for larpo_ray.run that writes the files a run writes):
    a failed run is reported and the others still run; the next invocation skips finished
    runs, resumes the partial one with --resume, and retries the failed one."""
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    real = study_mod.command
    monkeypatch.setattr(study_mod, "command", lambda run, state: [sys.executable, str(script)] + real(run, state)[3:])
    path = _write(tmp_path, STUDY.replace("listmle:", "broken:\n    overrides: {loss.name: ipo}\n  listmle:"))
    out = tmp_path / "out"
    lines = []
    study = load_study(path)
    runs = plan_runs(study, out, [])
    status = run_all(runs, out, echo=lines.append)
    assert {k: v["state"] for k, v in status.items()} == {
        **{f"pairwise/seed-{s}": "done" for s in (0, 1, 2)},
        **{f"listmle/seed-{s}": "done" for s in (0, 1, 2)},
        **{f"broken/seed-{s}": "failed" for s in (0, 1, 2)},
    }
    assert status["broken/seed-0"]["returncode"] == 2
    assert "DataError: data file 'missing.jsonl' does not exist" in status["broken/seed-0"]["error"]
    assert any("broken seed 1: FAILED (exit 2)" in ln and "the other runs go on" in ln for ln in lines)
    assert json.loads((out / "status.json").read_text()) == status
    # interrupt one run: its metrics stop at iteration 1
    (out / "listmle" / "seed-0" / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    lines.clear()
    status = run_all(runs, out, echo=lines.append)
    assert sum("done already" in ln for ln in lines) == 5
    assert any("resuming listmle seed 0" in ln for ln in lines)
    assert (out / "listmle" / "seed-0" / "invocations").read_text().splitlines() == [
        "--config " + str(Path("configs/tiny.yaml").absolute()),
        f"--resume {out / 'listmle' / 'seed-0'}",
    ]
    assert (out / "pairwise" / "seed-0" / "invocations").read_text().count("\n") == 1  # not run again
    assert status["broken/seed-2"]["state"] == "failed"  # retried, failed again
    assert "==== larpo-ray study:" in (out / "broken" / "seed-2" / "console.log").read_text()


SLOW_RUN = """
import pathlib, sys, time
args = sys.argv[1:]
run_dir = pathlib.Path(args[args.index("--loop.run_dir") + 1])
start = time.time()
time.sleep(1.5)
(run_dir / "span").write_text(f"{start} {time.time()}")
"""


def test_parallel_runs_go_at_once_each_in_its_own_folder(tmp_path, monkeypatch):
    """--parallel N: N child processes at a time (as on a Ray cluster, each its own run)."""
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    real = study_mod.command
    monkeypatch.setattr(study_mod, "command", lambda run, state: [sys.executable, str(script)] + real(run, state)[3:])
    runs = plan_runs(load_study(_write(tmp_path, STUDY)), tmp_path / "out", [])
    status = run_all(runs, tmp_path / "out", parallel=3, echo=lambda line: None)
    assert {v["state"] for v in status.values()} == {"done"} and len(status) == 6
    spans = [tuple(map(float, (r.run_dir / "span").read_text().split())) for r in runs]
    most_at_once = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert most_at_once >= 2  # one after another would give 1


def test_statistics_t_interval_and_paired_bootstrap():
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-3)
    assert t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-3)
    m, lo, hi = t_interval([0.30, 0.35, 0.40])
    assert m == pytest.approx(0.35) and hi - m == pytest.approx(4.3027 * 0.05 / math.sqrt(3), abs=1e-3)
    assert math.isnan(t_interval([0.3])[1])
    good = {s: {f"u{i}": float(i % 10 < 6) for i in range(200)} for s in range(3)}
    bad = {s: {f"u{i}": float(i % 10 < 3) for i in range(200)} for s in range(3)}
    d = paired_bootstrap(good, bad)
    assert d["diff"] == pytest.approx(0.3) and d["low"] > 0.2 and d["p"] < 0.01
    same = paired_bootstrap(good, good)
    assert same["diff"] == 0 and same["p"] == 1.0
    with pytest.raises(ValueError, match="share no seed"):
        paired_bootstrap({0: {}}, {1: {}})


def test_report_numbers_markdown_and_plot(tmp_path):
    study = load_study(_write(tmp_path, STUDY))
    out = tmp_path / "out"
    runs = plan_runs(study, out, [])
    n = 100
    for r in runs:
        good = r.variant == "listmle"
        acc = [0.2, 0.3, 0.5 + 0.01 * r.seed] if good else [0.2, 0.25, 0.3 + 0.01 * r.seed]
        rate = acc[-1]
        final = [int(j < rate * n) for j in range(n)]
        _fake_run(r.run_dir, 2, acc, correct=[[int(j < 20) for j in range(n)], final, final])
    (runs[5].run_dir / "metrics.jsonl").write_text(
        '{"iteration": 0, "eval/accuracy": 0.2}\n'
    )  # listmle seed 2: unfinished
    paths = write_report(study, runs, out, {"listmle/seed-2": {"state": "failed", "seconds": 5.0}})
    assert [p.name for p in paths] == ["study.md", "study.json", "study.png"]
    summary = json.loads((out / "study.json").read_text())
    rows = {r["variant"]: r for r in summary["variants"]}
    assert rows["pairwise"]["n"] == 3 and rows["listmle"]["n"] == 2
    assert rows["pairwise"]["final"]["mean"] == pytest.approx(0.31)
    assert rows["listmle"]["final"]["mean"] == pytest.approx(0.505)
    assert rows["listmle"]["gain"]["mean"] == pytest.approx(0.305)
    assert rows["pairwise"]["generated_tokens"]["mean"] == 2000 and rows["pairwise"]["loop_minutes"][
        "mean"
    ] == pytest.approx(2.7)
    low, high = rows["pairwise"]["final"]["low"], rows["pairwise"]["final"]["high"]
    assert low < 0.31 < high
    assert [c["iteration"] for c in rows["pairwise"]["curve"]] == [0, 1, 2]
    assert rows["pairwise"]["curve"][2]["minutes"] == pytest.approx(2.7)
    (diff,) = summary["differences"]
    assert (diff["a"], diff["b"]) == ("listmle", "pairwise") and diff["significant"]
    assert diff["diff"] == pytest.approx(0.2, abs=1e-6)  # paired: only the seeds both finished (0, 1)
    assert summary["held_out_prompts"] == n
    md = (out / "study.md").read_text()
    assert "| **pairwise** | 3 | 0.310 [" in md
    assert "| listmle - pairwise | +0.200 |" in md and "| yes |" in md
    assert "| listmle seed 2 | failed |" in md
    png = (out / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    (summary_run,) = (out / "wandb").glob("offline-run-*")  # W&B offline: the study's summary run
    assert list(summary_run.glob("*.wandb"))


def test_report_only_rewrites_the_report_from_the_folders(tmp_path, capsys):
    path = _write(tmp_path, STUDY)
    out = tmp_path / "out"
    for r in plan_runs(load_study(path), out, []):
        _fake_run(r.run_dir, 2, [0.2, 0.3, 0.4], correct=[[1, 0], [1, 0], [1, 1]])
    assert study_mod.main([path, "--out", str(out), "--report-only", "--logging.wandb_mode", "disabled"]) == 0
    assert "wrote " + str(out / "study.md") in capsys.readouterr().out
    assert summarize(load_study(path), plan_runs(load_study(path), out, []), {})["variants"][0]["final"][
        "mean"
    ] == pytest.approx(0.4)


def test_variants_selects_runs_and_names_an_unknown_one(tmp_path, capsys):
    path = _write(tmp_path, STUDY)
    assert study_mod.main([path, "--out", str(tmp_path / "o"), "--dry-run", "--variants", "listmle"]) == 0
    out = capsys.readouterr().out
    assert "3 runs" in out and "pairwise seed" not in out
    assert study_mod.main([path, "--out", str(tmp_path / "o"), "--dry-run", "--variants", "listmle,nope"]) == 2
    assert "--variants: ['nope'] not in the study; its variants: ['pairwise', 'listmle']" in capsys.readouterr().err


def test_export_copies_the_report_and_small_files_and_rebuilds_from_them(tmp_path, capsys):
    path = _write(tmp_path, STUDY)
    out, dest = tmp_path / "out", tmp_path / "exported"
    for r in plan_runs(load_study(path), out, []):
        _fake_run(r.run_dir, 2, [0.2, 0.3, 0.4], correct=[[1, 0], [1, 0], [1, 1]])
        (r.run_dir / "checkpoints").mkdir()
        (r.run_dir / "checkpoints" / "big.safetensors").write_bytes(b"w" * 1000)
    args = [path, "--out", str(out), "--report-only", "--logging.wandb_mode", "disabled"]
    assert study_mod.main(args + ["--export", str(dest)]) == 0
    assert "exported the report and 6 run folders' small files" in capsys.readouterr().out
    assert (dest / "study.md").is_file() and (dest / "listmle" / "seed-1" / "eval" / "iter-000002.jsonl").is_file()
    assert not list(dest.glob("**/*.safetensors"))
    assert study_mod.main([path, "--out", str(dest), "--report-only", "--logging.wandb_mode", "disabled"]) == 0
    rebuilt = json.loads((dest / "study.json").read_text())
    assert rebuilt["variants"] == json.loads((out / "study.json").read_text())["variants"]
