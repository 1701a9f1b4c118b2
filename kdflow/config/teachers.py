"""The ``teachers`` and ``routing`` sections: several named teachers, each row sent to one of them by a rule.

    teachers:
      - name: short                    # any teacher the ``teacher`` section can be: trained here, a folder, a GGUF
        architecture: {...}            # file, the model ``generation`` serves (vLLM) or an API model (api: true)
        train_on: {column: question, count: "[+-]", values: ["2", "3"]}   # a teacher trained here: its rows
      - name: long
        ...
        served: {base_url: http://10.0.0.6:8000/v1}   # optional: its own vLLM server, for on-policy scoring
    routing:
      column: question                 # the row's column the rule reads
      count: "[+-]"                    # optional: route by how many matches of this regex the value holds
      routes: {"2": short, "3": short}
      default: long                    # every other value

A recipe with ``teachers`` has no ``teacher`` section: the default teacher takes its place wherever one teacher is
meant (the students' shared tokenizer, pruning, the judge filter), so a recipe with one ``teacher`` is as it was.
A KD student of several teachers learns offline from their logit caches joined by row, or on-policy with each of its
samples scored by the teacher its row is routed to (``check_routed_kd``); every teacher is then local. On-policy
scoring by vLLM (``kd.teacher_backend: vllm``) asks each teacher's own server, the one its ``served`` names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, TypeAdapter, ValidationError, field_serializer, field_validator

from kdflow.config.fields import ROOT, SafeName, Strict, redact_url
from kdflow.config.generation import GenerationSection
from kdflow.config.teacher import TeacherSection
from kdflow.models.gguf import is_gguf_path
from kdflow.models.tokenizer_identity import TOKENIZER_FILES

# The columns every data source gives its rows (data/arithmetic.py, data/gsm8k.py, data/instructions.py), and the
# split each generation row is asked from: what a route may read.
ROW_COLUMNS = ("id", "question", "rationale", "answer", "split")


class RowKey(Strict):
    column: str = Field(description=f"the row's column the rule reads: one of {', '.join(ROW_COLUMNS)}")
    count: str | None = Field(
        None, description="a regex: the key is how many times it matches the column's value (e.g. '[+-]': steps)"
    )

    @field_validator("count")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                pattern = re.compile(v)
            except re.error as e:
                raise ValueError(f"count {v!r} is not a regex ({e}); e.g. '[+-]' counts the operators") from None
            if pattern.fullmatch(""):
                # findall counts an empty match at every position: the key would be the value's length + 1
                raise ValueError(
                    f"count {v!r} matches the empty string, so it would count every position of the value, not "
                    "what it names; write a regex that matches at least one character, e.g. '[+-]'"
                )
        return v

    def key(self, row: dict) -> str:
        """The row's key under this rule, as a string (YAML mapping keys are strings)."""
        if self.column not in row:
            raise KeyError(
                f"routing reads column {self.column!r}, which this row ({row.get('id', '?')}) lacks; its columns "
                f"are {sorted(row)}: name one of them in routing.column"
            )
        value = row[self.column]
        return str(len(re.findall(self.count, str(value)))) if self.count else str(value)


class RowMatch(RowKey):
    values: list[str] = Field(min_length=1, description="the keys of the rows it keeps")

    def keeps(self, row: dict) -> bool:
        return self.key(row) in self.values


class Routing(RowKey):
    routes: dict[str, str] = Field(default_factory=dict, description="a key -> the teacher that answers its rows")
    default: str = Field(description="the teacher of every row whose key is not in routes")

    def teacher_of(self, row: dict) -> str:
        return self.routes.get(self.key(row), self.default)


class ServedTeacher(Strict):
    """A teacher's own vLLM server, which scores the samples routed to it for on-policy students with
    ``kd.teacher_backend: vllm`` (started with --no-enable-prefix-caching and --max-logprobs of at least kd.k). Where
    it runs is not what it is: the URL is in no stage key, as ``kd.base_url`` is not. As with ``kd.base_url``, the
    server is asked for the teacher's model folder as kdflow names it (what ``vllm serve <folder>`` serves it under;
    the stage checks it before training and says the name to serve under)."""

    base_url: str = Field(description="the server's OpenAI base, e.g. http://10.0.0.5:8000/v1")

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(
                f"served.base_url {redact_url(v)!r}: give the server's OpenAI base, e.g. http://10.0.0.5:8000/v1"
            )
        return v

    @field_serializer("base_url", when_used="json")  # what manifests and logs hold: no user:password@
    def _redacted(self, v: str) -> str:
        return redact_url(v)


