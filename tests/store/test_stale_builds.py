"""Temporary build folders left by a killed process (no ``finally`` ran) are removed by the next build in their stage
folder; one a live process, another machine or an older kdflow is building is kept."""

import os
import subprocess
import sys

from kdflow.store.outputs import BUILDER, building, finish, remove_stale_builds


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_builds_folder_goes_and_the_others_stay(tmp_path):
    stage = tmp_path / "students"
    stage.mkdir()
    killed = stage / f".tmp-{'a' * 16}-{BUILDER}-{dead_pid()}-0000aaaa"
    live = stage / f".tmp-{'b' * 16}-{BUILDER}-{os.getpid()}-0000bbbb"
    elsewhere = stage / f".tmp-{'c' * 16}-otherhost-{dead_pid()}-0000cccc"
    older = stage / f".tmp-{'d' * 16}-0000dddd"  # named before the builder was in the name: cannot tell, kept
    for folder in (killed, live, elsewhere, older):
        folder.mkdir()
        (folder / "shard.parquet").write_bytes(b"x" * 100)

    assert remove_stale_builds(stage) == [killed]
    assert sorted(p.name for p in stage.iterdir()) == sorted(p.name for p in (live, elsewhere, older))


def test_a_build_sweeps_its_stage_folder_first_and_leaves_only_its_output(tmp_path):
    stage = tmp_path / "students"
    stage.mkdir()
    (stage / f".tmp-{'a' * 16}-{BUILDER}-{dead_pid()}-0000aaaa").mkdir()
    with building(tmp_path, "students", "e" * 64) as tmp:
        assert tmp.name.startswith(f".tmp-{'e' * 16}-{BUILDER}-{os.getpid()}-")
        finish(tmp, "students", "e" * 64, inputs={})
    assert [p.name for p in stage.iterdir() if not p.name.startswith(".lock")] == ["e" * 16]


def test_the_builder_tells_pid_namespaces_and_look_alike_hostnames_apart(monkeypatch):
    # The sixth audit: a build in another PID namespace (a container sharing the hostname) had its live folder removed,
    # its PID being dead here; and node-1, node.1 and node_1 all made one name.
    import socket

    from kdflow.store import outputs

    monkeypatch.setattr(os, "readlink", lambda path: "pid:[4026531836]")
    here = outputs._builder()
    monkeypatch.setattr(os, "readlink", lambda path: "pid:[4026532999]")
    assert outputs._builder() != here and "-" not in here
    names = set()
    for host in ("node-1", "node.1", "node_1"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        names.add(outputs._builder())
    assert len(names) == 3
