"""Where the roles run: the one place that applies Ray to the actor classes.

`build_runtime(cfg, ...)` returns a `Runtime` with the same methods whether the roles live in this
process (`resources.use_ray = false`: tests, debugging) or as Ray actors (generators and reward
actors as `ray.remote` classes with their resources from the config; the learner as a Ray Train
group in `larpo_ray.learner_group`). The driver only sees `Runtime`.
"""

from __future__ import annotations

import os
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from actors.generator import Generator
from actors.reward import RewardActor, ScoreReport
from larpo_ray import plan
from larpo_ray.actor_logs import log_path, redirect_output
from larpo_ray.config import Config
from larpo_ray.dispatch import Dispatcher
from larpo_ray.fleet import Fleet
from larpo_ray.learner_group import LearnerGroup, LocalLearnerGroup, RayLearnerGroup
from larpo_ray.storage import RunStorage
from larpo_ray.types import Candidate, Prompt, RankedList, ScoredCandidate, TrainResult

ACTOR_START_TIMEOUT_S = 1800.0  # generators' and reward actors' start-up (vLLM loads the model)


@dataclass
class Rollout:
    """Scored candidates of one generate-and-score pass, with what failed."""

    scored: list[ScoredCandidate] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    n_failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0
    score_seconds: float = 0.0  # summed over reward-actor calls; overlaps generation on Ray
    score_calls: int = 0  # relative rerankers: pair forwards / judge requests
    score_lists: int = 0  # relative rerankers: prompts' lists they ranked
    faults: dict[str, int] = field(default_factory=dict)  # actor failures / timeouts / re-dispatches

    def extend(self, other: Rollout) -> None:
        """Add another rollout's candidates and counts (dynamic sampling's later rounds)."""
        self.scored += other.scored
        self.candidates += other.candidates
        self.n_failed += other.n_failed
        self.generated_tokens += other.generated_tokens
        self.score_seconds += other.score_seconds
        self.score_calls += other.score_calls
        self.score_lists += other.score_lists
        for mine, theirs in ((self.failures, other.failures), (self.faults, other.faults)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n

    def add(self, candidates: list[Candidate], report: ScoreReport) -> None:
        self.candidates += candidates
        self.scored += report.scored
        self.n_failed += report.n_failed
        for reason, n in report.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n
        self.generated_tokens += sum(len(c.token_ids) for c in candidates)
        self.score_seconds += report.seconds
        self.score_calls += report.calls
        self.score_lists += report.lists


def batches(prompts: Sequence[Prompt], size: int) -> list[list[Prompt]]:
    return [list(prompts[i : i + size]) for i in range(0, len(prompts), size)]


class Runtime(ABC):
    """The roles of one run. Subclasses differ only in where the roles execute."""

    def __init__(self, cfg: Config, learner: LearnerGroup | None) -> None:
        self.cfg = cfg
        self.learner = learner

    @abstractmethod
    def rollout(
        self,
        prompts: Sequence[Prompt],
        temperatures: list[float],
        iteration: int,
        max_new_tokens: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        seed: int | None = None,
        batch_prompts: int | None = None,
    ) -> Rollout:
        """Generate len(temperatures) candidates per prompt (0.0 = greedy) and score them; with a
        `seed`, candidates depend only on (seed, prompt, slot) (actors.generator.sample_seed).
        Prompts go to the actors in batches of `batch_prompts` (default generation.batch_prompts)."""

    @abstractmethod
    def compare(self, prompts: Sequence[Prompt], responses: Sequence[str], baselines: Sequence[str]) -> list:
        """A relative reranker's margin of each response over its baseline (`RewardActor.compare`)."""

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

    def save_policy(self, path: str, upload: str | None = None) -> None:
        """The policy as an HF folder at `path` (and, for a run folder on a URI, at `upload` there)."""
        self.learner.save(path, upload)

    def save_checkpoint(self, path: str, with_optimizer: bool, upload: str | None = None) -> None:
        """The learner's part of a checkpoint (policy + optimizer state) into folder `path` (and,
        for a run folder on a URI, at `upload` there)."""
        self.learner.save_checkpoint(path, with_optimizer, upload)

    @property
    def resumed_from(self) -> int:
        """Checkpoint iteration the learner (re)started from (0: the initial policy)."""
        return self.learner.resumed_from if self.learner is not None else 0

    def shutdown(self) -> None:
        if self.learner is not None:
            self.learner.shutdown()


class LocalRuntime(Runtime):
    """Every role in this process, one after the other (no overlap, no fault handling)."""

    def __init__(self, cfg: Config, policy_path: str, with_learner: bool = True, run: RunStorage | None = None) -> None:
        checkpoints = _in(run, "checkpoints")
        super().__init__(cfg, LocalLearnerGroup(policy_path, cfg, checkpoints, run) if with_learner else None)
        self.generator = Generator(policy_path, cfg.generation, cfg.model)
        self.reward = RewardActor(cfg.reward, trust_remote_code=cfg.model.trust_remote_code)

    def rollout(
        self, prompts, temperatures, iteration, max_new_tokens=None, on_batch=None, seed=None, batch_prompts=None
    ) -> Rollout:
        out, by_uid = Rollout(), {p.uid: p for p in prompts}
        for batch in batches(prompts, batch_prompts or self.cfg.generation.batch_prompts):
            cands = self.generator.generate(batch, temperatures, max_new_tokens, seed)
            out.add(cands, self.reward.score(by_uid, cands, iteration))
            if on_batch:
                on_batch(len(batch))
        return out

    def compare(self, prompts, responses, baselines) -> list:
        return self.reward.compare(prompts, responses, baselines)

    def load_weights(self, version, weights) -> list[dict]:
        return [self.generator.load_weights(version, weights)]

    def shutdown(self) -> None:
        super().shutdown()
        self.generator.close()  # vLLM: its engine-core and worker processes, now


class RayRuntime(Runtime):
    """Generators and reward actors as Ray actors; the learner as a Ray Train group.

    Prompt batches go to the first generator with room (at most two calls each, larpo_ray/dispatch.py);
    as soon as a batch is generated it is sent to a reward actor, so scoring overlaps the generation
    of the next batches.

    Faults (`cfg.faults`): an actor whose process dies is restarted by Ray (`max_restarts`), or
    replaced once its restarts are spent; one that returns nothing for `call_timeout_s` is killed
    and restarted. Its unfinished batches go to the least busy actor; a restarted generator first
    re-loads the current weight version. Results are kept per batch, so no prompt is lost or
    counted twice, and with a seed a re-dispatched batch yields the very same candidates. An error
    raised by the work itself (e.g. a prompt too long) is not retried: it stops the rollout.
    Actor health is `self.fleet` (larpo_ray/fleet.py); a rollout's calls, a `Dispatcher`
    (larpo_ray/dispatch.py).
    """

    def __init__(self, cfg: Config, policy_path: str, with_learner: bool = True, run: RunStorage | None = None) -> None:
        import ray

        checkpoints, log_dir = _in(run, "checkpoints"), _in(run, "logs")
        self.cfg, self.policy_path, self.log_dir = cfg, policy_path, log_dir
        sizes = {"generator": cfg.generation.num_generators, "reward": cfg.reward.num_actors}
        self.fleet = Fleet(  # the actors, their deaths and replacements, the generators' weight versions
            {role: [self._spawn(role, i) for i in range(n)] for role, n in sizes.items()},
            spawn=self._spawn,
            max_restarts=cfg.faults.actor_max_restarts,
            fetch_weights=lambda: self.learner.get_weights(),  # after a gloo / nccl sync, when first needed
        )
        ray.get([a.ping.remote() for a in self.generators + self.rewards], timeout=ACTOR_START_TIMEOUT_S)
        super().__init__(cfg, RayLearnerGroup(policy_path, cfg, checkpoints, log_dir, run) if with_learner else None)
        self._weight_group: tuple | None = None  # gloo / nccl: (learner epoch, generator pids) it was opened for
        self._weight_meta: list | None = None  # what the learner broadcasts (names, shapes, dtypes)

    @property
    def generators(self) -> list:
        return self.fleet.actors("generator")

    @property
    def rewards(self) -> list:
        return self.fleet.actors("reward")

    def _spawn(self, role: str, slot: int):
        """A new generator or reward actor for `slot` with its resources (plan.py), restart policy
        and log file (RUN_DIR/logs/<role>-<slot>.log)."""
        import ray

        restarts = {"max_restarts": self.cfg.faults.actor_max_restarts, "max_task_retries": 0}
        if role == "generator":
            cls = ray.remote(self._logged(Generator, role, slot)).options(
                **plan.actor_options(self.cfg, "generator"),  # CPUs, GPUs, memory, custom resources (plan.py)
                runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(self.cfg.generation.cpu_kvcache_gb)}},
                **restarts,
            )
            return cls.remote(self.policy_path, self.cfg.generation, self.cfg.model)
        cls = ray.remote(self._logged(RewardActor, role, slot)).options(
            **plan.actor_options(self.cfg, "reward"), **restarts
        )
        return cls.remote(self.cfg.reward, self.cfg.model.trust_remote_code)

    def _logged(self, cls: type, role: str, slot: int) -> type:
        """`cls` whose process first sends its output to RUN_DIR/logs/<role>-<slot>.log (and, with
        logging.console = all, on to the console as well)."""
        if self.log_dir is None:
            return cls
        path, tee = str(log_path(self.log_dir, role, slot)), self.cfg.logging.console == "all"

        def __init__(actor, *args, **kwargs):
            redirect_output(path, tee)
            cls.__init__(actor, *args, **kwargs)

        return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})

    def log_file(self, role: str, slot: int) -> str:
        """Where an actor's output goes (for error messages)."""
        return str(log_path(self.log_dir, role, slot)) if self.log_dir else "the Ray worker logs (ray logs)"

    def rollout(
        self, prompts, temperatures, iteration, max_new_tokens=None, on_batch=None, seed=None, batch_prompts=None
    ) -> Rollout:
        work = batches(prompts, batch_prompts or self.cfg.generation.batch_prompts)
        args = (temperatures, max_new_tokens, seed)
        pool = Dispatcher(self.fleet, self.cfg.faults, self.log_file, work, args, iteration)
        for b in range(len(work)):
            pool.generate(b)
        out = Rollout()
        for b, cands, report in pool.results(on_batch):
            out.add(cands, report)
        out.faults = dict(pool.faults)
        return out

    def compare(self, prompts, responses, baselines) -> list:
        """On the first reward actor that answers (a few dozen pairs: not worth spreading)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        failed = []
        for i, actor in enumerate(self.rewards):
            try:
                ref = actor.compare.remote(list(prompts), list(responses), list(baselines))
                return ray.get(ref, timeout=self.cfg.faults.call_timeout_s)
            except (RayActorError, GetTimeoutError) as err:
                failed.append(f"reward actor {i}: {type(err).__name__}")
        raise RuntimeError(
            f"no reward actor could judge the held-out replies against the initial policy's ({'; '.join(failed)}); "
            f"see {self.log_file('reward', 0)}"
        )

    def load_weights(self, version, weights) -> list[dict]:
        """Every generator loads `weights` (an ObjectRef to numpy arrays: a zero-copy get on this
        node); one that is down is marked stale and loads them before its next batch."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        self.fleet.set_weights(version, weights)  # an ObjectRef: kept for generators that restart later
        refs = [g.load_weights.remote(version, weights) for g in self.generators]
        reports = []
        for i, ref in enumerate(refs):
            try:
                reports.append(ray.get(ref, timeout=self.cfg.faults.call_timeout_s))
                self.fleet.loaded(i, version)
            except (RayActorError, GetTimeoutError) as err:
                warnings.warn(
                    f"generator {i} could not load weights version {version} ({type(err).__name__}); "
                    f"it will load them before its next batch"
                )
                self.fleet.mark_stale(i)
        return reports

    def sync_weights(self, version: int) -> dict[str, float]:
        """object_store: the learner's rank 0 puts numpy arrays once; every generator reads them
        (zero-copy on its node). gloo / nccl: rank 0 broadcasts to every generator in a group of
        their own (larpo_ray.weight_transport), opened at the first sync and re-opened when a
        member restarted. If a broadcast fails (a generator died during it), this sync falls back
        to the object store and the next one re-opens the group."""
        transport = self.cfg.generation.weight_transport
        if transport == "object_store" or self.learner is None:
            return super().sync_weights(version)
        start = time.perf_counter()
        try:
            reports = self._broadcast(version)
        except WeightSyncFailed as err:
            warnings.warn(
                f"{transport} weight sync of version {version} failed ({err}); falling back to "
                f"the object store; the group re-opens at the next sync"
            )
            self._weight_group = None
            return {**super().sync_weights(version), "fallbacks": 1.0}
        seconds = time.perf_counter() - start
        # No ObjectRef is left: one is fetched if a generator restarts later; in async mode now, as the
        # learner will be training (on to the next version) when a generator restarts mid-rollout.
        self.fleet.set_weights(version, self.learner.get_weights() if self.cfg.loop.mode == "async" else None)
        for i in range(len(reports)):
            self.fleet.loaded(i, version)
        n_bytes = float(reports[0]["bytes"])
        return {
            "bytes": n_bytes,
            "seconds": seconds,
            "fallbacks": 0.0,
            "gb_per_s": n_bytes * len(reports) / max(seconds, 1e-9) / 1e9,
        }

    def _broadcast(self, version: int) -> list[dict]:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        bucket = self.cfg.generation.weight_bucket_mb << 20
        timeout = self.cfg.faults.call_timeout_s
        try:
            self._open_weight_group(timeout)
            refs = [g.receive_weights.remote(version, self._weight_meta, bucket) for g in self.generators]
            sent = self.learner.broadcast_weights(self._weight_meta, bucket)
            if sent["error"]:
                raise WeightSyncFailed(f"learner rank 0: {sent['error']}")
            return ray.get(refs, timeout=timeout)
        except (RayError, GetTimeoutError) as err:  # a generator died, restarts or hangs
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise WeightSyncFailed(f"a generator: {type(err).__name__}: {first_line}") from err

    def _open_weight_group(self, timeout: float) -> None:
        """The learner's rank 0 and every generator in one group, unless the current one still
        has the same members (no learner restart, no generator restart since)."""
        import ray

        members = (self.learner.epoch, tuple(ray.get([g.ping.remote() for g in self.generators], timeout=timeout)))
        if self._weight_group == members:
            return
        self._weight_group = None
        if self._weight_meta is None:
            self._weight_meta = self.learner.weight_meta()
        backend, world = self.cfg.generation.weight_transport, len(self.generators) + 1
        addr, port = self.learner.open_weight_group(timeout)
        joins = [
            g.join_weight_group.remote(addr, port, i + 1, world, backend, timeout)
            for i, g in enumerate(self.generators)
        ]
        error = self.learner.join_weight_group(world, backend, timeout)  # returns once all joined
        if error:
            raise WeightSyncFailed(f"learner rank 0 could not open the group: {error}")
        ray.get(joins, timeout=timeout)
        self._weight_group = members

    def shutdown(self) -> None:
        import ray

        super().shutdown()
        for actor in self.generators + self.rewards:
            ray.kill(actor, no_restart=True)


