"""A few rows of each data set the paper's recipes read, written with the published schema (column
names, types, nesting), and a stand-in hub that serves them offline under their published names.

- HuggingFaceH4/ultrafeedback_binarized (parquet on the hub; splits train_prefs, test_prefs, ...):
  prompt: string, prompt_id: string (sha256 hex of the prompt), chosen / rejected / messages:
  list<struct<content: string, role: string>> (user, then assistant; messages = chosen),
  score_chosen / score_rejected: double.
- openai/gsm8k, config main (parquet; splits train, test): question: string, answer: string (a
  worked solution with calculator annotations, last line "#### N").
- AlpacaEval's eval set, tatsu-lab/alpaca_eval's alpaca_eval.json (805 rows; the repository's
  loading script no longer runs with datasets >= 4): a JSON list of {instruction, output, generator,
  dataset}, all strings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ULTRAFEEDBACK = "HuggingFaceH4/ultrafeedback_binarized"
GSM8K = "openai/gsm8k"
ALPACA_EVAL = ("tatsu-lab/alpaca_eval", "alpaca_eval.json")

UF_PROMPTS = {
    "train_prefs": [
        "Write a haiku about autumn leaves.",
        "Explain why the sky is blue in two sentences.",
        "Give me three tips for a job interview.",
        "What is the difference between a list and a tuple in Python?",
        "Summarize the plot of Romeo and Juliet.",
        "Suggest a name for a bakery that sells only bread.",
    ],
    "test_prefs": [
        "How do vaccines train the immune system?",
        "Translate 'good morning' into French and Spanish.",
        "Write a limerick about a cat who likes tea.",
    ],
}
# (question, worked solution ending in "#### N")
GSM8K_ROWS = {
    "train": [
        (
            "Tom has 12 apples. He gives 5 to Ann and buys 8 more. How many apples does Tom have now?",
            "Tom has 12 - 5 = <<12-5=7>>7 apples after giving some away.\nThen he has 7 + 8 = <<7+8=15>>15 apples."
            "\n#### 15",
        ),
        ("A box holds 6 eggs. How many eggs are in 9 boxes?", "9 boxes hold 9 * 6 = <<9*6=54>>54 eggs.\n#### 54"),
        (
            "Mia reads 20 pages a day. How many days does she need for a 140-page book?",
            "She needs 140 / 20 = <<140/20=7>>7 days.\n#### 7",
        ),
        (
            "A shirt costs $25 and is sold at a 20% discount. What is the price after the discount?",
            "The discount is 25 * 0.2 = $<<25*0.2=5>>5.\nThe price is 25 - 5 = $<<25-5=20>>20.\n#### 20",
        ),
    ],
    "test": [
        (
            "Sara has 3 bags with 14 marbles each. She loses 9 marbles. How many marbles are left?",
            "She has 3 * 14 = <<3*14=42>>42 marbles.\nAfter losing 9 she has 42 - 9 = <<42-9=33>>33.\n#### 33",
        ),
        (
            "A train travels 60 km per hour for 4 hours and then 30 km. How far does it travel in all?",
            "In 4 hours it travels 60 * 4 = <<60*4=240>>240 km.\nIn all 240 + 30 = <<240+30=270>>270 km.\n#### 270",
        ),
        (
            "Leo earns $1,200 a month and saves a quarter of it. How much does he save in a year?",
            "He saves 1200 / 4 = $<<1200/4=300>>300 a month.\nIn a year 300 * 12 = $<<300*12=3600>>3,600.\n#### 3600",
        ),
    ],
}
ALPACA_EVAL_ROWS = [
    ("What are the names of some famous actors that started their careers on Broadway?", "helpful_base"),
    ("How did US states get their names?", "helpful_base"),
    ("Give me a recipe for a vegetarian lasagna.", "koala"),
    ("Write a short poem about the ocean at night.", "oasst"),
    ("What is the capital of Australia?", "selfinstruct"),
]


def reply(prompt: str, quality: str) -> str:
    return f"A {quality} answer to: {prompt}"


def gsm8k_answer(solution: str) -> str:
    """The number after "####", as the published set writes it."""
    return solution.rsplit("####", 1)[1].strip()


def write_ultrafeedback(path: Path, split: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    schema = pa.schema(
        [
            ("prompt", pa.string()),
            ("prompt_id", pa.string()),
            ("chosen", chat),
            ("rejected", chat),
            ("messages", chat),
            ("score_chosen", pa.float64()),
            ("score_rejected", pa.float64()),
        ]
    )

    def row(prompt: str, i: int) -> dict:
        chosen = [{"content": prompt, "role": "user"}, {"content": reply(prompt, "good"), "role": "assistant"}]
        rejected = [{"content": prompt, "role": "user"}, {"content": reply(prompt, "poor"), "role": "assistant"}]
        return {
            "prompt": prompt,
            "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
            "chosen": chosen,
            "rejected": rejected,
            "messages": chosen,
            "score_chosen": 8.0 + i % 2,
            "score_rejected": 3.5,
        }

    rows = [row(p, i) for i, p in enumerate(UF_PROMPTS[split])]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_gsm8k(path: Path, split: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
    rows = [{"question": q, "answer": a} for q, a in GSM8K_ROWS[split]]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_alpaca_eval(path: Path) -> Path:
    rows = [
        {"instruction": q, "output": reply(q, "reference"), "generator": "text_davinci_003", "dataset": d}
        for q, d in ALPACA_EVAL_ROWS
    ]
    path.write_text(json.dumps(rows, indent=4))
    return path


def serve_offline_hub(monkeypatch, folder: Path) -> None:
    """`datasets.load_dataset` and `huggingface_hub.hf_hub_download` answer for the published
    names only (the set, its config and split; the repository and file), from local files with the
    published schemas; any other name fails as the hub would."""
    import datasets
    import huggingface_hub
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    folder.mkdir(parents=True, exist_ok=True)
    published = {
        **{(ULTRAFEEDBACK, None, s): (write_ultrafeedback, s) for s in UF_PROMPTS},
        **{(GSM8K, "main", s): (write_gsm8k, s) for s in GSM8K_ROWS},
    }

    def load_dataset(name, config=None, *, split):
        if (name, config, split) not in published:
            raise ValueError(f"not a published (set, config, split): {(name, config, split)}")
        write, split_name = published[name, config, split]
        path = write(folder / f"{name.replace('/', '--')}-{config}-{split}.parquet", split_name)
        return datasets.Dataset(InMemoryTable(pq.read_table(path)))

    def hf_hub_download(repo_id, filename, *, repo_type, revision=None):
        if (repo_id, filename) != ALPACA_EVAL or repo_type != "dataset":
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo_type} {repo_id} has no file {filename}")
        return str(write_alpaca_eval(folder / filename))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
