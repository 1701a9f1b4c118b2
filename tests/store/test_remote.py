"""Run folders on an fsspec file system (kdflow/store/remote.py): push / pull with the manifest last, an upload cut
short is never an output, and the stage contract (kdflow/store/outputs.py, kdflow/store/run_folder.py) uploads each
finished output and takes one only the remote has. Fast: fsspec's in-memory file system and a file:// URL."""

import importlib.util
import json
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from kdflow.store import remote, run_folder
from kdflow.store.outputs import MANIFEST, building, existing_output, finish, output_dir

STAGE = "stage"


@pytest.fixture
def memory_url():
    """A fresh memory:// folder (the in-memory file system is one per process), removed afterwards."""
    url = f"memory://kdflow-tests/{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.fixture(params=["memory", "file"])
def url(request, memory_url, tmp_path):
    return memory_url if request.param == "memory" else f"file://{tmp_path / 'remote'}"


def an_output(folder: Path) -> Path:
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "model.bin").write_bytes(b"\0\1\2" * 1000)
    (folder / "rows.parquet").write_text("rows")
    (folder / MANIFEST).write_text(json.dumps({"sha256": "x"}))
    return folder


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_pull_gives_back_every_file(url, tmp_path):
    local = an_output(tmp_path / "out")
    assert not remote.exists_complete(f"{url}/stage/out")
    remote.push(local, f"{url}/stage/out")
    assert remote.exists_complete(f"{url}/stage/out") and remote.complete_outputs(f"{url}/stage") == ["out"]
    remote.pull(f"{url}/stage/out", tmp_path / "back")
    assert files_under(tmp_path / "back") == files_under(local)


def test_the_manifest_is_uploaded_last(memory_url, tmp_path, monkeypatch):
    order = []
    put = MemoryFileSystem.put_file
    monkeypatch.setattr(
        MemoryFileSystem, "put_file", lambda fs, src, dst, **kw: (order.append(dst), put(fs, src, dst, **kw))
    )
    remote.push(an_output(tmp_path / "out"), f"{memory_url}/out")
    assert len(order) == 3 and order[-1].endswith(f"/out/{MANIFEST}")


def test_an_upload_cut_short_is_not_an_output_and_leaves_a_complete_copy_there_whole(memory_url, tmp_path, monkeypatch):
    target, fs = f"{memory_url}/out", fsspec.filesystem("memory")
    old = an_output(tmp_path / "old")
    remote.push(old, target)  # a complete older copy, which a push of other bytes that dies must not take away
    put, calls = MemoryFileSystem.put_file, []

    def dies_on_second_file(fs, src, dst, **kw):
        calls.append(dst)
        if len(calls) == 2:
            raise ConnectionError("network gone")
        return put(fs, src, dst, **kw)

    monkeypatch.setattr(MemoryFileSystem, "put_file", dies_on_second_file)
    new = an_output(tmp_path / "new")
    (new / "rows.parquet").write_text("other rows")
    (new / MANIFEST).write_text(json.dumps({"sha256": "y"}))
    with pytest.raises(ConnectionError):
        remote.push(new, target)
    calls.clear()
    with pytest.raises(ConnectionError):
        remote.push(new, f"{memory_url}/first")  # nothing was there before
    monkeypatch.setattr(MemoryFileSystem, "put_file", put)
    remote.pull(target, tmp_path / "back")
    assert files_under(tmp_path / "back") == files_under(old)
    assert remote.complete_outputs(memory_url) == ["out"] and not remote.exists_complete(f"{memory_url}/first")
    assert not [p for p in fs.find(memory_url) if "/.upload-" in p]  # no half upload left behind
    with pytest.raises(FileNotFoundError, match="not a finished output"):
        remote.pull(f"{memory_url}/first", tmp_path / "none")


def test_a_pull_during_a_re_push_gets_the_whole_old_copy_and_after_it_the_new_one(memory_url, tmp_path, monkeypatch):
    """Issue 23, finding 7: the push deleted the remote copy before uploading the new one, so a pull in between
    failed. Here the pull runs inside the new push's upload (a fact, not a timing)."""
    target = f"{memory_url}/out"
    old, new = an_output(tmp_path / "old"), an_output(tmp_path / "new")
    (new / "rows.parquet").write_text("other rows")
    (new / MANIFEST).write_text(json.dumps({"sha256": "y"}))
    remote.push(old, target)
    put, pulled = MemoryFileSystem.put_file, []

    def pull_while_uploading(fs, src, dst, **kw):
        if not pulled:
            pulled.append(tmp_path / "during")
            remote.pull(target, pulled[0])
        return put(fs, src, dst, **kw)

    monkeypatch.setattr(MemoryFileSystem, "put_file", pull_while_uploading)
    remote.push(new, target)
    assert files_under(pulled[0]) == files_under(old)
    remote.pull(target, tmp_path / "after")
    assert files_under(tmp_path / "after") == files_under(new)
    assert not [p for p in fsspec.filesystem("memory").find(memory_url) if "/.upload-" in p]


