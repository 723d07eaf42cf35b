"""Checkpoints of a LARPO run: what a restart needs, written so a crash never leaves a bad one.

Layout (`RUN_DIR/checkpoints/`):

    iter-000002/
        policy/                  HF folder (safetensors + tokenizer): the policy after iteration 2
        learner/rank-0.safetensors, rank-0.json, ...   optimizer state per learner rank
        state.json               the driver's state (below); written last
    latest.json                  {"iteration": 2, "dir": "iter-000002"}

`state.json` holds the iteration, the resolved config, the W&B run id, the candidate memory, the
initial policy's held-out rewards (win-rate baseline), the prompt uids of every iteration (data
order), the driver's RNG states, the learner's step count and the metrics rows so far (a resume
rewrites metrics.jsonl / steps.jsonl from them, so the files always match the checkpoint).
Everything is JSON or safetensors: nothing is unpickled from disk.

Atomicity: a checkpoint is assembled in a hidden temporary folder, every file fsynced, then the
folder is renamed into place and `latest.json` replaced by rename (both atomic on POSIX). A reader
trusts only folders that have `state.json`; if `latest.json` is missing or names a bad folder, the
newest complete folder wins. Pure Python + torch/safetensors: no Ray.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from larpo_ray.config import ConfigError
from larpo_ray.storage import RunStorage

FORMAT = 1
CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints
LATEST = "latest.json"
STATE = "state.json"

# Config keys a resumed run may change: how it runs and logs, not what it computes.
RESUMABLE_KEYS = (
    "loop.iterations",
    "loop.run_dir",
    "loop.eval_every",
    "loop.save_model",
    "loop.checkpoint_every",
    "loop.keep_checkpoints",
    "loop.pass_at_n",
    "generation.num_generators",
    "generation.batch_prompts",
    "generation.cpu_kvcache_gb",
    "generation.gpu_memory_utilization",
    "generation.weight_transport",
    "generation.weight_bucket_mb",
    "reward.num_actors",
    "reward.batch_size",
    "reward.timeout_s",
    "reward.max_retries",
    "reward.verify_tls",
    "reward.ca_bundle",
    "reward.api_key_env",
)
RESUMABLE_GROUPS = ("logging", "resources", "faults")


@dataclass
class LoopState:
    """The driver's state after `iteration` completed iterations (0: after the initial eval)."""

    iteration: int = 0
    initial_rewards: dict[str, float] = field(default_factory=dict)
    initial_responses: dict[str, str] = field(default_factory=dict)  # greedy; relative rerankers judge against them
    memory: dict[str, Any] = field(default_factory=dict)
    prompt_uids: list[list[str]] = field(default_factory=list)  # per completed iteration
    wandb_id: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows so far
    steps: list[dict[str, Any]] = field(default_factory=list)  # steps.jsonl rows so far
    config: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    pending: list[dict[str, Any]] = field(default_factory=list)  # async: rollouts sampled ahead (pipeline.Drawn)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **vars(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> LoopState:
        if data.get("format") != FORMAT:
            raise ConfigError(
                f"checkpoint {path} has format {data.get('format')!r}, this larpo-ray "
                f"reads format {FORMAT}: resume it with the version that wrote it"
            )
        known = {f.name for f in fields(cls)}  # older checkpoints may hold dropped keys
        return cls(**{k: v for k, v in data.items() if k in known})


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter-{iteration:06d}"


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None."""
    root = Path(root)
    try:
        pointer = json.loads((root / LATEST).read_text())
        path = root / pointer["dir"]
        if (path / STATE).is_file():
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    complete = sorted(p for p in root.glob("iter-*") if (p / STATE).is_file())
    return complete[-1] if complete else None


def read_state(path: str | Path) -> LoopState:
    path = Path(path)
    try:
        data = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"checkpoint {path} has no readable {STATE} ({err}): it is incomplete; "
            f"delete it to resume from the one before"
        ) from None
    return LoopState.from_json(data, path)


def begin(root: str | Path, iteration: int) -> Path:
    """A fresh hidden folder in which the learner and the driver assemble a checkpoint."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".iter-{iteration:06d}.tmp-", dir=root))


