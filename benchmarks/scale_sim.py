"""Scale simulation: the real rollout driver against many simulated generator and reward actors.

`RayRuntime.rollout` (larpo_ray/topology.py, with its fault-handling `Dispatcher` in
larpo_ray/dispatch.py) is the code under test: it sends each prompt batch to the first generator
with room (at most two calls each), each finished batch to a reward actor, and collects the scored
candidates. Here its actors are Ray actors of `SimGenerator` / `SimReward`, which implement the
same methods as `actors.generator.Generator` / `actors.reward.RewardActor` but only sleep:

    generate  prefill + step_time x (longest response of the batch): engines decode a batch in
              lock-step, so the batch waits for its longest sample. Response lengths are lognormal
              (clipped to max_new_tokens), the per-token step time lognormal per batch.
    score     a fixed latency per call plus a per-candidate cost, with +-10% jitter.

Every draw is seeded by the batch's first prompt (and the rollout's seed), not by the actor: a
batch takes as long whichever actor runs it, so two dispatch policies or two loops run the very same
work. Defaults model a 7B policy on one GPU per generator (25 ms per decode step, median 150-token
responses, 50 ms prefill: ~12 s per batch of 8 prompts x k = 4) and a reward model (~0.26 s per
batch), compressed by `--time-scale` (0.2: a 12 s batch sleeps 2.4 s) so the runs fit in minutes.
Compression makes the overheads 5x larger relative to the work than at real speed (pessimistic).

Weak scaling: every generator gets `--batches-per-generator` (8) batches of 8 prompts, so 64
generators roll out 4096 prompts (16,384 samples). Reward actors: n / 4, at least 1. Two parts:

dispatch  the same rollouts (`--repeats` seeds) under the round-robin dispatch the runtime had
          before (every batch sent at once, in turn: `RoundRobinDispatcher`, here only) and its
          first-free dispatch. Per rollout:
    scaling efficiency  generator busy seconds / (n x wall) = throughput / (n x the throughput of
                    one generator running the same batches back to back), 1.0 = linear
    ideal makespan  the recorded sleeps replayed with zero overhead on the same assignment: each
                    generator runs its batches back to back, finished batches go to the reward
                    actors in completion order, each reward actor first-in first-out
    overhead/sample (wall - ideal makespan) / samples: everything that is not simulated work
                    (driver, Ray scheduling, serialization, the actors' own Python, all on the same
                    2 cores as the driver)
    driver CPU/sample  time.process_time() of this (driver) process over the rollout / samples
loop      `--iterations` iterations of a 7B run, sync (rollout, then train) against async (the next
          iteration's rollout runs in a background thread, as the async loop calls
          `RayRuntime.rollout`, while the main thread trains). Training is a sleep of the time a
          7B learner takes on the rollout's tokens (prompt + response): 6,900 tokens/s per learner
          GPU, i.e. this repo's H200 measurement on the 3B shape (results/gpu_learner_step_h200_3b
          .json: 17,314 train + 58,931 reference-forward tokens/s at MFU 0.44) scaled by 3.6/7 B
          parameters, on `--learner-gpus-per-generator` (0.25: 16 learner GPUs for 64 generators)
          GPUs; weight sync is left out. Per mode: the steady-state iteration time (between
          consecutive training starts: sync, train + rollout; async, the longer of the two) and
          samples/s.

    python benchmarks/scale_sim.py                       # 8 and 64 generators: ~10 min + actor start-up
    python benchmarks/scale_sim.py --smoke               # 2 and 4 generators, seconds
    python benchmarks/scale_sim.py --parts dispatch --generators 64 --batches-per-generator 16 --time-scale 0.1
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, cpu_environment, describe, save, table  # noqa: E402

cpu_environment()

from actors.reward import ScoreReport  # noqa: E402
from larpo_ray.config import Config  # noqa: E402
from larpo_ray.dispatch import Dispatcher  # noqa: E402
from larpo_ray.fleet import Fleet  # noqa: E402
from larpo_ray.topology import RayRuntime, Runtime  # noqa: E402
from larpo_ray.types import Candidate, Prompt, ScoredCandidate  # noqa: E402

FULL = {
    "generators": [8, 64],
    "batches_per_generator": 8,
    "batch_prompts": 8,
    "k": 4,
    "time_scale": 0.2,
    "repeats": 2,
    "iterations": 3,
    "learner_gpus_per_generator": 0.25,
}
SMOKE = {
    "generators": [2, 4],
    "batches_per_generator": 4,
    "batch_prompts": 8,
    "k": 4,
    "time_scale": 0.01,
    "repeats": 1,
    "iterations": 2,
    "learner_gpus_per_generator": 1 / 16,  # training about as long as the rollout: a clear async gain
}
PROMPT_TOKENS = 40  # token ids per simulated prompt
LEARNER_TOKENS_PER_S = 6900.0  # train + reference tokens/s of one H200 on a 7B policy (module docstring)


class Latency:
    """Simulated latencies, in seconds at real speed (multiplied by `time_scale` when slept)."""

    def __init__(
        self,
        time_scale: float,
        step_s: float = 0.025,
        step_sigma: float = 0.2,
        length_median: float = 150.0,
        length_sigma: float = 0.6,
        max_new_tokens: int = 512,
        prefill_s: float = 0.05,
        score_s: float = 0.2,
        score_per_candidate_s: float = 0.002,
    ):
        self.time_scale, self.step_s, self.step_sigma = time_scale, step_s, step_sigma
        self.length_median, self.length_sigma, self.max_new_tokens = length_median, length_sigma, max_new_tokens
        self.prefill_s, self.score_s, self.score_per_candidate_s = prefill_s, score_s, score_per_candidate_s

    def lengths(self, rng: random.Random, n: int) -> list[int]:
        return [
            max(1, min(self.max_new_tokens, round(rng.lognormvariate(math.log(self.length_median), self.length_sigma))))
            for _ in range(n)
        ]

    def generate_s(self, rng: random.Random, lengths: list[int]) -> float:
        step = rng.lognormvariate(math.log(self.step_s), self.step_sigma)
        return (self.prefill_s + step * max(lengths)) * self.time_scale

    def score_s_for(self, rng: random.Random, n: int) -> float:
        return (self.score_s + self.score_per_candidate_s * n) * rng.uniform(0.9, 1.1) * self.time_scale


class SimGenerator:
    """Stands in for actors.generator.Generator: same methods, sleeps instead of decoding."""

    def __init__(self, latency: Latency):
        self.latency, self._version = latency, 0
        self.busy: list[float] = []  # slept seconds per generate call, in call order

    def ping(self) -> int:
        return os.getpid()

    def generate(
        self, batch: list[Prompt], temperatures: list[float], max_new_tokens: int | None = None, seed: int | None = None
    ) -> list[Candidate]:
        rng = random.Random(f"{seed}:{batch[0].uid}")  # the batch's work, whichever actor runs it
        lengths = self.latency.lengths(rng, len(batch) * len(temperatures))
        seconds = self.latency.generate_s(rng, lengths)
        time.sleep(seconds)
        self.busy.append(seconds)
        it = iter(lengths)
        # Real-sized messages: token ids and log-probs per token, so serialization costs what it would.
        return [
            Candidate(
                prompt_uid=p.uid,
                token_ids=tuple(range(n)),
                text=f"the answer is {n % 10}",
                sample_logps=(-0.5,) * n,
                temperature=t,
                policy_version=self._version,
                finish_reason="stop",
            )
            for p in batch
            for t in temperatures
            for n in [next(it)]
        ]

    def load_weights(self, version: int, weights) -> dict:
        self._version = version
        return {"version": version, "bytes": 0, "seconds": 0.0}

    def busy_log(self) -> list[float]:
        """Sleeps since the last call, then forgets them (one rollout's worth)."""
        out, self.busy = self.busy, []
        return out


class SimReward:
    """Stands in for actors.reward.RewardActor: same `score` contract, sleeps instead of scoring."""

    def __init__(self, latency: Latency):
        self.latency = latency
        self.busy: list[float] = []

    def ping(self) -> int:
        return os.getpid()

    def score(self, by_uid: dict[str, Prompt], candidates: list[Candidate], iteration: int) -> ScoreReport:
        rng = random.Random(f"score:{candidates[0].prompt_uid}")
        seconds = self.latency.score_s_for(rng, len(candidates))
        time.sleep(seconds)
        self.busy.append(seconds)
        scored = [ScoredCandidate(c, float(rng.random() < 0.5), iteration) for c in candidates]
        return ScoreReport(scored=scored, n_failed=0, failures={}, seconds=seconds)

    def busy_log(self) -> list[float]:
        out, self.busy = self.busy, []
        return out


class RoundRobinDispatcher(Dispatcher):
    """The dispatch before first-free, kept for comparison only: every batch is sent at once, to
    the generators in turn (the simulation has no faults, so no batch has a generator to avoid)."""

    def fill(self) -> None:
        for b, _ in self.queue:
            self.submit("generator", self.pick("generator"), b)
        self.queue.clear()


POLICIES = {"round_robin": RoundRobinDispatcher, "first_free": Dispatcher}


class SimRuntime(RayRuntime):
    """RayRuntime with simulated actors. Its own __init__ would start real Generators: this one
    sets what RayRuntime.__init__ sets, with the simulated actors (no learner, initial weights)."""

    def __init__(self, cfg: Config, generators: list, rewards: list, policy: str = "first_free"):
        Runtime.__init__(self, cfg, learner=None)
        self.policy_path = "simulated"  # only read when an actor must be replaced (_spawn)
        self.log_dir = None  # simulated actors write no log files
        self.policy = policy
        self.fleet = Fleet(
            {"generator": generators, "reward": rewards},
            spawn=self._spawn,
            max_restarts=cfg.faults.actor_max_restarts,
            fetch_weights=lambda: None,  # never asked: no weights are synced here
        )

    def rollout(self, *args, **kwargs):
        """The real RayRuntime.rollout, with the policy's dispatcher."""
        with mock.patch("larpo_ray.topology.Dispatcher", POLICIES[self.policy]):
            return super().rollout(*args, **kwargs)


def ideal_makespan(gen_busy: list[list[float]], reward_busy: list[list[float]]) -> float:
    """Zero-overhead replay of the recorded sleeps (see the module docstring)."""
    done = []
    for calls in gen_busy:
        t = 0.0
        for seconds in calls:
            t += seconds
            done.append(t)
    free = [0.0] * len(reward_busy)
    queues = [iter(calls) for calls in reward_busy]
    end = max(done, default=0.0)
    for i, arrival in enumerate(sorted(done)):
        r = i % len(free)
        free[r] = max(free[r], arrival) + next(queues[r], 0.0)
        end = max(end, free[r])
    return end


def make_runtime(pool_gen: list, pool_rew: list, n: int, args, policy: str = "first_free") -> SimRuntime:
    gens, rews = pool_gen[:n], pool_rew[: max(1, n // 4)]
    cfg = Config.from_dict(
        {
            "generation": {
                "k": args.k,
                "batch_prompts": args.batch_prompts,
                "num_generators": n,
                "max_new_tokens": 512,
            },
            "reward": {"num_actors": len(rews)},
        }
    )
    return SimRuntime(cfg, gens, rews, policy)


def make_prompts(n: int, args, tag: str) -> list[Prompt]:
    return [
        Prompt(uid=f"{tag}-p{i}", text=f"What is {i} + 1?", token_ids=tuple(range(PROMPT_TOKENS)), answer=str(i + 1))
        for i in range(n * args.batches_per_generator * args.batch_prompts)
    ]


def checked_rollout(runtime: SimRuntime, prompts: list[Prompt], args, seed: int):
    rollout = runtime.rollout(prompts, [0.7] * args.k, iteration=0, seed=seed)
    if len(rollout.scored) != len(prompts) * args.k:
        raise RuntimeError(f"rollout returned {len(rollout.scored)} scored samples, expected {len(prompts) * args.k}")
    return rollout


def dispatch_point(ray, runtime: SimRuntime, n: int, repeat: int, args) -> dict:
    """One rollout of n generators' weak-scaling share under `runtime.policy`."""
    actors = runtime.generators + runtime.rewards
    prompts = make_prompts(n, args, f"r{repeat}")
    ray.get([a.busy_log.remote() for a in actors])  # clear
    cpu0, t0 = time.process_time(), time.perf_counter()
    rollout = checked_rollout(runtime, prompts, args, seed=repeat)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    gen_busy = ray.get([g.busy_log.remote() for g in runtime.generators])
    ideal = ideal_makespan(gen_busy, ray.get([r.busy_log.remote() for r in runtime.rewards]))
    samples = len(rollout.scored)
    return {
        "policy": runtime.policy,
        "generators": n,
        "repeat": repeat,
        "reward_actors": len(runtime.rewards),
        "samples": samples,
        "wall_s": wall,
        "ideal_makespan_s": ideal,
        "samples_per_s": samples / wall,
        "scaling_efficiency": sum(map(sum, gen_busy)) / (n * wall),
        "batches_per_generator_min_max": [min(map(len, gen_busy)), max(map(len, gen_busy))],
        "overhead_ms_per_sample": 1e3 * (wall - ideal) / samples,
        "driver_cpu_ms_per_sample": 1e3 * cpu / samples,
    }


def train_seconds(rollout, n: int, args) -> float:
    """What a 7B learner on n x learner_gpus_per_generator GPUs takes on the rollout's tokens."""
    tokens = rollout.generated_tokens + PROMPT_TOKENS * len(rollout.candidates)
    return tokens / (n * args.learner_gpus_per_generator * LEARNER_TOKENS_PER_S) * args.time_scale


def loop_point(runtime: SimRuntime, n: int, mode: str, args) -> dict:
    """`args.iterations` iterations, sync or async (module docstring); the same prompts and seeds
    in both modes."""
    rollouts, trains, starts = [], [], []

    def rollout(it: int):
        t0 = time.perf_counter()
        out = checked_rollout(runtime, make_prompts(n, args, f"it{it}"), args, seed=it)
        rollouts.append(time.perf_counter() - t0)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as background:
        ahead = background.submit(rollout, 0) if mode == "async" else None
        for it in range(args.iterations):
            if mode == "async":
                out = ahead.result()
                if it + 1 < args.iterations:
                    ahead = background.submit(rollout, it + 1)  # samples while this iteration trains
            else:
                out = rollout(it)
            starts.append(time.perf_counter())
            trains.append(train_seconds(out, n, args))
            time.sleep(trains[-1])
    wall = time.perf_counter() - t0
    iteration = (starts[-1] - starts[0]) / (len(starts) - 1)  # steady state: between training starts
    samples = len(out.scored)
    return {
        "mode": mode,
        "generators": n,
        "iterations": args.iterations,
        "samples_per_iteration": samples,
        "rollout_s_mean": mean(rollouts),
        "train_s_mean": mean(trains),
        "iteration_s": iteration,
        "wall_s": wall,
        "samples_per_s": samples / iteration,
    }


def summarize(dispatch_rows: list[dict], loop_rows: list[dict]) -> dict:
    summary = {}
    for n in sorted({r["generators"] for r in dispatch_rows}):
        for policy in POLICIES:
            runs = [r for r in dispatch_rows if (r["generators"], r["policy"]) == (n, policy)]
            summary[f"scaling_efficiency_{policy}_{n}"] = mean(r["scaling_efficiency"] for r in runs)
            summary[f"driver_cpu_ms_per_sample_{policy}_{n}"] = max(r["driver_cpu_ms_per_sample"] for r in runs)
    for n in sorted({r["generators"] for r in loop_rows}):
        sync, async_ = (next(r for r in loop_rows if (r["generators"], r["mode"]) == (n, m)) for m in ("sync", "async"))
        summary[f"async_over_sync_samples_per_s_{n}"] = async_["samples_per_s"] / sync["samples_per_s"]
        r, t = sync["rollout_s_mean"], sync["train_s_mean"]
        summary[f"async_over_sync_ideal_{n}"] = (r + t) / max(r, t)  # perfect overlap of these phases
    if dispatch_rows:
        most = max(r["generators"] for r in dispatch_rows)
        summary["first_free_efficiency_target_met"] = summary[f"scaling_efficiency_first_free_{most}"] >= 0.95
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 and 4 generators, short sleeps (CI)")
    parser.add_argument(
        "--out", type=Path, help="result JSON (default benchmarks/results/scale_sim_<machine>_<date>.json)"
    )
    parser.add_argument("--parts", nargs="+", choices=["dispatch", "loop"], default=["dispatch", "loop"])
    parser.add_argument("--generators", type=int, nargs="+", help="generator counts")
    parser.add_argument("--batches-per-generator", type=int, help="prompt batches per generator and rollout")
    parser.add_argument("--batch-prompts", type=int, help="generation.batch_prompts")
    parser.add_argument("--k", type=int, help="samples per prompt")
    parser.add_argument("--time-scale", type=float, help="multiplier on the simulated real-speed latencies")
    parser.add_argument("--repeats", type=int, help="dispatch part: rollouts (seeds) per policy and size")
    parser.add_argument("--iterations", type=int, help="loop part: iterations per mode (at least 2)")
    parser.add_argument(
        "--learner-gpus-per-generator", type=float, help="loop part: the simulated learner's GPUs per generator"
    )
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (the async steady state is between iterations)")

    import ray

    machine = describe()
    most = max(args.generators)
    t0 = time.perf_counter()
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    dispatch_rows, loop_rows = [], []
    try:
        latency = Latency(args.time_scale)
        pool_gen = [ray.remote(SimGenerator).options(num_cpus=0).remote(latency) for _ in range(most)]
        pool_rew = [ray.remote(SimReward).options(num_cpus=0).remote(latency) for _ in range(max(1, most // 4))]
        ray.get([a.ping.remote() for a in pool_gen + pool_rew])
        startup = time.perf_counter() - t0
        print(f"{len(pool_gen)} generator + {len(pool_rew)} reward actors up in {startup:.1f} s")
        for n in args.generators if "dispatch" in args.parts else []:
            for repeat in range(args.repeats):
                for policy in POLICIES:
                    runtime = make_runtime(pool_gen, pool_rew, n, args, policy)
                    dispatch_rows.append(dispatch_point(ray, runtime, n, repeat, args))
                    row = dispatch_rows[-1]
                    print(
                        f"  {n} generators, {policy}: {row['wall_s']:.2f} s, efficiency {row['scaling_efficiency']:.3f}"
                    )
        for n in args.generators if "loop" in args.parts else []:
            for mode in ("sync", "async"):
                loop_rows.append(loop_point(make_runtime(pool_gen, pool_rew, n, args), n, mode, args))
                print(f"  {n} generators, {mode} loop: {loop_rows[-1]['iteration_s']:.2f} s an iteration", flush=True)
    finally:
        ray.shutdown()
    if dispatch_rows:
        print(
            table(
                dispatch_rows,
                [
                    ("gens", "generators", "{}"),
                    ("policy", "policy", "{}"),
                    ("repeat", "repeat", "{}"),
                    ("wall s", "wall_s", "{:.2f}"),
                    ("ideal s", "ideal_makespan_s", "{:.2f}"),
                    ("samples/s", "samples_per_s", "{:.0f}"),
                    ("scaling eff.", "scaling_efficiency", "{:.3f}"),
                    ("overhead ms/sample", "overhead_ms_per_sample", "{:.3f}"),
                    ("driver CPU ms/sample", "driver_cpu_ms_per_sample", "{:.3f}"),
                ],
            )
        )
    if loop_rows:
        print(
            table(
                loop_rows,
                [
                    ("gens", "generators", "{}"),
                    ("mode", "mode", "{}"),
                    ("rollout s", "rollout_s_mean", "{:.2f}"),
                    ("train s", "train_s_mean", "{:.2f}"),
                    ("iteration s", "iteration_s", "{:.2f}"),
                    ("samples/s", "samples_per_s", "{:.0f}"),
                ],
            )
        )
    summary = summarize(dispatch_rows, loop_rows)
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    result = {
        "benchmark": "scale_sim",
        "smoke": args.smoke,
        "machine": machine,
        "settings": {
            "batches_per_generator": args.batches_per_generator,
            "batch_prompts": args.batch_prompts,
            "k": args.k,
            "time_scale": args.time_scale,
            "repeats": args.repeats,
            "iterations": args.iterations,
            "learner_gpus_per_generator": args.learner_gpus_per_generator,
            "learner_tokens_per_s": LEARNER_TOKENS_PER_S,
            "prompt_tokens": PROMPT_TOKENS,
            "latency": vars(latency),
            "actor_startup_s": startup,
        },
        "dispatch_rows": dispatch_rows,
        "loop_rows": loop_rows,
        "summary": summary,
    }
    save(result, args.out, "scale_sim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
