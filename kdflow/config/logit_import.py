"""``logit_cache: {import: ...}``: the run's logit cache read from another tool's logit dataset (DistillKit's compressed
parquet, axolotl's KD columns, or kdflow's own export of either) instead of captured from the teacher.

What such a run does (docs/howto/logit-datasets.md): the import replaces the capture, as a stage keyed by the files'
content, the settings and the tokenizer it records; offline-KD students train on the imported cache's own rows (the
sequences the file holds, not the teacher's answers); the teacher is still the recipe's `teacher` — what the report
measures every student against, and the tokenizer of students made here (`architecture:`, pruned) — but it is asked for
no answers unless a student learns from them (seq-KD, online or feature KD beside the import), so without such a student
the preflight, generation and curation stages do not run.

Checked at load, each naming the field and the fix: the files are there, the format is one kdflow reads, a DistillKit
file has its compression config, nothing meant for a capture is set beside the import, a student reads the cache and
none needs what an import cannot give (on-policy KD's off-policy rows are the teacher's answers, looked up by id), and —
where the file carries kdflow's tokenizer fingerprint and a student's tokenizer is on disk — that it is the student's.
"""

from __future__ import annotations

from kdflow.config.loading import FieldError
from kdflow.config.logit_cache import LogitImport, on_disk


def reads_cache(student) -> bool:
    """A student that trains from the logit cache (kdflow.training.student.needs_logit_cache, without torch)."""
    from kdflow.config.kd import OfflineKD, OnPolicyKD

    kd = student.kd
    return isinstance(kd, OfflineKD) or (isinstance(kd, OnPolicyKD) and kd.lmbda < 1.0)


def root_start(r, student):
    """The section a student's weights and tokenizer come from: itself, or through ``init: {from: student}`` the
    student it starts from (the recipe's order guarantees no cycle)."""
    from kdflow.config.student import StudentInit

    by_name = {s.name: s for s in r.students}
    while isinstance(student.init, StudentInit) and student.init.student in by_name:
        student = by_name[student.init.student]
    return student


def reader_start(r):
    """The section whose model's tokenizer the imported cache is made for: the first cache-reading student's start
    (``root_start``); its ``model`` is that model (a folder, hub id or GGUF file), and where it has none (a student of
    an ``architecture``, or pruned) the tokenizer is the teacher's. None when no student reads the cache."""
    readers = [s for s in r.students if reads_cache(s)]
    return root_start(r, readers[0]) if readers else None


def check_import(r) -> None:
    """The checks across sections of a recipe ``r`` whose logit cache is imported, each naming the field and the fix."""
    from kdflow.config.kd import OnPolicyKD

    imp = r.logit_cache.import_
    where = ("logit_cache", "import")
    if r.teachers is not None:
        raise FieldError(
            "an imported logit dataset replaces the capture of every routed teacher, and its rows carry no teacher: "
            "remove teachers/routing, or remove logit_cache.import to capture each teacher's logits",
            *where,
        )
    if r.teacher.api:
        raise FieldError(
            "with teacher.api: true the students' tokenizer is trained here, and no imported file's token ids come "
            "from it: name the model that made the file (or one of its tokenizer) in teacher.model instead",
            *where,
        )
    for i, s in enumerate(r.students):
        if isinstance(s.kd, OnPolicyKD) and s.kd.lmbda < 1.0:
            raise FieldError(
                f"student {s.name!r}: on-policy KD with lmbda {s.kd.lmbda} < 1 trains its off-policy share on the "
                "teacher's answers looked up in the cache by row, and an imported cache holds its own rows: set "
                "lmbda: 1, or use kd method offline",
                "students",
                i,
                "kd",
                "lmbda",
            )
    if r.teacher.imported:
        _check_absent_teacher(r)
    readers = [(i, s) for i, s in enumerate(r.students) if reads_cache(s)]
    if not readers:
        raise FieldError(
            "no student reads the imported cache: give one kd: {method: offline} (data: teacher), or remove "
            "logit_cache",
            *where,
        )
    record = imp.export_record()
    if record is not None:  # a kdflow export: what it recorded is known here, before the teacher stage runs
        _check_against_record(imp, record, where)
    for i, s in readers:
        _check_tokenizer(r, i, s, imp, record)