def commit(root: str | Path, tmp: Path, state: LoopState, keep: int) -> Path:
    """Write `state.json` into `tmp`, fsync everything, rename `tmp` into place, point
    `latest.json` at it and delete all but the newest `keep` checkpoints."""
    root = Path(root)
    write_json(tmp / STATE, state.to_json())
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))
    final = iteration_dir(root, state.iteration)
    if final.exists():  # a redone iteration (after a learner restart): replace the old one
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=root))
        os.rename(final, trash / final.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    write_json(root / LATEST, {"iteration": state.iteration, "dir": final.name})
    _fsync_dir(root)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep`, and abandoned temporary folders."""
    newest = latest(root)
    complete = sorted(p for p in root.glob("iter-*") if (p / STATE).is_file())
    for path in complete[:-keep]:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)
    for path in list(root.glob(".iter-*.tmp-*")) + list(root.glob(".trash-*")):
        shutil.rmtree(path, ignore_errors=True)


# ---- a run folder on a URI (larpo_ray.storage): what each role copies, and when ------------------


def pull_index(storage: RunStorage) -> None:
    """From the URI: latest.json and every checkpoint's state.json (what `latest` reads)."""
    if not storage.remote:
        return
    root, names = Path(storage.local) / CHECKPOINTS, storage.listdir(CHECKPOINTS)
    for stale in root.glob("iter-*"):  # the URI is the record: a local folder it lacks is not a checkpoint
        if stale.name not in names:
            shutil.rmtree(stale, ignore_errors=True)
    (root / LATEST).unlink(missing_ok=True)
    storage.pull(f"{CHECKPOINTS}/{LATEST}")
    for name in names:
        if name.startswith("iter-"):
            storage.pull(f"{CHECKPOINTS}/{name}/{STATE}")


def pull_part(storage: RunStorage, path: Path, rank: int) -> None:
    """From the URI: what learner rank `rank` loads of checkpoint `path` (policy, its optimizer state)."""
    if not storage.remote:
        return
    rel = f"{CHECKPOINTS}/{Path(path).name}"
    storage.pull(f"{rel}/policy")
    for ext in ("json", "safetensors"):
        storage.pull(f"{rel}/learner/rank-{rank}.{ext}")


def push_part(storage: RunStorage, assembled: Path, rel: str, rank: int) -> None:
    """To the URI: what learner rank `rank` wrote into the checkpoint being assembled at
    `assembled`, at its final place `rel` (the URI has no atomic rename: state.json, written
    after every part, is what marks a checkpoint complete)."""
    if not storage.remote:
        return
    if rank == 0:
        storage.push_from(assembled / "policy", f"{rel}/policy")
    for ext in ("json", "safetensors"):
        storage.push_from(assembled / "learner" / f"rank-{rank}.{ext}", f"{rel}/learner/rank-{rank}.{ext}")


def push_commit(storage: RunStorage, root: Path, final: Path) -> None:
    """To the URI, after every learner part: the checkpoint's state.json (now complete), then
    latest.json; checkpoints pruned here are deleted there too."""
    if not storage.remote:
        return
    storage.push(f"{CHECKPOINTS}/{final.name}/{STATE}")
    storage.push(f"{CHECKPOINTS}/{LATEST}")
    kept = {p.name for p in Path(root).glob("iter-*")}
    for name in storage.listdir(CHECKPOINTS):
        if name.startswith("iter-") and name not in kept:
            storage.delete(f"{CHECKPOINTS}/{name}")


def write_json(path: Path, data: Any) -> None:
    """Atomically replace `path` with `data` as JSON (temporary file, fsync, rename)."""
    _write_atomic(path, json.dumps(data))


def write_lines(path: Path, lines: list[str]) -> None:
    """Atomically replace text file `path` with `lines` (temporary file, fsync, rename)."""
    _write_atomic(path, "".join(line + "\n" for line in lines))


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


# ---- resuming ----------------------------------------------------------------------------------


def incompatible_keys(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's config and a resume's config and
    that change what the run computes (RESUMABLE_* may differ). A key the saved config lacks (it
    was written before that knob existed) counts as its default, which is what that run used."""
    from larpo_ray.config import Config

    defaults = Config().to_dict()
    out = []
    for group in sorted(set(saved) | set(new)):
        if group in RESUMABLE_GROUPS:
            continue
        a, b, d = saved.get(group) or {}, new.get(group) or {}, defaults.get(group) or {}
        for key in sorted(set(a) | set(b)):
            dotted = f"{group}.{key}"
            old_value, new_value = a.get(key, d.get(key)), b.get(key, d.get(key))
            if dotted not in RESUMABLE_KEYS and old_value != new_value:
                out.append(f"{dotted} (checkpoint: {old_value!r}, now: {new_value!r})")
    return out


def check_compatible(state: LoopState, config: dict[str, Any], path: Path) -> None:
    differing = incompatible_keys(state.config, config)
    if differing:
        raise ConfigError(
            f"the config differs from checkpoint {path} in keys that change the "
            f"run: {'; '.join(differing)}. Resume with the run's own config.yaml "
            f"(drop those overrides), or start a new run"
        )


def rng_state() -> dict[str, Any]:
    """The driver's global RNG states as JSON (the loop itself derives its randomness from
    (seed, iteration, prompt); these cover anything else drawing from the globals)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- optimizer state (learner ranks) -----------------------------------------------------------


def save_optimizer(optimizer, folder: Path, rank: int, extra: dict[str, Any]) -> None:
    """A torch optimizer's state_dict as `rank-R.safetensors` (tensors) + `rank-R.json` (the
    rest, plus `extra`), both fsynced. Same world size and ZeRO stage are needed to load it."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, folder / f"rank-{rank}.safetensors")
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    write_json(folder / f"rank-{rank}.json", {"param_groups": groups, "scalars": scalars, **extra})
    _fsync_file(folder / f"rank-{rank}.safetensors")


def load_optimizer(optimizer, folder: Path, rank: int) -> dict[str, Any]:
    """Restore what `save_optimizer` wrote into `optimizer`; returns the JSON side (`extra`)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / f"rank-{rank}.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(folder / f"rank-{rank}.safetensors").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = tensor
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return {k: v for k, v in meta.items() if k not in ("param_groups", "scalars")}
