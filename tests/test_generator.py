"""Generator role on the tiny model: both engines, their agreement, and weight sync.

Engines are built once per module (vLLM takes 20-80 s to start here); vLLM cases are marked
slow. The HF model built in `learner_model` plays the learner: after a weight load, a generator's
greedy output must equal that model's.
"""

import math

import numpy as np
import pytest
import torch

from actors.generator import Generator
from larpo_ray import tasks
from larpo_ray.config import GenerationConfig, ModelConfig
from larpo_ray.driver import sample_temperatures
from larpo_ray.models import load_causal_lm, load_tokenizer, read_model_facts, resolve_model
from larpo_ray.types import Prompt

QUESTIONS = ["What is 3 + 4?", "What is 12 - 5?", "What is 17 + 2?", "What is 9 - 6?", "What is 45 + 38?"]
MAX_NEW = 24
ENGINE_NAMES = ["hf", pytest.param("vllm", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("tiny")


@pytest.fixture(scope="module")
def model_cfg() -> ModelConfig:
    return ModelConfig(name_or_path="tiny", max_model_len=128)


@pytest.fixture(scope="module")
def prompts(model_path) -> list[Prompt]:
    tokenizer = load_tokenizer(model_path)
    return [
        Prompt(
            uid=f"q{i}",
            text=q,
            token_ids=tuple(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": f"{q} {tasks.INSTRUCTION}"}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            ),
        )
        for i, q in enumerate(QUESTIONS)
    ]


@pytest.fixture(scope="module", params=ENGINE_NAMES)
def generator(request, model_path, model_cfg):
    gen = Generator(model_path, GenerationConfig(engine=request.param, seed=1), model_cfg)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def learner_model(model_path):
    return load_causal_lm(model_path, "float32").eval()


@pytest.fixture(scope="module")
def learner_greedy(learner_model, prompts) -> list[tuple[int, ...]]:
    return hf_greedy(learner_model, prompts)


@pytest.fixture(scope="module")
def perturbed(model_path, prompts) -> tuple[dict[str, np.ndarray], list[tuple[int, ...]]]:
    """(learner weights after a perturbation, the learner's greedy responses with them)."""
    learner = load_causal_lm(model_path, "float32").eval()
    state = perturbed_state(learner)
    learner.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return state, hf_greedy(learner, prompts)


def hf_greedy(model, prompts: list[Prompt], max_new: int = MAX_NEW) -> list[tuple[int, ...]]:
    """The learner's greedy responses, one prompt at a time (no padding), EOS included."""
    eos = model.generation_config.eos_token_id
    out = []
    for p in prompts:
        ids = torch.tensor([p.token_ids])
        with torch.no_grad():
            seq = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        out.append(tuple(seq[0, ids.shape[1] :].tolist()))
    return out


def token_logps(model, prompt: Prompt, response: tuple[int, ...], temperature: float) -> np.ndarray:
    """log pi(y_t | x, y_<t) at `temperature` (1 for greedy), teacher-forced."""
    ids = torch.tensor([list(prompt.token_ids) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt.token_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits / (temperature or 1.0), -1)
    return logp.gather(1, torch.tensor(response)[:, None])[:, 0].numpy()


def perturbed_state(model, scale: float = 0.05) -> dict[str, np.ndarray]:
    """The learner's full state dict (tied lm_head included) plus noise, as numpy arrays."""
    rng = np.random.default_rng(0)
    state = {
        k: v.numpy() + rng.normal(0, scale, v.shape).astype(np.float32)
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # what a tied learner sends
    return state


def test_sample_temperatures():
    assert sample_temperatures(3, 0.7) == [0.7, 0.7, 0.7]
    assert sample_temperatures(5, 0.7, [0.5, 1.0]) == [0.5, 1.0, 0.5, 1.0, 0.5]


def test_candidates_are_well_formed(generator, prompts, model_path):
    temps = [0.0, 0.7, 1.0, 0.7]
    cands = generator.generate(prompts, temps, MAX_NEW)
    stop_ids = read_model_facts(model_path).stop_ids
    vocab = len(generator.tokenizer)
    assert len(cands) == len(prompts) * len(temps)
    assert [c.prompt_uid for c in cands] == [p.uid for p in prompts for _ in temps]
    assert [c.temperature for c in cands] == temps * len(prompts)
    for c in cands:
        assert 1 <= len(c.token_ids) <= MAX_NEW and all(0 <= t < vocab for t in c.token_ids)
        assert len(c.sample_logps) == len(c.token_ids)
        assert all(math.isfinite(x) and x <= 1e-6 for x in c.sample_logps)
        assert c.text == generator.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason == ("stop" if c.token_ids[-1] in stop_ids else "length")
        assert c.finish_reason == "stop" or len(c.token_ids) == MAX_NEW
        assert c.policy_version == 0
    assert any(c.finish_reason == "stop" for c in cands)  # the warmed-up tiny model ends replies


def test_max_new_tokens_respected(generator, prompts):
    cands = generator.generate(prompts, [0.0, 1.0], max_new_tokens=3)
    assert all(len(c.token_ids) <= 3 for c in cands)
    assert any(c.finish_reason == "length" and len(c.token_ids) == 3 for c in cands)


def test_greedy_matches_learner_and_logps_are_raw(generator, prompts, learner_model, learner_greedy):
    cands = generator.generate(prompts, [0.0], MAX_NEW)
    assert [c.token_ids for c in cands] == learner_greedy
    for c, p in zip(cands, prompts):  # greedy reports the temperature-1 model distribution
        np.testing.assert_allclose(c.sample_logps, token_logps(learner_model, p, c.token_ids, 0.0), atol=1e-4)


def test_sampling_logps_are_after_temperature(generator, prompts, learner_model):
    for c, p in zip(generator.generate(prompts, [0.7], MAX_NEW), prompts):
        np.testing.assert_allclose(c.sample_logps, token_logps(learner_model, p, c.token_ids, 0.7), atol=1e-4)


def test_weight_load_syncs_to_the_learner(generator, prompts, learner_model, learner_greedy, perturbed):
    new_state, expected = perturbed
    assert expected != learner_greedy  # the perturbation changes behaviour: the check has teeth
    try:
        info = generator.load_weights(7, new_state)
        assert info["version"] == 7
        unique = {id(a): a.nbytes for a in new_state.values()}  # a tied head is sent once
        assert info["bytes"] == sum(unique.values()) and info["seconds"] >= 0
        cands = generator.generate(prompts, [0.0], MAX_NEW)
        assert [c.token_ids for c in cands] == expected
        assert all(c.policy_version == 7 for c in cands)
    finally:  # restore, so other tests see the initial policy; restoring is exact
        original = {k: v.numpy() for k, v in learner_model.state_dict().items()}
        generator.load_weights(0, original)
    assert [c.token_ids for c in generator.generate(prompts, [0.0], MAX_NEW)] == learner_greedy


def test_overlong_prompt_is_refused(generator, prompts, model_cfg):
    long = Prompt(uid="too-long", text="", token_ids=(5,) * (model_cfg.max_model_len - 10))
    with pytest.raises(ValueError, match=r"too-long.*118 tokens.*room for 104"):
        generator.generate([prompts[0], long], [0.0], max_new_tokens=24)


def test_ping_is_the_process_id(generator):
    import os

    assert generator.ping() == os.getpid()


def test_a_failing_native_weight_transfer_falls_back_to_the_file_path():
    """The GPU path (vLLM's weight-transfer API) is not run here: if it raises, the engine warns
    once and reloads from a file from then on, rather than failing the run."""
    from actors.generator import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM engine behind it: only load_weights' choice
    engine.facts, engine.native_sync, loaded = read_model_facts(resolve_model("tiny")), True, []

    def native(tensors):
        raise RuntimeError("no IPC here")

    engine._load_native, engine._load_from_file = native, lambda tensors: loaded.append(sorted(tensors))
    weights = {"model.norm.weight": np.ones(4, dtype=np.float32)}
    with pytest.warns(UserWarning, match="native weight transfer failed \\(RuntimeError: no IPC here\\)"):
        engine.load_weights(weights)
    engine.load_weights(weights)  # no second warning: the file path is now the path
    assert loaded == [["model.norm.weight"], ["model.norm.weight"]] and engine.native_sync is False
