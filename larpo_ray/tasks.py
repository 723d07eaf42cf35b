"""The built-in verifiable task: arithmetic word problems with a numeric final answer.

A small stand-in for the paper's GSM8K setting (rule-based reward = final-answer match), sized for
tiny policies such as SmolLM2-135M. Levels: 1 = "What is a +- b?" with 1 <= a, b <= 19; 2 = the
same with two-digit a, b (a >= 20); 3 = a one-operation word problem; 4 = a two-operation word
problem. Levels 1-2 may have negative answers; word problems never do. Stdlib only, deterministic.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

INSTRUCTION = "Answer with a short explanation, then end your reply with the final answer as a single number."


@dataclass(frozen=True)
class Problem:
    uid: str  # sha1(question)[:12]: stable across runs and processes
    question: str
    answer: str  # canonical numeric string, e.g. "42", "-7"
    level: int


# ---------------------------------------------------------------------------------------------
# Question templates
# ---------------------------------------------------------------------------------------------

NAMES = (
    "Mia",
    "Leo",
    "Ava",
    "Noah",
    "Zoe",
    "Omar",
    "Lily",
    "Ravi",
    "Emma",
    "Kai",
    "Sofia",
    "Ben",
    "Nora",
    "Yuki",
    "Sam",
    "Priya",
)
THINGS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "books", "shells")
FRUIT = ("apples", "strawberries", "cherries", "plums", "lemons", "peaches")
SNACKS = ("cookies", "candies", "grapes", "crackers", "pretzels")
GOODS = ("notebooks", "pens", "tickets", "toys", "stickers")
R = range


@dataclass(frozen=True)
class Template:
    """One question pattern. `fill` maps free parameters to the numbers shown in `text` (x, y, z)
    plus "answer". Parameters, not shown numbers, are enumerated, so constraints such as "no
    negative answer" hold by construction and each index gives a distinct question."""

    text: str
    fill: Callable[..., dict[str, int]]
    ranges: tuple[range, ...]
    items: tuple[str, ...] = ("",)

    @property
    def names(self) -> tuple[str, ...]:
        return NAMES if "{name}" in self.text else ("",)

    @property
    def size(self) -> int:
        return len(self.names) * len(self.items) * math.prod(len(r) for r in self.ranges)

    def render(self, name: str, item: str, *params: int) -> tuple[str, int]:
        """(question, answer) for explicit values; `name`/`item` are "" when the text has none."""
        nums = self.fill(*params)
        friend = NAMES[(NAMES.index(name) + 1) % len(NAMES)] if name else ""
        return self.text.format(name=name, friend=friend, item=item, **nums), nums["answer"]

    def question(self, index: int) -> tuple[str, int]:
        """The index-th question, 0 <= index < size (mixed-radix decode: name, item, params)."""
        picks = []
        for options in (self.names, self.items, *self.ranges):
            index, digit = divmod(index, len(options))
            picks.append(options[digit])
        return self.render(*picks)


def _add(x, y):
    return dict(x=x, y=y, answer=x + y)


def _minus(x, y):
    return dict(x=x, y=y, answer=x - y)


def _sub(y, d):
    return dict(x=y + d, y=y, answer=d)  # x = y + d keeps x - y = d >= 1


def _mul(x, y):
    return dict(x=x, y=y, answer=x * y)


def _add_sub(e, y, z):
    return dict(x=e + z, y=y, z=z, answer=e + y)  # x + y - z with z < x


def _mul_add(x, y, z):
    return dict(x=x, y=y, z=z, answer=x * y + z)


def _mul_sub(x, y, z):
    return dict(x=x, y=y, z=z, answer=x * y - z)  # ranges keep z < x * y


def _twice(x, y):
    return dict(x=x, y=y, answer=2 * x + y)


def _share(y, z, e):
    return dict(x=y * z + e, y=y, z=z, answer=e)  # x - y * z = e >= 1


def _triple(x):
    return dict(x=x, answer=3 * x)


def _change(x, y, k):
    return dict(x=x, y=y, z=50 * (k + 1), answer=50 * (k + 1) - x * y)


