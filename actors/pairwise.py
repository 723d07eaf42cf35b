"""The pairwise reranker (`reward.kind = pairwise`): PairRM, the paper's main reward model.

PairRM (LLM-Blender, `llm-blender/PairRM-hf`) reads one prompt and two responses together and
answers a logit s(a, b) > 0 when response a is better than b. It is a DeBERTa-v3 encoder over

    [CLS] <|source|> prompt [SEP] [CLS] <|candidate1|> a [SEP] [CLS] <|candidate2|> b [SEP]

(each part encoded with the tokenizer's specials, the prompt cut to 1224 and each response to half
of what is left of 2048 tokens) with one head applied to [h(source), h(candidate)] at the two
candidate markers; s(a, b) is the head's output for a minus its output for b.

LLM-Blender's own package (`llm-blender` 0.0.2 on PyPI, its last release) does not import beside
our transformers 5 (`from transformers.utils.hub import TRANSFORMERS_CACHE` is gone), so the model
class is reimplemented here on transformers' `DebertaV2Model`: the same module names (checkpoints
load unchanged), the same input layout and output; LLM-Blender's `Blender.rank` schedules and its
training code are not. Only safetensors checkpoints are read (`PairRM-hf` ships them).

Ranking one prompt's k responses (`rank`):
- Identical texts are ranked once and share a score: ties stay ties.
- Every pair of distinct responses is compared in both orders (two forwards), which cancels the
  position bias: m(a, b) = (s(a, b) - s(b, a)) / 2 = -m(b, a).
- A response's score is the mean of its margins m(a, .) over the responses it met.
- Cost: u(u - 1) forwards for u distinct responses (90 at the paper's k = 10). For large k,
  `reward.pair_opponents = m` meets each response only with the m next ones in a cycle (both
  orders): 2 * u * m forwards (fewer when 2m >= u - 1, which is all pairs), each response meeting
  2m others. The forwards of a prompt go in batches of `reward.batch_size`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from larpo_ray.config import RewardConfig
from larpo_ray.models import require_safetensors
from larpo_ray.types import GroupScores, Prompt, ScorerError

SOURCE, CAND1, CAND2 = "<|source|>", "<|candidate1|>", "<|candidate2|>"
MARKERS = {"source_prefix_id": SOURCE, "cand1_prefix_id": CAND1, "cand2_prefix_id": CAND2}
MAX_LENGTH, SOURCE_MAX_LENGTH = 2048, 1224  # PairRM's input budget and the prompt's share of it


def pair_schedule(n: int, opponents: int = 0) -> list[tuple[int, int]]:
    """The unordered pairs (i < j) of n responses to compare: all of them (`opponents` = 0), or
    each response with the `opponents` next ones in a cycle."""
    if opponents <= 0 or 2 * opponents >= n - 1:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    pairs = {tuple(sorted((i, (i + d) % n))) for i in range(n) for d in range(1, opponents + 1)}
    return sorted(pairs)


def scores_from_margins(n: int, margins: dict[tuple[int, int], float]) -> list[float]:
    """Score of each of n responses: the mean of its margins m(i, j) = -m(j, i) over the pairs it
    was in (`margins` keyed by the pair (i, j) with i < j, valued m(i, j))."""
    total, met = [0.0] * n, [0] * n
    for (i, j), m in margins.items():
        total[i], total[j] = total[i] + m, total[j] - m
        met[i], met[j] = met[i] + 1, met[j] + 1
    return [t / c if c else 0.0 for t, c in zip(total, met)]


def _clean(text: str) -> str:
    """A response that spells a marker would add a second marker token and break the model's read."""
    for marker in MARKERS.values():
        text = text.replace(marker, "")
    return text


@functools.cache
def pairrm_class():
    """`DebertaV2PairRM` (built on first use: transformers is imported only where it runs)."""
    import torch
    from torch import nn
    from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Model, DebertaV2PreTrainedModel

    class DebertaV2PairRM(DebertaV2PreTrainedModel):
        """PairRM: `forward(input_ids, attention_mask)` -> s(candidate1, candidate2), one per row."""

        def __init__(self, config):
            super().__init__(config)
            self.pretrained_model = DebertaV2Model(config)
            hidden = config.hidden_size
            self.head_layer = nn.Sequential(
                nn.Dropout(config.drop_out),
                nn.Linear(2 * hidden, hidden),
                nn.Tanh(),
                nn.Dropout(config.drop_out),
                nn.Linear(hidden, config.n_tasks),
            )
            self.post_init()

        def _at(self, input_ids, hidden, token_id: int):
            rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
            if rows.tolist() != list(range(input_ids.shape[0])):
                raise ValueError(f"each input needs exactly one marker token {token_id}")
            return hidden[rows, cols]

        def forward(self, input_ids, attention_mask):
            hidden = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            cfg = self.config
            source = self._at(input_ids, hidden, cfg.source_prefix_id)
            left = self.head_layer(torch.cat([source, self._at(input_ids, hidden, cfg.cand1_prefix_id)], dim=-1))
            right = self.head_layer(torch.cat([source, self._at(input_ids, hidden, cfg.cand2_prefix_id)], dim=-1))
            return (left - right).mean(dim=-1)

    return DebertaV2PairRM


