"""The built-in arithmetic task: splits, templates, answer parser, rewards and Pass@n."""

import hashlib
import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from larpo_ray.tasks import (
    INSTRUCTION,
    REWARDS,
    TEMPLATES,
    Problem,
    answers_match,
    binary_reward,
    format_question,
    graded_reward,
    make_splits,
    parse_final_answer,
    pass_at_n,
    reference_answer,
)

# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def test_splits_are_deterministic():
    assert make_splits([1, 2, 3, 4], 200, 40, seed=7) == make_splits([1, 2, 3, 4], 200, 40, seed=7)
    assert make_splits([1, 2, 3, 4], 200, 40, seed=7) != make_splits([1, 2, 3, 4], 200, 40, seed=8)


def test_splits_are_identical_across_processes_with_different_hash_seeds():
    code = (
        "from larpo_ray.tasks import make_splits; "
        "tr, ev = make_splits([1, 3, 4], 30, 9, seed=3); print([p.uid for p in tr + ev])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": h},
        ).stdout
        for h in ("1", "2")
    }
    train, held_out = make_splits([1, 3, 4], 30, 9, seed=3)
    assert outs == {str([p.uid for p in train + held_out]) + "\n"}


def test_splits_are_disjoint_unique_and_sized():
    train, held_out = make_splits([1, 2, 3, 4], 1000, 200, seed=0)
    assert len(train) == 1000 and len(held_out) == 200
    questions = [p.question for p in train + held_out]
    assert len(set(questions)) == len(questions)
    assert all(isinstance(p, Problem) and p.level in (1, 2, 3, 4) for p in train + held_out)


def test_levels_are_spread_evenly_and_templates_varied():
    train, held_out = make_splits([1, 3, 4], 301, 30, seed=1)
    assert sorted(Counter(p.level for p in train).values()) == [100, 100, 101]
    assert Counter(p.level for p in held_out) == {1: 10, 3: 10, 4: 10}
    # Word problems use many templates: count distinct question openings.
    openings = {" ".join(p.question.split()[1:3]) for p in train if p.level == 3}
    assert len(openings) >= 8


def test_eval_split_does_not_depend_on_n_train():
    assert make_splits([2, 3], 10, 50, seed=4)[1] == make_splits([2, 3], 500, 50, seed=4)[1]


def test_level_can_be_exhausted_exactly():
    cap = sum(t.size for t in TEMPLATES[1])
    train, held_out = make_splits([1], cap - 100, 100, seed=0)
    assert len({p.question for p in train + held_out}) == cap


def test_too_large_request_names_the_level_and_max():
    cap = sum(t.size for t in TEMPLATES[1])
    with pytest.raises(ValueError, match=rf"level 1 has at most {cap}"):
        make_splits([1, 3], 2 * cap, 10, seed=0)


@pytest.mark.parametrize("levels", [[], [5], [1, 1]])
def test_bad_levels_are_rejected(levels):
    with pytest.raises(ValueError, match="levels"):
        make_splits(levels, 10, 10, seed=0)


def test_uid_is_sha1_of_question_and_format_question_appends_instruction():
    (p,), _ = make_splits([3], 1, 0, seed=0)
    assert p.uid == hashlib.sha1(p.question.encode()).hexdigest()[:12]
    assert format_question(p) == f"{p.question} {INSTRUCTION}"


# ---------------------------------------------------------------------------------------------
# Templates and answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [1, 2])
def test_bare_questions_answer_their_expression_and_are_all_distinct(level):
    seen = set()
    for template in TEMPLATES[level]:
        for index in range(template.size):
            question, answer = template.question(index)
            a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
            assert answer == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert (int(a) <= 19 and int(b) <= 19) if level == 1 else (int(a) >= 20)
            seen.add(question)
    assert len(seen) == sum(t.size for t in TEMPLATES[level])