def test_a_second_push_of_the_same_content_leaves_the_complete_copy_alone(memory_url, tmp_path, monkeypatch):
    target, fs = f"{memory_url}/out", fsspec.filesystem("memory")
    remote.push(an_output(tmp_path / "a"), target)
    again = an_output(tmp_path / "b")  # another machine's build: the same files, other timings in the manifest
    (again / MANIFEST).write_text(json.dumps({"sha256": "x", "seconds": 12.5}))
    touched = []
    for name in ("put_file", "rm_file", "rm", "mv"):
        monkeypatch.setattr(MemoryFileSystem, name, lambda *a, _name=name, **kw: touched.append(_name))
    remote.push(again, target)
    assert touched == []
    monkeypatch.undo()
    fs.pipe_file(f"{target}/rows.parquet", b"truncated")  # a copy whose files are not ours is replaced
    remote.push(again, target)
    remote.pull(target, tmp_path / "back")
    assert files_under(tmp_path / "back") == files_under(again)


def build(run_dir, key, payload="x"):
    with building(run_dir, STAGE, key) as tmp:
        (tmp / "data.txt").write_text(payload)
        finish(tmp, STAGE, key, inputs={"payload": payload}, rows=1)
    return existing_output(run_dir, STAGE, key)


def test_stages_upload_finished_outputs_and_a_fresh_staging_folder_takes_them(url, tmp_path):
    run = f"{url}/runs/r1"
    first = remote.bind(tmp_path / "staging-a" / "r1", run)
    ref = build(first, "a" * 64)
    assert remote.exists_complete(f"{run}/{STAGE}/{'a' * 16}")

    # Another machine (an empty staging folder bound to the same URL) finds it there, whole, and builds nothing.
    second = remote.bind(tmp_path / "staging-b" / "r1", run)
    got = existing_output(second, STAGE, "a" * 64)
    assert got.sha256 == ref.sha256 and got.path == str(output_dir(second, STAGE, "a" * 64).resolve())
    assert files_under(Path(got.path)) == files_under(Path(ref.path))
    assert existing_output(second, STAGE, "b" * 64) is None  # never built anywhere
    assert not [p for p in (second / STAGE).iterdir() if p.name.startswith(".pull-")]


def test_an_upload_cut_short_is_made_again_on_the_next_lookup(memory_url, tmp_path):
    run_dir = remote.bind(tmp_path / "r1", memory_url)
    ref = build(run_dir, "c" * 64)
    fs = fsspec.filesystem("memory")
    fs.rm_file(f"{memory_url}/{STAGE}/{'c' * 16}/{MANIFEST}")  # as if the upload had died before its manifest
    assert existing_output(run_dir, STAGE, "c" * 64) == ref
    assert remote.exists_complete(f"{memory_url}/{STAGE}/{'c' * 16}")


def test_a_damaged_remote_output_is_not_taken(memory_url, tmp_path):
    build(remote.bind(tmp_path / "a", memory_url), "d" * 64)
    fsspec.filesystem("memory").pipe_file(f"{memory_url}/{STAGE}/{'d' * 16}/data.txt", b"changed")
    fresh = remote.bind(tmp_path / "b", memory_url)
    assert existing_output(fresh, STAGE, "d" * 64) is None  # the stage builds it again...
    ref = build(fresh, "d" * 64)
    other = remote.bind(tmp_path / "c", memory_url)
    assert existing_output(other, STAGE, "d" * 64).sha256 == ref.sha256  # ... and its upload replaces the bad copy


def test_a_stage_flow_rerun_on_a_fresh_machine_finds_remote_outputs(memory_url, tmp_path):
    build(remote.bind(tmp_path / "a", memory_url), "e" * 64, payload="older")
    newest = build(remote.bind(tmp_path / "a", memory_url), "f" * 64, payload="newer")
    fresh = remote.bind(tmp_path / "b", memory_url)
    assert run_folder.latest(fresh, STAGE).sha256 == newest.sha256
    assert len(run_folder.outputs(fresh, STAGE)) == 2


def test_a_plain_local_run_folder_touches_no_remote(tmp_path):
    assert remote.bound_url(tmp_path) is None
    build(tmp_path, "g" * 64)
    assert [p.name for p in tmp_path.iterdir()] == [STAGE]


def recipe_with_run(run: str) -> str:
    text = (Path(__file__).parent.with_name("mini.yaml")).read_text()
    return text.replace("run:\n  name: mini\n  root: runs\n", run)


