"""What every recipe kind's sections share: strict models, names that become file names, files a recipe may read
(confined to the project or the recipe's folder), and URLs shown without their password."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

ROOT = Path(__file__).resolve().parents[2]  # the project folder (kdflow/config/fields.py)


class Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


# Names that become a file or folder name (run, split and student names): one path component, never '.' or
# '..' (a leading dot is refused), never a separator, so that nothing a recipe names is written outside its run
# folder.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SAFE_NAME_FIX = "use letters, digits, '.', '_' or '-' only, starting with a letter or digit"


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


def _confined(path: str, info: ValidationInfo | None, what: str = "template") -> str:
    """A file a recipe names, read into prompts, cache keys and manifests: it must lie in the project folder
    (paths are relative to it) or the recipe's own folder, so that a recipe cannot read /etc/passwd or ~/.ssh."""
    file = (ROOT / path).resolve()
    folders = [ROOT]
    if info is not None and info.context and info.context.get("recipe_dir"):
        folders.append(Path(info.context["recipe_dir"]).resolve())
    if not any(file.is_relative_to(f) for f in folders):
        raise ValueError(f"{what} {path!r} is outside the project folder ({ROOT})"
                         + (f" and the recipe's folder ({folders[1]})" if len(folders) > 1 else "")
                         + ": copy it under prompts/ and point at it there")
    return path


def read_template(path: str | None) -> str | None:
    return None if path is None else (ROOT / path).read_text()


def check_template(path: str | None, info: ValidationInfo | None = None) -> str | None:
    if path is not None and not (ROOT / _confined(path, info)).is_file():
        raise ValueError(f"no template at {ROOT / path}: point it at a file under prompts/")
    return path


def _template_field(path: str, info: ValidationInfo) -> str:
    return check_template(path, info)  # both parameters required: pydantic passes ``info`` only then


# A prompt template's path: it must be a file in the project folder or the recipe's own.
Template = Annotated[str, AfterValidator(_template_field)]