@pytest.mark.parametrize("template", TEMPLATES[3] + TEMPLATES[4], ids=lambda t: t.text[:30])
def test_word_problem_templates_give_distinct_questions_with_natural_answers(template):
    rng = random.Random(0)
    indices = {rng.randrange(template.size) for _ in range(300)} | {0, template.size - 1}
    questions = set()
    for index in indices:
        question, answer = template.question(index)
        assert isinstance(answer, int) and answer >= 0
        assert "{" not in question and "}" not in question and "  " not in question
        questions.add(question)
    assert len(questions) == len(indices)


@pytest.mark.parametrize(
    "level, template, args, expected",
    [
        (3, 0, ("Mia", "apples", 14, 9), ("Mia has 14 apples and buys 9 more. How many apples does Mia have now?", 23)),
        (
            3,
            1,
            ("Leo", "marbles", 9, 5),
            ("Leo had 14 marbles and gave 9 to a friend. How many marbles does Leo have left?", 5),
        ),
        (
            3,
            4,
            ("Ava", "pencils", 3, 6),
            ("Ava has 3 boxes with 6 pencils in each box. How many pencils does Ava have?", 18),
        ),
        (
            3,
            7,
            ("", "", 4, 10),
            (
                "A bus has 14 passengers. At the next stop, 4 people get off. How many passengers are on the bus now?",
                10,
            ),
        ),
        (
            4,
            0,
            ("Zoe", "stamps", 5, 7, 3),
            ("Zoe has 8 stamps, buys 7 more, and then gives 3 to a friend. How many stamps does Zoe have now?", 12),
        ),
        (
            4,
            2,
            ("Priya", "shells", 10, 4),
            ("Priya has 10 shells. Mia has 4 more than Priya. How many shells do they have together?", 24),
        ),
        (
            4,
            4,
            ("Sam", "cookies", 3, 4, 2),
            ("Sam had 14 cookies and gave 3 to each of 4 friends. How many cookies does Sam have left?", 2),
        ),
        (
            4,
            6,
            ("Kai", "pens", 3, 7, 0),
            (
                "Kai buys 3 pens at 7 dollars each and pays with a 50-dollar bill. How many dollars of "
                "change does Kai get?",
                29,
            ),
        ),
    ],
)
def test_hand_written_word_problems(level, template, args, expected):
    assert TEMPLATES[level][template].render(*args) == expected


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 12.", "12"),
        ("12", "12"),
        ("= 12", "12"),
        ("$1,234", "1234"),
        ("-5", "-5"),
        ("12.0", "12"),
        ("2.50", "2.5"),
        ("\\boxed{12}", "12"),
        ("#### 12", "12"),
        ("**12**", "12"),
        ("Answer: 12 apples", "12"),
        ("The farm has 1,234,567 chickens.", "1234567"),
        ("So Mia has 23 apples!", "23"),
        ("\u22125", "-5"),
        ("The answer is \u22120.0", "0"),
        ("Step 1: 14 + 9 = 23", "23"),
        ("Step 1: add the numbers.\nStep 2: the total is 23.\nStep 3", "23"),
        ("1. Mia has 14 apples.\n2. She buys 9 more, so she has 23.", "23"),
        ("23.", "23"),
        ("The answer is 7 + 12 = 19.", "19"),
        ("The answer is 23 because Mia had 14 and bought 9.", "23"),
        ("Answer: 12. I hope this answer is helpful.", "12"),
        ("The answer is below.\n\n14 + 9 = 23", "23"),
        ("The answer is:\n\n42", "42"),
        ("**Answer:** 8", "8"),
        ("3 + 4 = 7, 7 \u00d7 2 = 14. Final Answer: The final answer is $\\boxed{14}$. Check: 2", "14"),
        ("\\boxed{\\text{12 apples}}", "12"),
        ("#### 1,000\nThat was easy, 5 stars.", "1000"),
        ("7-5=2", "2"),
        ("x = -3", "-3"),
        ("The answer is 007", "7"),
        ("I am not sure.", None),
        ("", None),
    ],
)
def test_parse_final_answer(text, expected):
    assert parse_final_answer(text) == expected


