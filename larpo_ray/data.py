"""Prompts x for LARPO: where the retriever's queries come from, as typed `Prompt`s.

`load_prompts(cfg.data, tokenizer)` reads training and held-out prompts from one of
  - `builtin:arithmetic`: the generated task of `larpo_ray.tasks` (verifiable numeric answers);
  - a `.jsonl` file (one object per line), a `.json` file (one list of objects) or a `.parquet` file;
  - such a file in a hub dataset repository, `hf://datasets/ORG/NAME[@REVISION]/PATH` (fetched
    into the HF cache; e.g. AlpacaEval's `hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json`);
  - a `datasets.load_dataset(name, split=data.split)` name; `name:split` overrides the split
    (e.g. `eval_source: org/set:test`) and `name:config:split` also names the config (e.g.
    `openai/gsm8k:main:test`). Offline, a hub dataset or file must already be in the cache.
A row holds a plain-text prompt column (one user message) or a chat messages column (a list of
{role, content}; used when present), plus an optional reference answer (numbers become strings;
a number is matched numerically, a text answer such as "Paris" as a normalised string, GSM8K's
"rationale #### 72" as 72: `tasks.answers_match`). A chat is the prompt up to and including its
last user message: what follows (the assistant's reply of a preference or SFT set such as
UltraFeedback's `messages`) is dropped, so the policy answers the user itself; a chat without a
user message is a bad row. Column names: data.prompt_column / messages_column / answer_column,
and data.eval_prompt_column for held-out rows whose prompt column differs (AlpacaEval's
`instruction`).

Held-out prompts: `data.eval_source` if set (capped at data.num_eval if > 0), else the built-in
eval split, else the last data.num_eval rows of the source (after dedup, in file order). A prompt's
uid is the sha1 of its canonical messages (the built-in task keeps its problem uid); duplicates are
dropped, first kept, and an eval prompt is never trained on. Train prompts keep source order (the
driver samples per iteration), then are capped at data.num_train if > 0.
Bad rows stop loading with the file, row and fix, unless data.skip_bad_rows (then counted).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from larpo_ray.config import DataConfig
from larpo_ray.tasks import format_question, make_splits
from larpo_ray.types import Prompt

BUILTINS = ("builtin:arithmetic",)
HUB_FILE = "hf://datasets/"  # a data file in a hub dataset repository
SKIP_HINT = "or set data.skip_bad_rows = true to skip such rows"


class DataError(ValueError):
    """Prompts that cannot be loaded; the message names the source, the row and what to do."""


@dataclass
class SplitReport:
    """What loading one split did. Rows read, skipped and duplicates count on the split that read
    the source, so with a held-out tail they all sit on train."""

    source: str
    rows_read: int = 0
    # bad-row reason -> count; reasons: missing_column, not_a_string, empty_prompt, bad_messages,
    # bad_answer, not_an_object, too_long, template_error, invalid_json, undecodable
    skipped: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # rows dropped because an earlier row had the same uid
    in_eval: int = 0  # train only: prompts dropped because eval holds them
    kept: int = 0


@dataclass
class DataReport:
    train: SplitReport
    eval: SplitReport

    def summary(self) -> str:
        """One line per split, for the run log."""
        return "\n".join(
            f"{name}: {r.kept} prompts from {r.source} ({r.rows_read} rows read, skipped "
            f"{r.skipped or 'none'}, {r.duplicates} duplicates, {r.in_eval} also in eval)"
            for name, r in (("train", self.train), ("eval", self.eval))
        )


@dataclass
class PromptSplits:
    train: list[Prompt]
    eval: list[Prompt]
    report: DataReport


class _BadRow(Exception):
    """A row that cannot become a prompt: `reason` keys the report, `fix` tells the user what to do."""

    def __init__(self, reason: str, problem: str, fix: str):
        super().__init__(problem)
        self.reason, self.problem, self.fix = reason, problem, fix


# (row number, parsed row or the _BadRow it already is, uid to keep or None to hash the messages)
_Row = tuple[int, Any, "str | None"]


def load_prompts(cfg: DataConfig, tokenizer: Any) -> PromptSplits:
    """Training and held-out prompts of `cfg`, chat-templated and tokenized with `tokenizer`."""
    if not tokenizer.chat_template:
        raise DataError(
            "the tokenizer has no chat template, so prompts cannot be formatted as chats: "
            "use a chat/instruct model, or set `tokenizer.chat_template` to a Jinja template"
        )
    builtin = cfg.source.startswith("builtin:")
    held_out = cfg.eval_source or (
        f"{cfg.source} (eval split)" if builtin else f"{cfg.source} (last {cfg.num_eval} rows)"
    )
    report = DataReport(SplitReport(cfg.source), SplitReport(held_out))
    if builtin:
        rows, builtin_eval = _builtin_rows(cfg)
        train = _to_prompts(cfg.source, "row", rows, cfg, tokenizer, report.train)
    else:
        train = _to_prompts(*_read_source(cfg.source, cfg.split), cfg, tokenizer, report.train)
    if cfg.eval_source is not None:
        eval_cfg = replace(cfg, prompt_column=cfg.eval_prompt_column or cfg.prompt_column)
        evals = _to_prompts(*_read_source(cfg.eval_source, cfg.split), eval_cfg, tokenizer, report.eval)[
            : cfg.num_eval or None
        ]
    elif builtin:
        evals = _to_prompts(held_out, "row", builtin_eval, cfg, tokenizer, report.eval) if builtin_eval else []
    else:
        train, evals = _hold_out_tail(train, cfg)
    eval_uids = {p.uid for p in evals}
    kept = [p for p in train if p.uid not in eval_uids]
    report.train.in_eval = len(train) - len(kept)
    if not kept:
        raise DataError(
            f"{cfg.source}: every training prompt is also in data.eval_source = {cfg.eval_source!r}: use disjoint "
            "sources"
        )
    train = kept[: cfg.num_train or None]
    report.train.kept, report.eval.kept = len(train), len(evals)
    return PromptSplits(train, evals, report)


def _hold_out_tail(prompts: list[Prompt], cfg: DataConfig) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval): the last data.num_eval prompts are held out, so the split is stable per file."""
    if len(prompts) <= cfg.num_eval:
        raise DataError(
            f"{cfg.source}: only {len(prompts)} usable prompts, too few to hold out the last "
            f"data.num_eval = {cfg.num_eval} and still train: lower data.num_eval or set data.eval_source"
        )
    cut = len(prompts) - cfg.num_eval
    return prompts[:cut], prompts[cut:]


