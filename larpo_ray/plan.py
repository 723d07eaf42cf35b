"""The resource plan: what each actor asks Ray for, and the nodes that takes.

The one place the roles' Ray requests are computed from `resources.*`: `topology.py` creates the
generator and reward actors with `actor_options(cfg, role)`, and `learner_group.py` builds its Ray
Train `ScalingConfig` from `learner_scaling(cfg)` (its placement group keeps the learner workers
together). `make_plan` packs the same requests onto node types (`resources.nodes`) the way the
autoscaler adds nodes, and `python -m larpo_ray.run --dry-run` prints it (`format_plan`).
Imports no Ray: the plan is computed without starting anything.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from larpo_ray.config import Config, ConfigError

GIB = 2**30
EPS = 1e-9
# The "NxGPU" shorthand: per GPU, the host's vCPUs and RAM (GiB) in the 8-GPU cloud instance of
# each kind: p5.48xlarge (H100), p5en.48xlarge (H200), p4de.24xlarge (A100), g6e.48xlarge (L40S),
# g6.48xlarge (L4), g5.48xlarge (A10G). For other machines, give a launcher YAML.
GPU_HOSTS = {
    "H100": (24, 256),
    "H200": (24, 256),
    "A100": (12, 144),
    "L40S": (24, 192),
    "L4": (24, 96),
    "A10G": (24, 96),
}
GIB_PER_CPU = 4  # "Ncpu" nodes: general-purpose machines (m5, n2-standard) have 4 GiB per vCPU


class PlanError(ConfigError):
    """The actors cannot be placed on the given node types; the message names the actor."""


@dataclass(frozen=True)
class Request:
    """What one actor (or one learner worker) asks Ray for."""

    cpus: float
    gpus: float
    memory_gib: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: Request) -> Request:
        custom = dict(self.custom)
        for name, amount in other.custom.items():
            custom[name] = custom.get(name, 0.0) + amount
        return Request(self.cpus + other.cpus, self.gpus + other.gpus, self.memory_gib + other.memory_gib, custom)

    def times(self, n: int) -> Request:
        return Request(self.cpus * n, self.gpus * n, self.memory_gib * n, {k: v * n for k, v in self.custom.items()})


def requests(cfg: Config) -> dict[str, tuple[int, Request]]:
    """Per role: how many actors, and what each asks for."""
    res, gen = cfg.resources, cfg.generation
    return {
        "generator": (
            gen.num_generators,
            Request(
                res.generator_cpus,
                res.generator_gpus * gen.tensor_parallel_size,
                res.generator_memory_gb,
                dict(res.generator_resources),
            ),
        ),
        "reward": (
            cfg.reward.num_actors,
            Request(res.reward_cpus, res.reward_gpus, res.reward_memory_gb, dict(res.reward_resources)),
        ),
        "learner": (
            cfg.learner.num_workers,
            Request(
                res.learner_cpus_per_worker,
                res.learner_gpus_per_worker,
                res.learner_memory_gb_per_worker,
                dict(res.learner_resources_per_worker),
            ),
        ),
    }


def total(cfg: Config) -> Request:
    """Everything the roles ask for together."""
    out = Request(0.0, 0.0)
    for count, request in requests(cfg).values():
        out = out + request.times(count)
    return out


def actor_options(cfg: Config, role: str) -> dict:
    """Keyword arguments of `ray.remote(cls).options(...)` for a generator or reward actor."""
    request = requests(cfg)[role][1]
    options: dict = {"num_cpus": request.cpus, "num_gpus": request.gpus}
    if request.memory_gib:
        options["memory"] = int(request.memory_gib * GIB)
    if request.custom:
        options["resources"] = dict(request.custom)
    return options


def learner_scaling(cfg: Config) -> dict:
    """Keyword arguments of Ray Train's `ScalingConfig` for the learner group."""
    count, request = requests(cfg)["learner"]
    per_worker = {"CPU": request.cpus, **request.custom}
    if request.gpus:
        per_worker["GPU"] = request.gpus
    if request.memory_gib:
        per_worker["memory"] = int(request.memory_gib * GIB)
    return {
        "num_workers": count,
        "use_gpu": request.gpus > 0,
        "resources_per_worker": per_worker,
        "placement_strategy": cfg.resources.learner_placement,
    }


