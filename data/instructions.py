"""Instruction data from local files (``source: instructions``): free-text prompts with reference answers.

Two files, two roles. The transfer file (T0's prompts, ``{"id", "prompt", "completion"}`` per line) gives every
split but ``test``: the questions the teacher answers and the students learn from, drawn without overlap, seeded.
The test file (Self-Instruct's 252 user-oriented instructions, ``{"id", "instruction", "instances": [{"input",
"output"}]}``) is the ``test`` split, the held-out evaluation that MiniLLM and later LM-distillation papers report.

Rows have the fields the pipeline uses: ``id``, ``question`` (the prompt), ``rationale`` (the reference answer: what
``data: gold`` students are fine-tuned on) and ``answer`` (the same reference, which evaluation scores ROUGE-L
against). There is no answer checker (``no_checker`` refuses to be called): a reference is one good answer among
many."""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path

from kdflow.store.data_files import DataError, json_kind, load_located_rows

TEST = "test"  # the split read from the test file; every other split comes from the transfer file


def no_checker(*_):
    """Free text (``source: instructions``) has references, not answers to verify: the recipe refuses every filter and
    metric that would call a checker, so reaching this is a bug, not a wrong answer."""
    raise TypeError(
        "source 'instructions' has no answer checker (free text is scored by ROUGE-L against the reference);"
        " a filter or metric that needs one should have been refused at recipe load"
    )


def self_instruct_question(instruction: str, input_text: str) -> str:
    """The user turn for one Self-Instruct instance: the instruction, then a blank line and the input when it has one.

    MiniLLM (microsoft/LMOps, minillm/tools/process_data_dolly.py) prompts its base models with Alpaca's
    ``### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n`` and leaves the input part
    out when the input is empty. Here the model's own chat template is the scaffold (the pipeline applies it), so the
    user turn keeps that text without Alpaca's headers: instruction, blank line, input."""
    input_text = input_text.strip()
    return f"{instruction.strip()}\n\n{input_text}" if input_text else instruction.strip()


def read_transfer(path: Path) -> list[dict]:
    """Every row of a transfer file, in file order; a line without ``id``, ``prompt`` or ``completion`` fails naming
    ``file:line``."""
    located = load_located_rows(path, required=("id", "prompt", "completion"), prompt_field="prompt")
    rows = [
        {
            "id": str(r["id"]),
            "question": _prompt(r["prompt"], at, "prompt"),
            "rationale": _reference(r["completion"], at, "field 'completion'"),
            "answer": r["completion"],
        }
        for at, r in located
    ]
    return _unique(rows, [at for at, _ in located])


def _reference(value, at: str, field: str) -> str:
    """A row's reference answer: non-empty text. It is what ``data: gold`` students learn and what ROUGE-L scores
    against, so an empty one teaches nothing and ``None`` or a list crashes the scorer (or, as ``str(None)``, is scored
    against the word "None")."""
    if not isinstance(value, str):
        raise DataError(
            f"{at}: {field} holds {json_kind(value)}, not text: there is no reference to score against; write "
            "it as a JSON string or remove the row"
        )
    if not visible(value):
        raise DataError(
            f"{at}: {field} is empty (no visible character): there is no reference to score against; fill it in or "
            "remove the row"
        )
    return value


# Characters that show nothing: whitespace, controls and format characters (category Cf: the zero-width space U+200B,
# joiners U+200C/U+200D, the byte-order mark U+FEFF). str.strip() keeps the format ones, so a reference of only U+200B
# passed as text: a gold student learnt to write nothing, and ROUGE-L scored against no word.
INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def visible(text: str) -> bool:
    """Whether ``text`` has a character that shows."""
    return any(not ch.isspace() and unicodedata.category(ch) not in INVISIBLE for ch in text)


def _prompt(value: str, at: str, field: str) -> str:
    # load_located_rows refuses an empty or blank prompt, but by str.strip(), which keeps the zero-width characters
    if not visible(value):
        raise DataError(f"{at}: empty prompt in field {field!r} (no visible character); remove the row or fill it in")
    return value


def _input_text(value, at: str) -> str:
    """An instance's ``input``: text, or null for none (as ``""``; ``str(None)`` appended "None" to the question
    every model was evaluated on)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{at}: the instance's 'input' holds {json_kind(value)}, not text; write it as a JSON string, or "
            '"" (or null) for an instruction without an input'
        )
    return value


def read_test(path: Path) -> list[dict]:
    """Every instruction of a Self-Instruct-format file, in file order (its first instance: the user-oriented set has
    one per instruction); a line without ``id``, ``instruction`` or an instance with ``input`` and ``output`` fails
    naming ``file:line``."""
    located = load_located_rows(path, required=("id", "instruction", "instances"), prompt_field="instruction")
    rows = []
    for at, r in located:
        instances = r["instances"]
        if not (
            isinstance(instances, list)
            and instances
            and isinstance(instances[0], dict)
            and {"input", "output"} <= set(instances[0])
        ):
            raise DataError(
                f"{at}: 'instances' must be a list whose first item has 'input' and 'output' (Self-Instruct's "
                "format); fix the row or remove it"
            )
        first = instances[0]
        _prompt(r["instruction"], at, "instruction")
        _reference(first["output"], at, "the instance's 'output'")
        rows.append(
            {
                "id": str(r["id"]),
                "question": self_instruct_question(r["instruction"], _input_text(first["input"], at)),
                "rationale": first["output"],
                "answer": first["output"],
            }
        )
    return _unique(rows, [at for at, _ in located])


def _unique(rows: list[dict], where: list[str]) -> list[dict]:
    # Rows are joined by id downstream (teacher answers, the logit cache, predictions): two rows with one id would mix.
    seen: dict[str, str] = {}
    for row, at in zip(rows, where):
        if row["id"] in seen:
            raise DataError(f"{at}: id {row['id']!r} is also the id of {seen[row['id']]}; ids must be unique")
        seen[row["id"]] = at
    return rows


def sample(count: int, n: int, seed: int) -> list[int]:
    """``n`` of ``count`` row indices, seeded, in file order (all of them, in order, when ``n == count``)."""
    return sorted(random.Random(seed).sample(range(count), n))


def load_splits(transfer: Path, test: Path, splits: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """``test`` from the test file, every other split from the transfer file: disjoint, each split's rows in file
    order. Splits are dealt from one seeded shuffle in sorted name order, so that the rows a split gets depend on the
    splits' names and sizes and the seed, not on the order the recipe lists them in (which the cache key ignores)."""
    out = {}
    if TEST in splits:
        rows = read_test(test)
        if splits[TEST] > len(rows):
            raise DataError(
                f"data.splits.{TEST} asks for {splits[TEST]:,} rows but {test} has {len(rows):,}: lower it "
                f"to at most {len(rows):,}, or point data.test at a larger file"
            )
        out[TEST] = [rows[i] for i in sample(len(rows), splits[TEST], seed)]
    drawn = {name: n for name, n in sorted(splits.items()) if name != TEST}
    if drawn:
        rows = read_transfer(transfer)
        if sum(drawn.values()) > len(rows):
            asked = ", ".join(f"{name} {n:,}" for name, n in drawn.items())
            raise DataError(
                f"data.splits: {asked} ask for {sum(drawn.values()):,} rows of the transfer file, without "
                f"overlap, but {transfer} has {len(rows):,}: lower them to at most {len(rows):,} together, "
                "or point data.transfer at a larger file"
            )
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        start = 0
        for name, n in drawn.items():
            out[name] = [rows[i] for i in sorted(order[start : start + n])]
            start += n
    return {name: out[name] for name in splits}  # the recipe's order, as the other sources
