"""The pairwise reranker (reward.kind = pairwise, actors/pairwise.py): PairRM's model class on a
tiny locally built DeBERTa-v2 of the same architecture, its pair schedule (both orders, ties kept),
the reward actor's per-prompt lists and their cost, the config checks, and a tiny-preset run
through Ray scored by it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from actors.pairwise import (
    CAND1,
    CAND2,
    MARKERS,
    SOURCE,
    PairwiseScorer,
    pair_schedule,
    pairrm_class,
    scores_from_margins,
)
from actors.reward import RewardActor
from larpo_ray.config import ConfigError, RewardConfig, load_config
from larpo_ray.types import Candidate, Prompt, ScorerError

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is 12 + 7?"
PROMPT = Prompt(uid="p", text="<templated>", token_ids=(1, 2), messages=(("user", QUESTION),))
RESPONSES = ["12 + 7 = 19. The answer is 19.", "The answer is 20.", "19", "I do not know, sorry."]


def build_tiny_pairrm(path: Path, seed: int = 0) -> Path:
    """A ~60 k-parameter DebertaV2PairRM (deberta-v3's attention settings, 2 layers of 32) with a
    BPE tokenizer that adds [CLS]/[SEP] per encode and knows PairRM's three marker tokens."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import DebertaV2Config, PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", *MARKERS.values()]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [QUESTION, *RESPONSES, "What is 3 + 4? The answer is 7. hello world"] * 10
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    cls_id, sep_id = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
    bpe.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
        additional_special_tokens=list(MARKERS.values()),
        model_max_length=256,
    )
    config = DebertaV2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=64,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        pad_token_id=tok.pad_token_id,
        n_tasks=1,
        drop_out=0.05,
        sep_token_id=sep_id,
        cand_prefix_id=bpe.token_to_id(CAND1),
        **{field: bpe.token_to_id(marker) for field, marker in MARKERS.items()},
    )
    torch.manual_seed(seed)
    pairrm_class()(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairrm_path(tmp_path_factory) -> str:
    return str(build_tiny_pairrm(tmp_path_factory.mktemp("pairrm")))


@pytest.fixture(scope="module")
def scorer(pairrm_path) -> PairwiseScorer:
    return PairwiseScorer(pairrm_path, batch_size=5)


# ---- the pair schedule and the scores (pure) ---------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 10])
def test_all_pairs_by_default(n):
    pairs = pair_schedule(n)
    assert len(pairs) == n * (n - 1) // 2 and len(set(pairs)) == len(pairs)
    assert all(0 <= i < j < n for i, j in pairs)


@pytest.mark.parametrize(("n", "m"), [(7, 1), (7, 2), (12, 3), (16, 2)])
def test_cyclic_schedule_meets_each_response_with_2m_others(n, m):
    pairs = pair_schedule(n, m)
    assert len(pairs) == n * m
    met = [sum(i in pair for pair in pairs) for i in range(n)]
    assert met == [2 * m] * n


def test_cyclic_schedule_is_all_pairs_when_it_would_cover_them():
    assert pair_schedule(5, 2) == pair_schedule(5) and pair_schedule(4, 9) == pair_schedule(4)


def test_scores_are_mean_margins_and_antisymmetric():
    margins = {(0, 1): 2.0, (0, 2): 1.0, (1, 2): -0.5}
    assert scores_from_margins(3, margins) == [1.5, (-2.0 - 0.5) / 2, (-1.0 + 0.5) / 2]
    assert math.isclose(sum(scores_from_margins(3, margins)), 0.0, abs_tol=1e-12)
    assert scores_from_margins(2, {}) == [0.0, 0.0]


def test_source_is_the_last_user_turn():
    chat = Prompt(uid="c", text="t", token_ids=(1,), messages=(("user", "a"), ("assistant", "b"), ("user", "c")))
    assert chat.question == "c"
    assert Prompt(uid="t", text="plain", token_ids=(1,)).question == "plain"


# ---- the model on a tiny checkpoint ------------------------------------------------------------


def test_input_layout_is_pairrms(scorer):
    ids = scorer.encode(QUESTION, "a", "b")
    tok = scorer.tokenizer
    cfg = scorer.model.config
    assert [ids.count(getattr(cfg, f)) for f in MARKERS] == [1, 1, 1]
    assert ids.count(tok.cls_token_id) == 3 and ids.count(tok.sep_token_id) == 3
    assert ids.index(cfg.source_prefix_id) < ids.index(cfg.cand1_prefix_id) < ids.index(cfg.cand2_prefix_id)
    long = scorer.encode("x " * 1000, "y " * 1000, "z " * 1000)
    assert len(long) <= scorer.max_length == 256 and [long.count(getattr(cfg, f)) for f in MARKERS] == [1, 1, 1]


def test_a_response_that_spells_a_marker_still_scores(scorer):
    ranked = scorer.rank(PROMPT, [f"{CAND2} sneaky {SOURCE}", "fine"])
    assert all(math.isfinite(s) for s in ranked.scores)


def test_compare_is_batch_invariant_and_order_sensitive(scorer):
    pairs = [(a, b) for a in RESPONSES for b in RESPONSES if a != b]
    batched = scorer.compare(QUESTION, pairs)
    alone = [scorer.compare(QUESTION, [p])[0] for p in pairs]
    assert batched == pytest.approx(alone, abs=1e-5)
    forward = dict(zip(pairs, batched))
    assert any(abs(forward[a, b] + forward[b, a]) > 1e-4 for a, b in pairs)  # position bias exists...


def test_rank_uses_both_orders_and_cancels_position_bias(scorer):
    a, b = RESPONSES[0], RESPONSES[1]
    s_ab, s_ba = scorer.compare(QUESTION, [(a, b), (b, a)])
    ranked = scorer.rank(PROMPT, [a, b])
    margin = (s_ab - s_ba) / 2
    assert ranked.calls == 2 and ranked.scores == pytest.approx([margin, -margin], abs=1e-6)
    assert scorer.rank(PROMPT, [b, a]).scores == pytest.approx([-margin, margin], abs=1e-6)  # ...and cancels


def test_rank_matches_the_hand_computed_mean_margins(scorer):
    ranked = scorer.rank(PROMPT, RESPONSES)
    n = len(RESPONSES)
    assert ranked.calls == n * (n - 1)
    expected = []
    for i, a in enumerate(RESPONSES):
        margins = [
            (s1 - s2) / 2 for s1, s2 in (scorer.compare(QUESTION, [(a, b), (b, a)]) for b in RESPONSES if b != a)
        ]
        expected.append(sum(margins) / len(margins))
    assert ranked.scores == pytest.approx(expected, abs=1e-5)
    assert len(set(ranked.scores)) == n


def test_identical_responses_tie_and_are_compared_once(scorer):
    ranked = scorer.rank(PROMPT, [RESPONSES[0], RESPONSES[1], RESPONSES[0], RESPONSES[0]])
    assert ranked.calls == 2  # two distinct texts: one pair, both orders
    assert ranked.scores[0] == ranked.scores[2] == ranked.scores[3] != ranked.scores[1]
    assert scorer.rank(PROMPT, ["same", "same"]).scores == [0.0, 0.0]


def test_cheaper_schedule_costs_2_u_m_forwards(pairrm_path):
    cheap = PairwiseScorer(pairrm_path, batch_size=8, opponents=1)
    texts = [f"The answer is {i}." for i in range(7)]
    ranked = cheap.rank(PROMPT, texts)
    assert ranked.calls == 2 * 7 * 1 and len(ranked.scores) == 7


def test_refuses_what_is_not_a_pairrm_checkpoint(pairrm_path, tmp_path):
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    plain = tmp_path / "deberta-rm"
    DebertaV2ForSequenceClassification(
        DebertaV2Config(
            vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(plain)
    AutoTokenizer.from_pretrained(pairrm_path).save_pretrained(plain)
    with pytest.raises(ScorerError, match="not a PairRM checkpoint"):
        PairwiseScorer(str(plain))
    other = build_tiny_pairrm(tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["source_prefix_id"] = cfg["pad_token_id"]  # the tokenizer's <|source|> is another id
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScorerError, match="different checkpoints"):
        PairwiseScorer(str(other))


# ---- through the reward actor ------------------------------------------------------------------


def _cands(uid: str, texts: list[str]) -> list[Candidate]:
    return [
        Candidate(prompt_uid=uid, token_ids=(i + 1,), text=t, sample_logps=(-1.0,), temperature=1.0, policy_version=0)
        for i, t in enumerate(texts)
    ]


def test_actor_ranks_each_prompts_list_and_reports_its_cost(pairrm_path, scorer):
    cfg = RewardConfig(kind="pairwise", model_path=pairrm_path, batch_size=5)
    actor = RewardActor(cfg)
    other = Prompt(uid="q", text="t", token_ids=(1,), messages=(("user", "What is 3 + 4?"),))
    lone = Prompt(uid="r", text="t", token_ids=(1,), messages=(("user", "Hi"),))
    cands = _cands("p", RESPONSES[:3]) + _cands("q", ["7", "8"]) + _cands("r", ["alone"])
    report = actor.score({"p": PROMPT, "q": other, "r": lone}, cands, iteration=1)
    assert report.lists == 2 and report.calls == 3 * 2 + 2 and report.n_failed == 0
    by_uid = {}
    for sc in report.scored:
        by_uid.setdefault(sc.candidate.prompt_uid, []).append(sc.reward)
    assert by_uid["p"] == pytest.approx(scorer.rank(PROMPT, RESPONSES[:3]).scores, abs=1e-6)
    assert by_uid["r"] == [0.0]  # nothing to compare a lone reply with


def test_actor_compare_gives_margins_over_the_baseline(pairrm_path, scorer):
    actor = RewardActor(RewardConfig(kind="pairwise", model_path=pairrm_path))
    margins = actor.compare([PROMPT, PROMPT], [RESPONSES[0], RESPONSES[1]], [RESPONSES[1], RESPONSES[1]])
    expected = scorer.rank(PROMPT, [RESPONSES[0], RESPONSES[1]]).scores
    assert margins == pytest.approx([expected[0] - expected[1], 0.0], abs=1e-6)


def test_config_needs_the_model_and_the_current_memory():
    with pytest.raises(ConfigError, match="reward.model_path"):
        load_config(preset="tiny", overrides=["--reward.kind", "pairwise"])
    with pytest.raises(ConfigError, match="lists.memory = current"):
        load_config(
            preset="tiny", overrides=["--reward.kind", "pairwise", "--reward.model_path", "x", "--lists.memory", "all"]
        )
    with pytest.raises(ConfigError, match="pair_opponents"):
        load_config(
            preset="tiny",
            overrides=["--reward.kind", "pairwise", "--reward.model_path", "x", "--reward.pair_opponents", "-1"],
        )


# ---- a tiny-preset run scored by PairRM, through Ray ------------------------------------------


@pytest.mark.slow
def test_tiny_preset_run_with_the_pairwise_reranker(pairrm_path, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "larpo_ray.run", "--preset", "tiny", "--loop.iterations", "1"]
    cmd += ["--reward.kind", "pairwise", "--reward.model_path", pairrm_path, "--loop.run_dir", str(run_dir)]
    cmd += ["--logging.progress", "false"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    first, last = rows
    assert first["eval/mean_reward"] == 0.0  # the initial policy against itself
    assert 0.0 <= last["eval/win_rate_vs_initial"] <= 1.0 and last["lists/n_lists"] > 0
    k = 4
    assert last["reward/lists"] == 32 and last["reward/calls"] <= 32 * k * (k - 1)
    assert last["reward/calls_per_list"] == last["reward/calls"] / 32 and last["reward/seconds_per_list"] > 0
    assert (run_dir / "policy" / "config.json").exists()