class WeightSyncFailed(RuntimeError):
    """A gloo / nccl broadcast did not reach every generator (RayRuntime falls back)."""


def init_ray(cfg: Config) -> None:
    """Join the cluster at resources.ray_address / $RAY_ADDRESS (`ray job submit` sets it); else
    the cluster `ray start` recorded on this machine if it answers; else start a local instance.
    `resources.ray_address = local` always starts one. A recorded cluster that does not answer
    (stopped without `ray stop`) is reported and passed over.

    A local instance declares at least as many logical CPUs as the roles ask for: on a 2-core
    machine the phases take turns on the cores (generation, then training), so the roles' CPU
    requests describe a share, not exclusive cores. It also offers the custom resources the roles
    name (resources.*_resources), which a cluster's node types provide. Unless logging.console =
    all, the actors' output stays in their log files and Ray's own INFO lines stay off the console.
    """
    import logging

    import ray

    if ray.is_initialized():
        return
    quiet = {
        "log_to_driver": cfg.logging.console == "all",
        "logging_level": logging.INFO if cfg.logging.console == "all" else logging.WARNING,
    }
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        print(f"larpo-ray: joining the Ray cluster at {address}", flush=True)
        ray.init(address=address, **quiet)
        return
    recorded = None if address == "local" else _recorded_cluster()
    if recorded is not None:
        print(
            f"larpo-ray: joining the Ray cluster running on this machine at {recorded} (started with "
            f"`ray start`; --resources.ray_address local starts a separate one)",
            flush=True,
        )
        ray.init(address=recorded, **quiet)
        return
    local = plan.local_node(cfg).capacity
    ray.init(
        address="local",
        num_cpus=int(local.cpus),
        resources=local.custom or None,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": "larpo_ray.topology.quiet_without_dashboard"},
        **quiet,
    )


