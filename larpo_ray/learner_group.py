"""The learner group: data-parallel `LearnerWorker`s behind one interface, in-process or on Ray.

`LocalLearnerGroup` holds one in-process worker (world_size 1: tests, `resources.use_ray = false`).
`RayLearnerGroup` runs `learner.num_workers` workers in a Ray Train `TorchTrainer` (DeepSpeed inside
Ray Train's gloo / NCCL process group). The workers are long-lived: `fit()` runs in a background
thread of the driver and each worker's train loop builds its `LearnerWorker` once, then serves
requests for the whole run, so iterations reuse the loaded model, the optimizer state and the
process group (no restart, no re-load). Requests go through one Ray queue per rank (every rank
gets every request: the operations are collectives); replies come back through one shared queue.
Weights travel as numpy arrays through the object store (zero-copy gets, ENV.md): rank 0 puts
them and replies with the ObjectRef wrapped in a list, so the queue does not resolve it.
This file is the only Ray code of the learner role.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import traceback
from abc import ABC, abstractmethod

import numpy as np

from larpo_ray import plan
from larpo_ray.config import Config
from larpo_ray.types import RankedList, TrainResult

START_TIMEOUT_S = 1800.0  # workers load the model and build DeepSpeed (first run JIT-compiles)
CALL_TIMEOUT_S = 6 * 3600.0  # one request, e.g. an iteration's training
POLL_S = 1.0  # how often a wait checks that the trainer thread is still alive


class LearnerGroup(ABC):
    """What the driver needs from the learner role, wherever it runs."""

    @abstractmethod
    def train(self, iteration: int, lists: list[RankedList]) -> TrainResult:
        """Train one LARPO iteration on `lists`; metrics are global over all workers."""

    @abstractmethod
    def get_weights(self):
        """The policy's HF-named weights: dict[str, np.ndarray] locally, an ObjectRef on Ray."""

    @abstractmethod
    def save(self, path: str) -> None:
        """Write the policy as an HF folder (safetensors + tokenizer)."""

    def shutdown(self) -> None:
        """Release the workers."""


def _worker(model_path: str, cfg: Config, rank: int, world_size: int):
    from actors.learner import LearnerWorker  # DeepSpeed: imported only where a worker is built

    return LearnerWorker(model_path, cfg.model, cfg.loss, cfg.learner, cfg.loop.seed,
                         rank=rank, world_size=world_size)


class LocalLearnerGroup(LearnerGroup):
    """One LearnerWorker in this process."""

    def __init__(self, model_path: str, cfg: Config):
        self.worker = _worker(model_path, cfg, rank=0, world_size=1)

    def train(self, iteration: int, lists: list[RankedList]) -> TrainResult:
        return self.worker.train_iteration(iteration, lists)

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.worker.get_weights()

    def save(self, path: str) -> None:
        self.worker.save_pretrained(path)