class PairwiseScorer:
    """PairRM behind the relative-reranker interface `rank(prompt, responses) -> GroupScores`."""

    def __init__(self, model_path: str, batch_size: int = 16, opponents: int = 0, trust_remote_code: bool = False):
        import torch
        from transformers import AutoTokenizer

        self.batch_size, self.opponents = batch_size, opponents
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if Path(model_path).is_dir():
            require_safetensors(Path(model_path), "reward.model_path")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        try:
            self.model, info = pairrm_class().from_pretrained(
                model_path, output_loading_info=True, use_safetensors=True
            )
        except AttributeError as err:  # a config without PairRM's fields (n_tasks, drop_out, marker ids)
            raise ScorerError(
                f"reward.model_path {model_path!r} is not a PairRM checkpoint ({err}); reward.kind = pairwise "
                f"needs a DebertaV2PairRM folder such as llm-blender/PairRM-hf"
            ) from None
        if info["missing_keys"]:
            raise ScorerError(
                f"reward.model_path {model_path!r} lacks PairRM weights ({sorted(info['missing_keys'])[:4]}): "
                f"give a trained DebertaV2PairRM checkpoint such as llm-blender/PairRM-hf"
            )
        for field, marker in MARKERS.items():
            if self.tokenizer.convert_tokens_to_ids(marker) != getattr(self.model.config, field):
                raise ScorerError(
                    f"the tokenizer of {model_path!r} does not map {marker} to config.{field} = "
                    f"{getattr(self.model.config, field)}: tokenizer and model are from different checkpoints"
                )
        self.model.to(self.device).eval()
        limit = self.tokenizer.model_max_length
        self.max_length = min(MAX_LENGTH, limit) if limit and limit < 10**7 else MAX_LENGTH
        self.source_max_length = self.max_length * SOURCE_MAX_LENGTH // MAX_LENGTH

    @classmethod
    def from_config(cls, cfg: RewardConfig, trust_remote_code: bool = False) -> PairwiseScorer:
        return cls(cfg.model_path, cfg.batch_size, cfg.pair_opponents, trust_remote_code)

    def encode(self, source: str, first: str, second: str) -> list[int]:
        """One PairRM input: the prompt, then the two responses, each part with the tokenizer's specials."""
        tok = self.tokenizer
        ids = tok.encode(SOURCE + _clean(source), max_length=self.source_max_length, truncation=True)
        each = (self.max_length - len(ids)) // 2
        for marker, text in ((CAND1, first), (CAND2, second)):
            ids += tok.encode(marker + _clean(text), max_length=each, truncation=True)
        return ids

    def compare(self, source: str, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """s(a, b) for each (a, b): > 0 when PairRM prefers a."""
        import torch

        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(pairs), self.batch_size):
                ids = [self.encode(source, a, b) for a, b in pairs[start : start + self.batch_size]]
                batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
                out += self.model(batch["input_ids"], batch["attention_mask"]).float().cpu().tolist()
        return out

    def rank(self, prompt: Prompt, responses: Sequence[str]) -> GroupScores:
        """Scores of one prompt's responses from their pairwise margins (module docstring)."""
        unique = list(dict.fromkeys(responses))
        pairs = pair_schedule(len(unique), self.opponents)
        ordered = [(i, j) for i, j in pairs] + [(j, i) for i, j in pairs]
        logits = self.compare(prompt.question, [(unique[a], unique[b]) for a, b in ordered])
        forward = dict(zip(ordered, logits))
        margins = {(i, j): (forward[i, j] - forward[j, i]) / 2 for i, j in pairs}
        by_text = dict(zip(unique, scores_from_margins(len(unique), margins)))
        return GroupScores(scores=[by_text[r] for r in responses], calls=len(ordered))
