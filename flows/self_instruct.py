"""Self-instruct, top to bottom: seed instructions → the teacher writes new ones → parse and deduplicate
(against the seeds and each other) → the teacher answers them → curation (the recipe's filters) → a dataset
of instruction-following examples, with every dropped instruction and answer kept with its reason.

    python -m flows.self_instruct recipes/self-instruct/qwen7b.yaml
"""

from __future__ import annotations

from prefect import flow

from flows.chain import check_api_keys
from flows.cli import run_as_script
from kdflow.config.data import DataSource
from kdflow.config.fields import ROOT
from kdflow.config.self_instruct import load_self_instruct_recipe
from kdflow.curation.expansion import read_seeds
from tasks.curate import filter_answers
from tasks.generate import generate_answers
from tasks.self_instruct import make_expansion_prompts, pick_instructions
from tasks.teacher import use_existing_teacher

INSTRUCT = (ROOT / "prompts" / "instruct.jinja").read_text()  # the prompt as it is (it is already a full prompt)


@flow(name="self-instruct")
def self_instruct(recipe: str = "recipes/self-instruct/qwen7b.yaml") -> dict:
    r = load_self_instruct_recipe(recipe)  # a bad recipe fails here, before any work
    for section in (r.writing, r.answering):  # and a missing API key, naming it, not as a 401 mid-stage
        check_api_keys(section)
    run_dir, seeds = r.run_dir, read_seeds(r.seeds)

    teacher = use_existing_teacher(run_dir, r.teacher)
    prompts = make_expansion_prompts(run_dir, r.expansion, r.expansion.template_text(), seeds)
    written = generate_answers(run_dir, r.writing, INSTRUCT, teacher, prompts)
    instructions = pick_instructions(run_dir, r.expansion, seeds, written)
    answers = generate_answers(run_dir, r.answering, INSTRUCT, teacher, instructions)
    # No gold answers: correctness does not apply; free-form answers would be checked with math-verify.
    curated = filter_answers(run_dir, r.filters, DataSource.gsm8k, answers, teacher)

    picked, kept = instructions.manifest(), curated.manifest()
    summary = {
        "seeds": len(seeds),
        "replies": picked["replies"],
        "candidates": picked["candidates"],
        "instructions": picked["kept"],
        "instruction_drops": picked["drop_reasons"],
        "answers": kept["input_rows"],
        "kept": kept["kept"],
        "answer_drops": kept["drop_reasons"],
        "instructions_path": instructions.path,
        "dataset_path": curated.path,
    }
    print(
        f"self-instruct: {summary['candidates']} new instructions from {summary['replies']} replies, "
        f"{summary['instructions']} kept after dedup; {summary['kept']} of {summary['answers']} answers kept: "
        f"{curated.path}/kept.parquet"
    )
    return summary


if __name__ == "__main__":
    run_as_script("self-instruct")  # the same arguments and --help as `kdflow self-instruct`