def _recorded_cluster() -> str | None:
    """The address of the cluster `ray start` recorded on this machine, if its GCS answers."""
    import socket

    from ray._private.utils import get_ray_address_file, read_ray_address

    address = read_ray_address()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return address
    except (OSError, ValueError):
        warnings.warn(
            f"Ray records a cluster at {address} ({get_ray_address_file(None)}) but nothing answers "
            f"there (stopped without `ray stop`?): starting a local Ray instance for this run instead"
        )
        return None


def quiet_without_dashboard() -> None:
    """Runs in every worker of a local instance (started without the dashboard, to spare the
    cores). Ray Train's PlacementGroupCleaner asks the dashboard's state API every second whether
    the controller lives and, with no dashboard, warns "Failed to query Ray Train Controller actor
    state" each time: about 40 lines a minute on the console. Its warnings are dropped here; its
    errors stay. (On a cluster the dashboard runs and the cleaner works.)"""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def build_runtime(cfg: Config, policy_path: str, with_learner: bool = True, run: RunStorage | None = None) -> Runtime:
    """The run's roles; `with_learner=False` for evaluation-only runs (generators + scorers).
    `run` is the run folder, resolved once by the driver and handed to every role: the learner
    starts on its newest checkpoint if there is one, and on Ray each actor's output goes to a file
    in RUN_DIR/logs."""
    if not cfg.resources.use_ray:
        return LocalRuntime(cfg, policy_path, with_learner, run)
    init_ray(cfg)
    return RayRuntime(cfg, policy_path, with_learner, run)


def _in(run: RunStorage | None, name: str) -> str | None:
    """A folder of the run (local path; the same path on every node for a run on a URI)."""
    return None if run is None else f"{run.local}/{name}"
