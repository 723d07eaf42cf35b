"""Prompt loading: every source format, the splits, dedup, and the error for each kind of bad row."""

import json

import published_data as pub
import pytest

from larpo_ray.config import ConfigError, DataConfig
from larpo_ray.data import DataError, load_prompts, prompt_uid
from larpo_ray.tasks import format_question, make_splits, reference_answer

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE trained here on a few sentences, with a ChatML template that writes BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(
        ["What is 3 + 4? The answer is 7.", "Tell me a story about a cat.", "You are a helpful assistant."] * 20,
        trainer,
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>", chat_template=CHATML)


def cfg(source, **kw):
    kw.setdefault("num_eval", 1)
    kw.setdefault("num_train", 0)
    return DataConfig(source=str(source), **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompts_rows(n, start=0):
    return [{"prompt": f"question {i}?", "answer": i} for i in range(start, start + n)]


# ---- sources -------------------------------------------------------------------------------------


def test_builtin_counts_answers_template_and_determinism(tok):
    c = DataConfig(source="builtin:arithmetic", num_train=12, num_eval=4, levels=[1, 2], seed=3)
    out = load_prompts(c, tok)
    train, evals = make_splits([1, 2], 12, 4, 3)
    assert [p.uid for p in out.train] == [p.uid for p in train]
    assert [p.uid for p in out.eval] == [p.uid for p in evals]
    assert [p.answer for p in out.train] == [p.answer for p in train]
    first = out.train[0]
    assert first.messages == (("user", format_question(train[0])),)
    assert first.text.startswith("<s><|im_start|>user\n") and first.text.endswith("<|im_start|>assistant\n")
    # The template writes BOS; tokenizing must not add a second one.
    assert first.token_ids.count(tok.bos_token_id) == 1 and first.token_ids[0] == tok.bos_token_id
    assert tok.decode(first.token_ids) == first.text
    assert load_prompts(c, tok) == out
    assert out.report.train.kept == 12 and out.report.eval.kept == 4


def test_builtin_with_the_project_tiny_tokenizer():
    from larpo_ray.models import build_tiny_model, load_tokenizer

    tokenizer = load_tokenizer(build_tiny_model())  # cached across tests and runs
    out = load_prompts(DataConfig(num_train=4, num_eval=2), tokenizer)
    assert len(out.train) == 4 and len(out.eval) == 2
    p = out.train[0]
    assert (
        list(p.token_ids)
        == tokenizer.apply_chat_template(
            [{"role": "user", "content": p.messages[0][1]}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def test_jsonl_prompt_column_and_held_out_tail(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", prompts_rows(5))
    out = load_prompts(cfg(path, num_eval=2), tok)
    assert [p.messages[0][1] for p in out.train] == ["question 0?", "question 1?", "question 2?"]
    assert [p.messages[0][1] for p in out.eval] == ["question 3?", "question 4?"]
    assert [p.answer for p in out.train] == ["0", "1", "2"]
    assert out.train[0].uid == prompt_uid([{"role": "user", "content": "question 0?"}])
    assert out.report.train.rows_read == 5


def test_num_train_caps_train_after_the_tail(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", prompts_rows(6))
    out = load_prompts(cfg(path, num_eval=2, num_train=3), tok)
    assert [p.answer for p in out.train] == ["0", "1", "2"] and [p.answer for p in out.eval] == ["4", "5"]


def test_json_list_messages_with_system_prompt(tmp_path, tok):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}], "answer": 3.0},
        {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "yo"}]},
        {"prompt": "plain"},
    ]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows))
    out = load_prompts(cfg(path, system_prompt="Be brief."), tok)
    assert out.train[0].messages == (("system", "Be brief."), ("user", "hi"))
    assert out.train[0].answer == "3"
    assert (
        out.train[0].text
        == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out.train[1].messages == (("system", "own"), ("user", "yo")) and out.train[1].answer is None
    assert out.eval[0].messages == (("system", "Be brief."), ("user", "plain"))


def test_parquet(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?", "c?"], "answer": [1, None, 3]}), path)
    out = load_prompts(cfg(path, prompt_column="question"), tok)
    assert [(p.messages[0][1], p.answer) for p in out.train] == [("a?", "1"), ("b?", None)]
    assert out.eval[0].answer == "3"


def test_eval_source_and_overlap_removed_from_train(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", prompts_rows(4))
    evals = write_jsonl(tmp_path / "eval.jsonl", prompts_rows(3, start=2))  # 2, 3 overlap train
    out = load_prompts(cfg(train, eval_source=str(evals), num_eval=0), tok)
    assert [p.answer for p in out.train] == ["0", "1"]
    assert [p.answer for p in out.eval] == ["2", "3", "4"]
    assert out.report.train.in_eval == 2 and out.report.eval.rows_read == 3
    assert len(load_prompts(cfg(train, eval_source=str(evals), num_eval=2), tok).eval) == 2


def test_a_chat_is_cut_after_its_last_user_message(tmp_path, tok):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
        {
            "messages": [
                {"role": "system", "content": "own"},
                {"role": "user", "content": "a?"},
                {"role": "assistant", "content": "b."},
                {"role": "user", "content": "c?"},
                {"role": "assistant", "content": "d."},
            ]
        },
        {"prompt": "plain"},
    ]
    out = load_prompts(cfg(write_jsonl(tmp_path / "p.jsonl", rows)), tok)
    assert out.train[0].messages == (("user", "hi"),) and "hello!" not in out.train[0].text
    assert out.train[0].uid == prompt_uid([{"role": "user", "content": "hi"}])  # the same prompt, the same uid
    assert out.train[1].messages == (("system", "own"), ("user", "a?"), ("assistant", "b."), ("user", "c?"))
    assert out.train[1].text.endswith("c?<|im_end|>\n<|im_start|>assistant\n") and "d." not in out.train[1].text


def test_ultrafeedback_rows_are_their_user_prompt(tmp_path, tok):
    """The published schema: `messages` (the chosen chat, ending with the reply) beside `prompt`."""
    train = pub.write_ultrafeedback(tmp_path / "train_prefs.parquet", "train_prefs")
    test = pub.write_ultrafeedback(tmp_path / "test_prefs.parquet", "test_prefs")
    out = load_prompts(cfg(train, eval_source=str(test), num_eval=0, max_prompt_tokens=512), tok)
    assert [p.messages for p in out.train] == [(("user", q),) for q in pub.UF_PROMPTS["train_prefs"]]
    assert [p.messages for p in out.eval] == [(("user", q),) for q in pub.UF_PROMPTS["test_prefs"]]
    assert not any("answer to:" in p.text for p in out.train + out.eval)  # no chosen or rejected reply
    assert all(p.answer is None for p in out.train + out.eval)
    by_prompt = load_prompts(cfg(train, messages_column="none", num_eval=2, max_prompt_tokens=512), tok)
    assert [p.uid for p in by_prompt.train + by_prompt.eval] == [p.uid for p in out.train]


def test_gsm8k_answers_are_the_numbers_after_the_hashes(tmp_path, tok):
    train = pub.write_gsm8k(tmp_path / "train.parquet", "train")
    test = pub.write_gsm8k(tmp_path / "test.parquet", "test")
    c = cfg(train, eval_source=str(test), num_eval=0, prompt_column="question", max_prompt_tokens=512)
    out = load_prompts(c, tok)
    for prompts, split in ((out.train, "train"), (out.eval, "test")):
        assert [p.messages for p in prompts] == [(("user", q),) for q, _ in pub.GSM8K_ROWS[split]]
        assert [reference_answer(p.answer) for p in prompts] == [pub.gsm8k_answer(a) for _, a in pub.GSM8K_ROWS[split]]
    assert [reference_answer(p.answer) for p in out.eval] == ["33", "270", "3600"]


def test_alpaca_eval_instructions_as_eval_source(tmp_path, tok):
    train = pub.write_ultrafeedback(tmp_path / "train_prefs.parquet", "train_prefs")
    alpaca = pub.write_alpaca_eval(tmp_path / "alpaca_eval.json")
    c = cfg(train, eval_source=str(alpaca), eval_prompt_column="instruction", num_eval=0, max_prompt_tokens=512)
    out = load_prompts(c, tok)
    assert [p.messages for p in out.eval] == [(("user", q),) for q, _ in pub.ALPACA_EVAL_ROWS]
    assert all(p.answer is None for p in out.eval)  # `output` is a reference model's reply, not an answer
    assert len(out.train) == len(pub.UF_PROMPTS["train_prefs"])
    with pytest.raises(DataError, match=r"alpaca_eval\.json: rows have neither a 'prompt' nor"):
        load_prompts(cfg(train, eval_source=str(alpaca), num_eval=0, max_prompt_tokens=512), tok)
    with pytest.raises(ConfigError, match="data.eval_prompt_column = 'instruction' is not allowed"):
        cfg(train, eval_prompt_column="instruction")


def test_hub_names_pick_config_and_split_and_hub_files_are_fetched(monkeypatch, tmp_path, tok):
    pub.serve_offline_hub(monkeypatch, tmp_path)
    c = cfg("openai/gsm8k:main:train", eval_source="openai/gsm8k:main:test", num_eval=0, prompt_column="question")
    out = load_prompts(c, tok)
    assert len(out.train) == 4 and len(out.eval) == 3
    assert out.eval[0].messages == (("user", pub.GSM8K_ROWS["test"][0][0]),)  # the hub stand-in checks the names
    uf = cfg("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", num_eval=2)
    assert len(load_prompts(uf, tok).train) == 4  # no config: the set's default; data.split names the split
    with pytest.raises(DataError, match=r"could not load dataset 'openai/gsm8k' \(split 'test'\).*name:config:split"):
        load_prompts(cfg("openai/gsm8k:test", num_eval=2), tok)  # GSM8K has two configs: name one
    hub_file = "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json"
    evals = load_prompts(
        cfg(uf.source, split="train_prefs", eval_source=hub_file, eval_prompt_column="instruction"), tok
    )
    assert [p.messages[0][1] for p in evals.eval] == [pub.ALPACA_EVAL_ROWS[0][0]]  # num_eval = 1
    assert f"{len(pub.ALPACA_EVAL_ROWS)} rows read" in evals.report.summary()
    with pytest.raises(DataError, match="could not fetch hf://datasets/tatsu-lab/alpaca_eval/nope.json") as err:
        load_prompts(
            cfg(uf.source, split="train_prefs", eval_source=hub_file.replace("alpaca_eval.json", "nope.json")), tok
        )
    assert "hf download tatsu-lab/alpaca_eval nope.json --repo-type dataset" in str(err.value)
    with pytest.raises(DataError, match="is not a hub data file: write hf://datasets/ORG/NAME"):
        load_prompts(cfg("hf://datasets/tatsu-lab/alpaca_eval"), tok)


def test_duplicates_dropped_and_counted(tmp_path, tok):
    rows = prompts_rows(3) + [
        {"prompt": "question 1?", "answer": 99},
        {"messages": [{"role": "user", "content": "question 0?"}]},
    ]
    out = load_prompts(cfg(write_jsonl(tmp_path / "p.jsonl", rows), num_eval=1), tok)
    assert [p.answer for p in out.train] == ["0", "1"]  # the first copy is kept
    assert out.report.train.duplicates == 2
    assert "2 duplicates" in out.report.summary()


# ---- bad rows ------------------------------------------------------------------------------------

BAD_LINES = {
    "missing_column": json.dumps({"answer": 1}),
    "empty_prompt": json.dumps({"prompt": "   "}),
    "not_a_string": json.dumps({"prompt": 5}),
    "bad_messages": json.dumps(
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}
    ),
    "too_long": json.dumps({"prompt": "word " * 200}),
    "invalid_json": '{"prompt": "unterminated',
    "not_an_object": json.dumps(["a list"]),
}


def write_with_bad_line(path, bad: bytes):
    good = [json.dumps(r).encode() for r in prompts_rows(3)]
    path.write_bytes(b"\n".join([good[0], good[1], bad, good[2]]) + b"\n")
    return path


@pytest.mark.parametrize("reason", [*BAD_LINES, "undecodable"])
def test_bad_row_fails_with_file_and_line(tmp_path, tok, reason):
    bad = b'{"prompt": "caf\xe9"}' if reason == "undecodable" else BAD_LINES[reason].encode()
    path = write_with_bad_line(tmp_path / "p.jsonl", bad)
    with pytest.raises(DataError) as err:
        load_prompts(cfg(path, max_prompt_tokens=64), tok)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "data.skip_bad_rows = true" in msg
    out = load_prompts(cfg(path, max_prompt_tokens=64, skip_bad_rows=True), tok)
    assert out.report.train.skipped == {reason: 1}
    assert len(out.train) + len(out.eval) == 3


def test_bad_row_in_parquet_names_row(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "", "c"]}), path)
    with pytest.raises(DataError, match=r"p\.parquet, row 2: 'prompt' is empty"):
        load_prompts(cfg(path), tok)


