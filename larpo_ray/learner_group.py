"""The learner group: data-parallel `LearnerWorker`s behind one interface, in-process or on Ray.

`LearnerGroup` declares every operation the runtime asks of the learner role. Each is one typed
request (a `Request` dataclass per kind; its `run` is what a rank does with it) that every rank
runs: most are collectives. `LocalLearnerGroup` runs them on one in-process worker (world_size 1:
tests, `resources.use_ray = false`). `RayLearnerGroup` runs `learner.num_workers` workers in a Ray
Train `TorchTrainer` (DeepSpeed inside Ray Train's gloo / NCCL process group). The workers are
long-lived: `fit()` runs in a background thread of the driver and each worker's train loop builds
its `LearnerWorker` once, then serves requests for the whole run, so iterations reuse the loaded
model, the optimizer state and the process group (no restart, no re-load). Requests go through one
Ray queue per rank (every rank gets every request); replies come back through one shared queue.
Weights travel as numpy arrays through the object store (zero-copy gets, docs/cpu.md): rank 0 puts
them and replies with the ObjectRef wrapped in a list, so the queue does not resolve it.

Failures: workers start on the newest checkpoint of the run if there is one (`--resume`). When a
worker dies or fails, Ray Train ends the group and starts it again (`faults.learner_max_failures`,
its FailureConfig); the new workers load the newest checkpoint and the pending request raises
`LearnerRestarted(iteration)`, on which the driver rolls back to that iteration. Requests carry
the group's epoch, so a request left in a queue by the dead group never reaches the new one.
This file is the only Ray code of the learner role.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from larpo_ray import checkpoint, plan
from larpo_ray.actor_logs import log_path, redirect_output
from larpo_ray.config import Config
from larpo_ray.storage import RunStorage
from larpo_ray.types import RankedList, TrainResult

if TYPE_CHECKING:
    from actors.learner import LearnerWorker

START_TIMEOUT_S = 1800.0  # workers load the model and build DeepSpeed (first run JIT-compiles)
LEARNER_CALL_TIMEOUT_S = 6 * 3600.0  # one request to the learner group, e.g. an iteration's training
POLL_S = 1.0  # how often a wait checks that the trainer thread is still alive
STOP_TIMEOUT_S = 120.0  # shutdown: the workers' reply to "stop", then fit() returning
JOIN_GRACE_S = 60.0  # joining a weight group: beyond its own timeout, the reply's way back


class LearnerRestarted(RuntimeError):
    """The learner group lost a worker and Ray Train restarted it from the last checkpoint: the
    driver rolls back to `iteration` (0: the initial policy) and continues from there."""

    def __init__(self, iteration: int, cause: str):
        super().__init__(f"learner group restarted from iteration {iteration} after: {cause}")
        self.iteration = iteration


# ---- requests: what one rank does for each operation ---------------------------------------------


@dataclass(frozen=True)
class Rank:
    """What a request runs on: one rank's worker, its rank, and the run folder (uploads). In this
    process lists and weights pass as they are; on Ray (`_RayRank`) through the object store."""

    worker: LearnerWorker
    rank: int
    storage: RunStorage | None

    def fetch(self, lists) -> list[RankedList]:
        """The lists a Train request carries."""
        return lists

    def share(self, weights: dict[str, np.ndarray]):
        """Rank 0's reply carrying the weights."""
        return weights

    def address(self) -> str:
        """Where generators reach this rank's weight group rendezvous (every role is in this process)."""
        return "127.0.0.1"


@dataclass(frozen=True)
class Request(ABC):
    """One learner operation, sent to every rank; `run` returns this rank's reply."""

    @property
    def kind(self) -> str:
        """The name in messages: the class name in snake case ("train", "save_checkpoint")."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    @abstractmethod
    def run(self, here: Rank):
        """Do the operation on one rank; its reply (None from ranks with nothing to say)."""


@dataclass(frozen=True)
class Train(Request):
    """Train one iteration on `lists` (from RayLearnerGroup: [ObjectRef] to them, put once)."""

    iteration: int
    lists: list

    def run(self, here: Rank) -> TrainResult:
        return here.worker.train_iteration(self.iteration, here.fetch(self.lists))


@dataclass(frozen=True)
class GetWeights(Request):
    """The policy's weights, numpy by HF name (collective under ZeRO-3; rank 0 replies)."""

    def run(self, here: Rank):
        weights = here.worker.publisher.get_weights()
        return here.share(weights) if here.rank == 0 else None


