"""The LARPO loop (Algorithm 1 of Jin et al. 2025), one short function per step.

Per iteration s: sample prompts -> generate k candidates each with the current policy (retriever)
-> score them (reranker) -> build ranked lists with the memory of earlier iterations -> train
against the policy at the start of the iteration -> sync the new weights to the generators ->
evaluate on the held-out split -> record. Where the roles run is the runtime's business
(`larpo_ray.topology`); this module is the same for in-process and Ray runs.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actors.generator import sample_temperatures
from actors.reward import win_rate
from larpo_ray.config import Config
from larpo_ray.lists import CandidateMemory, ListStats
from larpo_ray.tasks import binary_reward, parse_final_answer, pass_at_n
from larpo_ray.topology import Rollout, Runtime
from larpo_ray.tracking import Tracker
from larpo_ray.types import Prompt, RankedList


def evaluate_only(cfg: Config, runtime: Runtime, held_out: Sequence[Prompt], tracker: Tracker,
                  progress: bool = True) -> dict[str, float]:
    """Held-out metrics of the policy as it is, recorded as iteration 0; returns its greedy
    rewards per prompt (the initial policy's, against which later win-rates are judged)."""
    t0 = time.perf_counter()
    metrics, rewards = evaluate(cfg, runtime, held_out, None, progress)
    tracker.log({"iteration": 0, **metrics, "timing/eval": time.perf_counter() - t0})
    return rewards


def run_loop(cfg: Config, runtime: Runtime, train: Sequence[Prompt], held_out: Sequence[Prompt],
             tracker: Tracker, progress: bool = True) -> list[dict[str, Any]]:
    """Run cfg.loop.iterations LARPO iterations; returns the per-iteration records."""
    memory = CandidateMemory(cfg.lists.memory, cfg.lists.max_pool, cfg.lists.dedup)
    initial_rewards = evaluate_only(cfg, runtime, held_out, tracker, progress)
    for s in range(cfg.loop.iterations):
        timing: dict[str, float] = {}
        prompts = sample_prompts(train, s, cfg)
        rollout = timed(timing, "generate", generate_and_score, cfg, runtime, prompts, s, progress)
        lists, stats = timed(timing, "lists", build_lists, cfg, memory, rollout, prompts, s)
        result = timed(timing, "train", runtime.train, s, lists)
        sync = timed(timing, "sync", runtime.sync_weights, s + 1)
        evaluated = s + 1 == cfg.loop.iterations or (cfg.loop.eval_every and (s + 1) % cfg.loop.eval_every == 0)
        ev = timed(timing, "eval", evaluate, cfg, runtime, held_out, initial_rewards, progress)[0] if evaluated else {}
        timing["iteration"] = sum(timing.values())
        record = {"iteration": s + 1, **ev, **{f"train/{k}": v for k, v in result.metrics.items()},
                  **rollout_metrics(rollout, timing["generate"]), **list_metrics(stats),
                  **{f"sync/{k}": v for k, v in sync.items()}, **{f"timing/{k}": v for k, v in timing.items()}}
        tracker.log(record, result.step_metrics, sample_rows(lists, cfg.logging.log_samples))
        if progress:
            print(summary_line(record, cfg.loop.iterations), flush=True)
    return tracker.records


def summary_line(record: dict[str, Any], iterations: int) -> str:
    """One console line per iteration: what each phase took and where the metrics stand."""
    get = lambda key: record.get(key, float("nan"))  # noqa: E731 (eval may be skipped)
    return (f"iter {record['iteration']}/{iterations}: generate {get('timing/generate'):.0f}s "
            f"({get('rollout/tokens_per_s'):.0f} tok/s), {get('lists/n_lists'):.0f} lists, "
            f"train {get('timing/train'):.0f}s loss {get('train/loss'):.4f}, sync {get('timing/sync'):.1f}s, "
            f"eval reward {get('eval/mean_reward'):.3f} win-rate vs initial {get('eval/win_rate_vs_initial'):.3f}")


def timed(timing: dict[str, float], phase: str, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    timing[phase] = time.perf_counter() - start
    return out


def sample_prompts(train: Sequence[Prompt], iteration: int, cfg: Config) -> list[Prompt]:
    """M prompts x ~ D_X for iteration s: positions [s*M, (s+1)*M) of a stream of seeded
    permutations of the data, so no prompt repeats before all were seen, and a resumed run
    samples the same prompts."""
    m, n = cfg.loop.prompts_per_iteration, len(train)
    picked = []
    for pos in range(iteration * m, (iteration + 1) * m):
        epoch, i = divmod(pos, n)
        picked.append(train[_permutation(cfg.loop.seed, n, epoch)[i]])
    return picked


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, n: int, epoch: int) -> list[int]:
    perm = list(range(n))
    random.Random(f"{seed}:prompts:{epoch}").shuffle(perm)
    return perm


def temperatures_for(cfg: Config, iteration: int) -> list[float]:
    """k per-sample temperatures: the iteration's schedule value, or the mixed list round-robin."""
    g = cfg.generation
    return sample_temperatures(g.k, g.temperature_at(iteration), g.mixed_temperatures)


def generate_and_score(cfg: Config, runtime: Runtime, prompts: list[Prompt], iteration: int, progress: bool) -> Rollout:
    with _bar(progress, len(prompts), f"iter {iteration + 1} generate+score") as bar:
        return runtime.rollout(prompts, temperatures_for(cfg, iteration), iteration, on_batch=bar.update)


def build_lists(cfg: Config, memory: CandidateMemory, rollout: Rollout, prompts: list[Prompt],
                iteration: int) -> tuple[list[RankedList], ListStats]:
    """D <- merge(D_0..D_s): add this iteration's scored responses to the memory, re-rank pools."""
    memory.add(rollout.scored)
    ls = cfg.lists
    lists, stats = memory.build_lists(prompts, iteration, ls.rule, ls.top, ls.bottom, ls.keep_order,
                                      ls.correct_threshold, cfg.loop.seed)
    memory.prune(iteration)
    return lists, stats


def evaluate(cfg: Config, runtime: Runtime, held_out: Sequence[Prompt], initial: dict[str, float] | None,
             progress: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Greedy held-out metrics: mean reward, accuracy (verifiable prompts), win-rate vs the
    initial policy judged by the scorer (ties count half), optional Pass@N."""
    with _bar(progress, len(held_out), "eval") as bar:
        greedy = runtime.rollout(held_out, [0.0], -1, on_batch=bar.update)
    rewards = {sc.candidate.prompt_uid: sc.reward for sc in greedy.scored}
    out = {"eval/mean_reward": _mean(rewards.values()), "eval/n_scored": float(len(rewards))}
    answers = {p.uid: _canonical(p.answer) for p in held_out if p.answer is not None}
    if answers:
        texts = {c.prompt_uid: c.text for c in greedy.candidates}
        out["eval/accuracy"] = _mean(binary_reward(texts[u], a) for u, a in answers.items() if u in texts)
        out["eval/mean_response_tokens"] = _mean(len(c.token_ids) for c in greedy.candidates)
    if initial and any(u in rewards for u in initial):
        common = [u for u in initial if u in rewards]
        out["eval/win_rate_vs_initial"] = win_rate([rewards[u] for u in common], [initial[u] for u in common])
    if cfg.loop.pass_at_n and answers:
        out[f"eval/pass@{cfg.loop.pass_at_n}"] = _pass_at(cfg, runtime, held_out, answers)
    return out, rewards


def _pass_at(cfg: Config, runtime: Runtime, held_out: Sequence[Prompt], answers: dict[str, str]) -> float:
    n = cfg.loop.pass_at_n
    sampled = runtime.rollout(held_out, [cfg.generation.temperature_at(0)] * n, -1)
    flags: dict[str, list[bool]] = {u: [] for u in answers}
    for c in sampled.candidates:
        if c.prompt_uid in flags:
            flags[c.prompt_uid].append(binary_reward(c.text, answers[c.prompt_uid]) == 1.0)
    return pass_at_n([f for f in flags.values() if len(f) >= n], n)


def rollout_metrics(rollout: Rollout, wall_s: float) -> dict[str, float]:
    rewards = [sc.reward for sc in rollout.scored]
    out = {"rollout/mean_reward": _mean(rewards), "rollout/n_candidates": float(len(rollout.candidates)),
           "rollout/n_failed_scores": float(rollout.n_failed), "rollout/tokens": float(rollout.generated_tokens),
           "rollout/tokens_per_s": rollout.generated_tokens / max(wall_s, 1e-9),
           "timing/score_actor": rollout.score_seconds}
    out.update({f"rollout/failed_{k}": float(v) for k, v in rollout.failures.items()})
    return out


def list_metrics(stats: ListStats) -> dict[str, float]:
    return {f"lists/{k}": float(v) for k, v in vars(stats).items()}


def sample_rows(lists: list[RankedList], n: int) -> list[dict[str, Any]]:
    """Prompt, best and worst candidate with their rewards, for the W&B samples table."""
    return [{"prompt": rl.prompt.messages[-1][1] if rl.prompt.messages else rl.prompt.text,
             "best": rl.candidates[0].candidate.text, "best_reward": rl.candidates[0].reward,
             "worst": rl.candidates[-1].candidate.text, "worst_reward": rl.candidates[-1].reward}
            for rl in lists[:n]]


def _canonical(answer: str) -> str:
    """GSM8K-style references ("... #### 72") reduce to their final number."""
    return parse_final_answer(answer) or answer


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _bar(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled, leave=False)


def save_final(runtime: Runtime, run_dir: Path) -> Path:
    path = run_dir / "policy"
    runtime.save_policy(str(path))
    return path
