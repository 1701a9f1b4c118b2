"""The demo task: multi-step arithmetic with a written-out rationale and an exactly checkable answer.

A problem is a chain of additions and subtractions, e.g. ``47+18-25+7``; its gold rationale reduces it
left to right, one operation per line, rewriting what is left (``=65-25+7``, ``=40+7``, ``=47``), and
ends with ``Answer: 47``. Rewriting the rest of the chain on every line keeps each step local: the next
operation is always the first one on the previous line, so a tiny model learns to reduce, not to count
how far along the question it is (with lines like ``65-25=40`` a 1M-parameter teacher mostly failed at
fetching the right operand from the question: 25 % accuracy after 1,200 steps). Running totals never go negative, so every
number is written with digits only. Everything is a pure function of (seed, split, index), so the splits
are deterministic and disjoint by construction (each split draws from its own seeded stream, and problems
that also occur in the test split are skipped in the others).

The difficulty knob is (min_steps, max_steps, max_operand): more steps means a longer chain of dependent
carries for the model to get right.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Difficulty:
    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 99

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {self.max_operand}")


def make_problem(rng: random.Random, difficulty: Difficulty) -> dict:
    """One problem: question, gold rationale (one step per line) and the integer answer."""
    n_steps = rng.randint(difficulty.min_steps, difficulty.max_steps)
    values = [rng.randint(1, difficulty.max_operand)]
    ops, totals = [], [values[0]]
    for _ in range(n_steps):
        operand = rng.randint(1, difficulty.max_operand)
        # Subtract only when the result stays >= 0, so answers never need a minus sign.
        op = "-" if operand <= totals[-1] and rng.random() < 0.5 else "+"
        ops.append(op)
        values.append(operand)
        totals.append(totals[-1] - operand if op == "-" else totals[-1] + operand)
    rest = lambda k: "".join(f"{ops[i]}{values[i + 1]}" for i in range(k, n_steps))  # ops k.. still to do
    lines = [f"={totals[k]}{rest(k)}" for k in range(1, n_steps + 1)]
    lines.append(f"Answer: {totals[-1]}")
    return {"question": f"{values[0]}{rest(0)}", "rationale": "\n".join(lines), "answer": totals[-1]}


def split_seed(seed: int, split: str) -> int:
    # A stable per-split seed (Python's hash() of a str is salted per process, so not that).
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(split))


def generate_split(split: str, n: int, seed: int, difficulty: Difficulty, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` problems for ``split``, skipping questions in ``exclude`` (used to keep test problems out)."""
    rng = random.Random(split_seed(seed, split))
    rows: list[dict] = []
    seen = set(exclude)
    while len(rows) < n:
        problem = make_problem(rng, difficulty)
        if problem["question"] in seen:
            continue
        seen.add(problem["question"])
        rows.append({"id": f"{split}-{len(rows):06d}", **problem})
    return rows


def generate_splits(sizes: dict[str, int], seed: int, difficulty: Difficulty) -> dict[str, list[dict]]:
    """All splits, disjoint: the test split is drawn first and every other split avoids its questions
    and each other's."""
    order = sorted(sizes, key=lambda s: (s != "test", s != "validation", s))
    taken: set[str] = set()
    out = {}
    for split in order:
        out[split] = generate_split(split, sizes[split], seed, difficulty, exclude=taken)
        taken |= {row["question"] for row in out[split]}
    return out


def extract_answer(text: str) -> int | None:
    """The integer after the last ``Answer:`` at the end of the text, or None when there is none."""
    match = ANSWER_RE.search(text.strip())
    return int(match.group(1)) if match else None


def check_answer(text: str, gold: int) -> bool:
    """True when the text ends with ``Answer: <gold>``."""
    return extract_answer(text) == int(gold)