def test_a_url_root_stages_locally_bound_to_the_run_url(memory_url, tmp_path):
    staging = tmp_path / "staging"
    r = parse_recipe(
        recipe_with_run(f"run:\n  name: mini\n  root: {memory_url}/runs\n  staging: {staging}\n"), "mini.yaml"
    )
    assert r.run.url == f"{memory_url}/runs/mini" and r.run_dir == staging / "mini"
    assert remote.bound_url(r.run_dir) == r.run.url
    local = parse_recipe(recipe_with_run(f"run:\n  name: mini\n  root: {tmp_path}\n"), "mini.yaml")
    assert local.run.url is None and remote.bound_url(local.run_dir) is None  # the same folder, not staging
    other = parse_recipe(
        recipe_with_run(f"run:\n  name: mini\n  root: {memory_url}/elsewhere\n  staging: {staging}\n"), "mini.yaml"
    )
    with pytest.raises(ValueError, match="staging folder of .*, not of .*: set run.staging"):
        other.run_dir


@pytest.mark.parametrize(
    "root, message", [("nosuch://bucket/runs", "unknown file system 'nosuch'"), ("s3://bucket/runs", "Install s3fs")]
)
def test_a_url_fsspec_cannot_open_says_how_to_fix_it(root, message):
    if root.startswith("s3://") and importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe_with_run(f"run:\n  name: mini\n  root: {root}\n"), "mini.yaml")


def test_a_remote_key_that_climbs_out_is_refused_and_nothing_lands_outside(memory_url, tmp_path):
    """Object stores take any key: `out/../../../escaped` is one. A pull writes inside its folder or not at all."""
    target = f"{memory_url}/runs/r1/{STAGE}/out"
    remote.push(an_output(tmp_path / "made"), target)
    fsspec.filesystem("memory").pipe_file(f"{target}/../../../../escaped.txt", b"planted")
    local = tmp_path / "staging" / "r1" / STAGE / "out"
    with pytest.raises(
        remote.UnsafeKey,
        match=r"the file name '\.\./\.\./\.\./\.\./escaped\.txt' would be written "
        r"outside .*/staging/r1/stage/out; remove that object",
    ):
        remote.pull(target, local)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["manifest.json", "model.bin", "rows.parquet"]

    # The stage contract: such an output is not taken, and the run folder holds nothing from it.
    run_dir = remote.bind(tmp_path / "fresh" / "r1", f"{memory_url}/runs/r1")
    with pytest.raises(remote.UnsafeKey):
        run_folder.outputs(run_dir, STAGE)
    assert not list((tmp_path / "fresh").rglob("escaped*")) and not list(tmp_path.rglob("escaped*"))


def test_remote_output_names_that_are_no_folder_name_are_ignored(memory_url, tmp_path, caplog):
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{memory_url}/{STAGE}/../{MANIFEST}", b"{}")
    remote.push(an_output(tmp_path / "ok"), f"{memory_url}/{STAGE}/" + "a" * 16)
    assert remote.complete_outputs(f"{memory_url}/{STAGE}") == ["a" * 16]
    assert "not an output folder name kdflow writes" in caplog.text


def test_push_files_takes_names_inside_the_run_folder_only(memory_url, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.md").write_text("r")
    (tmp_path / "secret.txt").write_text("s")
    with pytest.raises(remote.UnsafeKey, match=r"'\.\./secret\.txt' would be written outside"):
        remote.push_files(tmp_path / "run", ["report.md", "../secret.txt"], f"{memory_url}/runs/r1")
    assert not fsspec.filesystem("memory").exists(f"{memory_url}/runs/secret.txt")


def test_a_remote_manifest_edited_by_hand_is_not_taken_and_the_rebuild_replaces_it(memory_url, tmp_path):
    # The eleventh audit (#23): a push took a remote copy with an edited manifest (its files' sha256 unchanged) as
    # the same copy and left it there, so every pull of it was set aside and rebuilt, and the rebuild never uploaded.
    build(remote.bind(tmp_path / "a", memory_url), "e" * 64)
    fs, manifest = fsspec.filesystem("memory"), f"{memory_url}/{STAGE}/{'e' * 16}/{MANIFEST}"
    fs.pipe_file(manifest, json.dumps({**json.loads(fs.cat_file(manifest)), "rows": 50}).encode())
    fresh = remote.bind(tmp_path / "b", memory_url)
    assert existing_output(fresh, STAGE, "e" * 64) is None  # set aside as damaged: the stage builds it again ...
    build(fresh, "e" * 64)
    assert json.loads(fs.cat_file(manifest))["rows"] == 1  # ... and its upload replaces the edited copy