# ---------------------------------------------------------------------------------------------
# Rewards and metrics
# ---------------------------------------------------------------------------------------------


def test_binary_reward_compares_numerically():
    assert binary_reward("So the answer is 12.0", "12") == 1.0
    assert binary_reward("\\boxed{2.50}", "2.5") == 1.0
    assert binary_reward("The answer is 13", "12") == 0.0
    assert binary_reward("no idea", "12") == 0.0
    assert binary_reward("= 3", "3") == 1.0 and binary_reward("five", "5") == 0.0  # a number is needed
    assert REWARDS == {"binary": binary_reward, "graded": graded_reward}


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("72", "72"),
        ("Natalia sold 48/2 = 24 clips.\nShe sold 72 clips.\n#### 72", "72"),
        ("1,000", "1000"),
        (" -012.50 ", "-12.5"),
        ("\\boxed{7}", "7"),
        ("Paris", "Paris"),
        ("The answer is Paris.", "Paris"),
        ("3 apples", "3 apples"),
    ],
)
def test_reference_answer_is_a_canonical_number_or_the_text(reference, expected):
    assert reference_answer(reference) == expected
    assert reference_answer(expected) == expected  # idempotent: the driver and the scorer both apply it


def test_text_answers_match_as_normalised_strings_and_never_raise():
    """One matching rule for every caller (the reward actor, evaluation, Pass@N): a text reference
    is a string match; numbers in a reply to a text question are just wrong, not an error."""
    assert answers_match("The answer is paris.", "Paris")
    assert answers_match("Paris", "Paris") and answers_match("It is 12 km away.\nThe answer is: the Paris", "Paris")
    assert not answers_match("I think the capital is Paris", "Paris")  # no marker: the last line must be it
    assert not answers_match("12 + 7 = 19. The answer is 19.", "Paris")
    assert binary_reward("12 + 7 = 19. The answer is 19.", "Paris") == 0.0
    assert graded_reward("The answer is 19.", "Paris") == 0.0 and graded_reward("The answer is Paris", "Paris") == 1.0
    assert [binary_reward("The answer is Paris", "Paris"), binary_reward("19", "The answer is Paris.")] == [1.0, 0.0]
    assert answers_match("The answer is 19.0", "19") and not answers_match("The answer is nineteen", "19")


def test_graded_reward_orders_wrong_answers_by_closeness():
    replies = ["= 10", "= 11", "= 15", "= -50", "= 100", "no number"]  # errors 0, 1, 5, 60, 90
    scores = [graded_reward(r, "10") for r in replies]
    assert scores[0] == 1.0 and scores[-1] == 0.0
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert all(0.0 < s < 0.5 for s in scores[1:-1])
    assert graded_reward("= 11", "10") == pytest.approx(0.5 / 1.1)
    assert graded_reward("= 1", "0") == pytest.approx(0.25)  # |answer| < 1 uses scale 1


def test_pass_at_n_hand_computed():
    flags = [[True, False, False, False], [True, True, False, False], [False] * 4]
    assert pass_at_n(flags, 1) == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)  # n=1 is accuracy
    # 1 correct of 4: 1 - C(3,2)/C(4,2) = 1 - 3/6; 2 correct: 1 - C(2,2)/C(4,2) = 1 - 1/6.
    assert pass_at_n(flags, 2) == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert pass_at_n([[True] * 3, [True, True]], 2) == 1.0
    assert pass_at_n([[False] * 5], 3) == 0.0
    assert pass_at_n([[False, False, True]], 3) == 1.0  # all samples drawn: any correct counts
    with pytest.raises(ValueError, match="Pass@5"):
        pass_at_n([[True] * 4], 5)