@dataclass(frozen=True)
class SavePolicy(Request):
    """The policy as an HF folder at `path`; rank 0 then copies it to `upload` in the run folder."""

    path: str
    upload: str | None

    def run(self, here: Rank) -> None:
        here.worker.checkpoint_io.save_pretrained(self.path)
        if self.upload and here.storage is not None and here.rank == 0:
            here.storage.push_from(Path(self.path), self.upload)


@dataclass(frozen=True)
class SaveCheckpoint(Request):
    """The learner's part of checkpoint `path`; each rank then copies its part to `upload`."""

    path: str
    with_optimizer: bool
    upload: str | None

    def run(self, here: Rank) -> None:
        here.worker.checkpoint_io.save_checkpoint(self.path, self.with_optimizer, here.worker.global_step)
        if self.upload and here.storage is not None:
            checkpoint.push_part(here.storage, Path(self.path), self.upload, here.rank)


@dataclass(frozen=True)
class WeightMeta(Request):
    """What a weight broadcast sends (names, shapes, dtypes); rank 0 replies."""

    def run(self, here: Rank):
        return here.worker.publisher.weight_meta() if here.rank == 0 else None


@dataclass(frozen=True)
class OpenWeightGroup(Request):
    """Rank 0 serves a new weight group's rendezvous on its node: (address, port)."""

    timeout_s: float

    def run(self, here: Rank):
        return (here.address(), here.worker.publisher.open_weight_group(self.timeout_s)) if here.rank == 0 else None


@dataclass(frozen=True)
class JoinWeightGroup(Request):
    """Rank 0 joins the weight group as its sender; None, or why it could not."""

    world_size: int
    backend: str
    timeout_s: float

    def run(self, here: Rank):
        if here.rank != 0:
            return None
        return here.worker.publisher.join_weight_group(self.world_size, self.backend, self.timeout_s)


@dataclass(frozen=True)
class BroadcastWeights(Request):
    """Rank 0 broadcasts the policy to the weight group (every rank: ZeRO-3 gathers are collective)."""

    meta: list
    bucket_bytes: int

    def run(self, here: Rank) -> dict:
        return here.worker.publisher.broadcast_weights(self.meta, self.bucket_bytes)


@dataclass(frozen=True)
class WorkerInfo(Request):
    """For tests and debugging: is it the same process, and are the ranks in sync?"""

    def run(self, here: Rank) -> dict:
        weights = here.worker.publisher.get_weights()
        checksum = float(sum(np.float64(w.astype(np.float64).sum()) for w in weights.values()))
        return {"pid": os.getpid(), "step": here.worker.global_step, "checksum": checksum}


# ---- the interface -------------------------------------------------------------------------------


class LearnerGroup(ABC):
    """What the runtime needs from the learner role, wherever it runs. Every operation sends one
    request to every rank (`_call`); its result is rank 0's reply unless said otherwise."""

    _epoch = 0
    _resumed_from = 0

    @abstractmethod
    def _call(self, request: Request, timeout: float = LEARNER_CALL_TIMEOUT_S) -> list:
        """Run `request` on every rank; the replies, ordered by rank."""

    def train(self, iteration: int, lists: list[RankedList]) -> TrainResult:
        """Train one LARPO iteration on `lists`; metrics are global over all workers."""
        return self._call(Train(iteration, lists))[0]

    def get_weights(self):
        """The policy's HF-named weights: dict[str, np.ndarray] locally, an ObjectRef on Ray."""
        return self._call(GetWeights())[0]

    def save(self, path: str, upload: str | None = None) -> None:
        """Write the policy as an HF folder (safetensors + tokenizer); with a run folder on a URI,
        rank 0 then copies it to `upload` there."""
        self._call(SavePolicy(path, upload))

    def save_checkpoint(self, path: str, with_optimizer: bool, upload: str | None = None) -> None:
        """Write the policy and every rank's optimizer state into checkpoint folder `path`; with a
        run folder on a URI each rank then copies its part to `upload` there."""
        self._call(SaveCheckpoint(path, with_optimizer, upload))

    @property
    def resumed_from(self) -> int:
        """Iteration of the checkpoint the workers loaded when they (re)started (0: none)."""
        return self._resumed_from

    @property
    def epoch(self) -> int:
        """Incarnation of the worker group: changes when Ray Train restarted it."""
        return self._epoch

    # The collective weight transport (larpo_ray.weight_transport): rank 0 is the sender.
    def weight_meta(self) -> list:
        """What `broadcast_weights` sends, in order (weight_transport.TensorMeta)."""
        return self._call(WeightMeta())[0]

    def open_weight_group(self, timeout_s: float) -> tuple[str, int]:
        """A new weight group's rendezvous (node IP, port), served by rank 0."""
        return self._call(OpenWeightGroup(timeout_s))[0]

    def join_weight_group(self, world_size: int, backend: str, timeout_s: float) -> str | None:
        """Rank 0 joins; returns once all `world_size - 1` generators joined too, or why not."""
        return self._call(JoinWeightGroup(world_size, backend, timeout_s), timeout=timeout_s + JOIN_GRACE_S)[0]

    def broadcast_weights(self, meta: list, bucket_bytes: int) -> dict:
        """{bytes, seconds, error} of rank 0's broadcast (error: None, or why it failed)."""
        return self._call(BroadcastWeights(meta, bucket_bytes))[0]

    def worker_info(self) -> list[dict]:
        """Per rank: pid, optimizer steps so far and a checksum of the weights (tests)."""
        return self._call(WorkerInfo())

    def shutdown(self) -> None:
        """Release the workers."""


