"""cluster/: the launcher YAMLs pass Ray's own config validation, the KubeRay manifests pass their
CRD schemas, and both have the GPUs and CPUs the paper recipe's resource plan asks for."""

import copy
import functools
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from larpo_ray.config import CONFIGS_DIR, load_config

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_FILES = {"raycluster.yaml": "ray.io_rayclusters.yaml", "rayjob.yaml": "ray.io_rayjobs.yaml"}
# The CRDs live beside the checkout (../shared, README there); they are not part of the repository.
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay"
PAPER_RECIPE = CONFIGS_DIR / "paper-mistral7b-base-contrastive.yaml"


def read(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---- Ray cluster launcher ----------------------------------------------------------------------


def ray_validate(config: dict) -> None:
    """What `ray up` checks before it touches the cloud: Ray's defaults for the provider merged in
    (prepare_config), then ray-schema.json plus the head/min_workers rules (validate_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_ray_validation(name):
    ray_validate(read(CLUSTER_DIR / name))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_validation_rejects_broken_configs(name):
    config = read(CLUSTER_DIR / name)
    no_resources = copy.deepcopy(config)
    del no_resources["available_node_types"]["gpu_8x_h100"]["resources"]  # required by ray-schema.json
    typo = copy.deepcopy(config)
    typo["idle_timeout_minute"] = typo.pop("idle_timeout_minutes")  # top level allows no unknown keys
    for broken in (no_resources, typo):
        with pytest.raises(jsonschema.ValidationError):
            ray_validate(broken)
    bad_head = copy.deepcopy(config)
    bad_head["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(bad_head)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_image_matches_the_installed_ray(name):
    # `ray up` refuses a cluster whose Ray version differs from the local one.
    image = read(CLUSTER_DIR / name)["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image


# ---- KubeRay -----------------------------------------------------------------------------------


def crd_schema(crd_file: str) -> dict:
    """The served storage version's openAPIV3Schema, made strict like `kubectl apply`'s default
    field validation: objects with declared properties accept no other keys. `x-kubernetes-*`
    keys are unknown to jsonschema and ignored (CEL rules are not evaluated); formats (int32,
    int64, date-time) are not checked (no format checker); int-or-string quantities are, through
    the anyOf and pattern beside `x-kubernetes-int-or-string`."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (CI checks out ../shared beside the repository)")
    crd = read_crd(crd_file)
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v.get("storage")]
    return _strict(version["schema"]["openAPIV3Schema"])