class NamedTeacher(TeacherSection):
    name: SafeName
    train_on: RowMatch | None = Field(
        None, description="a teacher trained here learns from the teacher split's rows this keeps (all by default)"
    )
    generation: GenerationSection | None = Field(
        None,
        description="this teacher's own generation settings, merged over the recipe's `generation` (e.g. another "
        "backend or api.model); the recipe's otherwise",
    )
    served: ServedTeacher | None = Field(
        None,
        description="this teacher's own vLLM server, which scores its rows' samples for on-policy students with "
        "kd.teacher_backend: vllm (each teacher needs one then)",
    )

    def section(self) -> TeacherSection:
        """The teacher as the one-teacher stages take it: the stage keys of a recipe with one ``teacher`` are kept."""
        return TeacherSection.model_construct(**{f: getattr(self, f) for f in TeacherSection.model_fields})


def merge_generation(base: Any, override: Any) -> Any:
    """The recipe's raw ``generation`` mapping with a teacher's raw override on top (nested mappings merged)."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    return {**base, **{k: merge_generation(base.get(k), v) if k in base else v for k, v in override.items()}}


def fill_teachers(data: Any) -> Any:
    """Before validation: a recipe with ``teachers`` gets its default teacher as ``teacher`` (and each teacher's
    ``generation`` override merged over the recipe's); one with both sections is refused."""
    if not isinstance(data, dict) or data.get("teachers") is None:
        return data
    teachers, routing = data["teachers"], data.get("routing")
    from kdflow.config.loading import FieldError

    if "teacher" in data:
        raise FieldError(
            "teacher and teachers are both set: keep `teachers:` (with `routing:`) for several teachers, or "
            "`teacher:` for one",
            "teacher",
        )
    if not isinstance(teachers, list) or not teachers or not all(isinstance(t, dict) for t in teachers):
        raise FieldError("teachers: a list of named teacher sections, e.g. [{name: math, model: ...}, ...]", "teachers")
    if not isinstance(routing, dict) or "default" not in routing:
        raise FieldError(
            "teachers needs routing: {column: ..., routes: {value: teacher}, default: teacher}, which says which "
            "teacher answers each row",
            "routing",
        )
    names = [t.get("name") for t in teachers]
    if dup := sorted({str(n) for n in names if names.count(n) > 1}):
        raise FieldError(f"teachers.name must be unique; rename {dup}", "teachers")
    # Said here, before validation: later, the default teacher's copy as `teacher` was refused naming
    # teacher.imported at line 1 (a field the file lacks), and any other routed teacher loaded and failed in a stage.
    for i, t in enumerate(teachers):
        if _true(t.get("imported")):
            raise FieldError(
                f"teacher {t.get('name')!r}: imported: true says a teacher is only an imported logit dataset, which "
                "is the single `teacher:` of a run with logit_cache.import; each routed teacher answers its own rows "
                "and has their logits captured: give it model, architecture or api, or use `teacher: {imported: "
                "true}` without teachers/routing",
                "teachers",
                i,
                "imported",
            )
    named = dict(zip(names, teachers))
    if not isinstance(routing["default"], str):
        raise FieldError(
            f"routing.default {routing['default']!r} is not a teacher's name: name one teacher, one of "
            f"{sorted(map(str, named))}",
            "routing",
            "default",
        )
    default = named.get(routing["default"])
    if default is None:
        raise FieldError(
            f"routing.default {routing['default']!r} is not a teacher's name; name one of {sorted(map(str, named))}",
            "routing",
            "default",
        )
    gen = data.get("generation")
    return {
        **data,
        "teacher": {k: v for k, v in default.items() if k not in ("name", "train_on", "generation", "served")},
        "teachers": [
            {**t, "generation": merge_generation(gen, t["generation"])} if t.get("generation") is not None else t
            for t in teachers
        ],
    }


def _true(value: Any) -> bool:
    """Whether pydantic reads ``value`` as the boolean true (YAML's true/yes/on, or a quoted "true")."""
    try:
        return TypeAdapter(bool).validate_python(value) is True
    except ValidationError:
        return False  # not a boolean: the section's own validation says so


def tokenizer_identity(t: TeacherSection) -> tuple[str, str] | None:
    """What says two teachers tokenize alike, where known at load: trained here (the shared tokenizer at its size),
    a model folder's tokenizer files, a GGUF file's vocabulary; None for a hub id or an API model."""
    if t.api:
        return None
    if t.architecture is not None and t.model is None:
        return "trained here", f"vocab_size {t.vocab_size}"
    if is_gguf_path(t.model):
        return "gguf", _gguf_tokens(ROOT / t.model)
    folder = ROOT / t.model
    if folder.is_dir():
        import hashlib

        files = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
        return "folder", hashlib.sha256(b"".join((folder / f).read_bytes() for f in files)).hexdigest()
    return None


def _gguf_tokens(path: Path) -> str:
    import hashlib

    from kdflow.models.gguf import _reader  # the cached reader that inspect_gguf used a moment ago

    field = _reader(path).fields.get("tokenizer.ggml.tokens")
    tokens = [] if field is None else field.contents()
    return hashlib.sha256("\0".join(map(str, tokens)).encode()).hexdigest()


def check_routed(r) -> None:
    """The checks of a recipe ``r`` with ``teachers``, each naming the field and the fix."""
    from kdflow.config.generation import Backend
    from kdflow.config.loading import FieldError

    if r.teachers is None:
        if r.routing is not None:
            raise FieldError("routing sends rows to the teachers a `teachers:` list names; add it", "routing")
        return
    names = [t.name for t in r.teachers]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise FieldError(f"teachers.name must be unique; rename {dup}", "teachers")
    for value, name in r.routing.routes.items():
        if name not in names:
            raise FieldError(
                f"routing.routes sends {value!r} to {name!r}, which no teacher is named; name one of {names}",
                "routing",
                "routes",
                value,
            )
    routed_to = {r.routing.default, *r.routing.routes.values()}
    if idle := [n for n in names if n not in routed_to]:
        raise FieldError(
            f"no row goes to {idle}: no route names them and none is routing.default; route a key to each, or remove "
            "them from teachers (each teacher is trained or loaded, and evaluated)",
            "routing",
            "routes",
        )
    if r.routing.count is not None:
        for value in r.routing.routes:
            if not re.fullmatch(r"0|[1-9][0-9]*", value):
                raise FieldError(
                    f"with count, a row's key is how many times {r.routing.count!r} matches ('0', '1', '2', ...), so "
                    f"no row has the key {value!r}: write a whole number without leading zeros",
                    "routing",
                    "routes",
                    value,
                )
    rules = [(("routing", "column"), r.routing.column)]
    rules += [
        (("teachers", i, "train_on", "column"), t.train_on.column) for i, t in enumerate(r.teachers) if t.train_on
    ]
    for loc, column in rules:
        if column not in ROW_COLUMNS:
            raise FieldError(
                f"column {column!r}: the data's rows have no such column; route on one of {', '.join(ROW_COLUMNS)} "
                "(with count: a regex, to route by how often it matches, e.g. '[+-]' for a chain's steps)",
                *loc,
            )
    logits = r.logit_cache is not None or any(s.kd is not None for s in r.students)
    for i, t in enumerate(r.teachers):
        if t.train_on is not None and (t.model is not None or t.api):
            raise FieldError(
                f"teacher {t.name!r}: train_on picks the rows a teacher trained here learns from; this one is "
                "not trained here (model or api): remove train_on",
                "teachers",
                i,
                "train_on",
            )
        if not t.api:
            continue
        g = t.generation or r.generation
        if g.backend is not Backend.openai or not g.api.model:
            raise FieldError(
                f"teacher {t.name!r}: api: true asks an API model; give it generation: {{backend: openai, "
                "api: {base_url: ..., model: ...}}",
                "teachers",
                i,
                "generation",
            )
        if logits:
            raise FieldError(
                f"teacher {t.name!r} is an API model, whose logits are not here, and this recipe needs logits "
                "(a logit_cache or a kd student); route its rows to a local teacher, or drop logit_cache and kd",
                "teachers",
                i,
                "api",
            )
    check_served(r)
    if r.teacher.api and r.filters.judge is not None:
        raise FieldError("the default teacher is an API model and the judge filter runs it locally", "filters", "judge")
    if not logits:
        return
    for i, s in enumerate(r.students):
        check_routed_kd(s, i, r.teachers)
    if r.logit_cache is not None and r.logit_cache.ensemble:
        raise FieldError(
            "logit_cache.ensemble averages teachers on every row; with teachers: each row has its routed teacher's "
            "logits: remove ensemble",
            "logit_cache",
            "ensemble",
        )
    known = [(i, t, tokenizer_identity(t)) for i, t in enumerate(r.teachers)]
    known = [(i, t, ident) for i, t, ident in known if ident is not None]
    for i, t, ident in known[1:]:
        if ident != known[0][2]:
            first = known[0][1]
            raise FieldError(
                f"teacher {t.name!r} tokenizes otherwise than {first.name!r} ({ident[0]}, {ident[1][:16]} against "
                f"{known[0][2][0]}, {known[0][2][1][:16]}): a logit-KD student reads one vocabulary; use teachers "
                "of one tokenizer, or drop logit_cache and kd (sequence-level KD takes any teachers' text)",
                "teachers",
                i,
            )


def check_routed_kd(s, i: int, teachers: list[NamedTeacher]) -> None:
    """A KD student ``s`` (the recipe's ``students[i]``) of several routed teachers: offline KD reads their logit caches
    joined by row; on-policy KD has each sampled row scored by its row's teacher, each in an HF scoring process of
    its own (kdflow/training/on_policy.py) or, with teacher_backend vllm, by that teacher's own server (its
    ``served``); online and feature KD would load one teacher into training."""
    from kdflow.config.kd import OfflineKD, OnPolicyKD
    from kdflow.config.loading import FieldError

    if s.kd is None or isinstance(s.kd, OfflineKD):
        return
    if not isinstance(s.kd, OnPolicyKD):
        raise FieldError(
            f"student {s.name!r}: kd method {s.kd.method.value} loads one teacher model into training; with several "
            "teachers use method offline (their logit caches joined by row) or on_policy (each sampled row scored "
            "by its routed teacher)",
            "students",
            i,
            "kd",
            "method",
        )
    if s.kd.teacher_backend != "vllm":
        return
    if s.kd.base_url is not None:
        raise FieldError(
            f"student {s.name!r}: kd.base_url names one vLLM server, and several teachers score this student, each "
            "its own rows' samples: remove kd.base_url and give each teacher its server as `served: {base_url: ...}` "
            "in its teachers entry",
            "students",
            i,
            "kd",
            "base_url",
        )
    # kdflow starts no server per teacher. Started at once, each vLLM server claims its share of the GPU
    # (--gpu-memory-utilization is a share of the whole device) for a KV cache whatever the others hold, so two
    # would need sizes split by hand; started one after the other, every step would wait for each teacher's
    # server to start again (a minute each). A server the user runs per teacher has neither cost.
    for j, t in enumerate(teachers):
        if t.served is None:
            raise FieldError(
                f"student {s.name!r} is scored by vLLM (kd.teacher_backend: vllm) and teacher {t.name!r} names no "
                "server: give it `served: {base_url: http://<host>:<port>/v1}` (a vLLM server of that teacher, "
                "started with --no-enable-prefix-caching --max-logprobs " + str(s.kd.k) + "), as every teacher; "
                "or set kd.teacher_backend: hf to score each teacher in a process of its own. kdflow starts no "
                "vLLM server per teacher: each would claim memory for its KV cache beside the others'",
                "teachers",
                j,
                "served",
            )


def check_served(r) -> None:
    """Each teacher's ``served`` server: asked only by on-policy students with teacher_backend vllm, and one per
    teacher (two teachers at the same model of the same server would score each other's rows)."""
    from kdflow.config.kd import OnPolicyKD
    from kdflow.config.loading import FieldError

    asked = any(isinstance(s.kd, OnPolicyKD) and s.kd.teacher_backend == "vllm" for s in r.students)
    seen: dict[str, str] = {}
    for j, t in enumerate(r.teachers):
        if t.served is None:
            continue
        if t.api:
            raise FieldError(
                f"teacher {t.name!r} is an API model (api: true), whose log-probs kdflow does not score: remove "
                "served, or make it a local teacher (model: its folder) served by vLLM",
                "teachers",
                j,
                "served",
            )
        if not asked:
            raise FieldError(
                f"teacher {t.name!r} names a vLLM server (served), which only on-policy students with "
                "kd.teacher_backend: vllm ask; no student here does: set that backend on an on-policy student, or "
                "remove served",
                "teachers",
                j,
                "served",
            )
        where = t.served.base_url.rstrip("/")
        if where in seen:
            raise FieldError(
                f"teachers {seen[where]!r} and {t.name!r} name the same server, {redact_url(t.served.base_url)}, "
                "which serves one model: one would score the other's rows; give each teacher its own server",
                "teachers",
                j,
                "served",
            )
        seen[where] = t.name