def _serve(config: dict) -> None:
    """Ray Train loop of one worker: build the LearnerWorker once, then serve requests until
    "stop". An error is replied with its traceback, then re-raised so Ray Train ends the group
    (the other ranks may be stuck in a collective with it)."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    requests, replies = config["requests"][rank], config["replies"]
    try:
        worker = _worker(config["model_path"], config["cfg"], rank, len(config["requests"]))
        replies.put((rank, "ready", True, None))
        while True:
            kind, args = requests.get()
            if kind == "stop":
                replies.put((rank, kind, True, None))
                return
            replies.put((rank, kind, True, _handle(worker, rank, kind, args)))
    except BaseException:
        replies.put((rank, "error", False, traceback.format_exc()))
        raise


def _handle(worker, rank: int, kind: str, args: tuple):
    """Run one request on one rank; the reply payload."""
    import ray

    if kind == "train":
        iteration, lists_ref = args
        return worker.train_iteration(iteration, ray.get(lists_ref[0]))
    if kind == "get_weights":
        weights = worker.get_weights()  # collective under ZeRO-3
        return [ray.put(weights)] if rank == 0 else None
    if kind == "save":
        return worker.save_pretrained(args[0])
    if kind == "info":  # for tests and debugging: is it the same process, and in sync?
        weights = worker.get_weights()
        checksum = float(sum(np.float64(w.astype(np.float64).sum()) for w in weights.values()))
        return {"pid": os.getpid(), "step": worker.global_step, "checksum": checksum}
    raise ValueError(f"unknown learner request {kind!r}")


class RayLearnerGroup(LearnerGroup):
    """`learner.num_workers` LearnerWorkers in a Ray Train TorchTrainer, serving requests."""

    def __init__(self, model_path: str, cfg: Config):
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue

        start = time.perf_counter()
        n = cfg.learner.num_workers
        scaling = plan.learner_scaling(cfg)  # resources per worker and the placement group's strategy
        use_gpu = scaling["use_gpu"]
        queue_options = {"num_cpus": 0}  # bookkeeping actors must not take the workers' CPUs
        self._requests = [Queue(actor_options=queue_options) for _ in range(n)]
        self._replies = Queue(actor_options=queue_options)
        self._storage = tempfile.TemporaryDirectory(prefix="larpo-learner-")
        self._trainer = TorchTrainer(
            _serve,
            train_loop_config={"model_path": model_path, "cfg": cfg,
                               "requests": self._requests, "replies": self._replies},
            scaling_config=ScalingConfig(**scaling),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(storage_path=self._storage.name, name="learner"))
        self._error: BaseException | None = None
        self._failed = False  # a rank failed: the group cannot serve further requests
        self._thread = threading.Thread(target=self._fit, name="learner-group", daemon=True)
        self._thread.start()
        self._ray = ray
        try:
            self._collect("ready", START_TIMEOUT_S)
        except BaseException:
            self._failed = True  # do not wait for a "stop" reply: release what was started
            self.shutdown()
            raise
        self.start_seconds = time.perf_counter() - start

    def _fit(self) -> None:
        try:
            self._trainer.fit()
        except BaseException as err:  # surfaced by the next wait in the driver
            self._error = err

    def _call(self, kind: str, *args, timeout: float = CALL_TIMEOUT_S) -> list:
        """Send a request to every rank; the replies' payloads, ordered by rank."""
        for queue in self._requests:
            queue.put((kind, args))
        return self._collect(kind, timeout)

    def _collect(self, kind: str, timeout: float) -> list:
        """Wait for one reply per rank; re-raise a worker's error with its traceback."""
        from ray.util.queue import Empty

        payloads: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(payloads) < len(self._requests):
            try:
                rank, got, ok, payload = self._replies.get(timeout=POLL_S)
            except Empty:
                if not self._thread.is_alive():
                    self._failed = True
                    raise RuntimeError(f"the learner group stopped while waiting for {kind!r}: "
                                       f"{self._error!r}; see the Ray Train worker logs") from self._error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"learner request {kind!r} got no reply from "
                                       f"{len(self._requests) - len(payloads)} rank(s) in "
                                       f"{timeout:.0f} s; check the Ray Train worker logs") from None
                continue
            if not ok:
                self._failed = True
                raise RuntimeError(f"learner rank {rank} failed during {kind!r}:\n{payload}")
            if got != kind:  # a reply left over from a request that failed on another rank
                raise RuntimeError(f"learner rank {rank} answered {got!r} to {kind!r}: the group "
                                   f"is out of step after an earlier error; shut it down")
            payloads[rank] = payload
        return [payloads[r] for r in sorted(payloads)]

    def train(self, iteration: int, lists: list[RankedList]) -> TrainResult:
        lists_ref = self._ray.put(lists)  # stored once, read by every rank
        return self._call("train", iteration, [lists_ref])[0]

    def get_weights(self):
        """An ObjectRef to the weights dict (numpy arrays), put by rank 0."""
        return self._call("get_weights")[0][0]

    def save(self, path: str) -> None:
        self._call("save", path)

    def worker_info(self) -> list[dict]:
        """Per rank: pid, optimizer steps so far and a checksum of the weights (tests)."""
        return self._call("info")

    def shutdown(self) -> None:
        """Stop the workers' loops (fit() then returns); after a failure, wait for Ray Train to
        end the group."""
        if self._thread.is_alive() and not self._failed:
            self._call("stop", timeout=120.0)
        self._thread.join(timeout=120.0)
        for queue in self._requests + [self._replies]:
            queue.shutdown()
        self._storage.cleanup()