# ---- whole-source errors -------------------------------------------------------------------------


def test_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist") as err:
        load_prompts(cfg(tmp_path / "nope.jsonl"), tok)
    assert "nope.jsonl" in str(err.value)


def test_unknown_extension_lists_supported(tmp_path, tok):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nhello\n")
    with pytest.raises(DataError, match=r"\.jsonl, \.json, \.parquet"):
        load_prompts(cfg(path), tok)


def test_empty_file_and_all_rows_skipped(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(cfg(empty), tok)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}, {"prompt": 3}])
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(cfg(bad, skip_bad_rows=True), tok)


def test_json_file_that_does_not_parse(tmp_path, tok):
    path = tmp_path / "p.json"
    path.write_text('{"prompt": "one object per line"}\n{"prompt": "two"}\n')
    with pytest.raises(DataError, match=r"not a valid UTF-8 JSON file.*\.jsonl"):
        load_prompts(cfg(path), tok)


def test_too_few_rows_for_the_tail(tmp_path, tok):
    with pytest.raises(DataError, match="data.num_eval"):
        load_prompts(cfg(write_jsonl(tmp_path / "p.jsonl", prompts_rows(2)), num_eval=2), tok)


def test_wrong_columns_lists_existing_ones(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "solution": "1"}])
    with pytest.raises(DataError) as err:
        load_prompts(cfg(path, skip_bad_rows=True), tok)
    msg = str(err.value)
    assert "['question', 'solution']" in msg and "data.prompt_column" in msg and "data.messages_column" in msg


def test_tokenizer_without_chat_template(tok):
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        load_prompts(DataConfig(num_train=2, num_eval=1), bare)


def test_offline_dataset_name_fails_fast(monkeypatch, tmp_path, tok):
    import time

    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Flags read at import time: patch them too, so the test is offline whatever ran first.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_prompts(cfg("nonexistent-org/nonexistent-dataset"), tok)
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "nonexistent-org/nonexistent-dataset" in msg and "local" in msg
    with pytest.raises(DataError, match="split 'test'"):  # name:split picks the split
        load_prompts(
            cfg(
                write_jsonl(tmp_path / "p.jsonl", prompts_rows(2)),
                eval_source="nonexistent-org/nonexistent-dataset:test",
            ),
            tok,
        )
