"""Writes reference/recipe.md from the recipe models themselves (kdflow/config/): every section, key, type, default
and the field's own description, so the reference cannot drift from what a recipe accepts. Run by mkdocs-gen-files
at build time; importing kdflow.config imports neither torch nor Prefect."""

from __future__ import annotations

import enum
import importlib
import inspect
import pkgutil
import re
import types
import typing

import mkdocs_gen_files
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

import kdflow.config
from kdflow.config.fields import Strict

INTRO = """# Recipe reference

Generated from the recipe models in `kdflow/config/` (their field descriptions and docstrings) each time the docs
are built. A recipe is one YAML file; an unknown key, a wrong type or a value out of range fails before any work
with `RecipeError`, naming the file, line, field and fix. `training:` mappings are keyword arguments of TRL's
`SFTConfig` and are validated by TRL itself. Relative paths follow one rule:

> {path_rule}

Recipe kinds: {kinds}.
"""


def recipe_kinds() -> list[type[BaseModel]]:
    """Every top-level recipe model: the classes of kdflow.config named ``*Recipe``."""
    found = {}
    for info in pkgutil.iter_modules(kdflow.config.__path__):
        module = importlib.import_module(f"kdflow.config.{info.name}")
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Strict)
                and name.endswith("Recipe")
                and obj.__module__ == module.__name__
            ):
                found[name] = obj
    main = found.pop("Recipe")  # the distillation recipe first
    return [main, *sorted(found.values(), key=lambda c: c.__name__)]


def anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


def strip(tp):
    """``Annotated[X, ...]`` -> X."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def models_in(tp) -> list[type[BaseModel]]:
    tp = strip(tp)
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in models_in(arg)]


def type_name(tp, links: dict) -> str:
    tp = strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a, links) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a.value if isinstance(a, enum.Enum) else a}`" for a in args)
    if origin in (list, tuple, set, frozenset):
        inner = ", ".join(type_name(a, links) for a in args if a is not Ellipsis)
        return f"list[{inner}]"
    if origin is dict:
        return "mapping"
    if inspect.isclass(tp) and issubclass(tp, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in tp)
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{links[tp]})" if tp in links else tp.__name__
    return getattr(tp, "__name__", str(tp)).replace("|", "\\|")


def default_of(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, BaseModel):
        return "its defaults"
    return (
        "`"
        + yaml.safe_dump(value, default_flow_style=True, width=10_000)
        .strip()
        .removesuffix("...")
        .strip()
        .replace("|", "\\|")
        + "`"
    )


def cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def doc_of(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    return "" if doc.startswith(model.__name__ + "(") or "BaseModel" in doc[:40] else inspect.cleandoc(doc)


def describe(field) -> str:
    """The field's description, else the first sentence of its section's docstring."""
    if field.description:
        return field.description
    sections = models_in(field.annotation)
    doc = doc_of(sections[0]) if len(sections) == 1 else ""
    return doc.split("\n\n")[0].split(". ")[0].rstrip(".") if doc else ""


def walk(model: type[BaseModel], path: str, out: list, links: dict, seen: set, title: str | None = None) -> None:
    """One section per model reached from ``path``, depth first, each model documented once."""
    if model in seen:
        return
    seen.add(model)
    title = title or path
    links[model] = anchor(title)
    children = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        for sub in models_in(field.annotation):
            if sub not in links:
                shape = strip(field.annotation)
                many = typing.get_origin(shape) is list or any(
                    typing.get_origin(strip(a)) is list for a in typing.get_args(shape)
                )
                sub_path = f"{path}.{key}" + ("[]" if many else "")
                sub_title = sub_path + (f" ({sub.__name__})" if len(models_in(field.annotation)) > 1 else "")
                links[sub] = anchor(sub_title)
                children.append((sub, sub_path, sub_title))
    rows = [
        f"| `{field.alias or name}` | {type_name(field.annotation, links)} | {default_of(field)} | "
        f"{cell(describe(field))} |"
        for name, field in model.model_fields.items()
    ]
    out += [f"## `{title}` {{#{anchor(title)}}}", "", f"*{model.__module__}.{model.__name__}*", ""]
    if doc_of(model):
        out += [doc_of(model), ""]
    out += ["| key | type | default | what it does |", "|---|---|---|---|", *rows, ""]
    for sub, sub_path, sub_title in children:
        walk(sub, sub_path, out, links, seen, sub_title)


def page() -> str:
    from kdflow.config.fields import PATH_RULE

    kinds = recipe_kinds()
    out = [
        INTRO.format(path_rule=PATH_RULE, kinds=", ".join(f"[`{k.__name__}`](#{anchor(k.__name__)})" for k in kinds))
    ]
    links, seen = {}, set()  # a section shared by two recipe kinds is documented once, under the first
    for kind in kinds:
        walk(kind, kind.__name__, out, links, seen)
    return "\n".join(out)


with mkdocs_gen_files.open("reference/recipe.md", "w") as f:
    f.write(page())
