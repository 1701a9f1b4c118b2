"""How answers are measured (the length filter). How they are checked against gold is each data source's own
(``data.checkers``): the library is handed the checker, it never imports ``data``."""

from __future__ import annotations

import pandas as pd

from kdflow.config.filters import FiltersSection


def token_counts(rows: list[dict], section: FiltersSection) -> list[int] | None:
    """Answer lengths for the length filter: in the student's tokenizer when the recipe names one, else the
    teacher's own count (the demo's students share the teacher's tokenizer)."""
    if section.length is None:
        return None
    if section.length.tokenizer is None:
        if rows and "completion_tokens" not in rows[0]:
            raise ValueError("filters.length needs filters.length.tokenizer: these answers carry no completion_tokens")
        return [0 if pd.isna(r["completion_tokens"]) else int(r["completion_tokens"]) for r in rows]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(section.length.tokenizer)
    return [len(ids) for ids in tokenizer([r["text"] or "" for r in rows], add_special_tokens=False)["input_ids"]]
