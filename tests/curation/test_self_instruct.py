"""Self-instruct: parsing the teacher's replies, dedup against the seeds and each other with planted near
copies, and the whole flow against a real (tiny, locally trained) HF teacher."""

import json
from pathlib import Path

import pandas as pd
import pytest

from kdflow.config.self_instruct import load_self_instruct_recipe
from kdflow.curation.dedup import shingles
from kdflow.curation.expansion import candidates, dedup_instructions, expansion_prompts, parse_instructions

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = (ROOT / "prompts" / "self_instruct.jinja").read_text()
SEEDS = [
    json.loads(line)["instruction"] for line in (ROOT / "data" / "seed_instructions.jsonl").read_text().splitlines()
]
# What the tiny teacher is trained to write: a new task, an exact copy of it (case and punctuation aside), a
# near copy of a seed, another new task, and a line too short to be a task.
PLANTED = (
    "21. Write a poem about the quiet sea at night.\n"
    "22. Write a poem about the quiet sea at night!\n"
    "23. Explain to a ten-year-old why the sky is blue today.\n"
    "24. Describe three ways to save water in a garden.\n"
    "25. Ok"
)
NEW = ["Write a poem about the quiet sea at night.", "Describe three ways to save water in a garden."]


def jaccard(a: str, b: str, n: int = 2) -> float:
    x, y = shingles(a, n), shingles(b, n)
    return len(x & y) / len(x | y)


def test_prompts_show_different_seeds_and_replies_parse_into_lines():
    rows = expansion_prompts(SEEDS, TEMPLATE, prompts=4, seeds_per_prompt=3, new_per_prompt=5, seed=0)
    assert len(rows) == 4 and len({r["question"] for r in rows}) == 4
    assert all("Write 5 new tasks" in r["question"] and "numbered from\n4" in r["question"] for r in rows)
    assert parse_instructions(PLANTED)[0] == NEW[0] and len(parse_instructions(PLANTED)) == 5
    assert parse_instructions("I cannot think of any.") == []


def test_planted_copies_are_dropped_with_their_reasons():
    replies = [{"id": f"expand-{i}", "sample": 0, "text": PLANTED} for i in range(3)]
    replies.append({"id": "expand-3", "sample": 0, "text": "Sure! Here you go."})
    found, unusable = candidates(replies, min_words=3, max_words=80)
    kept, copies = dedup_instructions(found, SEEDS, threshold=0.7, ngram=2)
    assert [r["instruction"] for r in kept] == NEW
    reasons = [r["reasons"][0] for r in unusable + copies]
    assert len(kept) + len(reasons) == 3 * 5 + 1  # every candidate line and the reply without one
    assert sorted(set(reasons)) == ["duplicate", "near_seed", "no_instruction", "too_short"]
    assert reasons.count("no_instruction") == 1 and reasons.count("too_short") == 3 and reasons.count("near_seed") == 1
    near = next(r for r in copies if r["reasons"] == ["near_seed"])
    assert "why the sky is blue." in near["detail"] and jaccard(near["instruction"], SEEDS[1]) >= 0.7
    assert all(jaccard(a, b) < 0.7 for a in NEW for b in SEEDS)


def test_near_copies_between_candidates():
    rows = [
        {"source": "p/0", "instruction": t, "text": ""}
        for t in [
            "Write a short story about a lighthouse keeper and a storm at sea.",
            "Write a short story about a lighthouse keeper and a storm at night.",
            "Compare electric and petrol cars for a family of four.",
        ]
    ]
    kept, dropped = dedup_instructions(rows, SEEDS, threshold=0.7, ngram=2)
    assert [r["instruction"] for r in kept] == [rows[0]["instruction"], rows[2]["instruction"]]
    assert dropped[0]["reasons"] == ["near_duplicate"] and "lighthouse" in dropped[0]["detail"]


def test_the_shipped_recipe_validates():
    r = load_self_instruct_recipe(ROOT / "recipes" / "self-instruct" / "qwen7b.yaml")
    assert r.writing.splits == ["expand"] and r.filters.judge is not None


def test_a_bad_recipe_names_the_line(tmp_path):
    from kdflow.config.loading import RecipeError

    text = (
        (ROOT / "recipes" / "self-instruct" / "qwen7b.yaml")
        .read_text()
        .replace("splits: [instructions]", "splits: [test]")
    )
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+: .*answering.splits must be \[instructions\]"):
        load_self_instruct_recipe(tmp_path / "bad.yaml")


def tiny_teacher(folder: Path, prompts: list[str]) -> Path:
    """A tiny Llama trained to answer every expansion prompt with PLANTED (and to say something to others)."""
    from kdflow.config.templates import chat
    from kdflow.config.training import trainer_config
    from kdflow.training.sft import train_sft
    from kdflow.training.tiny_models import llama_model, train_tokenizer

    tok = train_tokenizer(prompts + [PLANTED] + SEEDS, vocab_size=300)
    model = llama_model(tok, hidden=64, layers=2, heads=2, intermediate=128, seed=0, max_positions=512)
    train_sft(
        model,
        tok,
        [chat(p, PLANTED) for p in prompts] * 8,
        trainer_config(
            {
                "max_steps": 120,
                "per_device_train_batch_size": 8,
                "learning_rate": 1e-2,
                "logging_steps": 120,
                "max_length": 512,
            },
            folder,
            0,
        ),
        folder,
    )
    return folder / "model"


@pytest.mark.slow
def test_self_instruct_flow_with_a_tiny_hf_teacher(prefect_server, tmp_path):
    import torch

    from flows.self_instruct import self_instruct

    torch.set_num_threads(1)
    prompts = [r["question"] for r in expansion_prompts(SEEDS, TEMPLATE, 3, 3, 5, seed=0)]
    model = tiny_teacher(tmp_path / "teacher", prompts)
    recipe = tmp_path / "si.yaml"
    recipe.write_text(f"""
run: {{name: si, root: {tmp_path / "runs"}}}
seeds: {{path: {ROOT / "data" / "seed_instructions.jsonl"}}}
teacher: {{model: {model}}}
expansion: {{prompts: 3, seeds_per_prompt: 3, new_per_prompt: 5, seed: 0, threshold: 0.7, ngram: 2}}
writing: {{splits: [expand], max_new_tokens: 100, batch_size: 8}}
answering: {{splits: [instructions], max_new_tokens: 16, batch_size: 8}}
filters: {{correctness: false, truncated: false, dedup: {{by: text}}, judge: {{threshold: 5, max_new_tokens: 8}}}}
""")
    summary = self_instruct(str(recipe))
    # The teacher wrote the planted list for every prompt; only the two new, distinct tasks survive.
    assert summary["replies"] == 3 and summary["candidates"] == 15
    assert summary["instruction_drops"] == {"duplicate": 9, "near_seed": 1, "too_short": 3}  # 12 of 15 lines dropped
    instructions = pd.read_parquet(Path(summary["instructions_path"]) / "instructions.parquet")
    assert list(instructions["question"]) == NEW
    # Both were answered and curated: nothing lost, and every drop says why (the untrained judge's replies
    # carry no score, so its reason must be recorded).
    kept = pd.read_parquet(Path(summary["dataset_path"]) / "kept.parquet")
    dropped = pd.read_parquet(Path(summary["dataset_path"]) / "dropped.parquet")
    assert summary["answers"] == 2 == len(kept) + len(dropped)
    assert all(len(r) > 0 for r in dropped["reasons"])
    assert "judge_reply" in dropped.columns or "judge_reply" in kept.columns
    assert (Path(summary["dataset_path"]) / "report.md").is_file()