def _check_against_record(imp: LogitImport, record: dict, where: tuple) -> None:
    """The import's settings against what a kdflow export records of its cache (the import refuses the same later)."""
    recorded = [t["model"] for t in record.get("teachers", [])]
    if imp.teacher and recorded and recorded != [imp.teacher]:
        raise FieldError(
            f"{imp.path} is a kdflow export, which records its teachers {recorded}; the teacher {imp.teacher!r} "
            "would contradict it: remove logit_cache.import.teacher (the export's record is kept)",
            *where,
            "teacher",
        )
    if imp.vocab_size is not None and imp.vocab_size != record["vocab_size"]:
        raise FieldError(
            f"{imp.path} is a kdflow export of a cache of {record['vocab_size']} logits per position: remove "
            f"logit_cache.import.vocab_size {imp.vocab_size} (the export's is used), or set it to "
            f"{record['vocab_size']}",
            *where,
            "vocab_size",
        )


def _check_absent_teacher(r) -> None:
    """``teacher.imported: true``: the file's logits are all there is of the teacher, so every student trains from
    them or from gold text, with a model (and tokenizer) of its own, and nothing compares against the teacher's
    answers."""
    from kdflow.config.kd import OfflineKD
    from kdflow.config.student import StudentData

    for i, s in enumerate(r.students):
        if s.kd is not None and not isinstance(s.kd, OfflineKD):
            raise FieldError(
                f"student {s.name!r}: kd method {s.kd.method.value} runs the teacher live, and with teacher.imported: "
                "true its weights are not here: use kd: {method: offline} (the imported logits), or name the "
                "teacher's model in teacher.model",
                "students",
                i,
                "kd",
            )
        if s.data is StudentData.teacher and s.kd is None:
            raise FieldError(
                f"student {s.name!r}: data: teacher learns from the teacher's answers, and with teacher.imported: "
                "true no teacher is here to answer: give it kd: {method: offline} (the imported logits) or data: gold",
                "students",
                i,
                "data",
            )
        if root_start(r, s).model is None:
            raise FieldError(
                f"student {s.name!r}: with teacher.imported: true there is no teacher to prune, nor a teacher's "
                "tokenizer for a student of an architecture: give it model: (a pretrained model with the tokenizer "
                "the file's token ids are in)",
                "students",
                i,
            )
    if r.evaluation.judge is not None:
        raise FieldError(
            "the judge compares each student's answers with the teacher's, and with teacher.imported: true no "
            "teacher is here to answer: remove evaluation.judge",
            "evaluation",
            "judge",
        )


def _check_tokenizer(r, i: int, s, imp: LogitImport, record: dict | None) -> None:
    """The tokenizer student ``s`` (``students[i]``) trains with, against the file's, where both are known at load."""
    from kdflow.models.gguf import is_gguf_path

    start = root_start(r, s)
    name = start.model if start.model is not None else r.teacher.model
    whose = f"its model {name!r}" if start.model is not None else f"the teacher's ({name or 'trained here'})"
    if name is None:  # a student of an architecture (or pruned) on a tokenizer the teacher's training makes
        if record is None:
            raise FieldError(
                f"student {s.name!r} would read {imp.path} with the tokenizer trained here for the teacher, which "
                "no other tool's file was made with: set teacher.model to the model whose tokenizer made the file "
                "(the students of an architecture take it), or give the student model:",
                "students",
                i,
            )
        return  # a kdflow export from a recipe like this one may match: checked by the import, before any write
    folder = on_disk(name)
    if record is None or is_gguf_path(name) or not folder.is_dir():
        return  # a foreign file's ids are checked against the tokenizer when imported; a hub id is not read here
    from transformers import AutoTokenizer

    from kdflow.models.tokenizer_identity import tokenizer_fingerprint

    mine = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(folder)))
    for key, what in (("tokenizer_sha256", "tokenizer"), ("chat_template_sha256", "chat template")):
        if mine[key] != record[key]:
            raise FieldError(
                f"student {s.name!r}: {whose} {what} is not the one {imp.path} was exported with (kdflow's "
                "fingerprint in the file): its token ids would mean other tokens; train a student of that tokenizer "
                "(model:, or teacher.model for a student of an architecture), or export the cache again from a run "
                "of this tokenizer",
                "students",
                i,
            )
