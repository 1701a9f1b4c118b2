import fcntl
import json
import multiprocessing
import os
import stat
import threading

import pytest

from kdflow.store import outputs
from kdflow.store.outputs import MANIFEST, OutputRef, building, content_key, existing_output, finish, output_dir


def build(run_dir, key, payload="x", fail=False):
    with building(run_dir, "stage", key) as tmp:
        (tmp / "data.txt").write_text(payload)
        if fail:
            raise RuntimeError("boom")
        finish(tmp, "stage", key, inputs={"payload": payload}, rows=1)
    return existing_output(run_dir, "stage", key)


def test_a_finished_output_has_its_manifest_and_a_ref(tmp_path):
    ref = build(tmp_path, "k" * 64)
    assert ref.is_complete() and ref.rows == 1
    manifest = json.loads((output_dir(tmp_path, "stage", "k" * 64) / MANIFEST).read_text())
    assert manifest["sha256"] == ref.sha256 and manifest["inputs"] == {"payload": "x"}
    # No temporary left behind; .lock is the stage folder's lock file (a regular file, kept: see _locked).
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == [".lock", "k" * 16]


def test_a_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        build(tmp_path, "f" * 64, fail=True)
    assert list((tmp_path / "stage").iterdir()) == []
    assert existing_output(tmp_path, "stage", "f" * 64) is None


def test_a_build_without_manifest_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="no manifest"):
        with building(tmp_path, "stage", "m" * 64) as tmp:
            (tmp / "data.txt").write_text("x")
    assert existing_output(tmp_path, "stage", "m" * 64) is None


def test_a_stage_output_without_a_declared_file_gets_no_manifest(tmp_path):
    from kdflow.store.stage import Stage

    stage = Stage("stage", "1", lambda n: {"n": n}, files=("answers.parquet", "model/"))
    assert stage.key(n=1) == Stage("stage", "1", lambda n: {"n": n}).key(n=1)  # the files are no part of the key
    out = stage.output(tmp_path, n=1)
    with pytest.raises(RuntimeError, match="built no model/: not complete"):
        with out.building() as tmp:
            (tmp / "answers.parquet").write_text("a")
            out.finish(tmp)
    assert out.done is None
    with out.building() as tmp:
        (tmp / "answers.parquet").write_text("a")
        (tmp / "model").mkdir()
        (tmp / "model" / "w").write_text("w")
        out.finish(tmp)
    assert out.done is not None


def test_every_stage_output_records_its_wall_time_from_the_ask_to_the_manifest(tmp_path):
    """The cost ledger's time for stages that keep no record of their own work (data, curate, prune, deployment)."""
    from kdflow.store.stage import Stage

    stage = Stage("stage", "1", lambda n: {"n": n})
    out = stage.output(tmp_path, n=1)
    out.started -= 12.5  # asked for 12.5 s before now: the manifest counts at least that
    with out.building() as tmp:
        out.finish(tmp)
    assert out.ref().manifest()["wall_seconds"] >= 12.5
    given = stage.output(tmp_path, n=2)
    with given.building() as tmp:
        given.finish(tmp, wall_seconds=3.0)  # a stage that knows better says so
    assert given.ref().manifest()["wall_seconds"] == 3.0


def test_deleted_or_changed_outputs_are_not_complete(tmp_path):
    ref = build(tmp_path, "d" * 64)
    (output_dir(tmp_path, "stage", "d" * 64) / MANIFEST).unlink()
    assert not ref.is_complete()
    other = build(tmp_path, "e" * 64, payload="y")
    assert not OutputRef(**{**other.model_dump(), "sha256": "0" * 64}).is_complete()


def test_an_incomplete_folder_is_replaced_not_trusted(tmp_path):
    stale = output_dir(tmp_path, "stage", "s" * 64)
    stale.mkdir(parents=True)
    (stale / "data.txt").write_text("half-written")
    assert existing_output(tmp_path, "stage", "s" * 64) is None
    ref = build(tmp_path, "s" * 64, payload="full")
    assert (stale / "data.txt").read_text() == "full" and ref.is_complete()


