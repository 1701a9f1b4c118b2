"""The stage contract, written once: a stage declares what its output is made from, and everything else — its
key, the lookup of a finished output, building the next one — follows from that declaration.

    CURATE = Stage("curate", "2", lambda section, source, answers, teacher=None: {
        "section": section, "source": source.value, "answers": answers, "teacher": teacher,
        "judge_template": section.judge.template_text() if section.judge else None},
        files=(KEPT, DROPPED, *drop_report.FILES))

    out = CURATE.output(run_dir, section=section, source=source, answers=answers, teacher=teacher)
    if out.done:
        return out.done
    with out.building() as tmp:
        ...                                    # write the files
        out.finish(tmp, rows=len(kept), ...)   # the manifest, last
    return out.ref()

``Stage.key`` is the one function that computes a stage's key: the Prefect cache policy (tasks/caching.py), the
task body and the sharded flows all call it with the task's arguments, so they cannot disagree. ``content`` takes
the task's arguments (``run_dir`` aside: it says where, not what) and returns the inputs by content — recipe
sections, upstream refs, and the text of every prompt the stage uses, so that editing a prompt file reruns
exactly the stages that read it.

``files`` names what every output of the stage holds beside its manifest (a folder name ends with ``/``): ``finish``
refuses to write the manifest of an output that lacks one, and docs/concepts/run-folders.md lists them. The names
themselves are constants of the library module that writes or reads the format (``KEPT`` in
kdflow/curation/pipeline.py, ``LOG_HISTORY`` in kdflow/store/model_folders.py): a task, a flow and a library
module downstream name a file by that constant, never by a string of their own.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdflow.store.outputs import MANIFEST, OutputRef, building, content_key, existing_output, finish, read_manifest

NOT_CONTENT = {"run_dir"}
# What a manifest says of itself rather than of the output's content: not carried over by ``StageOutput.adopt``.
OWN_FIELDS = {"stage", "key", "sha256", "rows", "inputs", "files", "created_at", "created_ns", "versions"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str  # the run folder's stage folder, runs/<run>/<name>/<key>/
    version: str  # bumped when the stage's code changes what it makes
    content: Callable[..., dict[str, Any]]
    files: tuple[str, ...] = ()  # what each output holds, always (not part of the key: where, not what)

    def inputs(self, **args) -> dict[str, Any]:
        """What the output is made from, by content (recorded in its manifest)."""
        return self.content(**{k: v for k, v in args.items() if k not in NOT_CONTENT})

    def key(self, **args) -> str:
        return content_key(self.name, self.version, self.inputs(**args))

    def output(self, run_dir: Path, **args) -> StageOutput:
        """This stage's output for these arguments: ``.done`` when it is finished (and verified), else built with
        ``.building()`` and ``.finish()``."""
        inputs = self.inputs(**args)
        return StageOutput(self, Path(run_dir), content_key(self.name, self.version, inputs), inputs)


@dataclass
class StageOutput:
    stage: Stage
    run_dir: Path
    key: str
    inputs: dict[str, Any] = field(repr=False)
    # When the task asked for its output: the manifest's ``wall_seconds`` (the cost ledger's time for a stage that
    # keeps no record of its own work) runs from here to ``finish``.
    started: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    @property
    def done(self) -> OutputRef | None:
        return existing_output(self.run_dir, self.stage.name, self.key)

    def ref(self) -> OutputRef:
        ref = self.done
        if ref is None:
            raise RuntimeError(f"stage {self.stage.name!r}: no finished output under {self.key[:16]} after building it")
        return ref

    @property
    def work(self) -> Path:
        """A folder for work in progress that survives a crash (checkpoints, shards): hidden, named by the key."""
        return self.run_dir / self.stage.name / f".work-{self.key[:16]}"

    @contextmanager
    def building(self):
        with building(self.run_dir, self.stage.name, self.key) as tmp:
            yield tmp

    def finish(self, tmp: Path, rows: int | None = None, **extra) -> None:
        """The manifest, last; refused while one of the stage's declared ``files`` is missing."""
        if missing := [f for f in self.stage.files if not (Path(tmp) / f).exists()]:
            raise RuntimeError(f"stage {self.stage.name!r} built no {', '.join(missing)}: not complete, no manifest")
        extra.setdefault("wall_seconds", round(time.perf_counter() - self.started, 1))
        finish(tmp, self.stage.name, self.key, inputs=self.inputs, rows=rows, **extra)

    def key_without(self, name: str) -> str:
        """The key these inputs had before ``name`` was one of them: where older code put the same output."""
        return content_key(self.stage.name, self.stage.version, {k: v for k, v in self.inputs.items() if k != name})

    def unrecorded(self, name: str) -> OutputRef | None:
        """The finished output older code made of these inputs less ``name`` (``key_without``), if its manifest records
        no ``name``: made before ``name`` was part of the key, so nothing says it was made of another one."""
        if name not in self.inputs:
            return None
        old = existing_output(self.run_dir, self.stage.name, self.key_without(name))
        if old is None or name in old.manifest() or self._adopted(old.key):
            return None
        return old

    def _adopted(self, key: str) -> bool:
        """Whether another output was made as a copy of the output ``key`` already: it is that one's, not this one's
        (the identity the first adopter recorded is the one it was taken for)."""
        for manifest in (self.run_dir / self.stage.name).glob(f"[!.]*/{MANIFEST}"):
            record = read_manifest(manifest.parent)
            if record is not None and record.get("adopted_from") == key:
                return True
        return False

    def adopt(self, old: OutputRef, **extra) -> OutputRef:
        """Finish this output as a copy of ``old``'s files — the same files, so the same sha256: nothing made from it
        is made again — with ``old``'s manifest figures, ``extra`` and ``adopted_from`` (its key)."""
        manifest = old.manifest()
        log.warning(
            f"stage {self.stage.name!r}: taking {old.path} (made before its key recorded "
            f"{sorted(set(self.inputs) - set(manifest.get('inputs', {})))}) as the output of {self.key[:16]}"
        )
        with self.building() as tmp:
            for file in sorted(p for p in Path(old.path).rglob("*") if p.is_file() and p.name != MANIFEST):
                (tmp / file.relative_to(old.path)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, tmp / file.relative_to(old.path))
            kept = {k: v for k, v in manifest.items() if k not in OWN_FIELDS}
            # Not checked against ``files``: a copy holds what the older code made, as the older output did.
            finish(
                tmp,
                self.stage.name,
                self.key,
                inputs=self.inputs,
                rows=manifest.get("rows"),
                **{**kept, **extra, "adopted_from": old.key},
            )
        return self.ref()
