"""The learner role: one data-parallel rank that trains the policy on ranked lists with DeepSpeed.

This is the inner loop of Algorithm 1 (docs/algorithm.md): with pi_ref = the policy at the start of the
iteration (or the initial policy, `loss.reference = initial`), run `learner.epochs` epochs over the
iteration's lists, minimising the ranking loss L(x, list; pi_theta, pi_ref); the weights carry over
to the next iteration (no re-init). Plain classes: `larpo_ray.learner_group` runs one `LearnerWorker`
in-process or one per Ray Train worker. Every rank receives the same global lists and derives its
share itself. The worker trains; it composes a `WeightPublisher` (its weights out, to the object
store or broadcast to the generators) and a `CheckpointIO` (HF folders and checkpoints).

Data-parallel and accumulation arithmetic (larpo_ray/losses.py, "Data-parallel reduction"):
- lists without a strict pair (all tied) are dropped first: they carry no gradient, and dropping
  them makes every step's active-prompt count N = its number of lists, known before any backward;
- a step's lists are sharded over ranks, each rank's share cut into token-bounded micro-batches;
  micro-batch m with n_m lists backpropagates loss_m * n_m / N * world_size. DeepSpeed averages
  gradients over ranks (ZeRO 0-3), so the update follows the global mean over the step's prompts;
- DeepSpeed runs with gradient_accumulation_steps = 1 (backward divides by 1) and the accumulation
  boundary is set by hand, so only the last micro-batch of a step reduces gradients;
- every rank runs the same number of forward/backward passes (ZeRO-2/3 collectives must match):
  ranks with fewer micro-batches run a 2-token dummy whose loss is multiplied by 0.

Hardware use, in every iteration's metrics: `padding_frac` (padding tokens / tokens of the training
forwards; small with `learner.packing`, larpo_ray/batching.py) and `mfu` (useful training FLOPs,
larpo_ray/flops.py, / train_seconds / `peak_gflops`, the matmul peak each worker measures once at
start in its training dtype, summed over the workers).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from larpo_ray import weight_transport
from larpo_ray.batching import ListBatch, collate, micro_batches, model_logps, shard, to_BK
from larpo_ray.checkpoint import load_optimizer, save_optimizer, write_json
from larpo_ray.choices import LOSS_SPECS
from larpo_ray.config import LearnerConfig, LossConfig, ModelConfig
from larpo_ray.flops import matmul_peak, training_flops
from larpo_ray.losses import LOSSES, best_nll
from larpo_ray.models import load_causal_lm, load_tokenizer
from larpo_ray.stats import mean
from larpo_ray.types import RankedList, TrainResult

# Order of the per-step sums that are all-reduced (weights follow losses.py's reduction rule).
# `forward_tokens` counts the training forwards' tokens, padding included.
_SUMS = (
    "loss",
    "n_active",
    "n_pairs",
    "reward_accuracy",
    "margin",
    "chosen_reward",
    "rejected_reward",
    "tokens",
    "forward_tokens",
)
_WEIGHT = {
    "loss": "n_active",
    "reward_accuracy": "n_pairs",
    "margin": "n_pairs",
    "chosen_reward": "n_active",
    "rejected_reward": "n_active",
}


def use_bf16(precision: str) -> bool:
    """`auto` means bf16 only on a CUDA device that supports it (CPU bf16 autograd is slow)."""
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def deepspeed_config(cfg: LearnerConfig, bf16: bool) -> dict:
    """DeepSpeed config from LearnerConfig. Micro-batch 1 and GAS 1: accumulation is ours."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:  # DeepSpeed then builds DeepSpeedCPUAdam (JIT-compiled once)
        zero["offload_optimizer"] = {"device": "cpu"}
    adam = {
        "lr": cfg.lr,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": cfg.weight_decay,
        "torch_adam": not cfg.offload_optimizer,
    }  # FusedAdam needs CUDA; torch's runs anywhere
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,  # we log ourselves
    }


