"""The one YAML loader every recipe kind goes through (distillation, classic, self-instruct, sweep).

A bad file fails before any work with ``RecipeError``, one ``file:line: field: fix`` line per problem: the line
comes from the YAML's own nodes, so that the message points at the setting to change.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError


class RecipeError(ValueError):
    pass


# YAML reads `.inf`, `-.inf` and `.nan` as floats; no recipe setting means them (a learning rate of inf trains NaN).
NOT_FINITE = "{value!r} is not a finite number: write a number (YAML reads .inf and .nan as infinity and not-a-number)"


# YAML 1.1 reads a number in e-notation as a float only with a dot and a signed exponent (3.0e-4); `3e-4` and `1e3`
# stay text, which a float or whole-number field then refuses.
E_NOTATION = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def e_notation_hint(value, whole: bool) -> str | None:
    """What to write instead of ``value`` when it is e-notation text (None otherwise): for a whole-number field
    (``whole``) that number written out (1e3: 1000), else the number with a dot. One past the float range (1e400),
    which reads as inf, is out of range: a dot would make it inf, which no setting takes. One below it (1e-400),
    which reads as 0, is out of range too: a dot would make it 0, another number than the one written."""
    if not isinstance(value, str) or not E_NOTATION.fullmatch(value.strip()):
        return None
    number = Decimal(value.strip())
    if not math.isfinite(float(number)):
        return (
            f"YAML reads {value} as text, and as a number it is out of range, past the largest float (1.8e308): "
            "write a smaller number"
        )
    if number != 0 and float(number) == 0:
        return (
            f"YAML reads {value} as text, and as a number it is out of range, below the smallest float (4.9e-324): "
            f"write a larger {'whole ' if whole else ''}number, or 0 if 0 is meant"
        )
    if not whole:
        return f"YAML reads {value} as text: write it with a dot, e.g. {_dotted(float(number))}"
    if number == number.to_integral_value():
        return f"YAML reads {value} as text: write it as a whole number, {int(number)}"
    # float() may round a fraction to a whole number (1.00000000000000001e0 -> 1.0): then name it as written
    shown = f"{float(number):g}" if not float(number).is_integer() else value.strip()
    return f"YAML reads {value} as text, and {shown} is not a whole number: write a whole number"


def _dotted(number: float) -> str:
    """``number`` in e-notation with a dot, which YAML reads as a float, with as few digits as give the same float
    back: a fixed one digit after the dot turned 1.234e-5 into another learning rate, 1.2e-05."""
    for digits in range(1, 17):
        text = f"{number:.{digits}e}"
        if float(text) == number:
            return text
    return f"{number:.17e}"


class FieldError(ValueError):
    """A validator's error about one entry inside its field (a split name, a training key): ``loc`` is the path
    from the field down to it, so that the message names that entry and its own line."""

    def __init__(self, message: str, *loc: str | int):
        super().__init__(message)
        self.loc = loc


def _line_of(node, loc: tuple) -> int | None:
    """The 1-based YAML line of the field at ``loc`` (or of its closest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == part]
            if not match:
                return line
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def read_recipe_text(path: Path) -> str:
    """A recipe file's text; a byte that is not UTF-8 is a ``RecipeError`` naming the file, line and offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}:{line}: byte 0x{data[e.start]:02x} at offset {e.start} is not UTF-8 ({e.reason}); "
            "save the file as UTF-8"
        ) from None


def read_recipe_file(path: str | Path, kind: str = "recipe") -> str:
    """The text of the ``kind`` file at ``path``; a missing file is a ``RecipeError`` saying so."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path}: a folder, not a {kind} file: name the YAML file in it")
    if not path.is_file():
        raise RecipeError(f"{path}: no such {kind} file")
    return read_recipe_text(path)