# ---- node types --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster has or can add; memory is Ray's heap share (None: unknown)."""

    name: str
    capacity: Request
    memory_known: bool = True
    max_count: int | None = None  # None: as many as needed
    head: bool = False  # a launcher YAML's head: always there, exactly once


def ray_heap_gib(ram_gib: float) -> float:
    """Ray's `memory` resource of a node with this RAM: the object store takes 30%, at most 200 GB."""
    return ram_gib - min(0.3 * ram_gib, 200e9 / GIB)


def parse_nodes(spec: str, cfg: Config) -> list[NodeType]:
    """`resources.nodes` -> node types: 'local', 'NxGPU', 'Ncpu', a launcher YAML, joined with '+'."""
    types: list[NodeType] = []
    for part in (p.strip() for p in spec.split("+")):
        gpu = re.fullmatch(r"(\d+)x([A-Za-z0-9]+)", part)
        cpu = re.fullmatch(r"(\d+)cpu", part)
        if part == "local":
            types.append(local_node(cfg))
        elif part.endswith((".yaml", ".yml")):
            types += launcher_nodes(part)
        elif gpu and gpu.group(2).upper() in GPU_HOSTS and int(gpu.group(1)) >= 1:
            n, kind = int(gpu.group(1)), gpu.group(2).upper()
            cpus, ram = GPU_HOSTS[kind]
            types.append(NodeType(f"{n}x{kind}", Request(n * cpus, n, ray_heap_gib(n * ram))))
        elif cpu and int(cpu.group(1)) >= 1:
            n = int(cpu.group(1))
            types.append(NodeType(f"{n}cpu", Request(n, 0, ray_heap_gib(n * GIB_PER_CPU))))
        else:
            raise PlanError(
                f"resources.nodes = {spec!r}: {part!r} is not a node type: use 'local', 'NxGPU' with GPU one "
                f"of {', '.join(GPU_HOSTS)} (e.g. 8xH100), 'Ncpu' (e.g. 16cpu) or a Ray launcher YAML "
                f"(e.g. cluster/aws.yaml); join several with '+'"
            )
    return types


def local_node(cfg: Config) -> NodeType:
    """The local Ray instance `topology.init_ray` starts: at least as many logical CPUs as the roles
    ask for (the phases take turns on the cores), the custom resources they ask for, this
    machine's GPUs and memory."""
    need = total(cfg)
    cpus = max(os.cpu_count() or 1, math.ceil(need.cpus - EPS))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = (
        len([d for d in visible.split(",") if d.strip()])
        if visible is not None
        else len(list(Path("/dev").glob("nvidia[0-9]*")))
    )
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    custom = {k: float(math.ceil(v - EPS)) for k, v in need.custom.items()}
    return NodeType("local", Request(cpus, gpus, ray_heap_gib(ram_gib), custom), max_count=1)


def launcher_nodes(path: str) -> list[NodeType]:
    """The `available_node_types` of a Ray cluster launcher YAML (relative paths: from here, else
    from the repository root)."""
    file = Path(path)
    if not file.is_file() and not file.is_absolute():
        file = Path(__file__).resolve().parent.parent / path
    if not file.is_file():
        raise PlanError(
            f"resources.nodes: cluster file {path!r} does not exist: give a Ray launcher YAML such as cluster/aws.yaml"
        )
    config = yaml.safe_load(file.read_text())
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        raise PlanError(
            f"resources.nodes: {path!r} has no available_node_types: give a Ray cluster launcher YAML (ray up)"
        )
    types = []
    for name, node in config["available_node_types"].items():
        custom = dict(node.get("resources") or {})
        cpus, gpus = custom.pop("CPU", 0), custom.pop("GPU", 0)
        memory = custom.pop("memory", None)  # bytes; usually detected by Ray on the node, so absent
        custom.pop("object_store_memory", None)
        head = name == config.get("head_node_type")
        types.append(
            NodeType(
                name,
                Request(cpus, gpus, (memory or 0) / GIB, custom),
                memory_known=memory is not None,
                max_count=1 if head else node.get("max_workers", config.get("max_workers")),
                head=head,
            )
        )
    return types


# ---- packing -----------------------------------------------------------------------------------


