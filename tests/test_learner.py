"""The learner: LearnerWorker through LocalLearnerGroup (fast) and RayLearnerGroup (slow).

All on the tiny model with real tokenized prompts and responses. The invariants checked are the
ones the loss scaling and the reference policy depend on: every parameter trains,
the reference is the policy at the start of the iteration (Algorithm 1), micro-batch x
accumulation gives the same update, and 2 data-parallel workers give the 1-worker update.
"""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from larpo_ray.config import Config
from larpo_ray.learner_group import LocalLearnerGroup
from larpo_ray.losses import LOSSES
from larpo_ray.models import load_causal_lm, load_tokenizer, resolve_model
from larpo_ray.types import Candidate, Prompt, RankedList, ScoredCandidate


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return resolve_model("tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return load_tokenizer(tiny_path)


def make_lists(tokenizer, n: int, tied: int = 0, varied: bool = False) -> list[RankedList]:
    """n arithmetic prompts with 2-4 real responses each, best first; `tied` more lists whose
    candidates all have the same reward (no strict pair); `varied`: responses of 1-4 times the
    length (the padded layout then pads a lot)."""
    lists = []
    for i in range(n + tied):
        a, b = 3 + i, 11 + 2 * i
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {a} + {b}?"}], add_generation_prompt=True, tokenize=False
        )
        prompt = Prompt(f"p{i}", text, tuple(tokenizer(text, add_special_tokens=False).input_ids))
        k = 2 + i % 3
        replies = [
            f"{a} + {b} = {a + b + j}." + f" The answer is {a + b + j}." * (1 + 3 * varied * ((i + j) % 2))
            for j in range(k)
        ]
        scored = []
        for j, reply in enumerate(replies):
            ids = tuple(tokenizer(reply, add_special_tokens=False).input_ids)
            reward = 1.0 if i >= n else float(k - j)
            scored.append(
                ScoredCandidate(Candidate(prompt.uid, ids + (tokenizer.eos_token_id,), reply, (), 1.0, 0), reward, 0)
            )
        lists.append(RankedList(prompt, tuple(scored), tuple(c.reward for c in scored)))
    return lists


def make_cfg(**learner) -> Config:
    base = {"lr": 1e-3, "epochs": 1, "prompts_per_step": 4, "num_workers": 1}
    # pairwise (DPO): the checks below use its value at pi = pi_ref, log 2
    return Config.from_dict({"learner": {**base, **learner}, "loss": {"name": "pairwise"}})


def snapshot(group) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in group.get_weights().items()}


def policy_logps(worker, lists: list[RankedList]) -> list[list[float]]:
    """Sequence log-probs of every candidate under the worker's current policy (its reference pass)."""
    return [t.tolist() for t in worker._no_grad_logps(worker.engine, lists)]


def assert_weights_close(
    a: dict, b: dict, atol: float, lr: float = 1e-3, steps: int = 1, flipped: float = 1e-3
) -> None:
    """Equal within atol, except for at most a `flipped` share of the elements of a tensor, which
    may differ up to Adam's largest move (2 lr per step): Adam moves a weight by about
    lr * g / (|g| + eps), so float noise (summation order) in a gradient of size ~eps flips single
    elements."""
    assert a.keys() == b.keys()
    for name in a:
        diff = np.abs(a[name].astype(np.float64) - b[name])
        assert (diff > atol).mean() <= flipped, f"{name}: {(diff > atol).sum()} elements differ"
        assert diff.max() <= 2 * lr * steps, f"{name}: max difference {diff.max()}"


# ---- fast: one in-process worker ---------------------------------------------------------------