def _duplicate_key(node, path: tuple = (), seen_nodes: set | None = None) -> tuple[str, int, int] | None:
    """(field, line, first line) of the first key that a mapping repeats: PyYAML silently keeps the last value.
    An aliased node (``*name``) is the anchored node itself, so each node is looked at once: walking every alias
    anew took exponential time on nested aliases (ten lists of ten aliases of the list before, eight deep)."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return None
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding merged keys is what it is for
                continue
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in seen:
                return ".".join(map(str, (*path, name))), key.start_mark.line + 1, seen[name]
            seen[name] = key.start_mark.line + 1
            if found := _duplicate_key(value, (*path, name), seen_nodes):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            if found := _duplicate_key(item, (*path, i), seen_nodes):
                return found
    return None


def load_yaml(
    text: str, source: str, what: str = "a recipe is a YAML mapping with sections run, data, teacher, ..."
) -> dict:
    """The YAML mapping of a recipe of any kind; invalid YAML, a repeated key or a non-mapping is a ``RecipeError``."""
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    if duplicate:
        field, line, first = duplicate
        raise RecipeError(
            f"{source}:{line}: {field}: set twice (first at line {first}); YAML would silently keep "
            "the last value: remove one of them"
        )
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {what}")
    return raw


Schema = TypeVar("Schema", bound=BaseModel)


def parse_yaml(
    schema: type[Schema],
    text: str,
    source: str,
    what: str,
    *,
    kind: str = "recipe",
    context: dict | None = None,
    skip: frozenset[str] = frozenset(),
) -> Schema:
    """``text`` validated as ``schema``. ``what``: the file's expected shape, said when it is not a mapping;
    ``context``: pydantic's validation context (e.g. the recipe's folder); ``skip``: as in ``validation_problems``."""
    raw = load_yaml(text, source, what)
    try:
        return schema.model_validate(raw, context=context)
    except ValidationError as e:
        raise RecipeError(f"invalid {kind}\n  " + "\n  ".join(validation_problems(e, text, source, skip))) from None


def _field_path(loc: tuple, skip: frozenset[str]) -> tuple:
    """``loc`` without validator names and union tags. A tag is dropped only where no tag was dropped just before:
    a union is never a direct member of another here, so ``kd.feature.feature`` (the tag ``feature``, then the
    feature method's own ``feature`` field) keeps its field."""
    out, after_tag = [], False
    for part in loc:
        if isinstance(part, str) and part.startswith("function-"):
            continue
        if isinstance(part, str) and part in skip and not after_tag:
            after_tag = True
            continue
        out.append(part)
        after_tag = False
    return tuple(out)


def validation_problems(
    error: ValidationError, text: str, source: str, skip: frozenset[str] = frozenset()
) -> list[str]:
    """One ``file:line: field: fix`` line per pydantic error. ``skip``: location parts that are not YAML keys
    (the tags of a discriminated union), left out of the field name and the line lookup."""
    root = yaml.compose(text)
    problems = []
    for err in error.errors():
        loc = _field_path(err["loc"], skip)
        if isinstance(cause := (err.get("ctx") or {}).get("error"), FieldError):
            loc += cause.loc  # the entry inside the field: its own name and line
        field = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required field is missing; add it"
        elif err["type"] == "finite_number":
            hint = e_notation_hint(err["input"], whole=False)  # 1e400 is text that reads as inf
            msg = NOT_FINITE.format(value=err["input"]) if hint is None else f"{err['input']!r}: {hint}"
        elif err["type"] == "int_parsing" and (hint := e_notation_hint(err["input"], whole=True)):
            msg += f" ({hint})"
        elif err["type"] == "string_type" and isinstance(err["input"], bool):
            msg += f"; YAML reads an unquoted yes/no/on/off/true/false as the boolean {err['input']}: quote the value"
        elif err["type"] == "string_type" and err["input"] is None:
            msg += "; YAML reads an unquoted ~ or null as nothing: quote it ('~'), or write the value meant"
        elif err["type"] == "string_type" and isinstance(err["input"], (int, float)):
            msg += f"; YAML reads an unquoted {err['input']!r} as a number: quote it ('{err['input']}')"
        problems.append(f"{source}:{_line_of(root, loc)}: {field}: {msg}")
    return problems
