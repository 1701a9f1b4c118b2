"""The stage contract: every stage writes one folder, atomically, with ``manifest.json`` written last.

``runs/<run>/<stage>/<key>/`` holds a stage's output; ``key`` comes from the content the stage was made
from (see ``content_key``), so two different inputs never share a folder and the same inputs always map to
the same one. A folder is built under a temporary name and renamed into place only after its manifest is
written: no manifest, no output. Stages pass each other small ``OutputRef``s, never the data itself.

A run folder on remote storage (``run.root: s3://…``, kdflow/store/remote.py) is wired in here, where every stage looks
up and finishes its output, rather than in each flow: every stage, and every stage flow rerun alone, gets it at
once with no flow or task changed. ``existing_output`` downloads an output that only the remote has, and
``building`` uploads each finished one (manifest last).

A finished output is checked against its manifest every time it is reused (``check_output``): the manifest
lists every file with its size and modification time, so a truncated, replaced or missing file is caught by a
``stat`` of each file; the whole folder is hashed again when it is small enough to afford it (under
``KDFLOW_VERIFY_HASH_MAX_BYTES``, 2 GiB by default: ~1.5 s at this machine's 1.4 GB/s sha256) or when any
file's modification time changed. A damaged output, or one with a torn manifest, is set aside and built again.

Locks are taken on regular files opened for writing (``.lock`` and ``.lock-<key>`` in the stage folder), which
is what an exclusive lock needs on NFS (Linux emulates ``flock`` there with POSIX byte-range locks, which the
server arbitrates between machines); a lock per path in this process as well, since POSIX locks do not exclude
two threads of one process from each other.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from kdflow.store import remote
from kdflow.store.self_hash import SELF_SHA256, edited, manifest_sha256

MANIFEST = "manifest.json"
# Test hook for failure-and-rerun tests (tests/flows/test_rerun.py): KDFLOW_FAIL_STAGE=<stage folder name> makes that
# stage fail as it starts building its output. Unset in normal use.
FAIL_STAGE_ENV = "KDFLOW_FAIL_STAGE"
# How a reused output is checked: "full" (the default: sizes always, the content hash when affordable or when a
# file changed) or "off" (only that the manifest is there: the benchmark's reference, benchmarks/verify_outputs.py).
VERIFY_ENV = "KDFLOW_VERIFY_OUTPUTS"
HASH_BUDGET_ENV = "KDFLOW_VERIFY_HASH_MAX_BYTES"
HASH_BUDGET_BYTES = 2 << 30
log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised where KDFLOW_FAIL_STAGE names the stage being built."""


class OutputRef(BaseModel):
    """A small, content-addressed pointer to a finished stage output."""

    stage: str
    key: str
    path: str
    sha256: str
    rows: int | None = None

    def is_complete(self) -> bool:
        """The folder still exists, its manifest is there, and it is the content this ref was made from."""
        manifest, problem = verified_manifest(Path(self.path))
        return problem is None and manifest["sha256"] == self.sha256

    def manifest(self) -> dict:
        return json.loads((Path(self.path) / MANIFEST).read_text())


def canonical(value):
    """A JSON-able view of a key input: refs by content hash, pydantic models by their fields."""
    if isinstance(value, OutputRef):
        return {"ref": value.stage, "sha256": value.sha256}
    if isinstance(value, BaseModel):
        # Settings left at their defaults are left out, so that a new option added to a section (at a default
        # that keeps the old behaviour) does not change every existing output's key and redo finished work.
        exclude = getattr(value, "__throughput_fields__", set())
        dump = value.model_dump(mode="json", exclude_defaults=True, exclude=exclude)
        # A nested section set only in its throughput knobs (`vllm: {kv_cache_gib: 4}`) dumps as {}: the same
        # content as leaving it out, so the same key.
        nested = exclude.items() if isinstance(exclude, dict) else ()
        emptied = [k for k, sub in nested if isinstance(sub, (set, dict)) and dump.get(k) == {}]
        # A nested section's own knobs (a student's kd: {base_url, concurrency}) are left out too; its emptied
        # dump stays (kd: {} is offline KD at its defaults, not the same as no kd).
        for name, sub in value:
            own = getattr(sub, "__throughput_fields__", None)
            if isinstance(own, set) and isinstance(dump.get(name), dict):
                dump[name] = {k: v for k, v in dump[name].items() if k not in own}
        return canonical({k: v for k, v in dump.items() if k not in emptied})
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        raise TypeError(f"paths are not content; pass the file's text or a ref instead of {value}")
    return value


