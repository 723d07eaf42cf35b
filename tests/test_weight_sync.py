"""The gloo weight transport through Ray (generation.weight_transport = gloo): the learner's
rank 0 (a Ray Train worker beside its DeepSpeed group) broadcasts to real generator actors (HF
engine here; test_e2e runs the vLLM engine with it). NCCL is the same code with another backend
and CUDA buffers, and needs GPUs on two processes: not run here.

One runtime, four syncs: a plain one; one after a rollout replaced a dead generator (the group
re-opens with the new process); one with a generator dead at sync time (falls back to the object
store, warns); one after the rollout replaced that one too."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_learner import make_lists


def generator_weights(actor) -> dict[str, np.ndarray]:
    """The HF engine's current weights, read inside the actor."""
    return actor.__ray_call__.remote(
        lambda g: {k: v.detach().float().numpy().copy() for k, v in g.engine.model.state_dict().items()}
    )


def answered_versions(ray, actors, prompt) -> list[int]:
    """The weight version each generator answers with (what the dispatcher checks): one greedy token."""
    return [cands[0].policy_version for cands in ray.get([g.generate.remote([prompt], [0.0], 1) for g in actors])]


def assert_generators_hold_the_learners_weights(ray, rt) -> None:
    learner = ray.get(rt.learner.get_weights())
    for actor in rt.generators:
        got = ray.get(generator_weights(actor))
        assert got.keys() == learner.keys()
        different = [k for k in learner if not np.array_equal(got[k], learner[k])]
        assert different == [], different


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_gloo_broadcast_reaches_every_generator_through_restarts_and_deaths(tiny_model_path, zero_stage):
    """ZeRO-3: every rank gathers each parameter for rank 0 to send."""
    import ray

    from larpo_ray.config import load_config
    from larpo_ray.models import load_tokenizer
    from larpo_ray.topology import RayRuntime

    cfg = load_config(
        None,
        "tiny",
        [
            "--generation.engine",
            "hf",
            "--generation.num_generators",
            "2",
            "--generation.weight_transport",
            "gloo",
            "--generation.weight_bucket_mb",
            "1",
            "--learner.lr",
            "1e-3",
            "--learner.zero_stage",
            str(zero_stage),
            "--faults.call_timeout_s",
            "120",
            "--faults.actor_max_restarts",
            "0",
            "--generation.batch_prompts",
            "2",
            "--resources.generator_cpus",
            "0.25",
            "--logging.wandb_mode",
            "disabled",
        ],
    )
    tokenizer = load_tokenizer(tiny_model_path)
    lists = make_lists(tokenizer, 8)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    rt = RayRuntime(cfg, tiny_model_path)
    try:
        # 1. a plain broadcast: every tensor once (the tied head goes as the embedding), 1 MB buckets
        rt.train(0, lists)
        sync = rt.sync_weights(1)
        meta = rt.learner.weight_meta()
        assert sync["fallbacks"] == 0 and sync["bytes"] == sum(m.nbytes for m in meta) and sync["gb_per_s"] > 0
        assert answered_versions(ray, rt.generators, lists[0].prompt) == [1, 1]
        assert_generators_hold_the_learners_weights(ray, rt)
        first_group = rt._weight_group

        # A gloo sync leaves no ObjectRef: a generator that restarts later gets one fetched from
        # the learner on demand (the dispatcher calls current_weights before its next batch).
        assert rt.fleet.weights == (1, None)
        version, ref = rt.fleet.current_weights()
        assert version == 1 and rt.fleet.weights == (1, ref)
        learner = ray.get(ref)

        # 2. generator 1 dies; the rollout replaces it (faults.actor_max_restarts = 0); the next
        #    sync re-opens the group with the new process
        prompts = [dataclasses.replace(x.prompt, answer="1") for x in lists[:4]]  # the scorer needs one
        ray.kill(rt.generators[1], no_restart=True)
        out = rt.rollout(prompts, [0.0, 0.0], 1)
        assert out.faults["generator_replaced"] == 1
        assert {c.policy_version for c in out.candidates} == {1}
        got = ray.get(generator_weights(rt.generators[0]))
        assert all(np.array_equal(got[k], learner[k]) for k in learner)
        rt.train(1, lists)
        assert rt.sync_weights(2)["fallbacks"] == 0
        assert rt._weight_group != first_group
        assert_generators_hold_the_learners_weights(ray, rt)

        # 3. generator 0 dead for good: this sync falls back to the object store and says so
        ray.kill(rt.generators[0], no_restart=True)
        rt.train(2, lists)
        with pytest.warns(
            UserWarning,
            match=r"gloo weight sync of version 3 failed \(a generator: ActorDiedError: .*\); "
            r"falling back to the object store",
        ):
            sync = rt.sync_weights(3)
        assert sync["fallbacks"] == 1 and [rt.fleet.needs_weights(i) for i in range(2)] == [True, False]
        assert answered_versions(ray, rt.generators[1:], lists[0].prompt) == [3]

        # 4. the rollout replaces generator 0 (it loads version 3 first); the next sync re-opens
        #    the group with the replacement
        out = rt.rollout(prompts, [0.0, 0.0], 3)
        assert out.faults["generator_replaced"] == 1
        assert {c.policy_version for c in out.candidates} == {3}
        rt.train(3, lists)
        assert rt.sync_weights(4)["fallbacks"] == 0
        assert answered_versions(ray, rt.generators, lists[0].prompt) == [4, 4]
        assert_generators_hold_the_learners_weights(ray, rt)
    finally:
        rt.shutdown()
        ray.shutdown()


def test_nccl_without_gpus_is_refused_naming_the_fix():
    from larpo_ray.config import Config, ConfigError

    with pytest.raises(
        ConfigError, match="weight_transport = 'nccl' broadcasts between GPUs.*use weight_transport = gloo"
    ):
        Config.from_dict({"generation": {"weight_transport": "nccl"}})
    cfg = Config.from_dict(
        {"generation": {"weight_transport": "nccl"}, "resources": {"learner_gpus_per_worker": 1, "generator_gpus": 1}}
    )
    assert cfg.generation.weight_transport == "nccl"
