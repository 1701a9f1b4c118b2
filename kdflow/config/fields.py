"""What every recipe kind's sections share: strict models, names that become file names, where a recipe's relative
paths point (``PATH_RULE``), files a recipe may read (confined to the project or the recipe's folder), and URLs shown
without their password."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

ROOT = Path(__file__).resolve().parents[2]  # the project folder (kdflow/config/fields.py)

# Where a recipe's relative paths (run.root, run.staging, templates, data.path, seeds.path, accelerate configs, a
# sweep's recipe) point: a recipe copied out of the project writes beside itself, not into the checkout's runs/.
PATH_RULE = (
    "relative paths in a recipe inside the project (recipes/, tests/) resolve against the project folder; in "
    "a recipe outside it, against the recipe's own folder, except that a file it reads (a template, data, "
    "seeds, an accelerate config) found there only is read from the project folder"
)


def recipe_base(folder: Path | None) -> Path:
    """The folder the relative paths of a recipe in ``folder`` resolve against (``PATH_RULE``)."""
    if folder is None:
        return ROOT
    folder = Path(folder).resolve()
    return ROOT if folder.is_relative_to(ROOT) else folder


def recipe_context(folder: Path | None) -> dict:
    """Pydantic's validation context for a recipe file in ``folder``: its folder, and where its paths point."""
    return {"recipe_dir": folder, "base": recipe_base(folder)}


def resolve(path: str | None, info: ValidationInfo | None, reads: bool = True) -> str | None:
    """``path`` as ``PATH_RULE`` says. Left as written (relative to the project folder, where it is read as
    ``ROOT / path``) for a recipe inside the project, so that the shipped recipes' sections, and the cache keys made
    of them, stay what they were; and for a file a recipe outside it ``reads`` that only the project has (a copied
    recipe's ``prompts/cot.jinja``). Otherwise absolute, under the recipe's folder."""
    base = info.context.get("base") if info is not None and info.context else None
    if path is None or base is None or Path(base) == ROOT or "://" in path or Path(path).is_absolute():
        return path
    beside = Path(os.path.normpath(Path(base) / path))
    return path if reads and not beside.exists() and (ROOT / path).exists() else str(beside)


def _resolved(path: str | None, info: ValidationInfo) -> str | None:
    return resolve(path, info)  # both parameters required: pydantic passes ``info`` only then


# A path to something a recipe reads (a folder or a file, checked where it is read), resolved by ``PATH_RULE``.
RecipePath = Annotated[str, AfterValidator(_resolved)]


class Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting. allow_inf_nan=False: YAML reads
    # `.inf` and `.nan` as floats, and a learning rate or temperature of inf trained to NaN weights without a word.
    # (The free `training:` dicts are checked in kdflow.config.training.check_training_values.)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Names that become a file or folder name (run, split and student names): one path component, never '.' or
# '..' (a leading dot is refused), never a separator, so that nothing a recipe names is written outside its run
# folder.
# At most MAX_NAME characters: a 300-character name passed the recipe and failed later as a folder name (255 bytes
# at most on common file systems, less once a stage adds its suffixes).
MAX_NAME = 100
SAFE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")
SAFE_NAME_FIX = (
    f"use letters, digits, '.', '_' or '-' only, starting with a letter or digit, at most {MAX_NAME} characters"
)
# Sizes beyond any real run, refused at load instead of failing (or filling memory) stages later: rows of one data
# split, tokens one answer may take (2^20: more than any model's context), answers sampled per prompt.
MAX_ROWS = 10_000_000
MAX_NEW_TOKENS = 1 << 20
MAX_SAMPLES = 1000


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r}: {SAFE_NAME_FIX} (it becomes a file or folder name)")
    return name


SafeName = Annotated[str, AfterValidator(check_name)]


def redact_url(url: str | None) -> str | None:
    """``url`` with any ``user:password@`` replaced by ``***@``: what manifests, cache keys and messages show."""
    if not url or "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _confined(path: str, resolved: str, info: ValidationInfo | None, what: str = "template") -> str:
    """A file a recipe names (``path``, found at ``resolved``), read into prompts, cache keys and manifests: it must lie
    in the project folder or the recipe's own folder, so that a recipe cannot read /etc/passwd or ~/.ssh."""
    file = (ROOT / resolved).resolve()
    folders = [ROOT]
    if info is not None and info.context and info.context.get("recipe_dir"):
        folders.append(Path(info.context["recipe_dir"]).resolve())
    if not any(file.is_relative_to(f) for f in folders):
        raise ValueError(
            f"{what} {path!r} is outside the project folder ({ROOT})"
            + (f" and the recipe's folder ({folders[1]})" if len(folders) > 1 else "")
            + ": copy it under prompts/ and point at it there"
        )
    return resolved


def read_template(path: str | None) -> str | None:
    return None if path is None else (ROOT / path).read_text()


def check_template(path: str | None, info: ValidationInfo | None = None) -> str | None:
    if path is None:
        return None
    file = _confined(path, resolve(path, info), info)
    if not (ROOT / file).is_file():
        raise ValueError(
            f"no template at {ROOT / file} ({PATH_RULE}): point it at a file under prompts/ or beside the recipe"
        )
    return file


def _template_field(path: str, info: ValidationInfo) -> str:
    return check_template(path, info)  # both parameters required: pydantic passes ``info`` only then


# A prompt template's path: it must be a file in the project folder or the recipe's own.
Template = Annotated[str, AfterValidator(_template_field)]
