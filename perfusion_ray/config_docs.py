"""The configuration reference, generated from the config's own field descriptions (`perfusion config docs`).

docs/configuration.md is this module's output, checked in; a test keeps the two equal, so the reference
never drifts from the code.
"""

from __future__ import annotations

import enum
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from perfusion_ray.config import PerfusionConfig, _section_type

HEADER = """# Configuration reference

Generated from the field descriptions in `perfusion_ray/config.py` by `perfusion config docs`; do not edit.
A config is a YAML file of these sections (`configs/fashionworld.yaml` is the embedded default); any field
can be overridden on the command line with `--set section.field=value`, e.g. `--set rm.lr=1e-4`. Unknown
fields are refused with the field named. Paths to outputs take a local path or a pyarrow filesystem URI.
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined:
        value = field.default_factory() if field.default_factory is not None else None
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    return "null" if value is None else f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _sections(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    found = [(prefix, model)]
    for name, field in model.model_fields.items():
        section = _section_type(field.annotation)
        if section is not None:
            found += _sections(section, f"{prefix}.{name}" if prefix else name)
    return found


def generate() -> str:
    """The whole reference as markdown."""
    parts = [HEADER]
    for path, model in _sections(PerfusionConfig, "")[1:]:
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        rows = []
        for name, field in model.model_fields.items():
            if _section_type(field.annotation) is not None:
                rows.append(f"| `{name}` | section | | see `{path}.{name}` |")
                continue
            description = (field.description or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
        parts.append(f"\n## `{path}`\n\n{doc}\n\n| field | type | default | what it sets |\n| --- | --- | --- | --- |\n"
                     + "\n".join(rows) + "\n")
    return "".join(parts)


def undocumented() -> list[str]:
    """Fields without a description (the reference must explain every one)."""
    return [f"{path}.{name}" for path, model in _sections(PerfusionConfig, "")[1:]
            for name, field in model.model_fields.items()
            if _section_type(field.annotation) is None and not field.description]