def test_in_process_learner_leaves_no_port_for_child_processes(tiny_path):
    """The one-rank group lives on an in-memory store: no MASTER_PORT in os.environ, so a child
    process (a benchmark, a subprocess run) starts its own one-rank group instead of failing
    with EADDRINUSE on the parent's live port (a CI failure before)."""
    LocalLearnerGroup(tiny_path, make_cfg())
    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"} & set(os.environ)
    child = (
        "from actors.learner import init_distributed; import torch.distributed as dist; "
        "init_distributed(1, 'gloo'); assert dist.get_world_size() == 1"
    )
    proc = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_training_changes_every_parameter(tiny_path, tokenizer):
    group = LocalLearnerGroup(tiny_path, make_cfg())
    before = snapshot(group)
    result = group.train(0, make_lists(tokenizer, 8))
    after = group.get_weights()
    assert result.policy_version == 1 and len(result.step_metrics) == 2
    unchanged = [name for name in before if np.array_equal(before[name], after[name])]
    assert unchanged == []
    for key in (
        "loss",
        "reward_accuracy",
        "margin",
        "chosen_reward",
        "rejected_reward",
        "n_active",
        "n_no_pair",
        "grad_norm",
        "lr",
        "tokens",
        "tokens_per_s",
        "ref_seconds",
        "train_seconds",
    ):
        assert math.isfinite(result.metrics[key]), key


def test_loss_decreases_on_a_fixed_batch(tiny_path, tokenizer):
    lists = make_lists(tokenizer, 6)
    # lr 1e-4: at 1e-3 Adam's first step overshoots on the sharper (3,000-step) tiny model
    group = LocalLearnerGroup(tiny_path, make_cfg(epochs=6, prompts_per_step=6, lr=1e-4))
    steps = group.train(0, lists).step_metrics
    assert [s["step"] for s in steps] == list(range(6))
    losses = [s["loss"] for s in steps]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # margin 0 vs pi_ref = pi_s
    assert losses[-1] < losses[0] - 0.05 and losses == sorted(losses, reverse=True)
    assert steps[-1]["reward_accuracy"] > 0.8 > steps[0]["reward_accuracy"]
    assert steps[-1]["margin"] > 0
    assert group.train(1, lists).step_metrics[0]["step"] == 6  # the counter spans iterations


def test_reference_is_the_policy_at_iteration_start(tiny_path, tokenizer):
    lists = make_lists(tokenizer, 6, tied=2)
    group = LocalLearnerGroup(tiny_path, make_cfg())
    worker = group.worker
    for iteration in range(2):
        start = policy_logps(worker, lists)
        result = group.train(iteration, lists)
        assert result.metrics["n_no_pair"] == 2 and result.metrics["n_active"] == 6
        for got, want, lst in zip(worker.last_reference_logps, start, lists):
            if len(set(lst.labels)) > 1:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
            else:  # no strict pair: dropped before the reference pass
                assert all(math.isnan(x) for x in got)
        first = result.step_metrics[0]
        # pi = pi_ref up to round-off: packed rows group sequences differently in the two passes
        assert abs(first["margin"]) < 1e-6 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_initial_reference_stays_the_initial_policy(tiny_path, tokenizer):
    lists = make_lists(tokenizer, 4)
    group = LocalLearnerGroup(
        tiny_path,
        Config.from_dict(
            {
                "learner": {"lr": 1e-3, "epochs": 1, "prompts_per_step": 4, "num_workers": 1},
                "loss": {"reference": "initial"},
            }
        ),
    )
    initial = policy_logps(group.worker, lists)
    group.train(0, lists)
    second = group.train(1, lists)
    for got, want in zip(group.worker.last_reference_logps, initial):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    assert second.step_metrics[0]["margin"] > 0  # trained away from pi_0 in iteration 0
    assert not np.allclose(policy_logps(group.worker, lists)[0], initial[0])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains(tiny_path, tokenizer, name):
    cfg = Config.from_dict(
        {
            "learner": {"lr": 1e-3, "epochs": 3, "prompts_per_step": 6, "num_workers": 1},
            "loss": {"name": name, "ndcg_weights": name == "lambdarank"},
        }
    )
    steps = LocalLearnerGroup(tiny_path, cfg).train(0, make_lists(tokenizer, 6)).step_metrics
    assert abs(steps[0]["margin"]) < 1e-6 and all(math.isfinite(s["loss"]) for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]