def lr_at(step: int, total_steps: int, cfg: LearnerConfig) -> float:
    """Learning rate of step `step` (0-based) of an iteration: linear warm-up, then the schedule
    (constant, or linear / cosine decay towards 0 at the iteration's end). The paper gives no
    schedule (docs/algorithm.md, hyper-parameters): this is [ours]."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def has_strict_pair(ranked: RankedList) -> bool:
    """True if the list orders at least two candidates (losses.active_prompts for one list)."""
    return len(ranked.labels) >= 2 and max(ranked.labels) > min(ranked.labels)


def init_distributed(world_size: int, backend: str) -> None:
    """Join torch.distributed through DeepSpeed. Ray Train has already built the process group
    for world_size > 1; a single in-process worker gets a one-rank group on an in-memory store.
    No port and no MASTER_* variables: a port written to os.environ would be inherited by child
    processes, whose own single-rank group would then fail with EADDRINUSE."""
    if not dist.is_initialized():
        if world_size != 1:
            raise RuntimeError(
                f"world_size = {world_size} needs an initialized process group: "
                "run the workers through RayLearnerGroup (Ray Train)"
            )
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: the reference pass must see the same function the loss trains (as TRL)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def frozen_initial(model, model_path: str, model_cfg: ModelConfig, resumed: bool, bf16: bool) -> torch.nn.Module:
    """The frozen pi_0 of `loss.reference = initial`: a copy of the freshly loaded policy, or,
    when `resumed` (the policy came from a checkpoint), the initial policy loaded again."""
    initial = (
        load_causal_lm(model_path, model_cfg.dtype, model_cfg.trust_remote_code) if resumed else copy.deepcopy(model)
    )
    disable_dropout(initial)
    initial.requires_grad_(False).eval()
    return initial.to(torch.bfloat16 if bf16 else model.dtype)


class LearnerWorker:
    """One data-parallel learner rank: a DeepSpeed engine around the policy, plus the reference,
    trained by `train_iteration`. Its weights leave through `publisher` (WeightPublisher) and its
    files through `checkpoint_io` (CheckpointIO)."""

    def __init__(
        self,
        model_path: str,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        learner_cfg: LearnerConfig,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        resume_from: str | Path | None = None,
    ):
        """`resume_from`: a checkpoint folder (larpo_ray.checkpoint) to continue from: its policy
        weights, this rank's optimizer state and the step count; `model_path` stays the initial
        policy (the reference when loss.reference = initial)."""
        self.cfg, self.loss_cfg, self.seed = learner_cfg, loss_cfg, seed
        self.rank, self.world_size = rank, world_size
        init_distributed(world_size, "nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"process group is rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the worker was told {rank} of "
                f"{world_size}"
            )
        torch.manual_seed(seed)
        resume_from = Path(resume_from) if resume_from is not None else None
        policy_path = resume_from / "policy" if resume_from is not None else model_path
        model = load_causal_lm(str(policy_path), model_cfg.dtype, model_cfg.trust_remote_code)
        disable_dropout(model)
        model.config.use_cache = False
        self.tokenizer = load_tokenizer(model_path, model_cfg.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id
        bf16 = use_bf16(learner_cfg.precision)
        # Classic iterative DPO keeps pi_0 as reference [ours: knob]; the paper uses pi_s.
        self.initial = None
        if loss_cfg.reference == "initial":
            self.initial = frozen_initial(model, model_path, model_cfg, resume_from is not None, bf16)
        if learner_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        if learner_cfg.packing and "flash" in (model.config._attn_implementation or ""):
            raise ValueError(  # flash kernels isolate packed sequences only in a single row
                f"learner.packing packs several rows, which {model.config._attn_implementation} does not "
                "isolate: set learner.packing = false"
            )
        # packed rows of hidden_size tokens: attention adds <= ~1/6 of the matmuls (batching.py)
        self.row_tokens = model.config.hidden_size if learner_cfg.packing else None
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(learner_cfg, bf16),
        )
        if self.initial is not None:
            self.initial.to(self.engine.device)
        options = {name: getattr(loss_cfg, name) for name in LOSS_SPECS[loss_cfg.name].options}
        self.loss_fn = lambda *args: LOSSES[loss_cfg.name](*args, loss_cfg.beta, **options)
        self.publisher = WeightPublisher(self.engine.module, rank)  # weights out: object store, broadcast
        self.checkpoint_io = CheckpointIO(self.engine, self.tokenizer, self.publisher, learner_cfg, rank, world_size)
        # optimizer steps over all iterations (step_metrics' `step`)
        self.global_step = self.checkpoint_io.load_checkpoint(resume_from) if resume_from is not None else 0
        self.last_reference_logps: list[list[float]] = []  # per input list of the last iteration
        # MFU's denominator: every worker's matmul peak in the training dtype, measured once.
        peak = matmul_peak(self.engine.device, torch.bfloat16 if bf16 else model.dtype)
        self.peak_flops = float(self._all_reduce(torch.tensor([peak], dtype=torch.float64))[0])

    # ---- collectives ---------------------------------------------------------------------------

    def _all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        if self.world_size == 1:
            return t
        t = t.to(self.engine.device)
        dist.all_reduce(t, op=op)
        return t.cpu()

    def _check_same_lists(self, lists: Sequence[RankedList]) -> None:
        """Ranks given different lists would deadlock in ZeRO's collectives: fail loudly instead."""
        if self.world_size == 1:
            return
        tokens = sum(len(sc.candidate.token_ids) for lst in lists for sc in lst.candidates)
        mine = torch.tensor([len(lists), tokens, sum(sum(lst.labels) for lst in lists)], dtype=torch.float64)
        most = self._all_reduce(torch.cat([mine, -mine]), dist.ReduceOp.MAX)  # max and -min
        if not torch.equal(most[:3], -most[3:]):  # every rank sees the mismatch, none hangs
            raise RuntimeError(
                "learner ranks received different lists; every rank must get the same global list of RankedLists"
            )

    # ---- forward passes ------------------------------------------------------------------------

    def _logps(self, model, batch: ListBatch) -> Tensor:
        """Sequence log-probs [N] of a batch under `model` (the engine or the frozen copy)."""
        return model_logps(model, batch.to(self.engine.device), self.loss_cfg.length_normalize)

    def _dummy_forward(self, model) -> Tensor:
        """A 2-token forward whose output sum times 0 is a loss with zero gradient everywhere:
        keeps this rank's collectives in step with ranks that have more micro-batches."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.engine.device)
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.sum() * 0.0

    def _plan(self, lists: Sequence[RankedList], indices: Sequence[int]) -> tuple[list, int]:
        """This rank's micro-batches (lists of indices into `lists`) for the global `indices`,
        and the most micro-batches any rank has (every rank derives it: no communication)."""

        def groups(rank: int) -> list[list[int]]:
            mine = [indices[i] for i in shard(len(indices), rank, self.world_size)]
            groups = micro_batches([lists[i] for i in mine], self.cfg.micro_batch_tokens, self.cfg.packing)
            return [[mine[i] for i in g] for g in groups]

        return groups(self.rank), max(len(groups(r)) for r in range(self.world_size))

    @torch.no_grad()
    def _no_grad_logps(self, model, lists: Sequence[RankedList]) -> list[Tensor]:
        """log pi(y|x) of every candidate of every list, float32, the same on all ranks. Each rank
        computes its shard; an all-reduce of the zero-filled flat vector assembles them."""
        self.engine.module.eval()
        sizes = [len(lst.candidates) for lst in lists]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        flat = torch.zeros(int(offsets[-1]), dtype=torch.float32)
        groups, n_micro = self._plan(lists, range(len(lists)))
        for group in groups:
            logp_N = self._logps(model, collate([lists[i] for i in group], self.pad_id, self.row_tokens)).cpu()
            flat[np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in group])] = logp_N
        for _ in range(n_micro - len(groups)):
            self._dummy_forward(model)
        self.engine.module.train()
        flat = self._all_reduce(flat)
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(lists))]

    # ---- training ------------------------------------------------------------------------------

    def train_iteration(self, iteration: int, lists: Sequence[RankedList]) -> TrainResult:
        """Algorithm 1's inner loop on this iteration's lists (collective; same lists on every
        rank). Metrics are global: loss, reward_accuracy, margin, chosen/rejected_reward are
        means over the iteration's steps (weighted as in losses.py); n_active / n_no_pair /
        n_pairs count the iteration's lists; tokens (trained, all epochs) and tokens_per_s
        exclude the reference pass (ref_seconds), as do flops, mfu and padding_frac."""
        self._check_same_lists(lists)
        active = [lst for lst in lists if has_strict_pair(lst)]
        start = time.perf_counter()
        # Reference log-probs once per iteration, for every candidate, pooled ones included:
        # pi_ref = pi_s, the policy as it stands now (Algorithm 1), or the frozen pi_0.
        ref = self._no_grad_logps(self.engine if self.initial is None else self.initial, active)
        ref_by_list = iter(ref)
        self.last_reference_logps = [
            next(ref_by_list).tolist() if has_strict_pair(lst) else [math.nan] * len(lst.candidates) for lst in lists
        ]
        ref_seconds, start = time.perf_counter() - start, time.perf_counter()
        steps = self._steps(iteration, len(active))
        step_metrics, sums = [], torch.zeros(len(_SUMS), dtype=torch.float64)
        for i, step_lists in enumerate(steps):
            lr = lr_at(i, len(steps), self.cfg)
            step_sums, grad_norm = self._train_step(active, ref, step_lists, lr)
            sums += step_sums
            step_metrics.append(
                {"step": float(self.global_step), "lr": lr, "grad_norm": grad_norm, **_means(step_sums)}
            )
            self.global_step += 1
        train_seconds = time.perf_counter() - start
        flops = self.cfg.epochs * training_flops(active, self.engine.module.config)  # each epoch: every list
        tokens, forward_tokens = (float(sums[_SUMS.index(k)]) for k in ("tokens", "forward_tokens"))
        metrics = {
            **_means(sums),
            "n_active": float(len(active)),
            "n_pairs": float(sums[_SUMS.index("n_pairs")]) / self.cfg.epochs,
            "n_no_pair": float(len(lists) - len(active)),
            "grad_norm": mean((m["grad_norm"] for m in step_metrics), empty=0.0),  # no step: nothing moved
            "lr": mean((m["lr"] for m in step_metrics), empty=0.0),
            "steps": float(len(steps)),
            "tokens_per_s": tokens / max(train_seconds, 1e-9),
            "ref_seconds": ref_seconds,
            "train_seconds": train_seconds,
            "padding_frac": 1.0 - tokens / max(forward_tokens, 1.0),
            "flops": flops,
            "peak_gflops": self.peak_flops / 1e9,
            "mfu": flops / max(train_seconds, 1e-9) / self.peak_flops,
        }
        return TrainResult(iteration + 1, metrics, step_metrics)

    def _steps(self, iteration: int, n_lists: int) -> list[list[int]]:
        """Optimizer steps of `prompts_per_step` list indices; each epoch reshuffles with a
        generator seeded by (seed, iteration, epoch), so every rank draws the same order."""
        steps = []
        for epoch in range(self.cfg.epochs):
            order = np.random.default_rng([self.seed, iteration, epoch]).permutation(n_lists)
            size = self.cfg.prompts_per_step
            steps += [order[s : s + size].tolist() for s in range(0, n_lists, size)]
        return steps

    def _train_step(self, lists, ref: list[Tensor], step_lists: list[int], lr: float) -> tuple[Tensor, float]:
        """One optimizer step over the global `step_lists`; returns (global sums, grad norm)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        groups, n_micro = self._plan(lists, step_lists)
        n_global = len(step_lists)  # all active: the loss is a mean over these prompts
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        for m in range(n_micro):
            self.engine.set_gradient_accumulation_boundary(m == n_micro - 1)
            if m < len(groups):
                loss, metrics = self._micro_loss([lists[i] for i in groups[m]], [ref[i] for i in groups[m]])
                n_m = metrics["n_active"]
                sums += torch.tensor(
                    [loss.item() * n_m]
                    + [metrics[k] * metrics[_WEIGHT[k]] if k in _WEIGHT else metrics[k] for k in _SUMS[1:]],
                    dtype=torch.float64,
                )
                loss = loss * (n_m / n_global * self.world_size)
            else:
                loss = self._dummy_forward(self.engine)
            self.engine.backward(loss)
        local_norm = self._grad_norm() if self.cfg.zero_stage == 0 else None
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = local_norm if grad_norm is None else float(grad_norm)
        return self._all_reduce(sums), grad_norm

    def _micro_loss(self, lists: list[RankedList], ref: list[Tensor]) -> tuple[Tensor, dict]:
        """Ranking loss of one micro-batch of whole lists (mean over its active prompts)."""
        batch = collate(lists, self.pad_id, self.row_tokens)
        policy_BK = to_BK(self._logps(self.engine, batch), batch.seq_index_BK.to(self.engine.device))
        ref_N = torch.cat(ref).to(policy_BK.device)
        ref_BK = to_BK(ref_N, batch.seq_index_BK.to(policy_BK.device))
        labels_BK, mask_BK = batch.labels_BK.to(policy_BK.device), batch.mask_BK.to(policy_BK.device)
        loss, metrics = self.loss_fn(policy_BK, ref_BK, labels_BK, mask_BK)
        if self.loss_cfg.sft_weight:  # + weight * NLL of each list's best candidate (losses.best_nll)
            lengths_BK = torch.ones(policy_BK.shape, dtype=policy_BK.dtype, device=policy_BK.device)
            if not self.loss_cfg.length_normalize:  # per-token: divide the summed log-probs
                for b, lst in enumerate(lists):
                    lengths_BK[b, : len(lst.candidates)] = torch.tensor(
                        [len(c.candidate.token_ids) for c in lst.candidates]
                    )
            loss = loss + self.loss_cfg.sft_weight * best_nll(policy_BK, lengths_BK, labels_BK, mask_BK)
        return loss, {**metrics, "tokens": float(batch.num_tokens), "forward_tokens": float(batch.input_ids_ST.numel())}

    def _grad_norm(self) -> float:
        """Global gradient norm before clipping (ZeRO 0 fp32: DeepSpeed does not record it).
        Gradients are already averaged over ranks at the accumulation boundary."""
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0