def prompt_uid(messages: list[dict[str, str]]) -> str:
    """Stable id: sha1 of the canonical JSON of the messages (same chat, same uid, any process)."""
    canon = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha1(canon.encode("utf-8")).hexdigest()[:12]


# ---- reading rows --------------------------------------------------------------------------------


def _builtin_rows(cfg: DataConfig) -> tuple[list[_Row], list[_Row]]:
    """The built-in task as rows in the configured column names, keeping each problem's uid."""
    if cfg.source not in BUILTINS:
        raise DataError(f"unknown built-in source data.source = {cfg.source!r}: choose one of {', '.join(BUILTINS)}")
    if cfg.num_train == 0:
        raise DataError(
            "data.num_train = 0 means 'all rows' of a file, but the built-in task has no fixed size: set "
            "data.num_train > 0"
        )
    try:
        train, evals = make_splits(cfg.levels, cfg.num_train, cfg.num_eval, cfg.seed)
    except ValueError as err:
        raise DataError(f"{cfg.source}: {err} (config keys: data.num_train, data.num_eval, data.levels)") from None

    def rows(problems: list) -> list[_Row]:
        return [
            (i, {cfg.prompt_column: format_question(p), cfg.answer_column: p.answer}, p.uid)
            for i, p in enumerate(problems, start=1)
        ]

    return rows(train), rows(evals)


def _read_source(source: str, split: str) -> tuple[str, str, list[_Row]]:
    """(where, row unit, rows) of a file or a datasets name."""
    if source.startswith("builtin:"):
        raise DataError(f"{source!r} can only be data.source; leave data.eval_source unset to use its eval split")
    if source.startswith(HUB_FILE):
        return _read_hub_file(source)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in _READERS or path.is_file():
        if not path.is_file():
            raise DataError(
                f"data file {str(path)!r} does not exist (relative paths start at {Path.cwd()}): fix data.source / "
                "data.eval_source"
            )
        if suffix not in _READERS:
            raise DataError(
                f"{path}: unsupported file type {suffix!r}; supported: {', '.join(_READERS)} "
                f"(or a datasets name, or {', '.join(BUILTINS)})"
            )
        return _read_file(path, str(path))
    return _read_hub(source, split)


def _read_file(path: Path, where: str) -> tuple[str, str, list[_Row]]:
    suffix = path.suffix.lower()
    return where, "line" if suffix == ".jsonl" else "row", _READERS[suffix](path)