def test_concurrent_builds_of_the_same_key_leave_one_complete_output(tmp_path):
    # Many rounds, because the race this guards against (one run setting aside another's just-completed
    # folder) needs an unlucky interleaving; 40 rounds of 6 threads find it reliably where it is not guarded.
    for round_ in range(40):
        key = f"{round_:02d}" * 32
        refs, errors = [], []

        def worker():
            try:
                refs.append(build(tmp_path, key, payload="same"))
            except Exception as e:  # collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == [] and None not in refs, f"round {round_}: {errors} {refs}"
        assert len({r.sha256 for r in refs}) == 1 and refs[0].is_complete()
    names = sorted(p.name for p in (tmp_path / "stage").iterdir() if p.name != ".lock")
    assert names == sorted(f"{r:02d}" * 8 for r in range(40))  # no temporaries or trash left behind


def test_content_key_depends_on_content_only():
    a = content_key("s", "1", {"x": 1, "ref": OutputRef(stage="d", key="k", path="/a", sha256="h")})
    b = content_key("s", "1", {"ref": OutputRef(stage="d", key="k2", path="/elsewhere", sha256="h"), "x": 1})
    assert a == b
    assert a != content_key("s", "2", {"x": 1, "ref": OutputRef(stage="d", key="k", path="/a", sha256="h")})
    assert a != content_key("s", "1", {"x": 2, "ref": OutputRef(stage="d", key="k", path="/a", sha256="h")})


# ---- damaged outputs are detected and rebuilt, never reused (issue 12, item 2) --------------------------------


def test_a_truncated_file_under_an_intact_manifest_is_not_reused_and_is_rebuilt(tmp_path, caplog):
    ref = build(tmp_path, "t" * 64, payload="the whole answer")
    data = output_dir(tmp_path, "stage", "t" * 64) / "data.txt"
    data.write_text("the whole")  # truncated: a smaller file under the same manifest
    assert not ref.is_complete()
    assert existing_output(tmp_path, "stage", "t" * 64) is None
    assert "data.txt has 9 bytes, the manifest says 16" in caplog.text and "built again" in caplog.text
    again = build(tmp_path, "t" * 64, payload="the whole answer")
    assert again.is_complete() and data.read_text() == "the whole answer"


def test_a_same_size_change_is_caught_by_the_content_hash(tmp_path, caplog):
    ref = build(tmp_path, "c" * 64, payload="aaaa")
    folder = output_dir(tmp_path, "stage", "c" * 64)
    recorded = json.loads((folder / MANIFEST).read_text())["files"]["data.txt"]
    (folder / "data.txt").write_text("aaab")
    os.utime(folder / "data.txt", ns=(recorded[1], recorded[1]))  # even with its old mtime put back
    assert not ref.is_complete() and existing_output(tmp_path, "stage", "c" * 64) is None
    assert "do not hash to the manifest" in caplog.text


def test_a_changed_file_is_hashed_even_above_the_hash_budget(tmp_path, monkeypatch):
    ref = build(tmp_path, "b" * 64, payload="aaaa")
    monkeypatch.setenv(outputs.HASH_BUDGET_ENV, "0")  # sizes only, unless a file's mtime changed
    assert ref.is_complete()
    (output_dir(tmp_path, "stage", "b" * 64) / "data.txt").write_text("aaab")  # same size, new mtime
    assert not ref.is_complete()


def test_missing_and_extra_files_are_damage(tmp_path):
    build(tmp_path, "x" * 64)
    folder = output_dir(tmp_path, "stage", "x" * 64)
    (folder / "stray.bin").write_bytes(b"1")
    assert outputs.check_output(folder) == "1 file(s) not in the manifest, e.g. stray.bin"
    (folder / "stray.bin").unlink()
    (folder / "data.txt").unlink()
    assert outputs.check_output(folder) == "1 file(s) of the manifest missing, e.g. data.txt"
    assert existing_output(tmp_path, "stage", "x" * 64) is None


