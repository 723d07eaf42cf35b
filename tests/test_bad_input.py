"""Bad input end to end (issue 6): what `python -m larpo_ray.run` gives for each kind of bad config,
data, model and reward (README "Bad input: what you get"). Through the CLI entry point: exit 2 and a
message that names the problem and the fix, before any role starts, so the run folder holds only
config.yaml. Unit-level cases live beside their modules (test_config, test_data, test_models,
test_reward, test_lists); serving is tested with larpo_ray/serve.py."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from builders import TINY_IN_PROCESS

from larpo_ray.run import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(tmp_path, argv, capsys) -> str:
    """main() must return 2; returns stderr. The run folder holds at most the resolved config."""
    run = tmp_path / "run"
    assert main(argv + ["--resources.use_ray", "false", "--loop.run_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("larpo-ray: ")
    assert not run.exists() or sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    return err


# ---- config --------------------------------------------------------------------------------------


def _recipe(tmp_path, name, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    "argv, messages",
    [
        (
            ["--generation.k", "three"],
            ["ConfigError: generation.k = 'three' has the wrong type: expected int, got str"],
        ),
        (["--generation.top_p", "1.5"], ["generation.top_p = 1.5 is not allowed: in (0, 1]"]),
        (["--learner.zero_stage", "5"], ["learner.zero_stage = 5 is not allowed: 0, 1, 2 or 3"]),
        (
            ["--loss.name", "listmle", "--lists.rule", "best_worst"],
            ["keeps only 2 candidates: use lists.rule = top_bottom or all"],
        ),
        (
            ["--reward.verify_tls", "false", "--reward.ca_bundle", "ca.pem"],
            ["reward.ca_bundle", "only with reward.verify_tls = true"],
        ),
    ],
)
def test_bad_config_values_exit_2(tmp_path, capsys, argv, messages):
    err = run_cli(tmp_path, argv, capsys)
    assert all(m in err for m in messages), err


@pytest.mark.parametrize(
    "content, messages",
    [
        (b"loss: [unclosed\n", ["is not valid YAML", "Fix the syntax"]),
        (b"\xff\xfe\x00binary\x00", ["is not valid YAML"]),
        (b"- a list\n- of things\n", ["must hold a mapping of groups"]),
        (b"generation:\n  k: four\n", ["generation.k = 'four' has the wrong type: expected int"]),
        (b"generaton:\n  k: 4\n", ["unknown config group 'generaton' (did you mean generation?)"]),
    ],
)
def test_bad_recipe_files_exit_2(tmp_path, capsys, content, messages):
    err = run_cli(tmp_path, ["--config", _recipe(tmp_path, "recipe.yaml", content)], capsys)
    assert all(m in err for m in messages), err


def test_a_pasted_api_key_is_refused_without_echoing_it(tmp_path, capsys):
    err = run_cli(tmp_path, ["--reward.api_key_env", "sk-live-0123456789"], capsys)
    assert "NAME of an environment variable" in err and "sk-live-0123456789" not in err


# ---- data ----------------------------------------------------------------------------------------


def _data_argv(path) -> list[str]:
    return [
        "--model.name_or_path",
        "tiny",
        "--data.source",
        str(path),
        "--data.num_eval",
        "1",
        "--data.max_prompt_tokens",
        "64",
    ]


def _jsonl(tmp_path, lines: list[bytes]) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = [json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}).encode() for i in range(3)]


@pytest.mark.parametrize(
    "lines, messages",
    [
        (None, ["DataError: data file", "does not exist", "fix data.source"]),
        (
            [json.dumps({"question": "q", "solution": 1}).encode()],
            [
                "neither a 'prompt' nor a 'messages' column",
                "columns found: ['question', 'solution']",
                "Set data.prompt_column",
            ],
        ),
        ([b""], ["no usable prompts (0 rows read", "give rows with a 'prompt' string"]),
        (
            [*GOOD[:2], b'{"prompt": "caf\xe9"}', GOOD[2]],
            ["line 3: not valid UTF-8", "Fix: re-save the file as UTF-8", "data.skip_bad_rows = true"],
        ),
        (
            [*GOOD, json.dumps({"prompt": "word " * 200}).encode()],
            [
                "line 4: the prompt is",
                "over data.max_prompt_tokens = 64",
                "Fix: shorten it or raise data.max_prompt_tokens",
            ],
        ),
        ([GOOD[0], b'{"prompt": "unterminated'], ["line 2: not valid JSON", "Fix: write one JSON object per line"]),
    ],
)
def test_bad_data_exits_2_naming_file_row_and_fix(tmp_path, capsys, lines, messages):
    path = tmp_path / "missing.jsonl" if lines is None else _jsonl(tmp_path, lines)
    err = run_cli(tmp_path, _data_argv(path), capsys)
    assert str(path) in err and all(m in err for m in messages), err


# ---- models --------------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_causal_lm_exits_2(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path / "bert")
    err = run_cli(tmp_path, ["--model.name_or_path", str(tmp_path / "bert")], capsys)
    assert "ModelError" in err and "not a causal language model" in err and "set model.name_or_path" in err


def test_pickled_weights_exit_2(tmp_path, capsys, tiny_model_path):
    folder = tmp_path / "bin-model"
    folder.mkdir()
    shutil.copy(Path(tiny_model_path) / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    err = run_cli(tmp_path, ["--model.name_or_path", str(folder)], capsys)
    assert "has no .safetensors weights" in err and "pytorch_model.bin" in err


def test_tokenizer_without_chat_template_exits_2(tmp_path, capsys, tiny_model_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_path, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    err = run_cli(tmp_path, ["--model.name_or_path", str(folder)], capsys)
    assert "DataError: the tokenizer has no chat template" in err and "use a chat/instruct model" in err


# ---- rewards -------------------------------------------------------------------------------------


def test_every_prompt_tied_trains_nothing_and_changes_nothing(tiny_model_path):
    """An iteration whose lists are all ties (e.g. a constant scorer) has no pair to learn from:
    zero steps, the weights stay as they are, n_no_pair counts the lists; the run goes on."""
    import numpy as np

    from larpo_ray.config import Config
    from larpo_ray.learner_group import LocalLearnerGroup
    from larpo_ray.models import load_tokenizer
    from larpo_ray.types import Candidate, Prompt, RankedList, ScoredCandidate

    tokenizer = load_tokenizer(tiny_model_path)
    lists = []
    for i in range(3):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + 1?"}], add_generation_prompt=True, tokenize=False
        )
        prompt = Prompt(f"p{i}", text, tuple(tokenizer(text, add_special_tokens=False).input_ids))
        scored = tuple(
            ScoredCandidate(
                Candidate(prompt.uid, tuple(tokenizer(f"{i + j}").input_ids), f"{i + j}", (), 1.0, 0), 0.5, 0
            )
            for j in range(3)
        )
        lists.append(RankedList(prompt, scored, (0.5, 0.5, 0.5)))
    group = LocalLearnerGroup(tiny_model_path, Config.from_dict({"learner": {"num_workers": 1, "prompts_per_step": 2}}))
    try:
        before = {k: v.copy() for k, v in group.get_weights().items()}
        result = group.train(0, lists)
        after = group.get_weights()
    finally:
        group.shutdown()
    assert (result.metrics["n_active"], result.metrics["n_no_pair"], result.metrics["steps"]) == (0.0, 3.0, 0.0)
    assert result.step_metrics == []
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # a real CLI process up to the initial evaluation: ~45 s on 2 cores
def test_reward_server_down_stops_the_run_naming_the_server_and_the_fix(tmp_path):
    """The scorer is first called by the initial evaluation: an unreachable server stops the run
    there with a non-zero exit, the URL and what to check; the run folder keeps its config."""
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/score"
    run = tmp_path / "run"
    argv = [
        *TINY_IN_PROCESS,
        "--loop.iterations",
        "1",
        "--data.num_eval",
        "2",
        "--reward.kind",
        "http",
        "--reward.url",
        url,
        "--reward.max_retries",
        "0",
        "--logging.wandb_mode",
        "disabled",
        "--logging.progress",
        "false",
        "--loop.run_dir",
        str(run),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "larpo_ray.run", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0
    for message in (url, "is down or too slow", "connection failed", "reward.timeout_s / reward.max_retries"):
        assert message in proc.stderr, proc.stderr[-3000:]
    assert (run / "config.yaml").is_file() and not (run / "metrics.jsonl").exists()