TEMPLATES: dict[int, tuple[Template, ...]] = {
    1: (
        Template("What is {x} + {y}?", _add, (R(1, 20), R(1, 20))),
        Template("What is {x} - {y}?", _minus, (R(1, 20), R(1, 20))),
    ),
    # x >= 20 keeps level 2 disjoint from level 1.
    2: (
        Template("What is {x} + {y}?", _add, (R(20, 100), R(10, 100))),
        Template("What is {x} - {y}?", _minus, (R(20, 100), R(10, 100))),
    ),
    3: (
        Template(
            "{name} has {x} {item} and buys {y} more. How many {item} does {name} have now?",
            _add,
            (R(2, 31), R(2, 21)),
            THINGS,
        ),
        Template(
            "{name} had {x} {item} and gave {y} to a friend. How many {item} does {name} have left?",
            _sub,
            (R(2, 16), R(1, 21)),
            THINGS,
        ),
        Template(
            "There are {x} {item} in a basket. {name} puts in {y} more. How many {item} are in the basket now?",
            _add,
            (R(2, 31), R(2, 21)),
            FRUIT,
        ),
        Template(
            "{name} picked {x} {item} in the morning and {y} in the afternoon. How many "
            "{item} did {name} pick in total?",
            _add,
            (R(2, 26), R(2, 26)),
            FRUIT,
        ),
        Template(
            "{name} has {x} boxes with {y} {item} in each box. How many {item} does {name} have?",
            _mul,
            (R(2, 10), R(2, 11)),
            THINGS,
        ),
        Template(
            "{name} had {x} {item} and lost {y} of them. How many {item} does {name} have now?",
            _sub,
            (R(2, 16), R(1, 21)),
            THINGS,
        ),
        Template(
            "{name} reads {x} pages a day. How many pages does {name} read in {y} days?", _mul, (R(2, 13), R(2, 10))
        ),
        Template(
            "A bus has {x} passengers. At the next stop, {y} people get off. How many passengers are on the bus now?",
            _sub,
            (R(2, 21), R(1, 26)),
        ),
        Template("{name} is {x} years old. How old will {name} be in {y} years?", _add, (R(5, 41), R(2, 21))),
        Template(
            "{name} has {x} {item}. {friend} has {y} fewer {item} than {name}. How many {item} does {friend} have?",
            _sub,
            (R(1, 13), R(1, 21)),
            THINGS,
        ),
        Template(
            "{name} buys {x} {item} that cost {y} dollars each. How many dollars does {name} spend?",
            _mul,
            (R(2, 10), R(2, 10)),
            GOODS,
        ),
    ),
    4: (
        Template(
            "{name} has {x} {item}, buys {y} more, and then gives {z} to a friend. How many "
            "{item} does {name} have now?",
            _add_sub,
            (R(1, 21), R(2, 16), R(2, 16)),
            THINGS,
        ),
        Template(
            "{name} buys {x} packs of {item} with {y} in each pack and already had {z}. How "
            "many {item} does {name} have now?",
            _mul_add,
            (R(2, 7), R(2, 11), R(1, 21)),
            THINGS,
        ),
        Template(
            "{name} has {x} {item}. {friend} has {y} more than {name}. How many {item} do they have together?",
            _twice,
            (R(2, 31), R(1, 16)),
            THINGS,
        ),
        Template(
            "{name} buys {x} bags with {y} {item} in each bag and eats {z} of them. How many {item} are left?",
            _mul_sub,
            (R(2, 7), R(5, 11), R(1, 10)),
            SNACKS,
        ),
        Template(
            "{name} had {x} {item} and gave {y} to each of {z} friends. How many {item} does {name} have left?",
            _share,
            (R(2, 7), R(2, 6), R(1, 16)),
            THINGS,
        ),
        Template(
            "{name} collects {x} {item} on Monday and twice as many on Tuesday. How many "
            "{item} does {name} collect in total?",
            _triple,
            (R(2, 41),),
            THINGS,
        ),
        Template(
            "{name} buys {x} {item} at {y} dollars each and pays with a {z}-dollar bill. How "
            "many dollars of change does {name} get?",
            _change,
            (R(2, 6), R(2, 10), R(2)),
            GOODS,
        ),
        Template(
            "A theater has {x} rows of {y} seats, and {z} seats are empty. How many seats are taken?",
            _mul_sub,
            (R(3, 10), R(4, 13), R(1, 10)),
        ),
        Template(
            "{name} has {x} {item} and {friend} has {y}. They put them together and give "
            "away {z}. How many {item} do they have left?",
            _add_sub,
            (R(1, 21), R(2, 21), R(2, 16)),
            FRUIT,
        ),
        Template(
            "{name} earns {x} dollars a day for {y} days and then spends {z} dollars. How "
            "many dollars does {name} have left?",
            _mul_sub,
            (R(3, 13), R(2, 8), R(1, 6)),
        ),
    ),
}


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def make_splits(levels: Sequence[int], n_train: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Fixed (train, eval) splits: disjoint question texts, spread evenly over `levels` (and over
    each level's templates), shuffled. The eval split depends only on (levels, n_eval, seed), so
    runs with different n_train are evaluated on the same questions."""
    unknown = [lv for lv in levels if lv not in TEMPLATES]
    if not levels or unknown or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct values from {sorted(TEMPLATES)}; got {levels}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0; got {n_train}, {n_eval}")
    per_train, per_eval = _even(n_train, len(levels)), _even(n_eval, len(levels))
    for level, nt, ne in zip(levels, per_train, per_eval):
        cap = sum(t.size for t in TEMPLATES[level])
        if nt + ne > cap:
            raise ValueError(
                f"level {level} has at most {cap} distinct questions but the request "
                f"needs {nt + ne} ({nt} train + {ne} eval); lower n_train/n_eval or "
                f"add levels"
            )
    # str seeds go through sha512, never hash(), so every process draws the same problems.
    eval_rng = random.Random(f"larpo-tasks/{seed}/eval")
    train_rng = random.Random(f"larpo-tasks/{seed}/train")
    train, held_out = [], []
    for level, nt, ne in zip(levels, per_train, per_eval):
        templates = TEMPLATES[level]
        eval_idx = [
            _draw(eval_rng, t.size, k, set()) for t, k in zip(templates, _spread(ne, [t.size for t in templates]))
        ]
        free = [t.size - len(used) for t, used in zip(templates, eval_idx)]
        train_idx = [
            _draw(train_rng, t.size, k, set(used)) for t, k, used in zip(templates, _spread(nt, free), eval_idx)
        ]
        held_out += [_problem(level, t, i) for t, idx in zip(templates, eval_idx) for i in idx]
        train += [_problem(level, t, i) for t, idx in zip(templates, train_idx) for i in idx]
    eval_rng.shuffle(held_out)
    train_rng.shuffle(train)
    return train, held_out


def format_question(problem: Problem) -> str:
    """The user-message content: the question followed by the answer-format instruction."""
    return f"{problem.question} {INSTRUCTION}"


def _problem(level: int, template: Template, index: int) -> Problem:
    question, answer = template.question(index)
    uid = hashlib.sha1(question.encode()).hexdigest()[:12]
    return Problem(uid=uid, question=question, answer=str(answer), level=level)


def _even(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def _spread(n: int, caps: Sequence[int]) -> list[int]:
    """Split n as evenly as possible over slots with capacities `caps` (water-filling): small
    templates give their overflow to the others. Caller guarantees n <= sum(caps)."""
    counts = [0] * len(caps)
    open_slots = [i for i, c in enumerate(caps) if c > 0]
    while n > 0 and open_slots:
        share, extra = divmod(n, len(open_slots))
        for rank, i in enumerate(open_slots):
            take = min(caps[i] - counts[i], share + (rank < extra))
            counts[i] += take
            n -= take
        open_slots = [i for i in open_slots if counts[i] < caps[i]]
    return counts


def _draw(rng: random.Random, size: int, k: int, exclude: set[int]) -> list[int]:
    """k distinct indices from range(size) minus `exclude`."""
    if (k + len(exclude)) * 4 < size:  # sparse: rejection sampling, no pool of `size` ints
        out, seen = [], set(exclude)
        while len(out) < k:
            i = rng.randrange(size)
            if i not in seen:
                seen.add(i)
                out.append(i)
        return out
    return rng.sample([i for i in range(size) if i not in exclude], k)


# ---------------------------------------------------------------------------------------------
# Answer parsing
# ---------------------------------------------------------------------------------------------

_CHARS = str.maketrans({"\u2212": "-", "\uff0d": "-", "\u00d7": "*", "\u00f7": "/"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OPERATOR_AFTER = re.compile(r"\s*(?:[-+*/=<>]|x\s*\d|\\times|\\cdot)")
_LABEL_BEFORE = re.compile(r"\b(?:step|part|question|problem)\s*$", re.I)
_ENUMERATOR = re.compile(r"^[ \t]*(\d+)[.)][ \t]+\S", re.M)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_HASHES = re.compile(r"####([^\n]*)")
_MARKER = re.compile(r"\banswer\b[\s*_]*(?:is\b[\s*_:]*|[:=])", re.I)


def parse_final_answer(text: str) -> str | None:
    """The model's final answer as a canonical numeric string ("12", "-5", "2.5"), or None.

    Rule: normalise (unicode minus, thousands separators); then the most explicit marker wins,
    last occurrence first: \\boxed{...}, then "#### ...", then "answer is" / "Answer:" / "answer
    =" (the first non-empty line after it). Inside a marked span the answer is the first number
    not followed by an operator ("The answer is 7 + 12 = 19" -> 19). Without a usable marker it
    is the last number in the text. Labels ("Step 2", a line-leading "3." list marker) are skipped.
    """
    text = _THOUSANDS.sub("", text.translate(_CHARS))
    for span in _marked_spans(text):
        numbers = _numbers(span)
        if numbers:
            return _canonical(next((v for v, op in numbers if not op), numbers[-1][0]))
    numbers = _numbers(text)
    return _canonical(numbers[-1][0]) if numbers else None


def _marked_spans(text: str) -> list[str]:
    boxed = [m.group(1) for m in _BOXED.finditer(text)]
    hashes = [m.group(1) for m in _HASHES.finditer(text)]
    after = [text[m.end() :] for m in _MARKER.finditer(text)]
    lines = [next((ln for ln in rest.split("\n") if ln.strip()), "") for rest in after]
    return boxed[::-1] + hashes[::-1] + lines[::-1]


def _numbers(text: str) -> list[tuple[str, bool]]:
    """(number, followed_by_operator) in order, without labels (unless only labels exist)."""
    enumerators = {m.start(1) for m in _ENUMERATOR.finditer(text)}
    found, plain = [], []
    for m in _NUMBER.finditer(text):
        entry = (m.group(), bool(_OPERATOR_AFTER.match(text, m.end())))
        found.append(entry)
        before = text[max(0, m.start() - 12) : m.start()]
        if m.start() not in enumerators and not _LABEL_BEFORE.search(before):
            plain.append(entry)
    return plain or found  # a reply that is just "23." is an answer, not a list marker


def _canonical(number: str) -> str:
    """Exact string canonicalisation: "-012.50" -> "-12.5", "12.0" -> "12", "-0" -> "0"."""
    sign, body = ("-", number[1:]) if number.startswith("-") else ("", number)
    whole, _, frac = body.partition(".")
    out = (whole.lstrip("0") or "0") + ("." + frac.rstrip("0") if frac.rstrip("0") else "")
    return "0" if out == "0" else sign + out


# ---------------------------------------------------------------------------------------------
# Rewards and metrics
# ---------------------------------------------------------------------------------------------


def reference_answer(answer: str) -> str:
    """A dataset's reference answer as it is matched: its canonical number when it is one (GSM8K's
    "rationale #### 72" -> "72", "1,000" -> "1000"), else the text (an answer like "Paris").

    Rule: the most explicit marked span of the reference (\\boxed{}, "####", "answer is", as in
    `parse_final_answer`), else the whole reference, stripped (a closing period dropped); a
    number when that is one number, else text.
    """
    text = _THOUSANDS.sub("", answer.translate(_CHARS)).strip()
    spans = _marked_spans(text)
    body = (spans[0] if spans else text).strip().removesuffix(".").strip()
    return _canonical(body) if _PLAIN_NUMBER.fullmatch(body) else body


def answers_match(reply: str, reference: str) -> bool:
    """Whether a reply's final answer matches a reference (as `reference_answer` gives it):
    numbers compare numerically ("19.0" == "19"); a text reference is matched as a normalised
    string (case, whitespace, surrounding punctuation and a leading "the" ignored) against the
    reply's marked answer span, or its last line when it marks none. The paper's math reward is a
    string match; this is the same for numbers written differently."""
    if _PLAIN_NUMBER.fullmatch(reference):
        pred = parse_final_answer(reply)
        return pred is not None and Decimal(pred) == Decimal(reference)
    spans = _marked_spans(reply.translate(_CHARS))
    lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
    said = spans[0] if spans else (lines[-1] if lines else "")
    return _normalised(said) == _normalised(reference)


def _normalised(text: str) -> str:
    words = re.sub(r"[\s\"'`*_.,:;!?()]+", " ", text.casefold()).split()
    return " ".join(words[1:] if words[:1] == ["the"] and len(words) > 1 else words)


def binary_reward(text: str, answer: str) -> float:
    """1.0 if the reply's final answer matches the reference answer (`answers_match` after
    `reference_answer`), else 0.0 (the paper's rule)."""
    return float(answers_match(text, reference_answer(answer)))


def graded_reward(text: str, answer: str) -> float:
    """1.0 if correct; a wrong number gets 0.5 / (1 + relative error), in (0, 0.5); no number 0.0.
    A text reference has no closeness: graded is binary there.

    Wrong answers stay strictly ordered by closeness (and any number beats none), so a listwise
    loss still sees an order in a list with no correct answer. [ours: not in the paper]
    """
    reference = reference_answer(answer)
    if not _PLAIN_NUMBER.fullmatch(reference):
        return float(answers_match(text, reference))
    pred = parse_final_answer(text)  # parsed once: the match and the closeness both use it
    if pred is None:
        return 0.0
    p, a = Decimal(pred), Decimal(reference)
    if p == a:
        return 1.0
    return 0.5 / (1.0 + float(abs(p - a)) / max(1.0, float(abs(a))))


REWARDS: dict[str, Callable[[str, str], float]] = {"binary": binary_reward, "graded": graded_reward}


def pass_at_n(correct_flags_per_prompt: Sequence[Sequence[bool]], n: int) -> float:
    """Mean over prompts of the unbiased Pass@n estimator (Chen et al. 2021, Codex paper).

    A prompt with `total` samples, `c` of them correct, scores 1 - C(total - c, n) / C(total, n):
    the chance that n samples drawn without replacement from the `total` include a correct one.
    Lower variance than drawing one subset; n = 1 gives the plain accuracy c / total. This is the
    paper's Recall@N analogue.
    """
    if n < 1 or not correct_flags_per_prompt:
        raise ValueError(f"need n >= 1 and at least one prompt; got n={n}, {len(correct_flags_per_prompt)} prompts")
    scores = []
    for flags in correct_flags_per_prompt:
        total, c = len(flags), sum(bool(f) for f in flags)
        if total < n:
            raise ValueError(f"Pass@{n} needs >= {n} samples per prompt; a prompt has {total}")
        scores.append(1.0 - math.comb(total - c, n) / math.comb(total, n))
    return sum(scores) / len(scores)


def win_rate(rewards_a: Sequence[float], rewards_b: Sequence[float]) -> float:
    """Fraction of prompts where a's reward beats b's (ties count half), e.g. policy vs initial.

    Inputs are finite rewards (ScoredCandidate rewards are); a NaN would count as a loss for both.
    """
    if len(rewards_a) != len(rewards_b) or not rewards_a:
        raise ValueError(
            f"win_rate needs two equal, non-empty reward lists (one per prompt); got "
            f"{len(rewards_a)} and {len(rewards_b)}"
        )
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards_a, rewards_b))
    return wins / len(rewards_a)
