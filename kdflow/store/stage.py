"""The stage contract, written once: a stage declares what its output is made from, and everything else — its
key, the lookup of a finished output, building the next one — follows from that declaration.

    CURATE = Stage("curate", "2", lambda section, source, answers, teacher=None: {
        "section": section, "source": source.value, "answers": answers, "teacher": teacher,
        "judge_template": section.judge.template_text() if section.judge else None})

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
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdflow.store.outputs import OutputRef, building, content_key, existing_output, finish

NOT_CONTENT = {"run_dir"}


@dataclass(frozen=True)
class Stage:
    name: str  # the run folder's stage folder, runs/<run>/<name>/<key>/
    version: str  # bumped when the stage's code changes what it makes
    content: Callable[..., dict[str, Any]]

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
        finish(tmp, self.stage.name, self.key, inputs=self.inputs, rows=rows, **extra)