@dataclass
class Node:
    """One node of the plan and what it holds."""

    type: NodeType
    used: Request = field(default_factory=lambda: Request(0.0, 0.0))
    holds: dict[str, int] = field(default_factory=dict)  # role -> actors


@dataclass
class Item:
    label: str  # names the actor in errors: "generator 0", "learner group (4 workers x ..., STRICT_PACK)"
    role: str
    request: Request
    actors: int = 1
    apart: bool = False  # STRICT_SPREAD: never on a node holding another worker of its role


@dataclass
class Plan:
    rows: dict[str, tuple[int, Request]]  # requests(cfg)
    total: Request
    nodes: list[Node]
    spec: str
    notes: dict[str, str]  # role -> how it is created / placed


def fits(capacity: Request, used: Request, request: Request, memory_known: bool = True) -> bool:
    if used.cpus + request.cpus > capacity.cpus + EPS or used.gpus + request.gpus > capacity.gpus + EPS:
        return False
    if memory_known and used.memory_gib + request.memory_gib > capacity.memory_gib + EPS:
        return False
    return all(used.custom.get(k, 0.0) + v <= capacity.custom.get(k, 0.0) + EPS for k, v in request.custom.items())


def items(cfg: Config, types: list[NodeType]) -> list[Item]:
    """The units the scheduler places: one per actor, the learner group as one unit when its
    placement keeps it on one node (STRICT_PACK; PACK where some node type holds it)."""
    rows = requests(cfg)
    out = [Item(f"{role} {i}", role, rows[role][1]) for role in ("generator", "reward") for i in range(rows[role][0])]
    n, worker = rows["learner"]
    placement = cfg.resources.learner_placement
    group = Item(f"learner group ({n} workers x {_fmt(worker)}, {placement})", "learner", worker.times(n), actors=n)
    if placement == "STRICT_PACK" or (
        placement == "PACK" and any(fits(t.capacity, Request(0, 0), group.request, t.memory_known) for t in types)
    ):
        out.append(group)
    else:  # SPREAD / STRICT_SPREAD, or PACK too big for one node: Ray places the bundles one by one
        out += [Item(f"learner worker {i}", "learner", worker, apart=placement == "STRICT_SPREAD") for i in range(n)]
    return out


def make_plan(cfg: Config, spec: str | None = None) -> Plan:
    """Pack the actors onto the node types first-fit decreasing (GPUs, then CPUs, then memory),
    opening the smallest node type that holds an actor when no open node does."""
    spec = cfg.resources.nodes if spec is None else spec
    types = parse_nodes(spec, cfg)
    nodes = [Node(t) for t in types if t.head]
    for item in sorted(
        items(cfg, types), key=lambda it: (it.request.gpus, it.request.cpus, it.request.memory_gib), reverse=True
    ):
        node = next(
            (
                n
                for n in nodes
                if fits(n.type.capacity, n.used, item.request, n.type.memory_known)
                and not (item.apart and n.holds.get(item.role))
            ),
            None,
        )
        if node is None:
            node = Node(_new_node_type(item, types, nodes, spec))
            nodes.append(node)
        node.used = node.used + item.request
        node.holds[item.role] = node.holds.get(item.role, 0) + item.actors
    return Plan(requests(cfg), total(cfg), nodes, spec, _notes(cfg))


def _new_node_type(item: Item, types: list[NodeType], nodes: list[Node], spec: str) -> NodeType:
    """The smallest node type that holds `item` and may still be added; else a PlanError naming
    the actor, its request and the biggest node type."""
    empty = Request(0.0, 0.0)
    holding = [t for t in types if fits(t.capacity, empty, item.request, t.memory_known)]
    addable = [
        t for t in holding if not t.head and (t.max_count is None or sum(n.type is t for n in nodes) < t.max_count)
    ]
    if addable:
        return min(addable, key=lambda t: (t.capacity.gpus, t.capacity.cpus, t.capacity.memory_gib))
    biggest = max(types, key=lambda t: (t.capacity.gpus, t.capacity.cpus, t.capacity.memory_gib))
    knobs = {
        "generator": "resources.generator_* and generation.tensor_parallel_size",
        "reward": "resources.reward_*",
        "learner": "resources.learner_*, learner.num_workers or resources.learner_placement",
    }[item.role]
    if not holding:
        raise PlanError(
            f"{item.label} requests {_fmt(item.request)}, more than any node type of resources.nodes = {spec!r} "
            f"offers (the biggest, {biggest.name}, has {_fmt(biggest.capacity, biggest.memory_known)}): "
            f"lower {knobs}, or plan for bigger nodes"
        )
    caps = ", ".join(f"{t.name}: {t.max_count}" for t in holding)
    raise PlanError(
        f"{item.label} requests {_fmt(item.request)}, but resources.nodes = {spec!r} allows no more nodes "
        f"that hold it (max_workers {caps}): raise max_workers, or lower {knobs}"
    )


