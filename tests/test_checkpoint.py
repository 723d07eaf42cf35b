"""Checkpoints: atomic layout, pruning, the resume compatibility check, the optimizer state round
trip, and an exact learner resume (in-process, tiny model)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from larpo_ray import checkpoint
from larpo_ray.checkpoint import LoopState
from larpo_ray.config import Config, ConfigError


def write(root, iteration: int, keep: int = 2, **state) -> object:
    tmp = checkpoint.begin(root, iteration)
    (tmp / "policy").mkdir()
    (tmp / "policy" / "model.safetensors").write_bytes(b"weights")
    return checkpoint.commit(root, tmp, LoopState(iteration=iteration, **state), keep)


def test_commit_renames_into_place_and_points_latest(tmp_path):
    path = write(tmp_path, 1, memory={"window": "current"}, initial_rewards={"q1": 1.0})
    assert path == tmp_path / "iter-000001" and (path / "policy" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "latest.json").read_text()) == {"iteration": 1, "dir": "iter-000001"}
    state = checkpoint.read_state(checkpoint.latest(tmp_path))
    assert state.iteration == 1 and state.initial_rewards == {"q1": 1.0}
    assert not list(tmp_path.glob(".*"))  # no temporary folder or file left


def test_keeps_the_newest_n(tmp_path):
    for it in range(1, 5):
        write(tmp_path, it, keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter-*")) == ["iter-000003", "iter-000004"]
    assert checkpoint.read_state(checkpoint.latest(tmp_path)).iteration == 4


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path):
    write(tmp_path, 1)
    tmp = checkpoint.begin(tmp_path, 2)  # the learner wrote its part, then the driver died
    (tmp / "policy").mkdir()
    assert checkpoint.latest(tmp_path) == tmp_path / "iter-000001"
    # a folder renamed without state.json (cannot happen through commit) is skipped too
    (tmp_path / "iter-000003").mkdir()
    (tmp_path / "latest.json").write_text('{"iteration": 3, "dir": "iter-000003"}')
    assert checkpoint.latest(tmp_path) == tmp_path / "iter-000001"
    (tmp_path / "latest.json").write_text("{not json")
    assert checkpoint.latest(tmp_path) == tmp_path / "iter-000001"
    write(tmp_path, 2)  # the next commit removes the abandoned temporary folder
    assert not list(tmp_path.glob(".iter-*"))


def test_redone_iteration_replaces_its_checkpoint(tmp_path):
    write(tmp_path, 1, wandb_id="first")
    write(tmp_path, 1, wandb_id="again")  # after a learner restart the iteration ran again
    assert checkpoint.read_state(tmp_path / "iter-000001").wandb_id == "again"


def test_a_checkpoint_with_a_key_this_version_dropped_still_resumes(tmp_path):
    path = write(tmp_path, 1)
    data = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**data, "learner_step": 12}))  # written before it was dropped
    assert checkpoint.read_state(path).iteration == 1


def test_unreadable_state_names_the_fix(tmp_path):
    path = write(tmp_path, 1)
    (path / "state.json").write_text("{")
    with pytest.raises(ConfigError, match="incomplete; delete it to resume from the one before"):
        checkpoint.read_state(path)
    (path / "state.json").write_text(json.dumps({"format": 99, "iteration": 1}))
    with pytest.raises(ConfigError, match="format 99"):
        checkpoint.read_state(path)


def test_state_round_trips_through_json(tmp_path):
    state = LoopState(
        iteration=2,
        initial_rewards={"a": 0.5},
        memory={"pool": [1, 2]},
        prompt_uids=[["a", "b"], ["c", "d"]],
        wandb_id="abc123",
        records=[{"iteration": 0, "eval/mean_reward": 0.25}],
        steps=[{"iteration": 1, "step": 0.0, "loss": 0.69}],
        config=Config().to_dict(),
        rng=checkpoint.rng_state(),
    )
    tmp = checkpoint.begin(tmp_path, 2)
    checkpoint.commit(tmp_path, tmp, state, keep=1)
    assert checkpoint.read_state(tmp_path / "iter-000002") == state


def test_rng_state_round_trip():
    import random

    saved = checkpoint.rng_state()
    json.dumps(saved)
    a = (random.random(), np.random.rand())
    checkpoint.set_rng_state(json.loads(json.dumps(saved)))
    assert (random.random(), np.random.rand()) == a


def test_resumable_keys_exist():
    flat = {f"{g}.{k}" for g, group in Config().to_dict().items() for k in group}
    assert set(checkpoint.RESUMABLE_KEYS) <= flat
    assert set(checkpoint.RESUMABLE_GROUPS) <= set(Config().to_dict())


def test_incompatible_keys_are_named():
    saved = Config().to_dict()
    new = Config.from_dict(
        {
            "loss": {"beta": 0.5},
            "loop": {"iterations": 9, "run_dir": "x"},
            "logging": {"wandb_mode": "disabled"},
            "faults": {"max_attempts": 5},
            "generation": {"num_generators": 4},
        }
    ).to_dict()
    assert checkpoint.incompatible_keys(saved, new) == ["loss.beta (checkpoint: 0.1, now: 0.5)"]
    with pytest.raises(
        ConfigError, match=r"loss\.beta \(checkpoint: 0\.1, now: 0\.5\).*Resume with the run's own config.yaml"
    ):
        checkpoint.check_compatible(LoopState(config=saved), new, Path("r/iter-000001"))
    # a config written before a knob existed ran with its default: not a difference, unless set
    older = Config().to_dict()
    del older["loss"]["sft_weight"]
    assert checkpoint.incompatible_keys(older, Config().to_dict()) == []
    assert checkpoint.incompatible_keys(older, Config.from_dict({"loss": {"sft_weight": 1.0}}).to_dict()) == [
        "loss.sft_weight (checkpoint: 0.0, now: 1.0)"
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ],
)
def test_optimizer_state_round_trip(tmp_path, make):
    """safetensors + JSON (no pickle) restore the optimizer so the next step is identical."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = make(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    checkpoint.save_optimizer(opt, tmp_path, 0, {"global_step": 3})
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt2 = make(twin.parameters())
    assert checkpoint.load_optimizer(opt2, tmp_path, 0) == {"global_step": 3}
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["rank-0.json", "rank-0.safetensors"]


