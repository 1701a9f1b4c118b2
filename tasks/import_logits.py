"""Stage: the logit cache imported — another tool's logit dataset (``logit_cache: {import: ...}``: DistillKit's
compressed parquet, axolotl's KD columns, or a kdflow export of either) read into a kdflow cache in place of the capture
(tasks/capture.py), for the students that train from it exactly as from a captured one (kdflow/logit_cache/interop.py).

Keyed by content: every file's name and sha256 (not the path: the same files moved are not imported again), DistillKit's
compression config by its text, the import's settings, and the fingerprint of the tokenizer the cache records (the
students'): a new file, setting or tokenizer imports again, a rerun reuses the import. Built under a temporary name and
renamed into place, its manifest last, as every stage.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from kdflow.config.logit_cache import LogitCacheSection, LogitFormat
from kdflow.logit_cache import interop
from kdflow.logit_cache.format import MANIFEST
from kdflow.store.model_folders import file_sha256_remembered
from kdflow.store.outputs import OutputRef, exclusive
from kdflow.store.stage import Stage
from tasks.caching import STAGE_RESULTS, StageCache


def import_inputs(section: LogitCacheSection, tokenizer: str) -> dict:
    """What an import is made of, by content. ``tokenizer``: the model folder or hub id whose tokenizer it records."""
    from transformers import AutoTokenizer

    from kdflow.models.tokenizer_identity import tokenizer_fingerprint

    imp = section.import_
    files = imp.files()
    return {
        "files": [{"name": f.name, "sha256": file_sha256_remembered(f)} for f in files],
        "config": imp.config_file().read_text() if imp.format is LogitFormat.distillkit else None,
        "settings": imp.model_dump(mode="json", exclude={"path", "config"}, exclude_defaults=True),
        "shard_rows": section.shard_rows,
        "tokenizer": tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer)),
    }


IMPORT = Stage(interop.STAGE, "1", import_inputs, files=(MANIFEST,))


@task(
    cache_policy=StageCache(IMPORT),
    **STAGE_RESULTS,
    task_run_name="import_logits[{section.import_.format.value}]",
)
def import_logits(run_dir: Path, section: LogitCacheSection, tokenizer: str) -> OutputRef:
    """The files of ``section.import_`` read into a cache for ``tokenizer`` (the model folder or hub id of the students
    that read it). Every row is checked before the output is in place; a bad file fails naming the file, row and fix."""
    out = IMPORT.output(run_dir, section=section, tokenizer=tokenizer)
    if done := out.done:
        return done
    from transformers import AutoTokenizer

    imp = section.import_
    with exclusive(run_dir, IMPORT.name, out.key):
        if done := out.done:
            return done  # a concurrent run of the same import finished it while this one waited
        with out.building() as tmp:
            start = time.perf_counter()
            manifest = interop.import_into(
                tmp,
                imp.files(),
                imp.format.value,
                AutoTokenizer.from_pretrained(tokenizer),
                vocab_size=imp.vocab_size,
                config=imp.config_file() if imp.format is LogitFormat.distillkit else None,
                teacher=imp.teacher,
                encoding=imp.value_encoding,
                shard_rows=section.shard_rows,
                digests=[f["sha256"] for f in out.inputs["files"]],
            )
            out.finish(
                tmp,
                rows=manifest["rows"],
                **{"k": manifest["k"], **interop.import_figures(manifest)},  # k: as a capture's manifest says it
                source=f"import:{imp.format.value}",
                imported_from=manifest["imported_from"],
                seconds=round(time.perf_counter() - start, 1),
            )
    return out.ref()