def _worker(
    model_path: str, cfg: Config, rank: int, world_size: int, checkpoints: str | None, storage: RunStorage | None = None
):
    """A LearnerWorker on the newest checkpoint under `checkpoints` if there is one (a resumed
    run, or a restart after a failure), else on the initial policy; and that iteration. With a
    run folder on a URI the checkpoint is first copied from there (this node may not have it)."""
    from actors.learner import LearnerWorker  # DeepSpeed: imported only where a worker is built

    if checkpoints and storage is not None and storage.remote:
        checkpoint.pull_index(storage)
        newest = checkpoint.latest(checkpoints)
        if newest is not None:
            checkpoint.pull_part(storage, newest, rank)
    resume = checkpoint.latest(checkpoints) if checkpoints else None
    worker = LearnerWorker(
        model_path,
        cfg.model,
        cfg.loss,
        cfg.learner,
        cfg.loop.seed,
        rank=rank,
        world_size=world_size,
        resume_from=resume,
    )
    return worker, checkpoint.read_state(resume).iteration if resume is not None else 0


class LocalLearnerGroup(LearnerGroup):
    """One LearnerWorker in this process."""

    def __init__(self, model_path: str, cfg: Config, checkpoints: str | None = None, storage: RunStorage | None = None):
        self.storage = storage
        self.worker, self._resumed_from = _worker(model_path, cfg, 0, 1, checkpoints, storage)
        self._here = Rank(self.worker, 0, storage)

    def _call(self, request: Request, timeout: float = LEARNER_CALL_TIMEOUT_S) -> list:
        return [request.run(self._here)]


# ---- on Ray: one Ray Train worker per rank, serving requests ------------------------------------


@dataclass(frozen=True)
class _RayRank(Rank):
    """A Ray Train worker's rank: lists and weights go through the object store, wrapped in a
    list so that the queues pass the ObjectRef on instead of resolving it."""

    def fetch(self, lists) -> list[RankedList]:
        import ray

        return ray.get(lists[0])  # put once by the driver, read by every rank

    def share(self, weights: dict[str, np.ndarray]):
        import ray

        return [ray.put(weights)]

    def address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()


@dataclass(frozen=True)
class Stop(Request):
    """Ends the worker's loop after its reply (shutdown)."""

    def run(self, here: Rank) -> None:
        return None


@dataclass(frozen=True)
class _Hello:
    """Admits the worker whose `nonce` this is into the group's epoch (the one it is sent with)."""

    nonce: str


@dataclass(frozen=True)
class _Ready:
    """A (re)started worker built its LearnerWorker on checkpoint `iteration` (0: none)."""

    rank: int
    nonce: str
    iteration: int


@dataclass(frozen=True)
class _Done:
    """A rank's reply to a request of group epoch `epoch`."""

    rank: int
    epoch: int
    payload: object


@dataclass(frozen=True)
class _Failed:
    """A rank's error (its traceback); the worker then ends, and Ray Train ends the group."""

    rank: int
    epoch: int | None
    traceback: str


