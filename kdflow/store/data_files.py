"""Rows from real data files: JSONL, parquet, or a local HF dataset folder (``Dataset.save_to_disk``).

Bad input fails before any work, naming the file and the line (JSONL) or row (parquet, HF dataset) and
what to fix: a line that is not JSON or not UTF-8, a missing field, an empty prompt. A hub dataset name
(``owner/name``) is accepted too, through ``datasets.load_dataset``; everything else works offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd


class DataError(ValueError):
    pass


# Half of a UTF-16 pair without its other half: a JSON "\ud83d" escape alone decodes to one. Python strings hold
# it, but UTF-8 cannot, so pyarrow (parquet, and pandas' string columns) refuses the whole table.
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def lone_surrogate(value, field: str) -> tuple[str, int] | None:
    """(field, character index) of the first lone surrogate in ``value`` (a string, or lists / dicts of them)."""
    if isinstance(value, str):
        found = LONE_SURROGATE.search(value)
        return (field, found.start()) if found else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if found := lone_surrogate(item, f"{field}.{key}"):
            return found
    return None


def json_kind(value) -> str:
    """What a JSON value is, in the words a data file's author uses (``5`` is a number, ``[..]`` a list)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else f"a {type(value).__name__}"


def check_utf8(rows: list[dict], what: str, id_field: str = "id") -> None:
    """Before rows become a parquet table: a lone surrogate fails naming the row (by ``id_field``) and the field,
    where pyarrow would only say 'surrogates not allowed'."""
    for i, row in enumerate(rows):
        for field, value in row.items():
            if found := lone_surrogate(value, field):
                raise DataError(
                    f"{what}: row {row.get(id_field, f'#{i}')!r}, field {found[0]!r}: a lone surrogate "
                    f"at character {found[1]} (half of a UTF-16 pair, e.g. a JSON \\ud83d escape without "
                    "its other half) cannot be stored as UTF-8; fix or remove that row"
                )


def load_rows(
    source: str | Path,
    required: tuple[str, ...] = (),
    prompt_field: str | None = None,
    n: int | None = None,
    split: str = "train",
) -> list[dict]:
    """The first ``n`` rows (all when None) of ``source``; each must have the ``required`` fields, and
    ``prompt_field`` (when given) must hold non-empty text."""
    return [row for _, row in load_located_rows(source, required, prompt_field, n, split)]


def load_located_rows(
    source: str | Path,
    required: tuple[str, ...] = (),
    prompt_field: str | None = None,
    n: int | None = None,
    split: str = "train",
) -> list[tuple[str, dict]]:
    """As ``load_rows``, each row with where it came from (``file:line`` or ``file: row N``), so that a
    caller's own checks can name the place too."""
    path = Path(source)
    if path.is_dir():
        rows, where = _hf_folder(path, split, n), "row"
    elif path.suffix == ".parquet":
        rows, where = _parquet(path, n), "row"
    elif path.suffix in (".jsonl", ".json"):
        rows, where = _jsonl(path, n), "line"
    elif not path.exists() and str(source).count("/") == 1 and not path.suffix:
        rows, where = _hub(str(source), split, n), "row"
    else:
        raise DataError(
            f"{path}: no such file, or not a format kdflow reads (.jsonl, .parquet, or a folder "
            "saved with datasets' save_to_disk)"
        )
    located = [(f"{path}:{number}" if where == "line" else f"{path}: row {number}", row) for number, row in rows]
    for at, row in located:
        _check(at, row, required, prompt_field)
    return located


def _check(at: str, row, required, prompt_field) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{at}: expected a JSON object with fields {list(required)}, got {type(row).__name__}")
    missing = [f for f in required if f not in row]
    if missing:
        raise DataError(f"{at}: missing field(s) {missing}; every row needs {list(required)}")
    if prompt_field is not None:
        prompt = row.get(prompt_field)
        if prompt is not None and not isinstance(prompt, str):
            # "empty" would send the fix the wrong way: a number or a list is there, it is just not text
            raise DataError(
                f"{at}: field {prompt_field!r} holds {json_kind(prompt)} ({prompt!r:.60}), not text; write the "
                "prompt as a JSON string (quoted) or remove the row"
            )
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{at}: empty prompt in field {prompt_field!r}; remove the row or fill it in")
    for field, value in row.items():
        if found := lone_surrogate(value, field):
            raise DataError(
                f"{at}: field {found[0]!r} holds a lone surrogate at character {found[1]} (a JSON "
                "\\ud83d-style escape without its other half), which cannot be stored as UTF-8; fix "
                "the escape or remove the row"
            )


def _jsonl(path: Path, n: int | None) -> list[tuple[int, dict]]:
    rows = []
    with open(path, "rb") as f:  # bytes, so a bad encoding is reported with its line
        for lineno, raw in enumerate(f, 1):
            if n is not None and len(rows) >= n:
                break
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as Windows tools write one
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r}); "
                    "re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue  # a blank line (often the last) holds no row
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
    return rows


def _parquet(path: Path, n: int | None) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    records = table.slice(0, n).to_pylist() if n is not None else table.to_pylist()
    return list(enumerate(records, 1))


def _hf_folder(path: Path, split: str, n: int | None) -> list[tuple[int, dict]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a dataset folder saved with save_to_disk ({e})") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r}; it has {sorted(data)}")
        data = data[split]
    assert isinstance(data, Dataset)
    if n is not None:
        data = data.select(range(min(n, len(data))))
    return list(enumerate(data.to_list(), 1))


def _hub(name: str, split: str, n: int | None) -> list[tuple[int, dict]]:
    from datasets import load_dataset

    try:
        data = load_dataset(name, split=split if n is None else f"{split}[:{n}]")
    except (ConnectionError, OSError, ValueError) as e:
        raise DataError(
            f"{name}: could not load this hub dataset ({e}); download it and point the recipe at "
            "the local files instead"
        ) from None
    return list(enumerate(data.to_list(), 1))


def save_rows(rows: list[dict], columns: list[str], path: Path) -> None:
    """``rows`` as a parquet file with ``columns`` first, so that an empty dataset (no drops) still has its schema."""
    extra = [c for r in rows for c in r if c not in columns]
    pd.DataFrame(rows, columns=list(dict.fromkeys(columns + extra))).to_parquet(path, index=False)