def _means(sums: Tensor) -> dict[str, float]:
    """Global sums (ordered as _SUMS) to means, weighted as losses.py prescribes."""
    values = dict(zip(_SUMS, sums.tolist()))
    out = {k: v / max(values[_WEIGHT[k]], 1.0) if k in _WEIGHT else v for k, v in values.items()}
    return out


class WeightPublisher:
    """How the policy's weights leave a rank: as numpy arrays (the object store, HF folders), or
    broadcast by rank 0 to the generators' weight group (larpo_ray.weight_transport). Reading the
    weights is collective: under ZeRO-3 every rank takes part in each parameter's gather."""

    def __init__(self, module: torch.nn.Module, rank: int):
        self.module, self.rank = module, rank
        self._store = self._group = None  # rank 0's weight broadcast group, once opened

    def get_weights(self) -> dict[str, np.ndarray]:
        """The policy's weights as numpy, keyed exactly like HF `state_dict()` (collective).

        Arrays keep the module's dtype, except bfloat16 (numpy has none), sent as float32. Tied
        weights (lm_head = embed_tokens) appear under both keys as the same array, so HF
        `load_state_dict` works, and pickling / the object store stores the array once. ZeRO-3
        gathers one parameter at a time, so peak memory grows by one parameter, not the model.
        """
        out: dict[str, np.ndarray] = {}
        by_id: dict[int, np.ndarray] = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if id(tensor) not in by_id:
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    data = tensor.detach()
                    data = data.float() if data.dtype == torch.bfloat16 else data
                    by_id[id(tensor)] = data.cpu().numpy().copy()  # detach from live params
            out[name] = by_id[id(tensor)]
        return out

    def _unique_weights(self):
        """(name, tensor) of the state dict, each tensor once (a tied head goes as the embedding)."""
        seen: set[int] = set()
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield name, tensor

    def weight_meta(self) -> list[weight_transport.TensorMeta]:
        """What `broadcast_weights` sends, in order, in the module's dtype (bf16 stays bf16)."""
        return [weight_transport.meta_of(name, t, getattr(t, "ds_shape", None)) for name, t in self._unique_weights()]

    def open_weight_group(self, timeout_s: float) -> int:
        """Rank 0: serve the rendezvous store of a new weight group; its port."""
        self.close_weight_group()
        self._store, port = weight_transport.open_endpoint(timeout_s)
        return port

    def join_weight_group(self, world_size: int, backend: str, timeout_s: float) -> str | None:
        """Rank 0: join as the sender once every generator joined; None, or why it could not (a
        generator that never came: reported, not raised, so the learner group stays up)."""
        try:
            self._group = weight_transport.join("", 0, 0, world_size, backend, timeout_s, store=self._store)
        except RuntimeError as err:  # gloo's connect timeout / a peer that went away
            self.close_weight_group()
            return f"{type(err).__name__}: {err}"
        return None

    def close_weight_group(self) -> None:
        self._group = self._store = None

    def broadcast_weights(self, meta: list[weight_transport.TensorMeta], bucket_bytes: int) -> dict:
        """Rank 0 broadcasts the policy to the weight group; every rank must call it (ZeRO-3
        gathers each parameter collectively). A failed broadcast (a generator died) closes the
        group and is reported, not raised: the learner group stays up, the driver falls back."""
        start = time.perf_counter()

        def gathered():
            for name, tensor in self._unique_weights():
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    # a ZeRO-3 parameter is re-partitioned when the block ends: keep a copy
                    yield name, tensor.detach().clone() if hasattr(tensor, "ds_id") else tensor.detach()

        source = gathered()
        if self.rank != 0 or self._group is None:
            for _ in source:  # only the collective gathers
                pass
            return {
                "bytes": 0,
                "seconds": time.perf_counter() - start,
                "error": None if self.rank != 0 else "no weight group: open and join one first",
            }
        try:
            n_bytes, error = weight_transport.send(self._group, meta, source, bucket_bytes), None
        except (RuntimeError, ValueError) as err:  # gloo/NCCL errors are RuntimeErrors
            n_bytes, error = 0, f"{type(err).__name__}: {err}"
            self.close_weight_group()
            for _ in source:  # the other ranks are still in the gathers
                pass
        return {"bytes": n_bytes, "seconds": time.perf_counter() - start, "error": error}