@pytest.mark.filterwarnings("ignore:a list of .* tokens exceeds")
def test_micro_batch_times_accumulation_gives_the_same_update(tiny_path, tokenizer):
    """One step on 7 lists (sizes 2-4, plus a tied list that is dropped) in one micro-batch, in
    uneven micro-batches of 1-3 lists, and one list per micro-batch: the same loss, gradient norm
    and parameters. Adam's first update is lr * g / (|g| + eps), blind to a wrong gradient scale
    and sensitive to float noise where |g| ~ eps, hence the gradient norm check and the
    parameter tolerance of a few percent of lr."""
    lists = make_lists(tokenizer, 7, tied=1)
    results, weights = [], []
    for budget in (100_000, 400, 64):
        group = LocalLearnerGroup(tiny_path, make_cfg(prompts_per_step=8, micro_batch_tokens=budget, max_grad_norm=0.0))
        results.append(group.train(0, lists).step_metrics[0])
        weights.append(group.get_weights())
    for result, weight in zip(results[1:], weights[1:]):
        for key in ("loss", "grad_norm", "reward_accuracy", "tokens"):
            assert result[key] == pytest.approx(results[0][key], rel=1e-5), key
        # 2%: the tied embedding's rows of tokens no list uses get softmax gradients of ~eps
        # (the warmed-up tiny model gives them near-zero probability): 0.6% of them flip
        # (padded), 1.0% (packed: rows group the sequences differently in each micro-batch)
        assert_weights_close(weight, weights[0], atol=1e-6, flipped=2e-2)


