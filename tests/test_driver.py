"""The driver loop, in-process (resources.use_ray = false) on the tiny model: Algorithm 1's steps
in order, metrics.jsonl, prompt sampling and temperatures."""

import json

import pytest

from larpo_ray.config import load_config
from larpo_ray.driver import run_loop, sample_prompts, temperatures_for
from larpo_ray.tasks import make_splits
from larpo_ray.types import Prompt


def _prompts(n):
    return [Prompt(uid=f"p{i}", text=f"q{i}", token_ids=(1, 2)) for i in range(n)]


def test_sample_prompts_walks_seeded_permutations_without_repeats():
    cfg = load_config(overrides=["--loop.prompts_per_iteration", "4", "--loop.seed", "3"])
    train = _prompts(10)
    seen = [p.uid for s in range(5) for p in sample_prompts(train, s, cfg)]
    assert sorted(seen[:10]) == sorted(p.uid for p in train)  # the first 10 cover the data once
    assert sorted(seen[10:20]) == sorted(p.uid for p in train)
    assert seen[:10] != seen[10:20]  # each pass over the data has its own order
    assert [p.uid for p in sample_prompts(train, 2, cfg)] == seen[8:12]  # stateless: resumable
    other = load_config(overrides=["--loop.prompts_per_iteration", "4", "--loop.seed", "4"])
    assert [p.uid for p in sample_prompts(train, 0, other)] != seen[:4]


def test_temperatures_follow_the_schedule_or_the_mix():
    cfg = load_config(overrides=["--generation.temperature", "1.0,0.8", "--loop.iterations", "3", "--generation.k", "4"])
    assert temperatures_for(cfg, 0) == [1.0] * 4
    assert temperatures_for(cfg, 1) == [0.8] * 4
    assert temperatures_for(cfg, 2) == [0.8] * 4  # the last value repeats
    mixed = load_config(overrides=["--generation.mixed_temperatures", "0.6,1.0", "--generation.k", "5"])
    assert temperatures_for(mixed, 0) == [0.6, 1.0, 0.6, 1.0, 0.6]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from larpo_ray.run import start

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(preset="tiny", overrides=[
        "--resources.use_ray", "false", "--generation.engine", "hf", "--learner.num_workers", "1",
        "--loop.iterations", "2", "--loop.prompts_per_iteration", "8", "--data.num_eval", "8",
        "--loop.pass_at_n", "2", "--logging.progress", "false", "--loop.run_dir", str(run_dir)])
    session = start(cfg, run_dir)
    try:
        records = run_loop(cfg, session.runtime, session.splits.train, session.splits.eval, session.tracker, progress=False)
        weights = session.runtime.learner.get_weights()
        greedy = session.runtime.rollout(session.splits.eval[:4], [0.0], -1)
    finally:
        session.close()
    return cfg, run_dir, records, weights, greedy, session.splits


def test_loop_records_every_iteration_with_all_phases(local_run):
    cfg, run_dir, records, *_ = local_run
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1, 2]
    assert lines == records
    for rec in lines[1:]:
        for key in ("train/loss", "train/reward_accuracy", "eval/mean_reward", "eval/accuracy",
                    "eval/win_rate_vs_initial", "eval/pass@2", "lists/n_lists", "rollout/tokens_per_s",
                    "sync/gb_per_s", "sync/bytes", "timing/generate", "timing/lists", "timing/train",
                    "timing/sync", "timing/eval", "timing/iteration", "rollout/n_scored",
                    "system/memory_used_gb", "system/driver_rss_gb"):
            assert key in rec, key
        assert rec["rollout/n_candidates"] == cfg.loop.prompts_per_iteration * cfg.generation.k
        assert rec["rollout/n_scored"] == rec["rollout/n_candidates"]  # the rule scorer scores all
        assert rec["sync/bytes"] > 0
    assert 0.0 <= lines[0]["eval/accuracy"] <= 1.0 and "eval/win_rate_vs_initial" not in lines[0]
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == sum(r["train/steps"] for r in lines[1:]) > 0
    assert [s["step"] for s in steps] == sorted(s["step"] for s in steps)  # the global learner step
    assert all({"iteration", "loss", "lr"} <= s.keys() for s in steps)


def test_generator_serves_the_learners_weights_after_the_loop(local_run):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, _, _, weights, greedy, splits = local_run
    from larpo_ray.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.name_or_path))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    by_uid = {c.prompt_uid: c for c in greedy.candidates}
    for prompt in splits.eval[:4]:
        ids = torch.tensor([prompt.token_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=cfg.generation.max_new_tokens)
        expected = out[0, ids.shape[1]:].tolist()
        got = list(by_uid[prompt.uid].token_ids)
        assert got == expected[: len(got)] and len(got) > 0
