"""A model a stage depends on is keyed by what it is, not by what it is called (issue 23, finding 9, old #15).

A local model folder (a pretrained student's ``model``, a local judge, a teacher folder) by its files: new weights at
the same path give a new key, the same weights give the same key without hashing them again. A folder inside a
finished stage output (``runs/<run>/<stage>/<key>/model``: a pruned teacher, an imported GGUF, another student) by
that output's key and the path inside it, wherever the run folder lies. The shipped recipes' keys are pinned below,
so a long study resumes from its cache. An API teacher or
judge by what its server lists for the name at ``/v1/models`` (kdflow/teacher/served.py): a different model under the
same name at the same URL gives a new key, and answers paid for under the older key are taken over, never asked again.
"""

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from kdflow.config.data import DataSource
from kdflow.config.evaluation import EvaluationSection
from kdflow.config.generation import GenerationSection
from kdflow.config.recipe import load_recipe
from kdflow.config.student import StudentInit, StudentSection
from kdflow.config.teacher import TeacherSection
from kdflow.store import model_folders
from kdflow.store.outputs import OutputRef, building, content_key, existing_output, finish
from kdflow.teacher import served
from kdflow.training.student import student_inputs
from tests.conftest import ROOT, fake_weights
from tests.fault_proxy import FakeTeacher

GOLDEN = {
    "demo.yaml": {
        "data": "af0063cf5c6b6a4eee1d729c5febeef4be3d39cdc9c527b60c0da4c5d75e02a2",
        "teacher": "8794b04e679a5a2be422fb64f1e6171d96bcd5f8defd5e665009a402bc3cc793",
        "generate": "a48a13339b593696d92d706952a05f77f80f443e9cb04aec071686bc70567263",
        "curate": "39c3b8a052412e733c8f0420c442bad0ee9c2eca8c1f1368f698eff4ad3bfb63",
        "logit-cache": "7e355c4065a316db8cc92f4f5d83223e712f6f352f36c1f3d40ef8dba4154762",
        "students baseline": "19a9407f50c3cb00934aca24bf68558153c0cd2cac19aca934605b5c6013b5e5",
        "students seq-kd": "c1e10e1a04e8220a115a58dcbf348f825069425bf9f9461763666b7ed42259ec",
        "students logit-fkl": "dd1c9cc94201f2035ad9aa1d6c60cbb6ca4e0e6a409123509c57dd6c57532495",
        "students logit-rkl": "c764509883fbe31bfaabecac164577c2c13e455a4b0db977535989fc5797554d",
        "evaluate": "bb26b80a95295103b5b1692530cca1741d35378fda8891b6ef97761d5e7bfc30",
        "deployment": "c1f3604d6e645236c6b4fee8ce438d52c354ac4d33399bb16bbb00231be0bf11",
        "quantize int8": "2890583a04c46a2822921f9a7930023072debba04baa14769c0446eee2ca1d68",
    },
    "smollm2.yaml": {
        "data": "f09f77baf7390ad6c3ffb42358f05a0aac30bcf5d916455249b3c76c4860537b",
        "import-gguf": "b84361ba200f53b531bed080a337fb445bb98c4bf8bf8763a154e11b2560988c",
        "generate": "980ffd9d4cd324242806c99ca867be1dcf6d90d7b011387833339bef79831fe6",
        "curate": "fa3ae11154eddcbc93e894ab2f4aac96652dd4bfed9fe25faec0406a46bf7c3a",
        "logit-cache": "63d1530d0f913088191e9f88d1e9e78a57f1a87296a030ca0ca76a1122785ae7",
        "prune sft": "6df3f96c0ee118dddd9b91d3534a75f3f2e5fd54bd33309f012bda99210fe681",
        "students sft": "62a7199cd209089634295ca23fe3dbb734d3aa7f547d5999ed128982bc6a3aff",
        "prune seq-kd": "6df3f96c0ee118dddd9b91d3534a75f3f2e5fd54bd33309f012bda99210fe681",
        "students seq-kd": "3512e4e4c25f1409140dd3331b106ce0b64ec020196d5d218cda149012557b63",
        "prune offline-kd": "6df3f96c0ee118dddd9b91d3534a75f3f2e5fd54bd33309f012bda99210fe681",
        "students offline-kd": "6729e2669af99777f7a93a3c7bb87559ae7e8fbb1f957c39c6c91fdc76b48a14",
        "prune on-policy": "6df3f96c0ee118dddd9b91d3534a75f3f2e5fd54bd33309f012bda99210fe681",
        "students on-policy": "30787916b19c8c560db3bf47a8b305728fded743c535faa238f698556a55457c",
        "evaluate": "e47e259b3a546ae85287708214cc62bb88450bbf23363c795b869fa51c01c6fe",
        "deployment": "dca4cf8e300ad2ca6a8b4a596225964af858cef7ee84cf6535d7c1bdac75222f",
    },
}
FIXED_START = "output:prune/0123456789abcdef/model"  # a pruned start as its key sees it (keyed_by_content)