def _read_jsonl(path: Path) -> list[_Row]:
    """One JSON object per line; undecodable or invalid lines become bad rows (skippable)."""
    rows: list[_Row] = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")  # a BOM from Windows editors is not data
        except UnicodeDecodeError as err:
            rows.append(
                (
                    n,
                    _BadRow(
                        "undecodable",
                        f"not valid UTF-8 ({err.reason} at byte {err.start})",
                        "re-save the file as UTF-8",
                    ),
                    None,
                )
            )
            continue
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            rows.append((n, json.loads(line), None))
        except json.JSONDecodeError as err:
            rows.append(
                (
                    n,
                    _BadRow(
                        "invalid_json",
                        f"not valid JSON ({err.msg} at column {err.colno})",
                        "write one JSON object per line",
                    ),
                    None,
                )
            )
    return rows


def _read_json(path: Path) -> list[_Row]:
    """One list of objects; a file that does not parse has no rows to point at, so it always fails."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"{path}: not a valid UTF-8 JSON file ({err}): a .json source holds one list of "
            "objects; for one object per line name the file .jsonl"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json source must hold a list of objects, got a {type(data).__name__}")
    return [(i, row, None) for i, row in enumerate(data, start=1)]


def _read_parquet(path: Path) -> list[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    return [(i, row, None) for i, row in enumerate(table.to_pylist(), start=1)]


_READERS: dict[str, Callable[[Path], list[_Row]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def _read_hub_file(source: str) -> tuple[str, str, list[_Row]]:
    """`hf://datasets/ORG/NAME[@REVISION]/PATH`: a data file of a hub dataset repository, fetched
    into the HF cache and read like a local file (for sets whose repository holds a loading script,
    which `datasets` >= 4 no longer runs, such as AlpacaEval's)."""
    owner, _, rest = source.removeprefix(HUB_FILE).partition("/")
    name, _, filename = rest.partition("/")
    name, _, revision = name.partition("@")
    repo_id, suffix = f"{owner}/{name}", Path(filename).suffix.lower()
    if not (owner and name and filename) or suffix not in _READERS:
        raise DataError(
            f"{source!r} is not a hub data file: write hf://datasets/ORG/NAME[@REVISION]/PATH with PATH a "
            f"{'/'.join(_READERS)} file"
        )
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision or None)
    except Exception as err:  # offline, missing repo or file, network: all mean "not readable"
        raise DataError(
            f"could not fetch {source} ({type(err).__name__}: {err}). Offline (HF_HUB_OFFLINE=1) it must already "
            f"be cached (where there is network: hf download {repo_id} {filename} --repo-type dataset); or "
            f"download it and set the data source to the local path"
        ) from None
    return _read_file(Path(local), source)


def _read_hub(source: str, default_split: str) -> tuple[str, str, list[_Row]]:
    """A `datasets` name (hub id or loadable folder): `name:split`, or `name:config:split` for sets
    with several configs (GSM8K's `main`)."""
    name, _, rest = source.partition(":")
    config, _, split = rest.rpartition(":")
    split = split or default_split
    where = f"dataset {name!r} ({f'config {config!r}, ' if config else ''}split {split!r})"
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # hub, cache and builder errors come in many types; all mean "not loadable"
        raise DataError(
            f"could not load {where} with datasets.load_dataset ({type(err).__name__}: {err}). "
            f"Name the config of a set that has several as name:config:split; offline (HF_HUB_OFFLINE=1) a hub "
            f"dataset must already be cached; or export it to a local {'/'.join(_READERS)} file and set the data "
            "source to its path"
        ) from None
    return where, "row", [(i, row, None) for i, row in enumerate(ds, start=1)]


# ---- rows to prompts -----------------------------------------------------------------------------