# ---- the learner: a resumed worker continues exactly --------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 2, 3])  # 3: its optimizer state once failed to save (KeyError)
def test_learner_resume_is_exact(tmp_path, tiny_model_path, zero_stage):
    """Train iteration 0, checkpoint, train iteration 1; a fresh worker resumed from the
    checkpoint trains iteration 1 to the same metrics and weights (optimizer state restored)."""
    from test_learner import make_cfg, make_lists

    from larpo_ray.learner_group import LocalLearnerGroup
    from larpo_ray.models import load_tokenizer

    lists = make_lists(load_tokenizer(tiny_model_path), 8)
    cfg = make_cfg(zero_stage=zero_stage)
    first = LocalLearnerGroup(tiny_model_path, cfg)
    first.train(0, lists)
    ckpt = tmp_path / "iter-000001"
    first.save_checkpoint(str(ckpt), with_optimizer=True)
    checkpoint.write_json(ckpt / "state.json", LoopState(iteration=1).to_json())
    expected = first.train(1, lists)
    weights = first.get_weights()

    resumed = LocalLearnerGroup(tiny_model_path, cfg, checkpoints=str(tmp_path))
    assert resumed.resumed_from == 1 and resumed.worker.global_step == first.worker.global_step - len(
        expected.step_metrics
    )
    got = resumed.train(1, lists)
    assert got.step_metrics == expected.step_metrics
    for name, value in resumed.get_weights().items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)

    without = LocalLearnerGroup(tiny_model_path, dataclasses.replace(cfg), checkpoints=None)
    assert without.resumed_from == 0


def test_learner_refuses_a_checkpoint_of_another_shape(tmp_path, tiny_model_path):
    from test_learner import make_cfg

    from larpo_ray.learner_group import LocalLearnerGroup

    group = LocalLearnerGroup(tiny_model_path, make_cfg(zero_stage=0))
    ckpt = tmp_path / "iter-000001"
    group.save_checkpoint(str(ckpt), with_optimizer=True)
    checkpoint.write_json(ckpt / "state.json", LoopState(iteration=1).to_json())
    with pytest.raises(RuntimeError, match="ZeRO stage 0.*same learner.num_workers and learner.zero_stage"):
        LocalLearnerGroup(tiny_model_path, make_cfg(zero_stage=1), checkpoints=str(tmp_path))


def test_resumed_wandb_run_ignores_a_w_and_b_service_inherited_from_the_parent(tmp_path):
    """A driver started from a process that used wandb inherits its service's address
    (WANDB_SERVICE). That service outlives a killed driver and holds the run id, so the resumed
    driver must start its own: here the inherited address points nowhere, and the run still opens
    (offline) under the checkpoint's id."""
    script = (
        "import pathlib, sys\n"
        "from larpo_ray.config import Config\n"
        "from larpo_ray.tracking import Tracker\n"
        "cfg = Config(); cfg.logging.wandb_mode = 'offline'\n"
        "t = Tracker(cfg, pathlib.Path(sys.argv[1]), wandb_id='abc123')\n"
        "t.log({'iteration': 0, 'train/loss': 0.5}); t.finish(); print(t.wandb_id)\n"
    )
    env = dict(os.environ, WANDB_SERVICE="3-1-tcp-localhost-1", WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("abc123")
    assert [p.name.endswith("abc123") for p in (tmp_path / "wandb").glob("offline-run-*")] == [True]