@pytest.fixture(autouse=True)
def fresh_state(tmp_path, monkeypatch):
    """Each test: its own record of folder hashes and served models, and a fresh run (nothing asked yet)."""
    monkeypatch.setenv(model_folders.STATE_ENV, str(tmp_path / "state"))
    monkeypatch.setattr(model_folders, "_hashes", {})
    monkeypatch.setattr(served, "BACKOFF_S", 0.01)
    served.forget()
    yield
    served.forget()


def fake(stage: str) -> OutputRef:
    return OutputRef(stage=stage, key=stage, path=f"/{stage}", sha256=stage)


def shipped_keys(recipe: str) -> dict[str, str]:
    """Every stage key of a shipped recipe, with the arguments its flows pass (refs stand in for upstream outputs)."""
    from tasks.capture import CAPTURE
    from tasks.curate import CURATE
    from tasks.data import DATA
    from tasks.evaluate import DEPLOYMENT, EVALUATE
    from tasks.generate import GENERATE
    from tasks.models import IMPORT_GGUF, PRUNE
    from tasks.quantize import QUANTIZE
    from tasks.students import STUDENTS
    from tasks.teacher import TEACHER

    if "models/SmolLM2-135M-Instruct.Q4_1.gguf" in (ROOT / "recipes" / recipe).read_text():
        from kdflow.models.smollm2 import link

        link(ROOT)  # as test_recipe.py: what `make smollm2` links
    r = load_recipe(ROOT / "recipes" / recipe)
    cot, k = r.prompts.cot_text(), {"data": DATA.key(section=r.data)}
    if r.teacher.architecture:
        k["teacher"] = TEACHER.key(section=r.teacher, data=fake("data"), template=cot)
    else:
        k["import-gguf"] = IMPORT_GGUF.key(gguf=r.teacher.model, dtype=r.teacher.dtype)
    k["generate"] = GENERATE.key(section=r.generation, template=cot, teacher=fake("teacher"), data=fake("data"))
    k["curate"] = CURATE.key(section=r.filters, source=r.data.source, answers=fake("generate"), teacher=fake("teacher"))
    if r.logit_cache:
        k["logit-cache"] = CAPTURE.key(
            section=r.logit_cache, template=cot, teacher=fake("teacher"), curated=fake("curate")
        )
    for s in r.student_runs():
        if isinstance(s.init, StudentInit):  # its start: the parent's trained folder, whose path carries its key
            s = s.model_copy(update={"model": f"{FIXED_START}-{s.init.student}", "init": None})
        if s.init:
            k[f"prune {s.name}"] = PRUNE.key(init=s.init, teacher=fake("teacher"), data=fake("data"), template=cot)
            s = s.model_copy(update={"model": FIXED_START, "init": None})
        curated, logits = student_inputs(s, fake("curate"), fake("logits"))
        k[f"students {s.name}"] = STUDENTS.key(
            section=s, template=cot, teacher=fake("teacher"), data=fake("data"), curated=curated, logits=logits
        )
    k["evaluate"] = EVALUATE.key(
        section=r.evaluation,
        template=cot,
        source=r.data.source,
        model=fake("students"),
        teacher=fake("teacher"),
        data=fake("data"),
    )
    k["deployment"] = DEPLOYMENT.key(
        models={"teacher": fake("teacher")},
        settings=r.evaluation.deployment,
        template=cot,
        data=fake("data"),
        split=r.evaluation.split,
    )
    for m in r.evaluation.quantize:
        k[f"quantize {m}"] = QUANTIZE.key(method=m, model=fake("students"))
    return k