def _to_prompts(
    where: str, unit: str, rows: list[_Row], cfg: DataConfig, tokenizer: Any, report: SplitReport
) -> list[Prompt]:
    """Validate, template and dedup rows in order; bad rows raise, or are skipped and counted."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    columns_checked = False
    for n, row, uid in rows:
        report.rows_read += 1
        if isinstance(row, dict) and not columns_checked:
            _check_columns(row, where, cfg)
            columns_checked = True
        try:
            if isinstance(row, _BadRow):
                raise row
            prompt = _make_prompt(row, uid, cfg, tokenizer)
        except _BadRow as bad:
            if not cfg.skip_bad_rows:
                raise DataError(f"{where}, {unit} {n}: {bad.problem}. Fix: {bad.fix}, {SKIP_HINT}") from None
            report.skipped[bad.reason] = report.skipped.get(bad.reason, 0) + 1
            continue
        if prompt.uid in seen:
            report.duplicates += 1
            continue
        seen.add(prompt.uid)
        prompts.append(prompt)
    if not prompts:
        raise DataError(
            f"{where}: no usable prompts ({report.rows_read} rows read, skipped {report.skipped or 'none'}): "
            f"give rows with a {cfg.prompt_column!r} string or a {cfg.messages_column!r} chat"
        )
    return prompts


def _check_columns(row: dict, where: str, cfg: DataConfig) -> None:
    """A first row with neither column means the column names are wrong, not that a row is bad."""
    if cfg.prompt_column not in row and cfg.messages_column not in row:
        raise DataError(
            f"{where}: rows have neither a {cfg.prompt_column!r} nor a {cfg.messages_column!r} column; "
            f"columns found: {sorted(row)}. Set data.prompt_column (plain text) or "
            f"data.messages_column (a chat) to the right one"
        )


def _make_prompt(row: Any, uid: str | None, cfg: DataConfig, tokenizer: Any) -> Prompt:
    if not isinstance(row, dict):
        raise _BadRow(
            "not_an_object",
            f"expected an object, got a {type(row).__name__}",
            f"make every row an object with a {cfg.prompt_column!r} or {cfg.messages_column!r} field",
        )
    messages = _row_messages(row, cfg)
    answer = _answer(row, cfg.answer_column)
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    text = _apply_template(tokenizer, messages)
    # The template writes BOS (if the model uses one) into the text, so the tokenizer must not add
    # another: add_special_tokens=False. Special-token strings in the text still map to their ids.
    token_ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
    if len(token_ids) > cfg.max_prompt_tokens:
        raise _BadRow(
            "too_long",
            f"the prompt is {len(token_ids)} tokens after the chat template, over "
            f"data.max_prompt_tokens = {cfg.max_prompt_tokens}",
            "shorten it or raise data.max_prompt_tokens",
        )
    return Prompt(
        uid=uid or prompt_uid(messages),
        text=text,
        token_ids=token_ids,
        messages=tuple((m["role"], m["content"]) for m in messages),
        answer=answer,
    )


def _row_messages(row: dict, cfg: DataConfig) -> list[dict[str, str]]:
    """The row's chat: its messages column if present, else its prompt as one user message."""
    if row.get(cfg.messages_column) is not None:
        return _prompt_chat(row[cfg.messages_column], cfg.messages_column)
    text = row.get(cfg.prompt_column)
    if text is None:
        raise _BadRow(
            "missing_column",
            f"no {cfg.prompt_column!r} or {cfg.messages_column!r} value (fields: {sorted(row)})",
            f"give the row a {cfg.prompt_column!r} string or a {cfg.messages_column!r} list",
        )
    if not isinstance(text, str):
        raise _BadRow(
            "not_a_string",
            f"{cfg.prompt_column!r} is of type {type(text).__name__}, not a string",
            f"write the prompt as a string (a chat goes in {cfg.messages_column!r})",
        )
    if not text.strip():
        raise _BadRow("empty_prompt", f"{cfg.prompt_column!r} is empty", "write the prompt text or drop the row")
    return [{"role": "user", "content": text}]


def _prompt_chat(chat: Any, column: str) -> list[dict[str, str]]:
    """The chat up to and including its last user message. Preference and SFT sets store the
    whole conversation (UltraFeedback's `messages` ends with the chosen reply); the prompt is what
    the user asked, and the policy writes the reply."""
    fix = f'make {column!r} a list of {{"role": str, "content": str}} objects with a user message'
    if not isinstance(chat, (list, tuple)) or not chat:
        raise _BadRow("bad_messages", f"{column!r} is not a non-empty list", fix)
    out = []
    for j, m in enumerate(chat):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _BadRow("bad_messages", f"{column}[{j}] is not a {{role, content}} object of strings", fix)
        out.append({"role": m["role"], "content": m["content"]})
    users = [j for j, m in enumerate(out) if m["role"] == "user"]
    if not users:
        roles = [m["role"] for m in out]
        raise _BadRow("bad_messages", f"the chat has no message of role 'user' (roles: {roles})", fix)
    out = out[: users[-1] + 1]
    if not out[-1]["content"].strip():
        raise _BadRow("empty_prompt", "the last user message is empty", "write the prompt text or drop the row")
    return out


def _answer(row: dict, column: str) -> str | None:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):  # NaN: pandas' missing value
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRow(
            "bad_answer",
            f"{column!r} is of type {type(value).__name__}, not a string or number",
            "write the reference answer as a string or number, or leave it out",
        )
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 42.0 (an int column with gaps, via pandas) is the answer "42"
    return str(value)


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:  # e.g. templates that require alternating user/assistant roles
        raise _BadRow(
            "template_error",
            f"the model's chat template refused this chat ({err})",
            "order the roles as the model's template expects",
        ) from None