def _serve(config: dict) -> None:
    """Ray Train loop of one worker: build the LearnerWorker once (on the newest checkpoint, if
    any), then serve requests until `Stop`. An error is replied with its traceback, then re-raised
    so Ray Train ends the group (the other ranks may be stuck in a collective with it) and, while
    `faults.learner_max_failures` allows, starts it again.

    Requests are (epoch, Request). A new worker takes none until the driver's `_Hello` with its
    nonce assigns it the group's epoch: requests left in a queue by a group that died are
    ignored, so no rank ever enters a collective alone."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if config["log_dir"]:  # this rank's output: RUN_DIR/logs/learner-rank-R.log
        redirect_output(log_path(config["log_dir"], "learner-rank", rank), config["cfg"].logging.console == "all")
    requests, replies = config["requests"][rank], config["replies"]
    nonce, epoch = uuid.uuid4().hex, None
    try:
        worker, iteration = _worker(
            config["model_path"], config["cfg"], rank, len(config["requests"]), config["checkpoints"], config["storage"]
        )
        here = _RayRank(worker, rank, config["storage"])
        replies.put(_Ready(rank, nonce, iteration))
        while True:
            req_epoch, request = requests.get()
            if isinstance(request, _Hello):
                epoch = req_epoch if request.nonce == nonce else epoch
                continue
            if epoch is None or req_epoch != epoch:
                continue  # sent to a group that no longer exists
            replies.put(_Done(rank, epoch, request.run(here)))
            if isinstance(request, Stop):
                return
    except BaseException:
        replies.put(_Failed(rank, epoch, traceback.format_exc()))
        raise


class RayLearnerGroup(LearnerGroup):
    """`learner.num_workers` LearnerWorkers in a Ray Train TorchTrainer, serving requests."""

    def __init__(
        self,
        model_path: str,
        cfg: Config,
        checkpoints: str | None = None,
        log_dir: str | None = None,
        storage: RunStorage | None = None,
    ):
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue

        n = cfg.learner.num_workers
        scaling = plan.learner_scaling(cfg)  # resources per worker and the placement group's strategy
        use_gpu = scaling["use_gpu"]
        queue_options = {"num_cpus": 0}  # bookkeeping actors must not take the workers' CPUs
        self._requests = [Queue(actor_options=queue_options) for _ in range(n)]
        self._replies = Queue(actor_options=queue_options)
        self._storage = tempfile.TemporaryDirectory(prefix="larpo-learner-")
        self._trainer = TorchTrainer(
            _serve,
            train_loop_config={
                "model_path": model_path,
                "cfg": cfg,
                "checkpoints": checkpoints,
                "requests": self._requests,
                "replies": self._replies,
                "log_dir": log_dir,
                "storage": storage,
            },
            scaling_config=ScalingConfig(**scaling),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                storage_path=self._storage.name,
                name="learner",
                failure_config=FailureConfig(max_failures=cfg.faults.learner_max_failures),
            ),
        )
        self._error: BaseException | None = None
        self._failed = False  # the group ended after a failure: it cannot serve further requests
        self._epoch = 0  # incarnation of the worker group (Ray Train restarts it after failures)
        self._last_error: tuple[int, str] | None = None  # (rank, traceback) of the newest failure
        self._thread = threading.Thread(target=self._fit, name="learner-group", daemon=True)
        self._thread.start()
        self._ray = ray
        try:
            self._resumed_from = self._await_ready({}, START_TIMEOUT_S)
        except BaseException:
            self._failed = True  # do not wait for a "stop" reply: release what was started
            self.shutdown()
            raise

    def _fit(self) -> None:
        try:
            self._trainer.fit()
        except BaseException as err:  # surfaced by the next wait in the driver
            self._error = err

    def _call(self, request: Request, timeout: float = LEARNER_CALL_TIMEOUT_S) -> list:
        """Send `request` to every rank; the replies' payloads, ordered by rank. Raises
        LearnerRestarted if Ray Train restarted the group meanwhile (the request is void)."""
        for queue in self._requests:
            queue.put((self._epoch, request))
        return self._collect(request.kind, timeout)

    def _next_reply(self, waiting_for: str, deadline: float):
        """The next reply; raises if the group has ended (no restarts left) or at the deadline."""
        from ray.util.queue import Empty

        while True:
            try:
                return self._replies.get(timeout=POLL_S)
            except Empty:
                if not self._thread.is_alive():
                    self._failed = True
                    if self._last_error is not None:
                        rank, trace = self._last_error
                        raise RuntimeError(
                            f"learner rank {rank} failed during {waiting_for!r} "
                            f"(no restarts left: faults.learner_max_failures):\n"
                            f"{trace}"
                        ) from self._error
                    raise RuntimeError(
                        f"the learner group stopped while waiting for {waiting_for!r}: "
                        f"{self._error!r}; see the learner logs (RUN_DIR/logs/learner-rank-*.log)"
                    ) from self._error
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"learner request {waiting_for!r} got no reply in time; "
                        f"check the learner logs (RUN_DIR/logs/learner-rank-*.log)"
                    ) from None

    def _await_ready(self, ready: dict[int, _Ready], timeout: float) -> int:
        """Wait until every rank of a (re)started group reported ready, then admit it with a new
        epoch; returns the checkpoint iteration the workers loaded (0: the initial policy)."""
        deadline = time.monotonic() + timeout
        while len(ready) < len(self._requests):
            reply = self._next_reply("ready", deadline)
            if isinstance(reply, _Ready):
                ready[reply.rank] = reply  # the newest incarnation's, if several
            elif isinstance(reply, _Failed):
                self._last_error = (reply.rank, reply.traceback)
        self._epoch += 1
        for rank, queue in enumerate(self._requests):
            queue.put((self._epoch, _Hello(ready[rank].nonce)))
        iterations = {r.iteration for r in ready.values()}
        if len(iterations) != 1:
            raise RuntimeError(f"learner ranks loaded different checkpoints {sorted(iterations)}")
        return iterations.pop()

    def _collect(self, kind: str, timeout: float) -> list:
        """Wait for one reply per rank of the current epoch. A rank's error is held until Ray
        Train either restarts the group (LearnerRestarted) or ends it (RuntimeError with the
        worker's traceback)."""
        payloads: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(payloads) < len(self._requests):
            try:
                reply = self._next_reply(kind, deadline)
            except TimeoutError as err:
                raise TimeoutError(
                    f"{err} (group epoch {self._epoch}: ranks {sorted(payloads)} of "
                    f"{len(self._requests)} replied; last error: {self._last_error_line()})"
                ) from None
            if isinstance(reply, _Ready):  # Ray Train restarted the group after a failure
                cause = self._last_error_line() or "a worker died"
                self._resumed_from = self._await_ready({reply.rank: reply}, START_TIMEOUT_S)
                raise LearnerRestarted(self._resumed_from, cause)
            if reply.epoch != self._epoch:
                continue  # from a group that no longer exists
            if isinstance(reply, _Failed):
                self._last_error = (reply.rank, reply.traceback)
                continue
            payloads[reply.rank] = reply.payload
        return [payloads[r] for r in sorted(payloads)]

    def _last_error_line(self) -> str | None:
        """The last line of the newest worker traceback (the exception), if any."""
        return self._last_error[1].strip().splitlines()[-1] if self._last_error else None

    # The object store: the lists are put once and read by every rank (_RayRank.fetch); the
    # weights come back as an ObjectRef put by rank 0 (_RayRank.share).
    def train(self, iteration: int, lists: list[RankedList]) -> TrainResult:
        return self._call(Train(iteration, [self._ray.put(lists)]))[0]

    def get_weights(self):
        """An ObjectRef to the weights dict (numpy arrays), put by rank 0."""
        return super().get_weights()[0]

    def shutdown(self) -> None:
        """Stop the workers' loops (fit() then returns); after a failure, wait for Ray Train to
        end the group."""
        if self._thread.is_alive() and not self._failed:
            try:
                try:
                    self._call(Stop(), timeout=STOP_TIMEOUT_S)
                except LearnerRestarted:  # restarted meanwhile: stop the new group
                    self._call(Stop(), timeout=STOP_TIMEOUT_S)
            except (TimeoutError, RuntimeError) as err:
                # Everything the run produced is saved before shutdown: a group that does not
                # answer is abandoned (ray.shutdown reclaims its workers), not an error.
                warnings.warn(f"the learner group did not stop cleanly ({err}); leaving it to Ray's shutdown")
        self._thread.join(timeout=STOP_TIMEOUT_S)
        for queue in self._requests + [self._replies]:
            queue.shutdown()
        self._storage.cleanup()