@pytest.mark.parametrize("recipe", sorted(GOLDEN))
def test_the_shipped_recipes_keep_every_stage_key(recipe):
    """A run of these recipes (runs/smollm2: a study resumed from its cache) must find every output it made (a
    student added to a recipe adds a key and changes none)."""
    keys = shipped_keys(recipe)
    assert {stage: keys.get(stage) for stage in GOLDEN[recipe]} == GOLDEN[recipe]


def model_folder(folder: Path, weights: bytes = b"weights-1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"model": {}}')
    (folder / "model.safetensors").write_bytes(fake_weights(weights))
    return folder


def stage_output(run_dir: Path, stage: str, key: str) -> Path:
    """A finished stage output holding a model folder (as the prune stage leaves one)."""
    with building(run_dir, stage, key) as tmp:
        model_folder(tmp / "model")
        finish(tmp, stage, key, inputs={})
    return Path(existing_output(run_dir, stage, key).path)


def student_key(model: str) -> str:
    from tasks.students import STUDENTS

    section = StudentSection(name="s", data="gold", model=model)
    return STUDENTS.key(section=section, template="t", teacher=fake("teacher"), data=fake("data"), curated=None)


def test_a_pretrained_students_folder_is_keyed_by_its_files_not_its_path(tmp_path, monkeypatch):
    folder = model_folder(tmp_path / "student")
    key = student_key(str(folder))
    hashed = []
    monkeypatch.setattr(model_folders, "hash_folder", lambda f: hashed.append(f) or "never")
    assert student_key(str(folder)) == key and hashed == []  # unchanged: the same key, the files not read again
    monkeypatch.undo()
    monkeypatch.setenv(model_folders.STATE_ENV, str(tmp_path / "state"))
    model_folders._hashes.clear()  # a new process: the digest comes from the record file, by the files' stat
    assert student_key(str(folder)) == key
    (folder / "model.safetensors").write_bytes(fake_weights(b"weights-2"))  # new weights, same path
    changed = student_key(str(folder))
    assert changed != key
    moved = folder.rename(tmp_path / "elsewhere")
    assert student_key(str(moved)) == changed  # the same files under another path: the same content


def test_a_start_inside_a_stage_output_is_keyed_by_that_output_wherever_the_run_folder_lies(tmp_path):
    """What chain.starting_points passes for a pruned (or imported, or another student's) start: keyed by the stage
    output's own key and the path inside it, so that a run folder copied or moved elsewhere finds the students it
    trained (the ninth audit's #28: keyed by the absolute path, `kdflow evaluate --run-dir <copy>` refused)."""
    import shutil

    output = stage_output(tmp_path / "runs" / "x", "prune", "ab" * 32)
    start = str(output / "model")
    key = student_key(start)
    section = StudentSection(name="s", data="gold", model=start)
    sha256 = model_folders.read_manifest(output)["sha256"]
    section = section.model_copy(update={"model": f"output:prune/abababababababab/model@{sha256}"})
    args = {"template": "t", "teacher": fake("teacher"), "data": fake("data"), "curated": None, "logits": None}
    assert key == content_key("students", "1", {"section": section, **args})
    shutil.copytree(tmp_path / "runs" / "x", tmp_path / "elsewhere" / "y")
    assert student_key(str(tmp_path / "elsewhere" / "y" / "prune" / output.name / "model")) == key
    other = stage_output(tmp_path / "runs" / "x", "prune", "cd" * 32)  # another pruning: another start
    assert student_key(str(other / "model")) != key
    (output / "model" / "model.safetensors").write_bytes(fake_weights(b"changed"))  # (the output's own check: not here)
    assert student_key(start) == key
    assert model_folders.local_model_sha256("some-org/some-model") is None  # a hub id: its name
    # the same output rebuilt under its key with other bytes (set aside as damaged, trained again): a new start
    shutil.rmtree(output)
    with building(tmp_path / "runs" / "x", "prune", "ab" * 32) as tmp:
        model_folder(tmp / "model", b"weights-2")
        finish(tmp, "prune", "ab" * 32, inputs={})
    assert student_key(start) != key


def test_a_teacher_folder_is_keyed_by_its_files(tmp_path):
    from tasks.teacher import EXISTING_TEACHER

    folder = model_folder(tmp_path / "teacher")
    key = EXISTING_TEACHER.key(section=TeacherSection(model=str(folder)))
    assert EXISTING_TEACHER.key(section=TeacherSection(model=str(folder))) == key
    (folder / "model.safetensors").write_bytes(fake_weights(b"weights-2"))
    assert EXISTING_TEACHER.key(section=TeacherSection(model=str(folder))) != key


def test_new_teacher_weights_in_place_give_the_teacher_output_another_content(tmp_path):
    """What follows (answers, logit cache, students, evaluations) keys the teacher by its output's sha256: with new
    weights at the same path that must change too, or the old teacher's answers and students are reused and reported
    as the new one's (the tenth audit's #38: the output held the location alone)."""
    from transformers import AutoTokenizer

    from kdflow.training.tiny_models import llama_model
    from tasks.teacher import use_existing_teacher
    from tests.conftest import build_tiny_teacher

    folder = build_tiny_teacher(tmp_path / "teacher")
    section = TeacherSection(model=str(folder))
    before = use_existing_teacher.fn(tmp_path / "runs", section)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llama_model(tokenizer, hidden=64, layers=1, heads=2, intermediate=128, seed=1, max_positions=1024).save_pretrained(
        folder
    )  # other weights, same path
    after = use_existing_teacher.fn(tmp_path / "runs", section)
    assert after.key != before.key and after.sha256 != before.sha256
    assert use_existing_teacher.fn(tmp_path / "runs", section).sha256 == after.sha256  # the same weights: reused


def local_judge_key(folder: Path) -> str:
    from tasks.evaluate import JUDGE

    section = EvaluationSection.Judge(backend="hf", model=str(folder))
    return JUDGE.key(
        section=section, students={"s": fake("evaluate")}, teacher=fake("evaluate"), data=fake("data"), split="test"
    )


def test_a_local_judge_is_keyed_by_its_files_and_so_are_its_kept_replies(tmp_path):
    from tasks.evaluate import reply_folder

    folder = model_folder(tmp_path / "judge")
    section = EvaluationSection.Judge(backend="hf", model=str(folder))
    key, replies = local_judge_key(folder), reply_folder(tmp_path, section)
    assert (local_judge_key(folder), reply_folder(tmp_path, section)) == (key, replies)
    (folder / "model.safetensors").write_bytes(fake_weights(b"another judge"))
    assert local_judge_key(folder) != key and reply_folder(tmp_path, section) != replies


class ServingTeacher(FakeTeacher):
    """FakeTeacher that also lists its models at GET /v1/models: ``cards()`` gives the list each time it is asked;
    ``posts`` counts the completions requested."""

    def __init__(self, cards, **kw):
        self.cards, self.posts, self.listed = cards, 0, 0
        super().__init__(**kw)

    def _handler(self):
        fake, base = self, super()._handler()

        class Handler(base):
            def do_GET(self):
                fake.listed += 1
                body = json.dumps({"object": "list", "data": fake.cards()}).encode()
                self.send_response(200 if self.path.rstrip("/") == "/v1/models" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                fake.posts += 1
                super().do_POST()

        return Handler


def openai_card(created: int) -> dict:
    return {"id": "teacher-model", "object": "model", "created": created, "owned_by": "org"}


def vllm_card(root: str) -> dict:  # vLLM stamps `created` with the time of the request
    return {
        "id": "teacher-model",
        "object": "model",
        "created": time.time_ns(),
        "owned_by": "vllm",
        "root": root,
        "max_model_len": 2048,
    }


def generation(url: str) -> GenerationSection:
    return GenerationSection(
        backend="openai",
        splits=["train"],
        max_new_tokens=8,
        api={"base_url": url + "/v1", "model": "teacher-model", "api_key_env": None},
    )


def api_keys_now(url: str) -> dict[str, str]:
    """The keys of every stage an API model feeds, as a new run computes them (the served card asked afresh)."""
    from tasks.evaluate import API_EVALUATE, JUDGE, reply_folder
    from tasks.generate import GENERATE

    served.forget()
    g = generation(url)
    judge = EvaluationSection.Judge(base_url=url + "/v1", model="teacher-model", api_key_env=None)
    return {
        "generate": GENERATE.key(section=g, template="t", teacher=fake("teacher"), data=fake("data")),
        "api-evaluate": API_EVALUATE.key(
            section=EvaluationSection(),
            template="t",
            source=DataSource.arithmetic,
            generation=g,
            teacher=fake("teacher"),
            data=fake("data"),
        ),
        "judge": JUDGE.key(
            section=judge, students={"s": fake("evaluate")}, teacher=fake("evaluate"), data=fake("data"), split="test"
        ),
        "judge-replies": str(reply_folder(Path("/run"), judge)),
    }


@pytest.mark.parametrize(
    "card, another",
    [
        (lambda: openai_card(1700000000), lambda: openai_card(1800000000)),
        (lambda: vllm_card("/models/a"), lambda: vllm_card("/models/b")),
    ],
    ids=["openai-created", "vllm-root"],
)
def test_another_model_served_under_the_same_name_and_url_gets_new_keys(card, another):
    current = {"card": card}
    with ServingTeacher(lambda: [{"id": "other"}, current["card"]()]) as server:
        keys = api_keys_now(server.url)
        assert api_keys_now(server.url) == keys  # the same model (vLLM's `created` moving on): the same keys
        current["card"] = another
        changed = api_keys_now(server.url)
    assert all(changed[k] != keys[k] for k in keys), (keys, changed)


def test_the_card_is_read_once_per_run_and_a_server_that_cannot_say_keeps_the_last_word(caplog):
    with ServingTeacher(lambda: [openai_card(1700000000)]) as server:
        keys = api_keys_now(server.url)
        listed = server.listed
        for _ in range(3):
            assert served.served_identity(server.url + "/v1", "teacher-model") == {
                "id": "teacher-model",
                "created": 1700000000,
                "owned_by": "org",
            }
        assert server.listed == listed  # asked once in this process, not once per key
        url = server.url
    # The server is gone (no network): keyed by what it said last time, with a warning; nothing is asked anyway.
    assert api_keys_now(url) == keys
    assert "keyed by what it said on" in caplog.text
    # A server that never said (no /models, as FakeTeacher): keyed by name and URL, as before these keys existed.
    with FakeTeacher() as bare:
        from tasks.generate import GENERATE

        served.forget()
        g = generation(bare.url)
        legacy = content_key(
            "generate", "2", {"section": g, "template": "t", "teacher": fake("teacher"), "data": fake("data")}
        )
        assert GENERATE.key(section=g, template="t", teacher=fake("teacher"), data=fake("data")) == legacy
    assert "keyed by its name and URL alone" in caplog.text


def data_output(run_dir: Path) -> OutputRef:
    rows = [
        {"id": f"r{i}", "question": f"{i}+1", "answer": str(i + 1), "rationale": f"{i}+1={i + 1}"} for i in range(3)
    ]
    with building(run_dir, "data", "d" * 64) as tmp:
        pd.DataFrame(rows).to_parquet(tmp / "train.parquet", index=False)
        finish(tmp, "data", "d" * 64, inputs={}, splits={"train": 3})
    return existing_output(run_dir, "data", "d" * 64)


def test_answers_paid_for_under_the_older_key_are_taken_over_not_asked_again(tmp_path):
    """A run made before the card was in the key is resumed once the key has it: its finished answers are copied
    under the new key (same files, same sha256: nothing downstream reruns) and the server is asked nothing; the older
    output is taken once (a later, different model is asked afresh), and a crashed run's shards are moved."""
    from tasks.generate import GENERATE, generate_answers, shard_folder

    run_dir, teacher, template = tmp_path / "run", fake("teacher"), "{{ question }}"
    data = data_output(run_dir)
    with ServingTeacher(lambda: [openai_card(1700000000)]) as server:
        g = generation(server.url)
        legacy_key = content_key(
            "generate", "2", {"section": g, "template": template, "teacher": teacher, "data": data}
        )
        with building(run_dir, "generate", legacy_key) as tmp:  # as older code wrote it: no served model named
            pd.DataFrame([{"id": "r0", "text": "paid for", "sample": 0}]).to_parquet(tmp / "answers.parquet")
            pd.DataFrame({"id": []}).to_parquet(tmp / "failures.parquet")
            finish(tmp, "generate", legacy_key, inputs={}, rows=1, failed=0, backend="openai")
        old = existing_output(run_dir, "generate", legacy_key)
        ref = generate_answers.fn(run_dir, g, template, teacher, data)
        assert server.posts == 0
        assert ref.key != legacy_key and ref.sha256 == old.sha256
        card = {"id": "teacher-model", "created": 1700000000, "owned_by": "org"}
        assert ref.manifest()["served"] == card and ref.manifest()["adopted_from"] == legacy_key
        assert generate_answers.fn(run_dir, g, template, teacher, data) == ref and server.posts == 0

        server.cards = lambda: [openai_card(1800000000)]  # another model under the name: not given the old answers
        served.forget()
        out = GENERATE.output(run_dir, section=g, template=template, teacher=teacher, data=data)
        assert out.key not in (ref.key, legacy_key) and out.done is None and out.unrecorded("served") is None

    legacy_shards = shard_folder(run_dir, legacy_key)  # a crashed older run's answers, resumed by the new key
    legacy_shards.mkdir()
    (legacy_shards / "shard-1-a.jsonl").write_text('{"id": "r1", "sample": 0, "ok": true, "text": "paid"}\n')
    from kdflow.teacher.answer_shards import adopt_folder, read_shards

    assert adopt_folder(legacy_shards, shard_folder(run_dir, out.key))
    assert ("r1", 0) in read_shards(shard_folder(run_dir, out.key))[0] and not legacy_shards.exists()


def test_the_length_filters_tokenizer_folder_is_keyed_by_its_files(tmp_path):
    """Another tokenizer copied to the same path counts other lengths, so other rows are kept (the tenth audit's #41:
    the curation was keyed by the path and reused)."""
    from kdflow.config.data import DataSource
    from kdflow.config.filters import FiltersSection
    from kdflow.training.tiny_models import train_tokenizer
    from tasks.curate import CURATE

    folder = tmp_path / "tok"
    train_tokenizer(["1+1=2", "2+2=4"] * 5, vocab_size=40).save_pretrained(folder)

    def key(section: FiltersSection) -> str:
        return CURATE.key(section=section, source=DataSource.arithmetic, answers=fake("generate"), teacher=None)

    section = FiltersSection(length={"max_tokens": 19, "tokenizer": str(folder)})
    before = key(section)
    assert key(section) == before
    train_tokenizer(["1+1=2", "2+2=4", "3*3=9", "10-1=9"] * 5, vocab_size=60).save_pretrained(folder)
    assert key(section) != before
    assert "length_tokenizer" not in CURATE.inputs(section=FiltersSection(), source=DataSource.arithmetic, answers=None)


def test_an_ensemble_members_folder_is_keyed_by_its_files(tmp_path):
    """New weights at an ensemble member's path make another logit cache, as a teacher folder's do."""
    from kdflow.config.logit_cache import LogitCacheSection
    from tasks.capture import CAPTURE

    folder = model_folder(tmp_path / "member")
    section = LogitCacheSection(k=4, ensemble=[{"model": str(folder), "weight": 0.5}])

    def key() -> str:
        return CAPTURE.key(section=section, template="t", teacher=fake("teacher"), curated=fake("curate"))

    before = key()
    assert key() == before
    (folder / "model.safetensors").write_bytes(fake_weights(b"weights-2"))
    assert key() != before
    plain = LogitCacheSection(k=4)
    assert CAPTURE.inputs(section=plain, template="t", teacher=None, curated=None)["section"] is plain
