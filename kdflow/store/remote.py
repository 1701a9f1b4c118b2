"""Run folders on any fsspec file system (s3://, gs://, az://, file://, memory://…).

Stages compute in a local staging folder — models, parquet files and checkpoints need local paths — and each
finished output is uploaded to the run's URL, ``<url>/<stage>/<key>/``, with its ``manifest.json`` last: a
remote output without a manifest is incomplete, exactly as a local one is. A stage looks for its output
remotely before computing it and downloads it into the staging folder when it is there (kdflow/store/outputs.py).

A staging folder is bound to its run's URL by a small file in it (``.remote.json``, written by ``bind`` when
the recipe's run folder is resolved), so that code that only gets the local run folder — every stage task —
knows where to upload, in any process on that machine.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import uuid
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from kdflow.store.self_hash import edited

MANIFEST = "manifest.json"  # as kdflow/store/outputs.py (which imports this module)
BINDING = ".remote.json"


def is_url(root: str) -> bool:
    return "://" in root


def check_url(url: str) -> None:
    """Raise with the fix when fsspec cannot open ``url`` (an unknown scheme, or its package not installed)."""
    protocol = url.split("://", 1)[0]
    if protocol not in fsspec.available_protocols():
        raise ValueError(
            f"unknown file system {protocol!r} in {url!r}: use a local folder or an fsspec URL "
            "(s3://, gs://, az://, file://, memory://)"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:  # fsspec's message names the package, e.g. "Install s3fs to access S3"
        raise ValueError(f"{url}: {e} (pip install it next to kdflow)") from None


def push(local_dir: Path, url: str) -> None:
    """Upload the finished output ``local_dir`` to ``url``, its manifest last.

    A complete copy of the same content already there (the same manifest sha256, the same files and sizes) is left
    as it is: a second machine that built the same output does not take a good copy away. Otherwise the files go
    first to a hidden folder beside it (``.upload-<name>-<id>``) and are moved into place only once all are up:
    deleting first, as this did, left no complete copy for the whole upload, and a pull in that time failed.
    Moves within a store are server-side copies, so what remains is a short swap without a manifest."""
    fs, root = url_to_fs(url.rstrip("/"))
    local_dir = Path(local_dir)
    files = [p.relative_to(local_dir).as_posix() for p in sorted(local_dir.rglob("*")) if p.is_file()]
    if _same_copy(fs, root, local_dir, files):
        return
    data = [rel for rel in files if rel != MANIFEST]
    staging = f"{posixpath.dirname(root)}/.upload-{posixpath.basename(root)}-{uuid.uuid4().hex[:8]}"
    try:
        _put(fs, local_dir, data, staging)
        if fs.exists(f"{root}/{MANIFEST}"):
            fs.rm_file(f"{root}/{MANIFEST}")  # incomplete from here on, until the new manifest lands
        if fs.exists(root):
            fs.rm(root, recursive=True)
        _makedirs(fs, root, files)
        for rel in data:
            fs.mv(f"{staging}/{rel}", f"{root}/{rel}")
        fs.put_file(str(local_dir / MANIFEST), f"{root}/{MANIFEST}")
    finally:
        if fs.exists(staging):  # a push cut short leaves no half upload behind (unless the process itself dies)
            fs.rm(staging, recursive=True)


def _same_copy(fs, root: str, local_dir: Path, files: list[str]) -> bool:
    """``root`` holds a complete copy of ``local_dir``: its manifest's sha256 (over every file's name and bytes but
    the manifest's) is ours, and its files have our sizes (a cheap check that catches a truncated or replaced
    file; a pull verifies the bytes)."""
    try:
        there = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except (FileNotFoundError, ValueError):
        return False
    ours = json.loads((local_dir / MANIFEST).read_text())
    if not isinstance(there, dict) or there.get("sha256") != ours.get("sha256"):
        return False
    if edited(there):
        return False  # its manifest edited after it was written: pushed again over it
    sizes = {path[len(root) :].lstrip("/"): info["size"] for path, info in fs.find(root, detail=True).items()}
    sizes.pop(MANIFEST, None)  # its timings differ between two builds of the same content
    return sizes == {rel: (local_dir / rel).stat().st_size for rel in files if rel != MANIFEST}


def _makedirs(fs, root: str, files: list[str]) -> None:
    for folder in sorted({posixpath.dirname(f"{root}/{rel}") for rel in files}):
        fs.makedirs(folder, exist_ok=True)  # a local or mounted file system needs them; object stores ignore it


def _put(fs, local_dir: Path, files: list[str], root: str) -> None:
    _makedirs(fs, root, files)
    for rel in files:
        fs.put_file(str(local_dir / rel), f"{root}/{rel}")


class UnsafeKey(ValueError):
    """A remote key or file name that would be written outside the folder it belongs in."""


def inside(local_dir: Path, rel: str, source: str) -> Path:
    """``local_dir / rel``, refused when ``rel`` is absolute or climbs out with '..' (an object store's keys
    may hold any bytes: a key named ``out/../../x`` must not write beside the staging folder)."""
    local_dir = Path(local_dir).resolve()
    target = (local_dir / rel).resolve()
    if not rel or posixpath.isabs(rel) or not target.is_relative_to(local_dir) or target == local_dir:
        raise UnsafeKey(
            f"{source}: the file name {rel!r} would be written outside {local_dir}; remove that object "
            "from the remote run folder (kdflow never writes such names)"
        )
    return target


def pull(url: str, local_dir: Path) -> None:
    """Download the complete output at ``url`` into ``local_dir``, its manifest last. Every name is checked
    before anything is downloaded: a remote output with a key outside it is refused whole."""
    fs, root = url_to_fs(url.rstrip("/"))
    if not fs.isfile(f"{root}/{MANIFEST}"):
        raise FileNotFoundError(f"{url} has no {MANIFEST}: not a finished output (an upload cut short?)")
    local_dir = Path(local_dir)
    files = {path: path[len(root) :].lstrip("/") for path in sorted(fs.find(root))}
    targets = {path: inside(local_dir, rel, url) for path, rel in files.items() if rel != MANIFEST}
    for path, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
    fs.get_file(f"{root}/{MANIFEST}", str(local_dir / MANIFEST))


def exists_complete(url: str) -> bool:
    """A finished output is at ``url`` (its manifest is there)."""
    fs, root = url_to_fs(url.rstrip("/"))
    return fs.isfile(f"{root}/{MANIFEST}")


OUTPUT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # key[:16] in kdflow; never '..' or a hidden name


def complete_outputs(stage_url: str) -> list[str]:
    """The folder names of the finished outputs under a stage's URL (names kdflow could not have written, such
    as '..', are left out with a warning: they become local folder names)."""
    fs, root = url_to_fs(stage_url.rstrip("/"))
    names = sorted(path[len(root) :].strip("/").split("/")[0] for path in fs.glob(f"{root}/*/{MANIFEST}"))
    for bad in [n for n in names if not OUTPUT_NAME.fullmatch(n)]:
        logging.getLogger(__name__).warning(f"{stage_url}/{bad}: not an output folder name kdflow writes; ignored")
    return [n for n in names if OUTPUT_NAME.fullmatch(n)]


def push_files(local_dir: Path, names: list[str], url: str) -> None:
    """Upload single files of a run folder (its report) to the run's URL."""
    fs, root = url_to_fs(url.rstrip("/"))
    for name in names:  # a name like ../x would also land outside the run's URL
        inside(local_dir, name, str(local_dir))
    fs.makedirs(root, exist_ok=True)
    for name in names:
        fs.put_file(str(Path(local_dir) / name), f"{root}/{name}")


def bind(local_dir: Path, url: str) -> Path:
    """Make ``local_dir`` the staging folder of the run at ``url``; refuses one already staging another run."""
    local_dir = Path(local_dir)
    bound = bound_url(local_dir)
    if bound is None:
        local_dir.mkdir(parents=True, exist_ok=True)
        part = local_dir / f"{BINDING}.{os.getpid()}.part"
        part.write_text(json.dumps({"url": url}))
        os.replace(part, local_dir / BINDING)
    elif bound != url:
        raise ValueError(
            f"{local_dir} is the staging folder of {bound}, not of {url}: set run.staging to another "
            "folder (or run.name to another name)"
        )
    return local_dir


def bound_url(run_dir: Path) -> str | None:
    """The URL of the run whose staging folder ``run_dir`` is; None for a plain local run folder."""
    binding = Path(run_dir) / BINDING
    return json.loads(binding.read_text())["url"] if binding.is_file() else None
