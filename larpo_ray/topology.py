"""Where the roles run: the one place that applies Ray to the actor classes.

`build_runtime(cfg, ...)` returns a `Runtime` with the same methods whether the roles live in this
process (`resources.use_ray = false`: tests, debugging) or as Ray actors (generators and reward
actors as `ray.remote` classes with their resources from the config; the learner as a Ray Train
group in `larpo_ray.learner_group`). The driver only sees `Runtime`.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from actors.generator import Generator
from actors.reward import RewardActor, ScoreReport
from larpo_ray import plan
from larpo_ray.config import Config
from larpo_ray.learner_group import LocalLearnerGroup, RayLearnerGroup
from larpo_ray.types import Candidate, Prompt, RankedList, ScoredCandidate, TrainResult

CALL_TIMEOUT_S = 1800.0  # one generate / score call; generous: a 7B batch on a busy GPU is slow


@dataclass
class Rollout:
    """Scored candidates of one generate-and-score pass, with what failed."""

    scored: list[ScoredCandidate] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    n_failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0
    score_seconds: float = 0.0  # summed over reward-actor calls; overlaps generation on Ray

    def add(self, candidates: list[Candidate], report: ScoreReport) -> None:
        self.candidates += candidates
        self.scored += report.scored
        self.n_failed += report.n_failed
        for reason, n in report.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n
        self.generated_tokens += sum(len(c.token_ids) for c in candidates)
        self.score_seconds += report.seconds


def batches(prompts: Sequence[Prompt], size: int) -> list[list[Prompt]]:
    return [list(prompts[i : i + size]) for i in range(0, len(prompts), size)]


class Runtime(ABC):
    """The roles of one run. Subclasses differ only in where the roles execute."""

    def __init__(self, cfg: Config, learner) -> None:
        self.cfg = cfg
        self.learner = learner

    @abstractmethod
    def rollout(self, prompts: Sequence[Prompt], temperatures: list[float], iteration: int,
                max_new_tokens: int | None = None, on_batch: Callable[[int], None] | None = None) -> Rollout:
        """Generate len(temperatures) candidates per prompt (0.0 = greedy) and score them."""

    @abstractmethod
    def load_weights(self, version: int, weights) -> list[dict]:
        """Load learner weights into every generator; one {version, bytes, seconds} per generator."""

    def train(self, iteration: int, lists: list[RankedList]) -> TrainResult:
        return self.learner.train(iteration, lists)

    def sync_weights(self, version: int) -> dict[str, float]:
        """Learner -> every generator; returns bytes, seconds and GB/s of the sync."""
        start = time.perf_counter()
        weights = self.learner.get_weights()
        reports = self.load_weights(version, weights)
        seconds = time.perf_counter() - start
        n_bytes = float(reports[0]["bytes"]) if reports else 0.0
        return {"bytes": n_bytes, "seconds": seconds, "gb_per_s": n_bytes * len(reports) / max(seconds, 1e-9) / 1e9}

    def save_policy(self, path: str) -> None:
        self.learner.save(path)

    def shutdown(self) -> None:
        if self.learner is not None:
            self.learner.shutdown()


class LocalRuntime(Runtime):
    """Every role in this process, one after the other (no overlap)."""

    def __init__(self, cfg: Config, policy_path: str, with_learner: bool = True) -> None:
        super().__init__(cfg, LocalLearnerGroup(policy_path, cfg) if with_learner else None)
        self.generator = Generator(policy_path, cfg.generation, cfg.model)
        self.reward = RewardActor(cfg.reward, trust_remote_code=cfg.model.trust_remote_code)

    def rollout(self, prompts, temperatures, iteration, max_new_tokens=None, on_batch=None) -> Rollout:
        out, by_uid = Rollout(), {p.uid: p for p in prompts}
        for batch in batches(prompts, self.cfg.generation.batch_prompts):
            cands = self.generator.generate(batch, temperatures, max_new_tokens)
            out.add(cands, self.reward.score(by_uid, cands, iteration))
            if on_batch:
                on_batch(len(batch))
        return out

    def load_weights(self, version, weights) -> list[dict]:
        return [self.generator.load_weights(version, weights)]

    def shutdown(self) -> None:
        super().shutdown()
        self.generator.close()  # vLLM: its engine-core and worker processes, now


class RayRuntime(Runtime):
    """Generators and reward actors as Ray actors; the learner as a Ray Train group.

    Prompt batches go round-robin to the generators; as soon as a batch is generated it is sent to
    a reward actor, so scoring overlaps the generation of the next batches.
    """

    def __init__(self, cfg: Config, policy_path: str, with_learner: bool = True) -> None:
        import ray

        gen_cls = ray.remote(Generator).options(
            **plan.actor_options(cfg, "generator"),  # CPUs, GPUs, memory, custom resources (plan.py)
            runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(cfg.generation.cpu_kvcache_gb)}})
        reward_cls = ray.remote(RewardActor).options(**plan.actor_options(cfg, "reward"))
        self.generators = [gen_cls.remote(policy_path, cfg.generation, cfg.model) for _ in range(cfg.generation.num_generators)]
        self.rewards = [reward_cls.remote(cfg.reward, cfg.model.trust_remote_code) for _ in range(cfg.reward.num_actors)]
        ray.get([a.ping.remote() for a in self.generators + self.rewards], timeout=CALL_TIMEOUT_S)
        super().__init__(cfg, RayLearnerGroup(policy_path, cfg) if with_learner else None)

    def rollout(self, prompts, temperatures, iteration, max_new_tokens=None, on_batch=None) -> Rollout:
        import ray

        out = Rollout()
        pending: dict = {}  # generate ref -> its prompt batch
        for i, batch in enumerate(batches(prompts, self.cfg.generation.batch_prompts)):
            pending[self.generators[i % len(self.generators)].generate.remote(batch, temperatures, max_new_tokens)] = batch
        scoring = []  # (score ref, candidates)
        n_done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=CALL_TIMEOUT_S)
            if not ready:
                raise TimeoutError(f"no generator answered within {CALL_TIMEOUT_S:.0f} s; check the generator actors' logs (ray logs)")
            batch = pending.pop(ready[0])
            cands = ray.get(ready[0])
            actor = self.rewards[n_done % len(self.rewards)]
            scoring.append((actor.score.remote({p.uid: p for p in batch}, cands, iteration), cands))
            n_done += 1
            if on_batch:
                on_batch(len(batch))
        for ref, cands in scoring:
            out.add(cands, ray.get(ref, timeout=CALL_TIMEOUT_S))
        return out

    def load_weights(self, version, weights) -> list[dict]:
        import ray

        # `weights` is an ObjectRef to numpy arrays: each generator gets it zero-copy on this node.
        return ray.get([g.load_weights.remote(version, weights) for g in self.generators], timeout=CALL_TIMEOUT_S)

    def shutdown(self) -> None:
        import ray

        super().shutdown()
        for actor in self.generators + self.rewards:
            ray.kill(actor)


def init_ray(cfg: Config) -> None:
    """Join the cluster at resources.ray_address / $RAY_ADDRESS, else start a local one.

    A local instance declares at least as many logical CPUs as the roles ask for: on a 2-core
    machine the phases take turns on the cores (generation, then training), so the roles' CPU
    requests describe a share, not exclusive cores. It also offers the custom resources the roles
    name (resources.*_resources), which a cluster's node types provide.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    local = plan.local_node(cfg).capacity
    ray.init(num_cpus=int(local.cpus), resources=local.custom or None, include_dashboard=False)


def build_runtime(cfg: Config, policy_path: str, with_learner: bool = True) -> Runtime:
    """The run's roles; `with_learner=False` for evaluation-only runs (generators + scorers)."""
    if not cfg.resources.use_ray:
        return LocalRuntime(cfg, policy_path, with_learner)
    init_ray(cfg)
    return RayRuntime(cfg, policy_path, with_learner)
