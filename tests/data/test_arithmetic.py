import random

import pytest

from data.arithmetic import Difficulty, check_answer, extract_answer, generate_splits, make_problem

SIZES = {"train": 300, "prompts": 200, "test": 100}


def evaluate_chain(question: str) -> int:
    # An independent evaluation of '47+18-25' (no eval()): split into signed terms.
    total, sign, number = 0, 1, ""
    for ch in question + "+":
        if ch.isdigit():
            number += ch
        else:
            total += sign * int(number)
            sign, number = (1 if ch == "+" else -1), ""
    return total


def test_same_seed_same_splits_and_other_seed_differs():
    a = generate_splits(SIZES, seed=1, difficulty=Difficulty())
    b = generate_splits(SIZES, seed=1, difficulty=Difficulty())
    c = generate_splits(SIZES, seed=2, difficulty=Difficulty())
    assert a == b
    assert [r["question"] for r in a["train"]] != [r["question"] for r in c["train"]]
    assert {k: len(v) for k, v in a.items()} == SIZES


def test_splits_are_disjoint():
    splits = generate_splits(SIZES, seed=0, difficulty=Difficulty(1, 2, 9))  # small space: collisions likely
    questions = [set(r["question"] for r in rows) for rows in splits.values()]
    assert sum(map(len, questions)) == len(set().union(*questions)) == sum(SIZES.values())


def test_gold_rationale_is_right_and_checker_accepts_it():
    for row in generate_splits(SIZES, seed=3, difficulty=Difficulty())["train"]:
        assert row["answer"] == evaluate_chain(row["question"]) >= 0
        steps = row["rationale"].splitlines()[:-1]
        before = row["question"]
        for line in steps:
            done, after = line.split("=")
            assert before.startswith(done) and evaluate_chain(done) == int(after.split("+")[0].split("-")[0])
            assert evaluate_chain(after) == evaluate_chain(before)  # the rest is copied, not changed
            before = after
        assert before == str(row["answer"])
        assert check_answer(row["rationale"], row["answer"])


def test_checker_rejects_perturbed_answers():
    rows = generate_splits({"test": 200}, seed=4, difficulty=Difficulty())["test"]
    for row in rows:
        wrong = row["rationale"].rsplit(" ", 1)[0] + f" {row['answer'] + 1}"
        assert row["rationale"].endswith(f"Answer: {row['answer']}")
        assert not check_answer(wrong, row["answer"])
        assert not check_answer(row["rationale"].rsplit("\n", 1)[0], row["answer"])  # no Answer line
        assert not check_answer(row["rationale"] + " and more", row["answer"])  # answer not at the end
    assert extract_answer("12+3=15\nAnswer: 15") == 15
    assert extract_answer("Answer:") is None


def test_difficulty_knob_sets_the_number_of_steps():
    rng = random.Random(0)
    easy = [make_problem(rng, Difficulty(1, 1, 9)) for _ in range(50)]
    hard = [make_problem(rng, Difficulty(5, 6, 999)) for _ in range(50)]
    assert all(p["rationale"].count("\n") == 1 for p in easy)
    assert all(5 <= p["rationale"].count("\n") <= 6 for p in hard)
    assert max(p["answer"] for p in hard) > 999


def test_bad_difficulty_is_refused():
    with pytest.raises(ValueError, match="min_steps"):
        Difficulty(3, 2, 9)


def test_commuted_order_keeps_the_questions_and_writes_valid_rationales_in_both_orders():
    fixed = generate_splits(SIZES, seed=5, difficulty=Difficulty(2, 5, 9))
    commuted = generate_splits(SIZES, seed=5, difficulty=Difficulty(2, 5, 9), commuted=True)
    assert {k: [r["question"] for r in v] for k, v in commuted.items()} == {
        k: [r["question"] for r in v] for k, v in fixed.items()
    }
    swapped = kept = 0
    for a, b in zip(fixed["train"], commuted["train"]):
        assert a["answer"] == b["answer"] and check_answer(b["rationale"], b["answer"])
        for line_a, line_b in zip(a["rationale"].splitlines()[:-1], b["rationale"].splitlines()[:-1]):
            done_a, after_a = line_a.split("=")
            done_b, after_b = line_b.split("=")
            assert after_a == after_b  # the same step, its operands perhaps the other way round
            if done_a != done_b:
                x, y = done_a.split("+")
                assert done_b == f"{y}+{x}"
                swapped += 1
            else:
                kept += 1
    assert swapped > 100 and kept > 100  # both orders occur (each addition's order is a fair coin)
    assert generate_splits(SIZES, seed=5, difficulty=Difficulty(2, 5, 9), commuted=True) == commuted


def test_solution_order_is_for_the_arithmetic_generator_only():
    from kdflow.config.data import DataSection

    assert DataSection(source="arithmetic", splits={"train": 1, "test": 1}, solution_order="commuted")
    with pytest.raises(ValueError, match="solution_order is for the arithmetic generator: remove it"):
        DataSection(source="gsm8k", path="data", splits={"train": 1, "test": 1}, solution_order="commuted")