def content_key(stage: str, version: str, inputs: dict) -> str:
    """sha256 of (stage, code version, inputs by content)."""
    payload = json.dumps({"stage": stage, "version": version, "inputs": canonical(inputs)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """One file's sha256, read in 1 MiB blocks (data files, GGUF files and wheels, logit-cache shards)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_folder(path: Path) -> str:
    """sha256 over every file's relative name and bytes, in a fixed order (the manifest excluded)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def output_dir(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / stage / key[:16]


def existing_output(run_dir: Path, stage: str, key: str) -> OutputRef | None:
    """The ref of a complete, undamaged output for this key, or None (missing, no manifest: incomplete).

    An output that no longer matches its manifest (a file truncated, changed or deleted; a torn manifest) is
    set aside, with a warning naming what is wrong, so that the stage builds it again under the same name."""
    final = output_dir(run_dir, stage, key)
    sync(run_dir, stage, final.name)
    if not (final / MANIFEST).is_file():
        return None
    m, problem = verified_manifest(final)
    if problem is not None:
        _set_aside_if_damaged(final, problem)
        return None
    return OutputRef(stage=stage, key=key, path=str(final.resolve()), sha256=m["sha256"], rows=m.get("rows"))


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder``; None when it is missing or unreadable (torn by a crash, damaged)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_bytes())
    except (OSError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("sha256"), str) else None


# Folders verified by hash in this process, by the stat signature they had then: a cache hit checked by the
# cache policy and again by the task body hashes once. Any change of size, mtime, ctime or inode makes a new one.
_verified: dict[str, tuple] = {}


def verified_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(the manifest of the finished output in ``folder``, why the folder does not match it or None when it does)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None, f"{MANIFEST} is missing, torn or not a manifest"
    if os.environ.get(VERIFY_ENV, "full") == "off":
        return manifest, None
    if edited(manifest):
        return manifest, f"its {MANIFEST} was changed after it was written (its fields no longer hash to {SELF_SHA256})"
    stats = {str(f.relative_to(folder)): f.stat() for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST}
    recorded = manifest.get("files")  # {name: [size, mtime_ns]}; absent in outputs made before it was recorded
    if recorded is not None:
        if missing := sorted(set(recorded) - set(stats)):
            return manifest, f"{len(missing)} file(s) of the manifest missing, e.g. {missing[0]}"
        if extra := sorted(set(stats) - set(recorded)):
            return manifest, f"{len(extra)} file(s) not in the manifest, e.g. {extra[0]}"
        for name, (size, _) in recorded.items():
            if stats[name].st_size != size:
                return manifest, f"{name} has {stats[name].st_size} bytes, the manifest says {size}"
    # ctime too: a write changes it even when the old mtime is put back, and nobody can set it.
    signature = (
        manifest["sha256"],
        tuple(sorted((n, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for n, st in stats.items())),
    )
    if _verified.get(str(folder)) == signature:
        return manifest, None
    changed = recorded is None or any(stats[n].st_mtime_ns != mtime for n, (_, mtime) in recorded.items())
    budget = int(os.environ.get(HASH_BUDGET_ENV, HASH_BUDGET_BYTES))
    if changed or sum(st.st_size for st in stats.values()) <= budget:
        if hash_folder(folder) != manifest["sha256"]:
            return manifest, "its files do not hash to the manifest's sha256 (changed after it was written)"
        _verified[str(folder)] = signature
    return manifest, None


def check_output(folder: Path) -> str | None:
    """Why the finished output in ``folder`` does not match its manifest, or None when it does."""
    return verified_manifest(folder)[1]


def _set_aside_if_damaged(final: Path, problem: str) -> None:
    with _locked(final.parent / ".lock"):
        if check_output(final) is None:  # replaced by a concurrent run's good output meanwhile
            return
        log.warning(f"{final}: {problem}; not reused, set aside and built again")
        _trash(final)


# Who builds a temporary folder is in its name (.tmp-<key>-<builder>-<pid>-<random>), so that a later build can tell a
# folder left by a killed process (SIGKILL, a lost machine: no ``finally`` ran) from one still being built. The builder
# is this machine and PID namespace (a container's PIDs are not its host's, nor another container's, even where the
# hostname is shared), hashed: hostnames like node-1 and node.1 stay apart, and the name holds no "-".
def _builder() -> str:
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # no /proc (not Linux): the hostname alone
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:12]


BUILDER = _builder()


def remove_stale_builds(stage_dir: Path) -> list[Path]:
    """Remove the temporary folders in ``stage_dir`` whose builder was a process of this machine that is gone; keep
    any other (a live process's, another machine's, or a name without its builder). Returns what was removed."""
    removed = []
    for tmp in Path(stage_dir).glob(".tmp-*"):
        parts = tmp.name.split("-")  # .tmp, key, builder, pid, random: none holds a "-"
        if len(parts) != 5 or parts[2] != BUILDER or not parts[3].isdigit() or _alive(int(parts[3])):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        log.warning(f"removed {len(removed)} temporary folder(s) left in {stage_dir} by killed builds")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextmanager
def building(run_dir: Path, stage: str, key: str):
    """Yield a temporary folder to build the output in; on success it is renamed into place.

    Use ``finish(tmp, ...)`` inside the block to write the manifest. On an exception the temporary
    folder is removed and nothing is left under the final name.
    """
    if os.environ.get(FAIL_STAGE_ENV) == stage:
        raise InjectedFailure(f"{FAIL_STAGE_ENV}={stage}: injected failure (a test hook; unset it to run the stage)")
    final = output_dir(run_dir, stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(final.parent)
    tmp = final.parent / f".tmp-{key[:16]}-{BUILDER}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError(f"stage {stage!r} built {tmp} without calling finish(): no manifest, not complete")
        _move_into_place(tmp, final)
        if url := remote_url(run_dir, stage, final.name):
            remote.push(final, url)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remote_url(run_dir: Path, stage: str, name: str) -> str | None:
    """Where the output folder ``name`` of a run folder on remote storage goes; None for a local run folder."""
    url = remote.bound_url(run_dir)
    return None if url is None else f"{url}/{stage}/{name}"


def sync(run_dir: Path, stage: str, name: str) -> None:
    """For a run folder on remote storage: download the output folder ``name`` when only the remote has it, and
    upload it when only this machine has it (its upload was cut short). A plain local run folder: nothing."""
    url = remote_url(run_dir, stage, name)
    if url is None:
        return
    final = Path(run_dir) / stage / name
    if (final / MANIFEST).is_file():
        if not remote.exists_complete(url):
            remote.push(final, url)
    elif remote.exists_complete(url):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".pull-{name}-{uuid.uuid4().hex[:8]}"
        try:
            remote.pull(url, tmp)
            # Verified before it is trusted: a damaged copy, or one replaced while it was read, is not taken; the
            # stage builds the output again and its upload replaces the remote copy.
            if hash_folder(tmp) == json.loads((tmp / MANIFEST).read_text())["sha256"]:
                _move_into_place(tmp, final)
            else:
                logging.getLogger(__name__).warning(f"{url}: files do not match its manifest; not used")
        except FileNotFoundError as e:  # swapped by another machine's push while it was read: as if not there
            logging.getLogger(__name__).warning(f"{url}: changed while it was downloaded ({e}); not used")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def exclusive(run_dir: Path, stage: str, key: str):
    """Hold the lock of one stage output while it is built: a second run of the same content (another flow
    run, another worker) waits here, then finds the output finished, instead of training beside the first
    and sharing its resumable work folder. The lock file (``.lock-<key>``, empty) stays; the kernel drops
    the lock when the holder exits, also on a crash or a kill."""
    folder = Path(run_dir) / stage
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f".lock-{key[:16]}"):
        yield


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextmanager
def _locked(path: Path):
    """An exclusive lock on the regular file ``path`` (created empty, kept), between threads and processes.

    The file is opened for writing: on NFS an exclusive lock on a file opened read-only (or on a directory) is
    refused or not shared between machines. The in-process lock comes first because NFS's POSIX-lock emulation
    of ``flock`` is per process: two threads of one process would both get it."""
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(str(Path(path).resolve()), threading.Lock())
    with thread_lock, open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _trash(folder: Path) -> None:
    trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _move_into_place(tmp: Path, final: Path) -> None:
    # Concurrent builds of the same key (two flow runs, two workers) serialise here: without the lock one
    # run could take a folder another run had just completed for a stale one and set it aside.
    with _locked(final.parent / ".lock"):
        if (final / MANIFEST).is_file() and check_output(final) is None:
            return  # a concurrent run finished the same content first; keep theirs, drop ours
        if final.exists():  # incomplete (no manifest) or damaged: never trusted, set aside and removed
            _trash(final)
        os.rename(tmp, final)
        _fsync_dir(final.parent)  # the rename itself survives a power cut


def finish(tmp: Path, stage: str, key: str, *, inputs: dict, rows: int | None = None, **extra) -> None:
    """Write the manifest (last): what the output was made from, its content hash, every file's size and
    modification time (checked on every reuse), counts and extras. Files and folder are fsynced first, so a
    manifest never survives a power cut that the files it describes did not."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
    for file in files:
        _fsync_file(file)
    manifest = {
        "stage": stage,
        "key": key,
        "sha256": hash_folder(tmp),
        "rows": rows,
        "inputs": canonical(inputs),
        "files": {str(f.relative_to(tmp)): [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # the same instant to the nanosecond: whether an output was made before or after a flow run started (the
        # cost ledger) must not hang on a one-second tie between the last output of one run and the next run's start
        "created_ns": time.time_ns(),
        "versions": _versions(),
        **extra,
    }
    manifest[SELF_SHA256] = manifest_sha256(json.loads(json.dumps(manifest, default=str)))
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
    for folder in {f.parent for f in files} | {tmp}:
        _fsync_dir(folder)


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``path`` whole or not at all: a temporary name in the same folder (one per writer: concurrent runs
    of a recipe write the same report), fsynced, renamed over it."""
    path = Path(path)
    part = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    with open(part, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and FUSE mounts) refuse fsync on a directory; the rename still stands
        pass
    finally:
        os.close(fd)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "datasets", "prefect"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
