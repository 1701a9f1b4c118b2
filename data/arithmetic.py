"""The demo task: multi-step arithmetic with a written-out rationale and an exactly checkable answer.

A problem is a chain of additions and subtractions, e.g. ``7+8-5+9``; its gold rationale reduces it left
to right, one operation per line, writing the operation out and then what is left of the chain
(``7+8=15-5+9``, ``15-5=10+9``, ``10+9=19``), and ends with ``Answer: 19``. Every step is local: the
operation to do is the first one after ``=`` on the previous line, and its operands sit right before the
new ``=``. Measured with a 1M-parameter Llama: with lines like ``15-5=10`` that leave the next operand in
the question, the model mostly failed at fetching the right operand (25 % accuracy after 1,200 steps);
with 2-digit operands (max_operand 99) no format reached 5 % within the demo's training budget. Running totals never go
negative, so every number is written with digits only. Everything is a pure function of (seed, split, index), so the
splits are deterministic and disjoint by construction (each split draws from its own seeded stream, and problems
that also occur in the test split are skipped in the others).

The difficulty knob is (min_steps, max_steps, max_operand): more steps means a longer chain of dependent
carries for the model to get right.

``commuted`` (the data section's ``solution_order: commuted``) writes each addition's two operands in either order,
drawn at random (``15+9=24`` or ``9+15=24``): several valid rationales per question, so that a teacher trained on
them spreads its next-token distribution over right answers, something soft targets can transfer and its greedy
text cannot. The order is drawn from a stream of its own, so the questions (and every split) stay the same.
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
    max_operand: int = 9

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {self.max_operand}")


def make_problem(rng: random.Random, difficulty: Difficulty, order_rng: random.Random | None = None) -> dict:
    """One problem: question, gold rationale (one step per line) and the integer answer. ``order_rng``: write each
    addition's operands in an order it draws (commuted), else the running total first."""
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
    swapped = [order_rng is not None and ops[k] == "+" and order_rng.random() < 0.5 for k in range(n_steps)]
    step = lambda k: f"{values[k + 1]}+{totals[k]}" if swapped[k] else f"{totals[k]}{ops[k]}{values[k + 1]}"
    lines = [f"{step(k)}={totals[k + 1]}{rest(k + 1)}" for k in range(n_steps)]
    lines.append(f"Answer: {totals[-1]}")
    return {"question": f"{values[0]}{rest(0)}", "rationale": "\n".join(lines), "answer": totals[-1]}


def split_seed(seed: int, split: str) -> int:
    # A stable per-split seed (Python's hash() of a str is salted per process, so not that).
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(split))


def generate_split(
    split: str, n: int, seed: int, difficulty: Difficulty, exclude: set[str] = frozenset(), commuted: bool = False
) -> list[dict]:
    """``n`` problems for ``split``, skipping questions in ``exclude`` (used to keep test problems out);
    ``commuted``: rationales in random valid orders (the same questions)."""
    rng = random.Random(split_seed(seed, split))
    order_rng = random.Random(split_seed(seed, split) + 1) if commuted else None
    rows: list[dict] = []
    seen = set(exclude)
    while len(rows) < n:
        problem = make_problem(rng, difficulty, order_rng)
        if problem["question"] in seen:
            continue
        seen.add(problem["question"])
        rows.append({"id": f"{split}-{len(rows):06d}", **problem})
    return rows


def generate_splits(
    sizes: dict[str, int], seed: int, difficulty: Difficulty, commuted: bool = False
) -> dict[str, list[dict]]:
    """All splits, disjoint: the test split is drawn first and every other split avoids its questions
    and each other's. ``commuted``: as in ``generate_split``."""
    order = sorted(sizes, key=lambda s: (s != "test", s != "validation", s))
    taken: set[str] = set()
    out = {}
    for split in order:
        out[split] = generate_split(split, sizes[split], seed, difficulty, exclude=taken, commuted=commuted)
        taken |= {row["question"] for row in out[split]}
    return out


def extract_answer(text: str) -> int | None:
    """The integer after the last ``Answer:`` at the end of the text, or None when there is none."""
    match = ANSWER_RE.search(text.strip())
    return int(match.group(1)) if match else None


def check_answer(text: str, gold: int) -> bool:
    """True when the text ends with ``Answer: <gold>``."""
    return extract_answer(text) == int(gold)
