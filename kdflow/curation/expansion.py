"""Self-instruct expansion (Wang et al., 2023): the teacher writes new instructions from a few seed ones;
its replies are parsed into one candidate per line, and candidates that (nearly) repeat a seed or an earlier
candidate are dropped, with their reason and raw reply kept. The kept instructions then go to the teacher
to answer, and through the same curation as any teacher answers."""

from __future__ import annotations

import random
import re
from collections import Counter

from kdflow.config.self_instruct import ExpansionSection, SeedsSection
from kdflow.config.templates import render
from kdflow.curation.dedup import exact_duplicates, near_duplicates
from kdflow.curation.filters import Reason
from kdflow.store.data_files import load_rows

ITEM_RE = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•])\s*(.+?)\s*$")  # "4. Write ...", "5) ...", "- ..."


def expansion_prompts(
    seeds: list[str], template: str, prompts: int, seeds_per_prompt: int, new_per_prompt: int, seed: int
) -> list[dict]:
    """``prompts`` rows ``{id, question}``: each shows a different random handful of seeds (the variety of the
    examples shown is what keeps the teacher from writing the same tasks again)."""
    rng = random.Random(seed)
    rows = []
    for i in range(prompts):
        shown = rng.sample(seeds, min(seeds_per_prompt, len(seeds)))
        rows.append(
            {"id": f"expand-{i:06d}", "question": render(template, seeds=shown, n=new_per_prompt), "answer": ""}
        )
    return rows


def parse_instructions(reply: str) -> list[str]:
    """The numbered or bulleted lines of a reply, without their numbers."""
    return [m.group(1) for line in reply.splitlines() if (m := ITEM_RE.match(line))]


def candidates(replies: list[dict], min_words: int, max_words: int) -> tuple[list[dict], list[dict]]:
    """(candidates, dropped): one candidate per parsed line of each reply ``{id, sample, text}``; a reply with
    no usable line is dropped whole (``no_instruction``), a line of the wrong length alone."""
    out, dropped = [], []
    for r in replies:
        lines = parse_instructions(r["text"] or "")
        if not lines:
            dropped.append(
                {
                    "source": f"{r['id']}/{r.get('sample', 0)}",
                    "instruction": "",
                    "text": r["text"],
                    "reasons": [Reason.no_instruction.value],
                }
            )
        for j, line in enumerate(lines):
            row = {"source": f"{r['id']}/{r.get('sample', 0)}", "instruction": line, "text": r["text"]}
            words = len(line.split())
            if words < min_words or words > max_words:
                dropped.append({**row, "reasons": [(Reason.too_short if words < min_words else Reason.too_long).value]})
            else:
                out.append(row)
    return out, dropped


def dedup_instructions(
    rows: list[dict], seeds: list[str], threshold: float, ngram: int, num_perm: int = 128
) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): exact copies (of a seed or an earlier candidate) go first, then MinHash near copies."""
    texts = seeds + [r["instruction"] for r in rows]
    exact = exact_duplicates(texts)[len(seeds) :]
    unique = [i for i, first in enumerate(exact) if first is None]
    near = dict(
        zip(
            unique, near_duplicates([rows[i]["instruction"] for i in unique], threshold, ngram, num_perm, against=seeds)
        )
    )
    kept, dropped = [], []
    for i, row in enumerate(rows):
        if exact[i] is not None:
            first = exact[i]
            of = f"seed {first}" if first < len(seeds) else rows[first - len(seeds)]["instruction"]
            dropped.append({**row, "reasons": [Reason.duplicate.value], "detail": f"duplicate of {of}"})
        elif near[i] is not None:
            kind, j = near[i]
            reason, of = (
                (Reason.near_seed, seeds[j])
                if kind == "against"
                else (Reason.near_duplicate, rows[unique[j]]["instruction"])
            )
            dropped.append({**row, "reasons": [reason.value], "detail": f"{reason.value} of {of!r}"})
        else:
            kept.append(row)
    assert len(kept) + len(dropped) == len(rows)
    return kept, dropped


def read_seeds(section: SeedsSection) -> list[str]:
    """The seed instructions (a malformed file fails naming its line)."""
    rows = load_rows(section.location(), required=(section.field,), prompt_field=section.field)
    return [r[section.field].strip() for r in rows]


def pick_instructions(replies: list[dict], seeds: list[str], section: ExpansionSection) -> dict:
    """The teacher's replies -> ``instructions`` (rows a generate stage can answer), ``dropped`` (every candidate
    or reply not kept, with its reasons), ``counts`` by reason and ``candidates`` (lines that parsed)."""
    found, unusable = candidates(replies, section.min_words, section.max_words)
    kept, copies = dedup_instructions(found, seeds, section.threshold, section.ngram)
    dropped = unusable + copies
    instructions = [
        {"id": f"instruction-{i:06d}", "question": r["instruction"], "answer": "", "source": r["source"]}
        for i, r in enumerate(kept)
    ]
    return {
        "instructions": instructions,
        "dropped": dropped,
        "counts": dict(Counter(reason for row in dropped for reason in row["reasons"])),
        "candidates": len(found) + sum(r["instruction"] != "" for r in unusable),
    }