def _notes(cfg: Config) -> dict[str, str]:
    gen = cfg.generation
    return {
        "generator": f"one actor per engine ({gen.engine}, tensor_parallel_size {gen.tensor_parallel_size})",
        "reward": f"reranker: {_reranker(cfg)}",
        "learner": f"Ray Train placement group, {cfg.resources.learner_placement}",
    }


def _reranker(cfg: Config) -> str:
    r = cfg.reward
    what = {
        "rule": f"rule {r.rule}",
        "model": f"reward model {r.model_path}",
        "http": f"HTTP scorer {r.url}",
        "pairwise": f"pairwise {r.model_path}",
        "listwise": f"listwise judge {r.judge_model} at {r.url}",
    }
    return what.get(r.kind, r.kind)


# ---- printing ----------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:g}"


def _gib(x: float, known: bool = True) -> str:
    return "?" if not known else (f"{x:.0f} GiB" if x >= 10 else f"{x:g} GiB") if x else "-"


def _custom(custom: dict[str, float]) -> str:
    return ",".join(f"{k}={_num(v)}" for k, v in sorted(custom.items())) or "-"


def _fmt(r: Request, memory_known: bool = True) -> str:
    parts = [f"{_num(r.cpus)} CPU", f"{_num(r.gpus)} GPU"]
    if r.memory_gib or not memory_known:
        parts.append(f"{_gib(r.memory_gib, memory_known)} memory")
    return ", ".join(parts + [f"{_num(v)} {k}" for k, v in sorted(r.custom.items())])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]


def format_plan(plan: Plan, title: str = "") -> str:
    """The plan as text: actors and their requests, totals, then the nodes and what each holds."""
    names = {"generator": "generator", "reward": "reward", "learner": "learner worker"}
    rows = [
        [names[role], str(n), _num(r.cpus), _num(r.gpus), _gib(r.memory_gib), _custom(r.custom), plan.notes[role]]
        for role, (n, r) in plan.rows.items()
    ]
    t = plan.total
    rows.append(
        [
            "total",
            str(sum(n for n, _ in plan.rows.values())),
            _num(t.cpus),
            _num(t.gpus),
            _gib(t.memory_gib),
            _custom(t.custom),
            "",
        ]
    )
    lines = [f"larpo-ray resource plan{' for ' + title if title else ''} (dry run: nothing started)", ""]
    lines += _table(["actors", "count", "CPU each", "GPU each", "memory each", "custom each", "placement"], rows)
    counts: dict[str, int] = {}
    for node in plan.nodes:
        counts[node.type.name] = counts.get(node.type.name, 0) + 1
    lines += [
        "",
        f"nodes needed (resources.nodes = {plan.spec}): " + ", ".join(f"{c} x {name}" for name, c in counts.items()),
        "",
    ]
    node_rows = []
    for i, node in enumerate(plan.nodes):
        cap, used = node.type.capacity, node.used
        holds = ", ".join(f"{names[role]} x{n}" for role, n in node.holds.items()) or "(nothing)"
        node_rows.append(
            [
                str(i),
                node.type.name + (" (head)" if node.type.head else ""),
                f"{_num(used.cpus)}/{_num(cap.cpus)}",
                f"{_num(used.gpus)}/{_num(cap.gpus)}",
                f"{_gib(used.memory_gib)} / {_gib(cap.memory_gib, node.type.memory_known)}",
                holds,
            ]
        )
    lines += _table(["node", "type", "CPU used", "GPU used", "memory used", "holds"], node_rows)
    lines += [
        "",
        "The driver runs where it is launched (the head) and reserves nothing. Memory is Ray's logical",
        "`memory` resource: a node's RAM less the object store (30%, at most 200 GB).",
    ]
    return "\n".join(lines)
