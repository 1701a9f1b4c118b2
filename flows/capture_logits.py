"""The logit-cache stage on its own: data → teacher → answers → curate (all cached) → the teacher's top-k
distributions on the kept answers, for KD from disk.

    python -m flows.capture_logits recipes/demo.yaml
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.train_teacher import train_teacher
from kdflow.store.outputs import OutputRef
from kdflow.config.recipe import RecipeError, load_recipe
from tasks.capture import capture_logits
from tasks.curate import filter_answers
from tasks.data import make_data
from tasks.generate import generate_answers


# No log_prints (see flows/distill.py).
@flow(name="capture-logits")
def capture_logits_flow(recipe: str = "recipes/demo.yaml") -> OutputRef:
    r = load_recipe(recipe)
    if r.logit_cache is None:
        raise RecipeError(f"{recipe}: no logit_cache section; add one (e.g. `logit_cache: {{k: 20}}`)")
    run_dir, cot = r.run_dir, r.prompts.cot_text()

    data = make_data(run_dir, r.data)
    teacher = train_teacher(recipe)
    answers = generate_answers(run_dir, r.generation, cot, teacher, data)
    curated = filter_answers(run_dir, r.filters, r.data.source, answers, teacher)  # as flows/distill.py: same key
    cache = capture_logits(run_dir, r.logit_cache, cot, teacher, curated)

    m = cache.manifest()
    print(f"logit cache: {cache.path}: {m['rows']:,} rows, {m['positions']:,} answer tokens, "
          f"{m['bytes_per_position']} bytes/token at k={m['k']}")
    return cache


if __name__ == "__main__":
    capture_logits_flow(*sys.argv[1:2])
