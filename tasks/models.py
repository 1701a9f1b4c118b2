"""Models made from other models, before any training: a GGUF file imported into a Hugging Face folder (the teacher or
a student named by a ``.gguf`` path), and the teacher pruned to a subset of its layers (a student's ``init``).

Both are stages of their own, so that every backend reads one folder, the import runs once per file (keyed by its
sha256, not its path) and one pruned copy serves every student that names the same init — and is evaluated, untrained,
as the floor of the report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from kdflow.config.fields import ROOT
from kdflow.config.precision import Dtype
from kdflow.config.student import PrunedInit
from kdflow.config.templates import plain_messages, render, special_strings
from kdflow.models.gguf import import_gguf
from kdflow.models.pruning import PRUNING, prune
from kdflow.store.model_folders import MODEL, SOURCE, model_location, write_location
from kdflow.store.outputs import OutputRef, file_sha256
from kdflow.store.run_folder import read_split
from kdflow.store.stage import Stage
from tasks.caching import STAGE_RESULTS, StageCache

IMPORT_GGUF = Stage(
    "import-gguf",
    "1",
    lambda gguf, dtype: {"gguf_sha256": file_sha256(ROOT / gguf), "dtype": (dtype or Dtype.float32).value},
    files=(SOURCE, f"{MODEL}/"),
)
# The calibration rows matter only to importance and MLP width; evenly spaced layers depend on the teacher alone.
PRUNE = Stage(
    "prune",
    "1",
    lambda init, teacher, data, template: {
        "init": init,
        "teacher": teacher,
        **({"data": data, "template": template} if init.calibrated else {}),
    },
    files=(SOURCE, f"{MODEL}/", PRUNING),
)


# Not Prefect-cached: the key covers the file's bytes, which are not a task input; the body finds its own output.
@task(cache_policy=NO_CACHE, task_run_name="import_gguf[{gguf}]")
def import_gguf_model(run_dir: Path, gguf: str, dtype: Dtype | None) -> OutputRef:
    """The GGUF file at ``gguf`` (relative to the project, or absolute), dequantized into ``model/`` in ``dtype``
    (float32 when unset): safetensors, tokenizer and chat template, generation config."""
    out = IMPORT_GGUF.output(run_dir, gguf=gguf, dtype=dtype)
    if done := out.done:
        return done
    with out.building() as tmp:
        start = time.perf_counter()
        info = import_gguf(ROOT / gguf, tmp / MODEL, (dtype or Dtype.float32).value)
        write_location(tmp, MODEL)
        out.finish(tmp, **info, source=str(gguf), dequantized=True, seconds=round(time.perf_counter() - start, 1))
    return out.ref()


@task(cache_policy=StageCache(PRUNE), **STAGE_RESULTS, task_run_name="prune_teacher[{init.layers} {init.select.value}]")
def prune_teacher(run_dir: Path, init: PrunedInit, teacher: OutputRef, data: OutputRef, template: str) -> OutputRef:
    """The teacher with ``init.layers`` of its layers (and ``init.mlp_width`` MLP channels in each) in ``model/``, and
    ``pruning.json``: what was kept and, where measured, the importance it was ranked by and the calibration."""
    out = PRUNE.output(run_dir, init=init, teacher=teacher, data=data, template=template)
    if done := out.done:
        return done
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = model_location(teacher)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(location), AutoTokenizer.from_pretrained(location)
    batches, calibration = None, {}
    if init.calibrated:
        rows = read_split(data, "train")[: init.calibration_rows]
        batches, tokens = calibration_batches(tokenizer, rows, template, init.calibration_max_length)
        # the rows measured on: fewer than asked when the split is smaller (the fifth audit found the ask recorded)
        calibration = {"calibration_rows": len(rows), "calibration_tokens": tokens}
        if len(rows) < init.calibration_rows:
            calibration["calibration_rows_asked"] = init.calibration_rows
    pruned, record = prune(model, init.layers, init.select, init.mlp_width, batches)
    kept = record["kept"]
    with out.building() as tmp:
        pruned.save_pretrained(tmp / MODEL)
        tokenizer.save_pretrained(tmp / MODEL)
        (tmp / PRUNING).write_text(json.dumps(record | calibration, indent=2))
        write_location(tmp, MODEL)
        out.finish(tmp, kept=kept, params=sum(p.numel() for p in pruned.parameters()), untrained=True)
    return out.ref()


def calibration_batches(tokenizer, rows: list[dict], template: str, max_length: int, batch_size: int = 8):
    """(batches of ``input_ids``/``attention_mask``, real tokens): each row's question through ``template`` and its
    reference ``rationale``, as the chat template lays out a conversation."""
    specials = special_strings(tokenizer)  # data text is never read as chat markup (templates.plain_text)
    texts = [
        tokenizer.apply_chat_template(
            plain_messages(
                [
                    {"role": "user", "content": render(template, question=r["question"])},
                    {"role": "assistant", "content": r["rationale"]},
                ],
                specials,
            ),
            tokenize=False,
        )
        for r in rows
    ]
    if not texts:
        raise ValueError("prune with select importance: the train split has no rows to calibrate on")
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batches = [
            dict(
                tokenizer(
                    texts[i : i + batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    add_special_tokens=False,
                )
            )
            for i in range(0, len(texts), batch_size)
        ]
    finally:
        tokenizer.padding_side = side
    return batches, int(sum(b["attention_mask"].sum() for b in batches))