@functools.cache
def read_crd(crd_file: str) -> dict:
    """A parsed CRD (10k+ lines: parsed once, with libyaml where present). Callers must not mutate it."""
    return yaml.load((CRD_DIR / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _strict(node):
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(crd_file: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(crd_schema(crd_file))


def k8s_errors(manifest: dict, crd_file: str) -> list[str]:
    validator = crd_validator(crd_file)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize("name, crd_file", KUBERAY_FILES.items())
def test_kuberay_manifest_matches_its_crd(name, crd_file):
    manifest = read(CLUSTER_DIR / "kuberay" / name)
    assert k8s_errors(manifest, crd_file) == []
    crd = read_crd(crd_file)
    assert manifest["kind"] == crd["spec"]["names"]["kind"]
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])  # DNS-1123 label


def test_kuberay_validation_rejects_broken_manifests():
    cluster = read(CLUSTER_DIR / "kuberay" / "raycluster.yaml")
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["enableInTreeAutoscaling"] = "yes"  # boolean in the CRD
    assert any("enableInTreeAutoscaling" in e for e in k8s_errors(wrong_type, "ray.io_rayclusters.yaml"))
    bad_quantity = copy.deepcopy(cluster)
    bad_quantity["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ] = "four"
    assert k8s_errors(bad_quantity, "ray.io_rayclusters.yaml")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert any("maxReplica" in e for e in k8s_errors(typo, "ray.io_rayclusters.yaml"))
    job = read(CLUSTER_DIR / "kuberay" / "rayjob.yaml")
    job["spec"]["entrypointNumGpus"] = "none"  # a number in the CRD
    assert any("entrypointNumGpus" in e for e in k8s_errors(job, "ray.io_rayjobs.yaml"))


def test_rayjob_runs_the_paper_recipe_on_the_raycluster():
    cluster = read(CLUSTER_DIR / "kuberay" / "raycluster.yaml")
    job = read(CLUSTER_DIR / "kuberay" / "rayjob.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert f"python -m larpo_ray.run --config configs/{PAPER_RECIPE.name}" in job["spec"]["entrypoint"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["rayVersion"] == ray.__version__
    assert {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]} == {"learner", "generator", "reward"}


# ---- the paper recipe's resource plan fits ------------------------------------------------------


def role_bundles(overrides: list[str] | None = None) -> dict[str, list[tuple[float, float]]]:
    """(CPU, GPU) per actor of each role, as larpo_ray/topology.py and learner_group.py request them."""
    cfg = load_config(str(PAPER_RECIPE), overrides=overrides)
    res, gen = cfg.resources, cfg.generation
    return {
        "learner": [(res.learner_cpus_per_worker, res.learner_gpus_per_worker)] * cfg.learner.num_workers,
        "generator": [(res.generator_cpus, res.generator_gpus * gen.tensor_parallel_size)] * gen.num_generators,
        "reward": [(res.reward_cpus, res.reward_gpus)] * cfg.reward.num_actors,
    }


def fits(bundles: list[tuple[float, float]], nodes: list[tuple[float, float]]) -> bool:
    """First-fit decreasing of (CPU, GPU) bundles onto (CPU, GPU) nodes (what the autoscaler can add)."""
    free = [list(n) for n in nodes]
    for cpu, gpu in sorted(bundles, key=lambda b: (b[1], b[0]), reverse=True):
        node = next((n for n in free if n[0] >= cpu and n[1] >= gpu), None)
        if node is None:
            return False
        node[0] -= cpu
        node[1] -= gpu
    return True


def launcher_nodes(config: dict) -> list[tuple[float, float]]:
    types = config["available_node_types"]
    nodes = []
    for name, t in types.items():
        count = 1 if name == config["head_node_type"] else t.get("max_workers", 0)
        nodes += [(t["resources"].get("CPU", 0), t["resources"].get("GPU", 0))] * count
    return nodes


def quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_resources(group: dict) -> tuple[float, float]:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = group["rayStartParams"].get("num-cpus", limits.get("cpu", 0))
    return quantity(cpus), quantity(limits.get("nvidia.com/gpu", 0))


def kuberay_nodes(cluster: dict) -> list[tuple[float, float]]:
    spec = cluster["spec"]
    nodes = [pod_resources(spec["headGroupSpec"])]
    for group in spec["workerGroupSpecs"]:
        nodes += [pod_resources(group)] * group["maxReplicas"]
    return nodes


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_hosts_the_paper_recipe(name):
    config = read(CLUSTER_DIR / name)
    roles = role_bundles()
    assert fits(sum(roles.values(), []), launcher_nodes(config))
    # The learner group is placed PACK: one GPU node type holds all of its workers, and the whole
    # recipe (8 GPUs) on one node keeps weight sync on NVLink.
    biggest = max(t["resources"].get("GPU", 0) for t in config["available_node_types"].values())
    gpu_type = next(t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) == biggest)
    one_node = [(gpu_type["resources"]["CPU"], biggest)]
    assert fits(roles["learner"], one_node)
    assert fits(sum(roles.values(), []), one_node)


def test_kuberay_hosts_the_paper_recipe():
    cluster = read(CLUSTER_DIR / "kuberay" / "raycluster.yaml")
    roles = role_bundles()
    assert fits(sum(roles.values(), []), kuberay_nodes(cluster))
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert fits(roles["learner"], [pod_resources(groups["learner"])])  # PACK onto one learner pod
    # Ray does not pin roles to groups, so every GPU pod must hold any one-GPU actor of any role.
    largest_cpu_per_gpu = max(cpu / gpu for bundles in roles.values() for cpu, gpu in bundles if gpu)
    for group in groups.values():
        cpu, gpu = pod_resources(group)
        assert gpu == 0 or cpu / gpu >= largest_cpu_per_gpu, group["groupName"]


def test_resource_check_fails_when_the_recipe_outgrows_the_cluster():
    cluster = read(CLUSTER_DIR / "kuberay" / "raycluster.yaml")
    bigger = role_bundles(["--learner.num_workers", "8"])
    assert not fits(sum(bigger.values(), []), kuberay_nodes(cluster))
