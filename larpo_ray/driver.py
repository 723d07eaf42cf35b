"""The LARPO loop (Algorithm 1 of Jin et al. 2025), one short function per step.

Per iteration s: sample prompts -> generate k candidates each with the current policy (retriever)
-> score them (reranker) -> build ranked lists with the memory of earlier iterations -> train
against the policy at the start of the iteration -> sync the new weights to the generators ->
evaluate on the held-out split -> checkpoint -> record. Where the roles run is the runtime's
business (`larpo_ray.topology`); this module is the same for in-process and Ray runs.

Determinism: prompts, list sampling, the learner's step order and every candidate's sampling seed
derive from (seed, iteration, prompt), so a resumed run, a re-dispatched batch or an iteration
redone after a learner restart computes what the uninterrupted run computed.

loop.mode = async samples iteration s+1's candidates while iteration s trains (larpo_ray.pipeline
says when that is reproducible); the steps are the same functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from larpo_ray import checkpoint, pipeline
from larpo_ray.checkpoint import LoopState
from larpo_ray.choices import RELATIVE_SCORERS
from larpo_ray.config import Config
from larpo_ray.learner_group import LearnerRestarted
from larpo_ray.lists import CandidateMemory, ListStats
from larpo_ray.pipeline import Drawn
from larpo_ray.stats import mean
from larpo_ray.storage import RunStorage
from larpo_ray.tasks import binary_reward, pass_at_n, reference_answer, win_rate
from larpo_ray.topology import Rollout, Runtime
from larpo_ray.tracking import Tracker, jsonable
from larpo_ray.types import Prompt, RankedList

EVAL_BATCH_PROMPTS = 64  # greedy held-out prompts per generate call: short replies batch well


def evaluate_only(
    cfg: Config, runtime: Runtime, held_out: Sequence[Prompt], tracker: Tracker, progress: bool = True
) -> tuple[dict[str, float], dict[str, str]]:
    """Held-out metrics of the policy as it is, recorded as iteration 0; returns its greedy
    rewards and responses per prompt (the initial policy's, against which later win-rates are
    judged)."""
    t0 = time.perf_counter()
    metrics, rewards, answers = evaluate(cfg, runtime, held_out, None, progress)
    tracker.log({"iteration": 0, **metrics, "timing/eval": time.perf_counter() - t0}, eval_rows=answers)
    return rewards, {row["uid"]: row["response"] for row in answers if row["response"] is not None}


def run_loop(
    cfg: Config,
    runtime: Runtime,
    train: Sequence[Prompt],
    held_out: Sequence[Prompt],
    tracker: Tracker,
    progress: bool = True,
    run_dir: Path | None = None,
    state: LoopState | None = None,
    storage: RunStorage | None = None,
) -> list[dict[str, Any]]:
    """Run LARPO iterations until cfg.loop.iterations are done; returns the per-iteration records.

    A fresh run starts with the initial evaluation; a resumed one (`state` from a checkpoint, the
    learner already on that checkpoint) first syncs the restored weights to the generators. With a
    `run_dir`, a checkpoint is written every loop.checkpoint_every iterations (and copied to the
    run's URI, if `storage` has one). If the learner group
    restarts after a failure it comes back on the newest checkpoint, and the loop rolls back to it.
    The rollouts come from `pipeline.rollouts` (sampled in turn, or ahead in async mode).
    """
    root = run_dir / "checkpoints" if run_dir is not None else None
    if state is None:
        rewards, responses = evaluate_only(cfg, runtime, held_out, tracker, progress)
        state = LoopState(
            initial_rewards=rewards, initial_responses=responses, wandb_id=tracker.wandb_id, config=cfg.to_dict()
        )
        state.records = list(tracker.records)
    else:
        runtime.sync_weights(state.iteration)  # generators <- the policy the learner restored
    memory, source = _memory(cfg, state), _rollouts(cfg, runtime, train, state, progress)
    try:
        while state.iteration < cfg.loop.iterations:
            s = state.iteration
            try:
                out = run_iteration(cfg, runtime, memory, source, held_out, state, s, progress)
                after = advanced(state, out.record, out.steps, memory, out.drawn, source.pending())
                if root is not None and _checkpoint_due(cfg, s + 1):
                    start = time.perf_counter()
                    write_checkpoint(cfg, runtime, root, after, storage)
                    out.record["timing/checkpoint"] = time.perf_counter() - start
            except LearnerRestarted as restart:
                print(f"larpo-ray: {restart}; rolling back to iteration {restart.iteration}", flush=True)
                source.close()  # the rollout in flight finishes: the generators are free for the sync
                state = rollback(root, restart.iteration, state, tracker)
                memory = _memory(cfg, state)
                runtime.sync_weights(state.iteration)
                source = _rollouts(cfg, runtime, train, state, progress)
                continue
            state = after
            tracker.log(out.record, out.steps, out.samples, out.answers)
            if progress:
                print(summary_line(out.record, cfg.loop.iterations), flush=True)
    finally:
        source.close(wait=False)
    return tracker.records


@dataclasses.dataclass
class IterationOutput:
    """What one iteration produced: its metrics.jsonl row, the learner's per-step rows, W&B sample
    rows, the held-out answers (one row per prompt; none if not evaluated), the prompts drawn."""

    record: dict[str, Any]
    steps: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    answers: list[dict[str, Any]]
    drawn: list[Prompt]


def _rollouts(
    cfg: Config, runtime: Runtime, train: Sequence[Prompt], state: LoopState, progress: bool
) -> pipeline.Inline | pipeline.Prefetch:
    """The rollout source from `state` on: stream position after the prompts drawn so far, and the
    rollouts an async run's checkpoint kept. Rollouts sampled ahead show no progress bar."""
    cursor = sum(len(uids) for uids in state.prompt_uids)
    by_uid = {p.uid: p for p in train} if state.pending else {}
    pending = [Drawn.from_json(d, by_uid) for d in state.pending]
    produce = functools.partial(sample_iteration, cfg, runtime, train, progress and cfg.loop.mode == "sync")
    return pipeline.rollouts(cfg, produce, state.iteration, cursor, pending)


def sample_iteration(
    cfg: Config, runtime: Runtime, train: Sequence[Prompt], progress: bool, s: int, cursor: int
) -> Drawn:
    """Iteration s's rollout from stream position `cursor` (`draw_prompts`), with its wall time
    and the oldest weight version among its candidates."""
    start = time.perf_counter()
    rollout, drawn, prompts, draws = draw_prompts(cfg, runtime, train, cursor, s, progress)
    version = min((c.policy_version for c in rollout.candidates), default=s)
    return Drawn(s, rollout, drawn, prompts, draws, time.perf_counter() - start, version)


def run_iteration(
    cfg: Config,
    runtime: Runtime,
    memory: CandidateMemory,
    source: pipeline.Inline | pipeline.Prefetch,
    held_out: Sequence[Prompt],
    state: LoopState,
    s: int,
    progress: bool,
) -> IterationOutput:
    """Iteration s (0-based): generate -> score -> lists -> train -> sync -> evaluate. In async
    mode the rollout was sampled while the previous iteration trained; `timing/generate_wait` is
    what this iteration waited for it (and for the next one in flight, before the sync)."""
    timing: dict[str, float] = {}
    wall_start = time.perf_counter()
    waited = time.perf_counter()
    got = source.take(s)
    waited = time.perf_counter() - waited
    timing["generate"] = got.seconds
    rollout, stale = fresh(cfg, got.rollout, s)
    lists, stats = timed(timing, "lists", build_lists, cfg, memory, rollout, got.prompts, s)
    result = timed(timing, "train", runtime.train, s, lists)
    before_sync = time.perf_counter()
    with source.generators():  # async: after the rollout in flight
        waited += time.perf_counter() - before_sync
        sync = timed(timing, "sync", runtime.sync_weights, s + 1)
        evaluated = s + 1 == cfg.loop.iterations or (cfg.loop.eval_every and (s + 1) % cfg.loop.eval_every == 0)
        ev, _, answers = (
            timed(
                timing,
                "eval",
                evaluate,
                cfg,
                runtime,
                held_out,
                state.initial_rewards,
                progress,
                state.initial_responses,
            )
            if evaluated
            else ({}, {}, [])
        )
    timing["iteration"] = time.perf_counter() - wall_start  # wall clock, checkpoint excluded
    overlapped = cfg.loop.mode == "async"
    if overlapped:
        timing["generate_wait"] = waited
    on_path = [k for k in timing if k not in ("iteration", "generate" if overlapped else "generate_wait")]
    timing["overhead"] = timing["iteration"] - sum(timing[k] for k in on_path)
    record = {
        "iteration": s + 1,
        **ev,
        **{f"train/{k}": v for k, v in result.metrics.items()},
        **rollout_metrics(got.rollout, timing["generate"]),
        "rollout/policy_version": float(got.version),
        "rollout/staleness": float(s - got.version),
        **({"rollout/dropped_stale": float(stale)} if overlapped else {}),
        **got.draws,
        **list_metrics(stats),
        **{f"sync/{k}": v for k, v in sync.items()},
        **{f"timing/{k}": v for k, v in timing.items()},
        **system_metrics(),
    }
    steps = [{k: jsonable(v) for k, v in m.items()} for m in result.step_metrics]
    return IterationOutput(
        {k: jsonable(v) for k, v in record.items()},
        steps,
        sample_rows(lists, cfg.logging.log_samples),
        answers,
        got.drawn,
    )


def fresh(cfg: Config, rollout: Rollout, s: int) -> tuple[Rollout, int]:
    """Async mode: the rollout without candidates sampled more than loop.max_staleness weight
    versions before iteration s's policy, and how many were dropped (sync: as it is, 0)."""
    if cfg.loop.mode != "async":
        return rollout, 0
    keep = [sc for sc in rollout.scored if s - sc.candidate.policy_version <= cfg.loop.max_staleness]
    return dataclasses.replace(rollout, scored=keep), len(rollout.scored) - len(keep)


def _checkpoint_due(cfg: Config, done: int) -> bool:
    every = cfg.loop.checkpoint_every
    return bool(every) and (done % every == 0 or done == cfg.loop.iterations)


def _memory(cfg: Config, state: LoopState) -> CandidateMemory:
    memory = CandidateMemory(cfg.lists.memory, cfg.lists.max_pool, cfg.lists.dedup)
    if state.memory:
        memory.load_state_dict(state.memory)
    return memory


def advanced(
    state: LoopState,
    record: dict,
    step_metrics: list[dict],
    memory: CandidateMemory,
    prompts: list[Prompt],
    pending: Sequence[Drawn] = (),
) -> LoopState:
    """The loop state after the iteration that `record` describes (`pending`: the rollouts
    sampled ahead of it, async mode)."""
    return dataclasses.replace(
        state,
        iteration=record["iteration"],
        memory=memory.state_dict(),
        pending=[d.to_json() for d in pending],
        prompt_uids=state.prompt_uids + [[p.uid for p in prompts]],
        records=state.records + [record],
        steps=state.steps + [{"iteration": record["iteration"], **m} for m in step_metrics],
    )


def write_checkpoint(
    cfg: Config, runtime: Runtime, root: Path, state: LoopState, storage: RunStorage | None = None
) -> Path:
    """Everything a restart at `state` needs, atomically (larpo_ray.checkpoint): the learner
    writes the policy and its optimizer state, then the driver its state, then the rename. On a
    URI: each learner rank's part goes up first, then state.json, then latest.json."""
    tmp = checkpoint.begin(root, state.iteration)
    final = checkpoint.iteration_dir(root, state.iteration)
    upload = f"{checkpoint.CHECKPOINTS}/{final.name}" if storage is not None and storage.remote else None
    runtime.save_checkpoint(str(tmp), cfg.loop.save_optimizer, upload)
    state.rng = checkpoint.rng_state()
    final = checkpoint.commit(root, tmp, state, cfg.loop.keep_checkpoints)
    if upload:
        checkpoint.push_commit(storage, root, final)
    return final


def rollback(root: Path | None, iteration: int, state: LoopState, tracker: Tracker) -> LoopState:
    """The loop state at `iteration` (the checkpoint the restarted learner loaded; 0: the start,
    keeping the initial evaluation); the tracker's files are cut back to match."""
    if iteration == 0:
        restored = LoopState(
            initial_rewards=state.initial_rewards,
            initial_responses=state.initial_responses,
            wandb_id=state.wandb_id,
            config=state.config,
            records=state.records[:1],
        )
    else:
        if root is None:
            raise RuntimeError(f"the learner restarted from checkpoint {iteration} but this loop writes none")
        restored = checkpoint.read_state(checkpoint.iteration_dir(root, iteration))
    tracker.restore(restored.records, restored.steps)
    return restored


def summary_line(record: dict[str, Any], iterations: int) -> str:
    """One console line per iteration: what each phase took and where the metrics stand."""
    get = lambda key: _or_nan(record.get(key))  # noqa: E731 (eval may be skipped)
    overlap = f", overlapped, waited {record['timing/generate_wait']:.0f}s" if "timing/generate_wait" in record else ""
    return (
        f"iter {record['iteration']}/{iterations}: generate {get('timing/generate'):.0f}s "
        f"({get('rollout/tokens_per_s'):.0f} tok/s{overlap}), {get('lists/n_lists'):.0f} lists, "
        f"train {get('timing/train'):.0f}s loss {get('train/loss'):.4f}, sync {get('timing/sync'):.1f}s, "
        f"eval reward {get('eval/mean_reward'):.3f} win-rate vs initial {get('eval/win_rate_vs_initial'):.3f}"
    )


def _or_nan(value) -> float:
    return float("nan") if value is None else value


def timed(timing: dict[str, float], phase: str, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    timing[phase] = time.perf_counter() - start
    return out


def sample_prompts(train: Sequence[Prompt], iteration: int, cfg: Config) -> list[Prompt]:
    """M prompts x ~ D_X for iteration s without dynamic sampling: positions [s*M, (s+1)*M) of
    the prompt stream."""
    m = cfg.loop.prompts_per_iteration
    return prompt_stream(train, iteration * m, m, cfg.loop.seed)


def prompt_stream(train: Sequence[Prompt], start: int, count: int, seed: int) -> list[Prompt]:
    """Positions [start, start + count) of a stream of seeded permutations of the data, so no
    prompt repeats before all were seen, and a resumed run draws the same prompts."""
    n = len(train)
    picked = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        picked.append(train[_permutation(seed, n, epoch)[i]])
    return picked


def draw_prompts(
    cfg: Config, runtime: Runtime, train: Sequence[Prompt], cursor: int, s: int, progress: bool
) -> tuple[Rollout, list[Prompt], list[Prompt], dict[str, float]]:
    """Generate and score iteration s's prompts from stream position `cursor`. Returns the
    rollout, every prompt drawn, the prompts to build lists from, and draw counts.

    loop.dynamic_sampling: prompts whose k candidates all tie teach nothing, so more prompts are
    drawn, in rounds sized by the share that formed a pair so far, until M prompts have a strict
    pair or loop.max_draw_factor x M prompts were drawn; the first M such prompts (stream order)
    are kept. Otherwise the M prompts at the cursor, ties and all (Algorithm 1 as printed)."""
    m = cfg.loop.prompts_per_iteration
    drawn = prompt_stream(train, cursor, m, cfg.loop.seed)
    rollout = generate_and_score(cfg, runtime, drawn, s, progress)
    if not cfg.loop.dynamic_sampling:
        return rollout, drawn, drawn, {}
    cap, rounds = int(cfg.loop.max_draw_factor * m), 1
    while True:
        paired = _with_strict_pair(drawn, rollout)
        if len(paired) >= m or len(drawn) >= cap:
            break
        rate = max(len(paired) / len(drawn), 1 / 8)  # 1/8: bound the next round when none paired yet
        more = prompt_stream(
            train, cursor + len(drawn), min(cap - len(drawn), math.ceil((m - len(paired)) / rate)), cfg.loop.seed
        )
        rollout.extend(generate_and_score(cfg, runtime, more, s, progress))
        drawn, rounds = drawn + more, rounds + 1
    counts = {
        "prompts_drawn": len(drawn),
        "prompts_tied": len(drawn) - len(paired),
        "prompts_unused": max(0, len(paired) - m),
        "draw_rounds": rounds,
    }
    return rollout, drawn, paired[:m], {f"rollout/{k}": float(v) for k, v in counts.items()}


def _with_strict_pair(prompts: list[Prompt], rollout: Rollout) -> list[Prompt]:
    """The prompts (in order) whose scored candidates are not all tied."""
    rewards: dict[str, set[float]] = {}
    for sc in rollout.scored:
        rewards.setdefault(sc.candidate.prompt_uid, set()).add(sc.reward)
    return [p for p in prompts if len(rewards.get(p.uid, ())) >= 2]


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, n: int, epoch: int) -> list[int]:
    perm = list(range(n))
    random.Random(f"{seed}:prompts:{epoch}").shuffle(perm)
    return perm


def sample_temperatures(k: int, temperature: float, mixed: Sequence[float] = ()) -> list[float]:
    """Temperatures of a prompt's k samples: all `temperature`, or `mixed` round-robin."""
    if mixed:
        return [mixed[i % len(mixed)] for i in range(k)]
    return [temperature] * k


def temperatures_for(cfg: Config, iteration: int) -> list[float]:
    """k per-sample temperatures: the iteration's schedule value, or the mixed list round-robin."""
    g = cfg.generation
    return sample_temperatures(g.k, g.temperature_at(iteration), g.mixed_temperatures)


def generate_and_score(cfg: Config, runtime: Runtime, prompts: list[Prompt], iteration: int, progress: bool) -> Rollout:
    with _bar(progress, len(prompts), f"iter {iteration + 1} generate+score") as bar:
        return runtime.rollout(
            prompts, temperatures_for(cfg, iteration), iteration, on_batch=bar.update, seed=rollout_seed(cfg, iteration)
        )


def rollout_seed(cfg: Config, iteration: int) -> int:
    """The sampling seed of iteration s's rollout (-1: held-out Pass@N): every candidate's own
    seed derives from it (actors.generator.sample_seed), so a re-dispatched batch or a resumed
    run draws the same candidates."""
    return (cfg.generation.seed * 1_000_003 + iteration + 1) & 0x7FFFFFFF


def build_lists(
    cfg: Config, memory: CandidateMemory, rollout: Rollout, prompts: list[Prompt], iteration: int
) -> tuple[list[RankedList], ListStats]:
    """D <- merge(D_0..D_s): add this iteration's scored responses to the memory, re-rank pools."""
    memory.add(rollout.scored)
    ls = cfg.lists
    lists, stats = memory.build_lists(
        prompts, iteration, ls.rule, ls.top, ls.bottom, ls.keep_order, ls.correct_threshold, cfg.loop.seed
    )
    memory.prune(iteration)
    return lists, stats


def evaluate(
    cfg: Config,
    runtime: Runtime,
    held_out: Sequence[Prompt],
    initial: dict[str, float] | None,
    progress: bool,
    initial_responses: dict[str, str] | None = None,
) -> tuple[dict[str, float], dict[str, float], list[dict[str, Any]]]:
    """Greedy held-out metrics: mean reward, accuracy (verifiable prompts), win-rate vs the
    initial policy judged by the scorer (ties count half), optional Pass@N. Also returns the
    greedy rewards per prompt and one row per prompt (uid, reward, correct, response).

    A relative reranker (reward.kind = pairwise / listwise) cannot score a lone reply, so a reply's
    reward is its margin over the initial policy's greedy reply to the same prompt, as the
    reranker judges the two side by side (0 for the initial policy itself)."""
    with _bar(progress, len(held_out), "eval") as bar:
        greedy = runtime.rollout(
            held_out,
            [0.0],
            -1,
            on_batch=bar.update,
            batch_prompts=max(cfg.generation.batch_prompts, EVAL_BATCH_PROMPTS),
        )
    rewards = {sc.candidate.prompt_uid: sc.reward for sc in greedy.scored}
    texts = {c.prompt_uid: c.text for c in greedy.candidates}
    if cfg.reward.kind in RELATIVE_SCORERS:  # the initial policy against itself: every margin is 0
        rewards = (
            _margins(runtime, held_out, texts, initial_responses) if initial_responses else dict.fromkeys(texts, 0.0)
        )
    out = {"eval/mean_reward": mean(rewards.values()), "eval/n_scored": float(len(rewards))}
    answers = {p.uid: reference_answer(p.answer) for p in held_out if p.answer is not None}
    correct = {u: binary_reward(texts[u], a) for u, a in answers.items() if u in texts}
    rows = [
        {
            "uid": p.uid,
            "reward": rewards.get(p.uid),
            **({"correct": correct[p.uid]} if p.uid in correct else {}),
            "response": texts.get(p.uid),
        }
        for p in held_out
    ]
    if answers:
        out["eval/accuracy"] = mean(correct.values())
        out["eval/mean_response_tokens"] = mean(len(c.token_ids) for c in greedy.candidates)
    if initial and any(u in rewards for u in initial):
        common = [u for u in initial if u in rewards]
        out["eval/win_rate_vs_initial"] = win_rate([rewards[u] for u in common], [initial[u] for u in common])
    if cfg.loop.pass_at_n and answers:
        out[f"eval/pass@{cfg.loop.pass_at_n}"] = _pass_at(cfg, runtime, held_out, answers)
    return out, rewards, rows


def _margins(
    runtime: Runtime, held_out: Sequence[Prompt], texts: dict[str, str], baselines: dict[str, str]
) -> dict[str, float]:
    """Each greedy reply's margin over its baseline reply, by the relative reranker (failed
    comparisons are left out, as failed scores are)."""
    judged = [p for p in held_out if p.uid in texts and p.uid in baselines]
    margins = runtime.compare(judged, [texts[p.uid] for p in judged], [baselines[p.uid] for p in judged])
    return {p.uid: m for p, m in zip(judged, margins) if m is not None}


def _pass_at(cfg: Config, runtime: Runtime, held_out: Sequence[Prompt], answers: dict[str, str]) -> float:
    n = cfg.loop.pass_at_n
    sampled = runtime.rollout(held_out, [cfg.generation.temperature_at(0)] * n, -1, seed=rollout_seed(cfg, -1))
    flags: dict[str, list[bool]] = {u: [] for u in answers}
    for c in sampled.candidates:
        if c.prompt_uid in flags:
            flags[c.prompt_uid].append(binary_reward(c.text, answers[c.prompt_uid]) == 1.0)
    return pass_at_n([f for f in flags.values() if len(f) >= n], n)


def rollout_metrics(rollout: Rollout, wall_s: float) -> dict[str, float]:
    rewards = [sc.reward for sc in rollout.scored]
    out = {
        "rollout/mean_reward": mean(rewards),
        "rollout/n_candidates": float(len(rollout.candidates)),
        "rollout/n_scored": float(len(rollout.scored)),
        "rollout/n_failed_scores": float(rollout.n_failed),
        "rollout/tokens": float(rollout.generated_tokens),
        "rollout/tokens_per_s": rollout.generated_tokens / max(wall_s, 1e-9),
        "timing/score_actor": rollout.score_seconds,
    }
    if rollout.score_lists:  # a relative reranker's cost: what it took per prompt's list
        out["reward/lists"] = float(rollout.score_lists)
        out["reward/calls"] = float(rollout.score_calls)
        out["reward/calls_per_list"] = rollout.score_calls / rollout.score_lists
        out["reward/seconds_per_list"] = rollout.score_seconds / rollout.score_lists
    out.update({f"rollout/failed_{k}": float(v) for k, v in rollout.failures.items()})
    out.update({f"faults/{k}": float(v) for k, v in rollout.faults.items()})  # actor deaths, timeouts
    return out


def system_metrics() -> dict[str, float]:
    """This machine at the end of an iteration: memory, load, the driver's own footprint (the
    actors' share is in Ray's dashboard; W&B adds its own system charts)."""
    import psutil

    mem = psutil.virtual_memory()
    return {
        "system/memory_used_gb": (mem.total - mem.available) / 2**30,
        "system/memory_total_gb": mem.total / 2**30,
        "system/load_1min": psutil.getloadavg()[0],
        "system/driver_rss_gb": psutil.Process().memory_info().rss / 2**30,
    }


def list_metrics(stats: ListStats) -> dict[str, float]:
    return {f"lists/{k}": float(v) for k, v in vars(stats).items()}


def sample_rows(lists: list[RankedList], n: int) -> list[dict[str, Any]]:
    """Prompt, best and worst candidate with their rewards, for the W&B samples table."""
    return [
        {
            "prompt": rl.prompt.messages[-1][1] if rl.prompt.messages else rl.prompt.text,
            "best": rl.candidates[0].candidate.text,
            "best_reward": rl.candidates[0].reward,
            "worst": rl.candidates[-1].candidate.text,
            "worst_reward": rl.candidates[-1].reward,
        }
        for rl in lists[:n]
    ]


def _bar(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled, leave=False)


def save_final(runtime: Runtime, run_dir: Path, storage: RunStorage | None = None) -> Path:
    """The aligned policy as RUN_DIR/policy (an HF folder), and on the run's URI if it has one."""
    path = run_dir / "policy"
    runtime.save_policy(str(path), "policy" if storage is not None and storage.remote else None)
    return path