class CheckpointIO:
    """A rank's files: the policy as an HF folder (rank 0), and checkpoints (larpo_ray.checkpoint)
    of the policy, this rank's optimizer state and the step count, written and resumed from.
    Writing is collective: every rank gathers the weights, then all meet at a barrier."""

    def __init__(self, engine, tokenizer, publisher: WeightPublisher, cfg: LearnerConfig, rank: int, world_size: int):
        self.engine, self.tokenizer, self.publisher = engine, tokenizer, publisher
        self.zero_stage, self.rank, self.world_size = cfg.zero_stage, rank, world_size

    def save_pretrained(self, path: str | Path) -> None:
        """An HF folder (safetensors + tokenizer) at `path`, written by rank 0 (collective).

        Written to a temporary sibling folder and renamed into place, so readers never see half
        a checkpoint; an existing folder at `path` is replaced.
        """
        weights = self.publisher.get_weights()
        if self.rank == 0:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {id(a): torch.from_numpy(a) for a in weights.values()}
            state = {name: tensors[id(a)] for name, a in weights.items()}
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            try:
                self.engine.module.save_pretrained(tmp, state_dict=state)
                self.tokenizer.save_pretrained(tmp)
                if path.exists():
                    shutil.rmtree(path)
                os.rename(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def _base_optimizer(self):
        """The torch optimizer under DeepSpeed's wrappers (ZeRO 1-3 and bf16 keep it in
        `.optimizer`; its parameters are this rank's fp32 partitions). ZeRO-3 detaches those
        partitions from the torch optimizer between steps (its state stays keyed by them), which
        made `state_dict()` fail with a KeyError: they are attached for the save or load, as
        DeepSpeed's own ZeRO-3 state_dict does."""
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", None)
        base = inner if isinstance(inner, torch.optim.Optimizer) else opt
        attach = getattr(opt, "_set_fp32_optimizer_param_groups", None) if self.zero_stage == 3 else None
        if attach is None:
            yield base
            return
        attach()
        try:
            yield base
        finally:
            opt._clear_fp32_optimizer_param_groups()

    def save_checkpoint(self, path: str | Path, with_optimizer: bool, global_step: int) -> None:
        """The policy as `path/policy` (rank 0) and this rank's optimizer state and step count
        as `path/learner/rank-R.*` (collective). With fp32 weights the resume is exact; with bf16
        the fp32 master weights restart from the saved bf16 policy [ours: documented limit]."""
        path = Path(path)
        self.save_pretrained(path / "policy")
        extra = {
            "global_step": global_step,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "has_optimizer": with_optimizer,
        }
        if with_optimizer:
            with self._base_optimizer() as optimizer:
                save_optimizer(optimizer, path / "learner", self.rank, extra)
        else:
            (path / "learner").mkdir(parents=True, exist_ok=True)
            write_json(path / "learner" / f"rank-{self.rank}.json", extra)
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, path: Path) -> int:
        """This rank's optimizer state from checkpoint `path` (its policy is already loaded: the
        engine was built on `path/policy`); returns the saved step count."""
        meta_path = path / "learner" / f"rank-{self.rank}.json"
        if not meta_path.is_file():
            raise RuntimeError(
                f"checkpoint {path} has no learner state for rank {self.rank} "
                f"({meta_path}): resume with the learner.num_workers it was written with"
            )
        meta = json.loads(meta_path.read_text())
        if (meta["world_size"], meta["zero_stage"]) != (self.world_size, self.zero_stage):
            raise RuntimeError(
                f"checkpoint {path} was written by {meta['world_size']} learner "
                f"workers at ZeRO stage {meta['zero_stage']}; this group has "
                f"{self.world_size} at stage {self.zero_stage}: resume with "
                f"the same learner.num_workers and learner.zero_stage"
            )
        if meta["has_optimizer"]:
            with self._base_optimizer() as optimizer:
                load_optimizer(optimizer, path / "learner", self.rank)
        return int(meta["global_step"])
