"""Config: defaults, sources and their order, validation messages, recipes, --help."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from larpo_ray.choices import ENGINE_NAMES, LOSS_SPECS, SCORER_KINDS
from larpo_ray.config import CONFIGS_DIR, Config, ConfigError, LossConfig, help_text, load_config
from larpo_ray.lists import LIST_RULES, WINDOWS
from larpo_ray.run import main, parse_args
from larpo_ray.tasks import REWARDS

# Every config key whose values are a registry's names, and the registry.
REGISTRIES = {
    "loss.name": LOSS_SPECS,
    "lists.rule": LIST_RULES,
    "lists.memory": WINDOWS,
    "generation.engine": ENGINE_NAMES,
    "reward.kind": SCORER_KINDS,
    "reward.rule": REWARDS,
}
ENTRIES = [(key, name) for key, registry in REGISTRIES.items() for name in registry]
# What an entry needs besides its name, where the defaults do not do.
NEEDS = {
    ("reward.kind", "model"): ["--reward.model_path", "some/reward-model"],
    ("reward.kind", "http"): ["--reward.url", "https://rm.example/score"],
    ("reward.kind", "pairwise"): ["--reward.model_path", "llm-blender/PairRM-hf"],
    ("reward.kind", "listwise"): ["--reward.url", "http://judge.example/v1", "--reward.judge_model", "judge"],
}


def test_defaults_validate_and_match_the_default_recipe():
    assert load_config(preset="default") == Config()


def test_the_default_lists_adapt_to_fewer_candidates():
    """The default takes the top 1 against up to 3 below it: with k = 2 that is one pair."""
    cfg = load_config(overrides=["--generation.k", "2"])
    assert (cfg.loss.name, cfg.lists.top, cfg.lists.bottom) == ("contrastive", 1, 3)


def test_sources_in_order_defaults_yaml_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"loss": {"name": "contrastive", "beta": 0.5}, "generation": {"k": 6}}))
    cfg = load_config(
        str(recipe), overrides=["--loss.name", "listmle", "--generation.temperature=0.8,1.0", "--loop.iterations", "2"]
    )
    assert cfg.loss.name == "listmle"  # override beats YAML
    assert cfg.loss.beta == 0.5  # YAML beats default
    assert cfg.generation.k == 6
    assert cfg.generation.temperature == [0.8, 1.0]
    assert cfg.learner.lr == Config().learner.lr  # default kept


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--loss.nam", "x"], "unknown key loss.nam (did you mean loss.name?)"),
        (["--los.name", "x"], "unknown config group 'los' (did you mean loss?)"),
        (
            ["--loss.name", "lismle"],
            "loss.name = 'lismle' is not allowed: choose one of 'pairwise', 'contrastive', 'lambdarank', 'listmle', "
            "'ipo' (did you mean listmle?)",
        ),
        (["--generation.k", "three"], "generation.k = 'three' has the wrong type: expected int, got str"),
        (["--learner.lr", "-1"], "learner.lr = -1.0 is not allowed: > 0"),
        (["--generation.top_p", "1.5"], "generation.top_p = 1.5 is not allowed: in (0, 1]"),
        (
            ["--loss.name", "listmle", "--generation.k", "2"],
            "loss.name = 'listmle' is listwise and needs lists of >= 3 candidates, but generation.k = 2",
        ),
        (["--lists.top", "4"], "lists.top = 4 leaves no negative among the 4 candidates"),
        (
            ["--lists.rule", "correct_incorrect", "--reward.rule", "graded"],
            "lists.rule = 'correct_incorrect' needs binary rewards",
        ),
        (
            ["--learner.offload_optimizer", "true"],
            "learner.offload_optimizer = True is not allowed: needs learner.zero_stage >= 1",
        ),
        (["--reward.kind", "http"], "reward.url = None is not allowed: set it when reward.kind = http"),
        (["--loop.iterations"], "--loop.iterations needs a value"),
        (["loss.name", "x"], "unexpected argument 'loss.name'"),
        (
            ["--generation.temperature", "0.7,0.8", "--loop.iterations", "1"],
            "generation.temperature lists 2 values for loop.iterations = 1",
        ),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads `1e-5` as a string; on the command line and in recipes it means a float.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learner:\n  lr: 2e-6\n")
    assert load_config(str(recipe)).learner.lr == 2e-6
    assert load_config(overrides=["--learner.lr", "1e-5"]).learner.lr == 1e-5
    with pytest.raises(ConfigError, match="learner.lr = '1e-5x' has the wrong type"):
        load_config(overrides=["--learner.lr", "1e-5x"])


def test_construction_in_python_is_validated_too():
    with pytest.raises(ConfigError, match="loss.beta = 0.0 is not allowed"):
        LossConfig(beta=0)
    with pytest.raises(ConfigError, match="expected bool"):
        LossConfig(length_normalize="yes")


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="must hold a mapping of groups"):
        load_config(str(scalar))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(preset="nope")


@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in CONFIGS_DIR.glob("*.yaml") if not p.name.startswith("study-"))
)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_config(str(CONFIGS_DIR / recipe))
    assert Config.from_dict(cfg.to_dict()) == cfg  # the resolved config round-trips


@pytest.mark.parametrize("study", sorted(p.name for p in CONFIGS_DIR.glob("study-*.yaml")))
def test_every_shipped_study_plans_valid_runs(study, tmp_path):
    """configs/study-*.yaml are study files (larpo_ray.study), not recipes: every run they plan
    validates, and none is a preset."""
    from larpo_ray.study import load_study, plan_runs

    runs = plan_runs(load_study(str(CONFIGS_DIR / study)), tmp_path, [])
    assert len(runs) >= 2 and len({r.run_dir for r in runs}) == len(runs)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset=study.removesuffix(".yaml"))


def test_paper_recipes_hold_the_papers_settings():
    base = load_config(preset="paper-mistral7b-base-contrastive")
    assert (
        base.generation.k,
        base.generation.temperature,
        base.loop.iterations,
        base.learner.lr,
        base.learner.epochs,
    ) == (10, [1.0], 3, 5e-7, 2)
    assert (base.lists.top, base.lists.bottom, base.lists.keep_order, base.reward.kind) == (1, 3, False, "pairwise")
    instruct = load_config(preset="paper-mistral7b-instruct-lambdarank")
    assert (instruct.loss.name, instruct.lists.top, instruct.lists.bottom, instruct.generation.temperature) == (
        "lambdarank",
        2,
        2,
        [0.8],
    )
    study = {
        n: load_config(preset=f"paper-study-gemma2-{n}") for n in ("pairwise", "contrastive", "lambdarank", "listmle")
    }
    assert {n: c.generation.k for n, c in study.items()} == {
        "pairwise": 2,
        "contrastive": 4,
        "lambdarank": 4,
        "listmle": 4,
    }
    math = load_config(preset="paper-math-mistral7b")
    assert (math.generation.k, math.lists.rule, math.reward.kind, math.reward.rule) == (
        20,
        "correct_incorrect",
        "rule",
        "binary",
    )


def test_saved_config_loads_back(tmp_path):
    cfg = load_config(overrides=["--loss.name", "contrastive", "--data.system_prompt", "Be brief."])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_help_lists_every_knob_with_doc_and_default():
    text = help_text()
    for group in dataclasses.fields(Config):
        for f in dataclasses.fields(group.default_factory()):
            assert f"--{group.name}.{f.name} (" in text
            assert f.metadata["doc"] in text


@pytest.mark.parametrize(("key", "name"), ENTRIES, ids=[f"{k}={n}" for k, n in ENTRIES])
def test_every_registry_entry_is_a_choice_of_the_config_and_the_cli(key, name, capsys):
    """Adding a loss, list rule, memory window, engine, scorer or verifier rule to its registry makes
    it a config value, a command-line value and a choice `--help` lists, with no other edit."""
    args, rest = parse_args([f"--{key}", name, *NEEDS.get((key, name), [])])
    cfg = load_config(args.config, args.preset, rest)
    group, field = key.split(".")
    assert getattr(getattr(cfg, group), field) == name
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert main(["--help"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(f"--{key} ("))
    assert name in line.split("(", 1)[1].split(", default")[0].split(" | ")


@pytest.mark.parametrize("key", REGISTRIES)
def test_a_name_no_registry_holds_is_refused_with_the_choices(key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"--{key}", "nope"])
    assert f"{key} = 'nope' is not allowed: choose one of {', '.join(map(repr, REGISTRIES[key]))}" in str(err.value)


def test_the_heavy_registries_implement_exactly_the_named_choices():
    """Losses (torch), engines and scorers (actors/) are named in larpo_ray.choices for the light
    config: their tables must hold the same names, and a loss's options must be loss.* keys."""
    from actors.generator import ENGINES
    from actors.reward import SCORERS
    from larpo_ray import serve_engines
    from larpo_ray.losses import LOSSES

    assert list(LOSSES) == list(LOSS_SPECS)
    assert list(ENGINES) == list(serve_engines.ENGINES) == list(ENGINE_NAMES)
    assert list(SCORERS) == list(SCORER_KINDS)
    loss_keys = {f.name for f in dataclasses.fields(LossConfig)}
    assert all(set(spec.options) <= loss_keys for spec in LOSS_SPECS.values())


def test_config_import_is_light():
    code = (
        "import larpo_ray.config, sys; "
        "bad = [m for m in ('torch', 'ray', 'vllm', 'deepspeed') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
