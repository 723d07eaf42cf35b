"""The driver loop, in-process (resources.use_ray = false) on the tiny model: Algorithm 1's steps
in order, metrics.jsonl, prompt sampling and temperatures."""

import json

import builders
import pytest

from larpo_ray.config import load_config
from larpo_ray.driver import run_loop, sample_prompts, temperatures_for


def _prompts(n):
    return [builders.prompt(f"p{i}") for i in range(n)]


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
    cfg = load_config(
        overrides=["--generation.temperature", "1.0,0.8", "--loop.iterations", "3", "--generation.k", "4"]
    )
    assert temperatures_for(cfg, 0) == [1.0] * 4
    assert temperatures_for(cfg, 1) == [0.8] * 4
    assert temperatures_for(cfg, 2) == [0.8] * 4  # the last value repeats
    mixed = load_config(overrides=["--generation.mixed_temperatures", "0.6,1.0", "--generation.k", "5"])
    assert temperatures_for(mixed, 0) == [0.6, 1.0, 0.6, 1.0, 0.6]


@pytest.fixture(scope="module", params=["sync", "async"])
def local_run(request, tmp_path_factory):
    """The tiny preset in this process, 2 iterations, in each loop mode (async: iteration 2's
    rollout sampled by the initial policy in a thread while iteration 1 trains)."""
    from larpo_ray.run import start

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(
        preset="tiny",
        overrides=[
            *builders.IN_PROCESS,
            "--loop.mode",
            request.param,
            "--loop.iterations",
            "2",
            "--loop.prompts_per_iteration",
            "8",
            "--data.num_eval",
            "8",
            "--loop.pass_at_n",
            "2",
            "--logging.progress",
            "false",
            "--loop.run_dir",
            str(run_dir),
        ],
    )
    session = start(cfg, run_dir)
    try:
        records = run_loop(
            cfg, session.runtime, session.splits.train, session.splits.eval, session.tracker, progress=False
        )
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
        for key in (
            "train/loss",
            "train/reward_accuracy",
            "eval/mean_reward",
            "eval/accuracy",
            "eval/win_rate_vs_initial",
            "eval/pass@2",
            "lists/n_lists",
            "rollout/tokens_per_s",
            "sync/gb_per_s",
            "sync/bytes",
            "timing/generate",
            "timing/lists",
            "timing/train",
            "timing/sync",
            "timing/eval",
            "timing/iteration",
            "rollout/n_scored",
            "system/memory_used_gb",
            "system/driver_rss_gb",
            "train/padding_frac",
            "train/mfu",
            "rollout/staleness",
        ):
            assert key in rec, key
        assert rec["rollout/n_candidates"] == cfg.loop.prompts_per_iteration * cfg.generation.k
        assert rec["rollout/n_scored"] == rec["rollout/n_candidates"]  # the rule scorer scores all
        assert rec["sync/bytes"] > 0
    assert 0.0 <= lines[0]["eval/accuracy"] <= 1.0 and "eval/win_rate_vs_initial" not in lines[0]
    overlapped = cfg.loop.mode == "async"
    assert [r["rollout/staleness"] for r in lines[1:]] == ([0.0, 1.0] if overlapped else [0.0, 0.0])
    assert all(("timing/generate_wait" in r) == overlapped for r in lines[1:])
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
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=cfg.generation.max_new_tokens
        )
        expected = out[0, ids.shape[1] :].tolist()
        got = list(by_uid[prompt.uid].token_ids)
        assert got == expected[: len(got)] and len(got) > 0


class _TieRuntime:
    """Stands in for the roles in `draw_prompts`: a prompt whose uid ends in an even digit gets
    k tied rewards, the others one correct and k - 1 wrong candidates."""

    def __init__(self):
        self.calls = []

    def rollout(
        self, prompts, temperatures, iteration, max_new_tokens=None, on_batch=None, seed=None, batch_prompts=None
    ):
        from larpo_ray.topology import Rollout
        from larpo_ray.types import Candidate, ScoredCandidate

        self.calls.append([p.uid for p in prompts])
        out = Rollout()
        for p in prompts:
            tied = int(p.uid[1:]) % 2 == 0
            for slot, t in enumerate(temperatures):
                c = Candidate(p.uid, (slot, 1), f"r{slot}", (-1.0, -1.0), t, 0)
                out.candidates.append(c)
                out.scored.append(ScoredCandidate(c, 0.0 if tied or slot else 1.0, iteration))
            out.generated_tokens += 2 * len(temperatures)
        return out


def test_dynamic_sampling_draws_until_m_prompts_can_form_a_pair():
    from larpo_ray.driver import draw_prompts, prompt_stream

    train = _prompts(40)
    cfg = load_config(
        overrides=[
            "--loop.prompts_per_iteration",
            "6",
            "--loop.dynamic_sampling",
            "true",
            "--loop.max_draw_factor",
            "3",
            "--logging.progress",
            "false",
        ]
    )
    rt = _TieRuntime()
    rollout, drawn, kept, counts = draw_prompts(cfg, rt, train, 5, 0, False)
    stream = [p.uid for p in prompt_stream(train, 5, 40, cfg.loop.seed)]
    assert [p.uid for p in drawn] == stream[: len(drawn)]  # contiguous from the cursor: resumable
    assert len(kept) == 6 and all(int(p.uid[1:]) % 2 for p in kept)  # the first 6 with a pair
    assert [p.uid for p in kept] == [u for u in stream[: len(drawn)] if int(u[1:]) % 2][:6]
    assert counts["rollout/prompts_drawn"] == len(drawn) == sum(len(c) for c in rt.calls)
    assert counts["rollout/prompts_tied"] == sum(1 for p in drawn if int(p.uid[1:]) % 2 == 0)
    assert counts["rollout/prompts_unused"] == len(drawn) - counts["rollout/prompts_tied"] - 6
    assert counts["rollout/draw_rounds"] == len(rt.calls) >= 2
    assert len(rollout.candidates) == 4 * len(drawn)  # every round's candidates are kept
    # the cap: with every prompt tied it stops at max_draw_factor x M and keeps none
    rt_all_tied = _TieRuntime()
    even = [p for p in train if int(p.uid[1:]) % 2 == 0]
    _, drawn, kept, counts = draw_prompts(cfg, rt_all_tied, even, 0, 0, False)
    assert len(drawn) == 18 and kept == [] and counts["rollout/prompts_tied"] == 18
    # off: the M prompts at the cursor, ties and all, one round
    off = load_config(overrides=["--loop.prompts_per_iteration", "6", "--loop.dynamic_sampling", "false"])
    _, drawn, kept, counts = draw_prompts(off, _TieRuntime(), train, 12, 0, False)
    assert drawn == kept == prompt_stream(train, 12, 6, off.loop.seed) and counts == {}


def test_the_held_out_answers_of_every_evaluation_are_kept(local_run):
    cfg, run_dir, records, *_, splits = local_run
    for it in (0, 1, 2):
        rows = [json.loads(x) for x in (run_dir / "eval" / f"iter-{it:06d}.jsonl").read_text().splitlines()]
        assert [r["uid"] for r in rows] == [p.uid for p in splits.eval]
        assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(records[it]["eval/accuracy"])
        assert all(isinstance(r["response"], str) and r["reward"] in (0.0, 1.0) for r in rows)
