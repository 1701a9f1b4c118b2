"""The logit-cache stage on its own: data → teacher → answers → curate (all cached) → the teacher's top-k
distributions on the kept answers, for KD from disk.

    python -m flows.capture_logits recipes/demo.yaml
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.chain import upstream
from flows.cli import run_as_script
from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe
from kdflow.logit_cache.reader import LogitCache
from kdflow.store.outputs import OutputRef


# No log_prints (see flows/distill.py).
@flow(name="capture-logits")
def capture_logits_flow(recipe: str = "recipes/demo.yaml") -> OutputRef:
    r = load_recipe(recipe)
    if r.logit_cache is None:
        raise RecipeError(f"{recipe}: no logit_cache section; add one (e.g. `logit_cache: {{k: 20}}`)")
    cache = upstream(r).logits  # the same chain (and keys) as flows/distill.py

    m = LogitCache.open(Path(cache.path)).manifest  # every cache's own (captured, joined from teachers, imported)
    print(
        f"logit cache: {cache.path}: {m['rows']:,} rows, {m['positions']:,} answer tokens, "
        f"{m['bytes'] / max(m['positions'], 1):.2f} bytes/token at k={m['k']}"
    )
    return cache


if __name__ == "__main__":
    run_as_script("logit-cache")  # the same arguments and --help as `kdflow logit-cache`