def test_packing_gives_the_same_training(tiny_path, tokenizer):
    """Packed rows (learner.packing) change the layout, not the update: two steps (the second's
    loss depends on the first's update) on 7 lists give the same losses, gradient norms and
    parameters as one padded row per sequence, with far fewer forward tokens."""
    lists = make_lists(tokenizer, 7, varied=True)
    runs = [
        LocalLearnerGroup(tiny_path, make_cfg(packing=packing, prompts_per_step=7, epochs=2, max_grad_norm=0.0))
        for packing in (False, True)
    ]
    results = [group.train(0, lists) for group in runs]
    for got, want in zip(results[1].step_metrics, results[0].step_metrics):
        for key in ("loss", "grad_norm", "margin", "tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        assert got["forward_tokens"] < want["forward_tokens"]
    assert results[1].step_metrics[1]["margin"] != 0.0  # the second step saw the first's update
    assert_weights_close(runs[1].get_weights(), runs[0].get_weights(), atol=1e-5, steps=2, flipped=1e-2)


@pytest.mark.parametrize("packing", [False, True])
def test_padding_and_mfu_metrics(tiny_path, tokenizer, packing):
    """padding_frac counts the padding of the training forwards exactly (one micro-batch: rows x
    the fullest row), flops are the useful FLOPs of larpo_ray.flops per epoch, and MFU against
    the worker's measured matmul peak lies in (0, 1]."""
    from larpo_ray.batching import packed_rows, real_tokens
    from larpo_ray.flops import training_flops

    lists = make_lists(tokenizer, 6, varied=True)
    group = LocalLearnerGroup(tiny_path, make_cfg(packing=packing, prompts_per_step=6, epochs=2))
    metrics = group.train(0, lists).metrics
    lengths = [len(lst.prompt.token_ids) + len(c.candidate.token_ids) for lst in lists for c in lst.candidates]
    rows = packed_rows(lengths, group.worker.engine.module.config.hidden_size) if packing else []
    width = max(sum(lengths[n] for n in row) for row in rows) if packing else max(lengths)
    forward = (len(rows) if packing else len(lengths)) * width  # the fullest row's width
    assert metrics["padding_frac"] == pytest.approx(1 - sum(lengths) / forward, abs=1e-12)
    assert metrics["tokens"] == 2 * real_tokens(lists)
    assert not packing or metrics["padding_frac"] < 1 - sum(lengths) / (len(lengths) * max(lengths))  # < padded
    assert metrics["flops"] == pytest.approx(2 * training_flops(lists, group.worker.engine.module.config))
    assert math.isfinite(metrics["peak_gflops"]) and metrics["peak_gflops"] > 0
    assert 0 < metrics["mfu"] <= 1
    assert metrics["mfu"] == pytest.approx(metrics["flops"] / metrics["train_seconds"] / metrics["peak_gflops"] / 1e9)


@pytest.mark.parametrize("variant", [{"zero_stage": 1}, {"zero_stage": 3}, {"gradient_checkpointing": True}])
def test_memory_options_give_the_same_training(tiny_path, tokenizer, variant):
    """ZeRO sharding and activation recomputation change memory, not the update."""
    lists = make_lists(tokenizer, 6)
    runs = [LocalLearnerGroup(tiny_path, make_cfg(**learner)) for learner in ({}, variant)]
    steps = [group.train(0, lists).step_metrics for group in runs]
    for got, want in zip(steps[1], steps[0]):
        for key in ("loss", "grad_norm", "margin"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert_weights_close(runs[1].get_weights(), runs[0].get_weights(), atol=1e-5, steps=2)


@pytest.mark.slow
def test_optimizer_offload_trains(tiny_path, tokenizer):
    """ZeRO-2 with DeepSpeedCPUAdam (JIT-compiled on first use, minutes) follows torch AdamW."""
    lists = make_lists(tokenizer, 6)
    runs = [
        LocalLearnerGroup(tiny_path, make_cfg(zero_stage=2, **extra)) for extra in ({}, {"offload_optimizer": True})
    ]
    steps = [group.train(0, lists).step_metrics for group in runs]
    assert [s["loss"] for s in steps[1]] == pytest.approx([s["loss"] for s in steps[0]], rel=1e-3)
    assert_weights_close(runs[1].get_weights(), runs[0].get_weights(), atol=1e-5, steps=2)


def test_lr_schedule_within_an_iteration(tiny_path, tokenizer):
    lists = make_lists(tokenizer, 8)
    for schedule, want in (
        ("constant", [0.5, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 2 / 3, 1 / 3]),
        ("cosine", [0.5, 1.0, 0.75, 0.25]),
    ):
        group = LocalLearnerGroup(tiny_path, make_cfg(prompts_per_step=2, schedule=schedule, warmup_steps=1))
        lrs = [s["lr"] / 1e-3 for s in group.train(0, lists).step_metrics]
        assert lrs == pytest.approx(want), schedule
        assert group.worker.engine.optimizer.param_groups[0]["lr"] == pytest.approx(want[-1] * 1e-3)


def test_get_weights_load_into_a_fresh_hf_model(tiny_path, tokenizer):
    lists = make_lists(tokenizer, 4)
    group = LocalLearnerGroup(tiny_path, make_cfg())
    group.train(0, lists)
    weights = group.get_weights()
    fresh = load_causal_lm(tiny_path)
    state = fresh.state_dict()
    assert list(weights) == list(state)
    assert all(weights[k].shape == tuple(v.shape) for k, v in state.items())
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]  # tied, sent once
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    want = policy_logps(group.worker, lists)
    for lst, logps in zip(lists, want):
        for sc, logp in zip(lst.candidates, logps):
            ids = torch.tensor([lst.prompt.token_ids + sc.candidate.token_ids])
            with torch.no_grad():
                logits = fresh(input_ids=ids).logits[0, :-1].log_softmax(-1)
            n_prompt = len(lst.prompt.token_ids)
            got = logits[n_prompt - 1 :].gather(1, ids[0, n_prompt:, None]).sum()
            assert float(got) == pytest.approx(logp, abs=1e-4)


def test_save_pretrained_is_an_hf_folder(tiny_path, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    group = LocalLearnerGroup(tiny_path, make_cfg())
    group.save(str(tmp_path / "policy"))  # before training, then replaced after
    group.train(0, make_lists(tokenizer, 4))
    group.save(str(tmp_path / "policy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no temporary folders left
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert AutoTokenizer.from_pretrained(tmp_path / "policy").pad_token_id == tokenizer.pad_token_id
    weights = group.get_weights()
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), weights[name], err_msg=name)


# ---- slow: Ray Train workers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a stray cluster
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:a list of .* tokens exceeds")
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_ray_group_matches_one_worker(ray_cluster, tiny_path, tokenizer, zero_stage):
    """2 gloo workers serve two iterations without restarting, stay identical, and give the
    update of one in-process worker on the same lists (the data-parallel reduction check).
    7 lists in steps of 4, one list per micro-batch: rank 0 runs dummy micro-batches."""
    from larpo_ray.learner_group import RayLearnerGroup

    lists = make_lists(tokenizer, 7, tied=1)
    learner = {"lr": 1e-3, "epochs": 2, "prompts_per_step": 4, "micro_batch_tokens": 64, "zero_stage": zero_stage}
    start = time.perf_counter()
    # no restarts: the worker's own error (below) must surface at once (restarts: test_fault_injection)
    group = RayLearnerGroup(
        tiny_path, Config.from_dict({"learner": {**learner, "num_workers": 2}, "faults": {"learner_max_failures": 0}})
    )
    print(f"RayLearnerGroup start (ZeRO-{zero_stage}): {time.perf_counter() - start:.1f} s")
    try:
        first = group.worker_info()
        results = [group.train(it, lists) for it in range(2)]
        info = group.worker_info()
        assert [i["pid"] for i in info] == [i["pid"] for i in first]  # same processes
        assert [i["step"] for i in info] == [8, 8] and [i["step"] for i in first] == [0, 0]
        assert info[0]["checksum"] == info[1]["checksum"]  # ranks hold identical weights
        weights = ray_cluster.get(group.get_weights())
        local = LocalLearnerGroup(tiny_path, Config.from_dict({"learner": {**learner, "num_workers": 1}}))
        local_results = [local.train(it, lists) for it in range(2)]
        # flipped=1e-2: the warmed-up tiny model is sharp, so many embedding rows get gradients near
        # Adam's eps, where summation-order noise flips single elements (measured up to 0.44%)
        assert_weights_close(weights, local.get_weights(), atol=1e-5, steps=8, flipped=1e-2)
        for ray_step, local_step in zip(results[1].step_metrics, local_results[1].step_metrics):
            # After 8 Adam steps the fp32 summation order (gloo all-reduce of 2 ranks vs one
            # process) shows up around 1e-4 relative in derived metrics; the weights match above.
            for key in ("loss", "grad_norm", "reward_accuracy", "margin", "tokens"):
                assert ray_step[key] == pytest.approx(local_step[key], rel=1e-3, abs=1e-5), key
        print(f"ZeRO-{zero_stage} 2 workers: {results[1].metrics['tokens_per_s']:.0f} tok/s")
        bad = [
            RankedList(
                lists[0].prompt,
                tuple(ScoredCandidate(Candidate("p0", (10**6,), "", (), 1.0, 0), r, 0) for r in (1.0, 0.0)),
                (1.0, 0.0),
            )
        ]
        with pytest.raises(RuntimeError, match="failed during 'train' \\(no restarts left"):
            group.train(2, bad)  # token id outside the vocabulary: the worker's error surfaces
    finally:
        group.shutdown()


def test_sft_weight_adds_the_best_candidates_nll_and_raises_their_likelihood(tiny_path, tokenizer):
    """loss.sft_weight: the learner's loss is the ranking loss plus weight x the per-token NLL of
    each list's best candidate (losses.best_nll), and training with it makes the best candidates
    more likely than training without it."""
    from larpo_ray.batching import collate, to_BK

    lists = make_lists(tokenizer, 4)

    def best_logp(group) -> float:
        w = group.worker
        batch = collate(lists, w.pad_id)
        with torch.no_grad():
            logps = to_BK(w._logps(w.engine, batch), batch.seq_index_BK)
        return float(logps[:, 0].sum())  # make_lists puts the best candidate first

    base = {"loss": {"name": "listmle"}, "learner": {"lr": 1e-3, "epochs": 1, "prompts_per_step": 4, "num_workers": 1}}
    plain = LocalLearnerGroup(tiny_path, Config.from_dict(base))
    before = best_logp(plain)
    plain_loss = plain.train(0, lists).metrics["loss"]
    with_sft = LocalLearnerGroup(tiny_path, Config.from_dict({**base, "loss": {"name": "listmle", "sft_weight": 1.0}}))
    sft_loss = with_sft.train(0, lists).metrics["loss"]
    tokens = [len(lst.candidates[0].candidate.token_ids) for lst in lists]
    assert sft_loss == pytest.approx(plain_loss - before / len(lists) / np.mean(tokens), rel=0.05)
    assert best_logp(with_sft) > best_logp(plain)