@pytest.mark.parametrize("edit", [{"rows": 50}, {"drop_reasons": {"wrong_answer": 50}}, {"wall_seconds": 0.1}])
def test_a_hand_edited_manifest_is_damage_and_is_rebuilt(tmp_path, caplog, edit):
    """The files' sha256 does not cover the manifest's own figures, which reports and the cost ledger read (the
    ninth and tenth audits: edited curation and logit-cache counts reached the report); its own hash does."""
    ref = build(tmp_path, "m" * 64)
    manifest = output_dir(tmp_path, "stage", "m" * 64) / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **edit}, indent=2))
    assert not ref.is_complete() and existing_output(tmp_path, "stage", "m" * 64) is None
    assert f"its {MANIFEST} was changed after it was written" in caplog.text and "built again" in caplog.text
    again = build(tmp_path, "m" * 64)
    assert again.is_complete() and again.manifest()["rows"] == 1
    legacy = json.loads(manifest.read_text())  # an output made before manifests hashed themselves: trusted as before
    del legacy[outputs.SELF_SHA256]
    manifest.write_text(json.dumps({**legacy, "rows": 7}))
    assert again.is_complete()


def test_a_torn_manifest_is_rebuilt_not_a_json_error(tmp_path, caplog):
    build(tmp_path, "j" * 64)
    manifest = output_dir(tmp_path, "stage", "j" * 64) / MANIFEST
    manifest.write_text(manifest.read_text()[:40])  # torn mid-write (an old writer, a disk that lied)
    assert existing_output(tmp_path, "stage", "j" * 64) is None
    assert "torn" in caplog.text
    assert build(tmp_path, "j" * 64).is_complete()


def test_an_output_made_before_file_lists_is_verified_by_its_hash(tmp_path):
    ref = build(tmp_path, "o" * 64)
    manifest = output_dir(tmp_path, "stage", "o" * 64) / MANIFEST
    m = json.loads(manifest.read_text())
    del m["files"], m[outputs.SELF_SHA256]  # neither was recorded then
    manifest.write_text(json.dumps(m))
    assert ref.is_complete()  # reused as it is: run folders made before the change are not recomputed
    (output_dir(tmp_path, "stage", "o" * 64) / "data.txt").write_text("y")
    assert not ref.is_complete()


def test_files_and_folder_are_fsynced_before_the_manifest_and_the_rename(tmp_path, monkeypatch):
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ref = build(tmp_path, "s" * 64)
    names = [os.path.basename(p) for p in synced]
    data, manifest_part = names.index("data.txt"), next(i for i, n in enumerate(names) if n.startswith(".manifest"))
    assert data < manifest_part  # the data is on disk before a manifest can describe it
    assert names[-1] == "stage" and str(tmp_path / "stage") == synced[-1]  # the rename into place, last
    assert ref.is_complete()


# ---- locks that hold on NFS: a regular file opened for writing (issue 12, item 1) ---------------------------


def test_locks_are_taken_on_regular_files_opened_for_writing(tmp_path, monkeypatch):
    seen, real = [], fcntl.flock

    def flock(f, op):
        fd = f if isinstance(f, int) else f.fileno()
        seen.append((stat.S_ISREG(os.fstat(fd).st_mode), fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE))
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    build(tmp_path, "l" * 64)
    with outputs.exclusive(tmp_path, "stage", "l" * 64):
        pass
    assert len(seen) == 2 and all(regular and mode in (os.O_WRONLY, os.O_RDWR) for regular, mode in seen), seen


def _finish_in_process(run_dir, key, barrier, payload):
    barrier.wait()  # every process reaches the build together
    ref = build(run_dir, key, payload=payload)
    assert ref is not None and ref.is_complete()


def test_two_processes_finishing_the_same_key_leave_one_complete_output(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(10):
        key = f"p{round_}" * 32
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_finish_in_process, args=(tmp_path, key, barrier, "same")) for _ in range(4)]
        [p.start() for p in procs]
        [p.join(120) for p in procs]
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], f"round {round_}"
        ref = existing_output(tmp_path, "stage", key)
        assert (
            ref is not None and ref.is_complete() and outputs.check_output(output_dir(tmp_path, "stage", key)) is None
        )
    names = sorted(p.name for p in (tmp_path / "stage").iterdir() if p.name != ".lock")
    assert names == sorted(f"p{r}" * 8 for r in range(10))  # no temporaries or trash left behind
