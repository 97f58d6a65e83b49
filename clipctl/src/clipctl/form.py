"""From the spec schema to form fields: what the editor shows for each table.

Component tables show their selector (choices: what the plugins register) followed by
the chosen component's own options, so switching ``loss.name`` switches the fields.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from clip_jax.plugins import Registry
from clip_jax.spec import COMPONENT_SECTIONS, FIXED_SECTIONS, SECTION_ORDER


@dataclass(frozen=True)
class Field:
    path: str  # full key path, e.g. "model.vision.width"
    kind: str  # "bool", "choice" or "text"
    choices: tuple[str, ...] = ()
    default: Any = None
    description: str = ""


def sections() -> list[str]:
    return list(SECTION_ORDER)


def _fields_of(model: type[BaseModel], prefix: str) -> list[Field]:
    found: list[Field] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _fields_of(annotation, path)
            continue
        args = typing.get_args(annotation)
        description = info.description or ""
        if annotation is bool:
            found.append(Field(path, "bool", default=info.default, description=description))
        elif typing.get_origin(annotation) is typing.Literal:
            found.append(Field(path, "choice", tuple(map(str, args)), info.default, description))
        else:
            default = None if info.is_required() else info.default
            found.append(Field(path, "text", default=default, description=description))
    return found


def section_fields(section: str, table: dict[str, Any], registry: Registry) -> list[Field]:
    """The fields of one spec table, given its current raw values."""
    if section in FIXED_SECTIONS:
        return _fields_of(FIXED_SECTIONS[section], section)
    selector, kind, default = COMPONENT_SECTIONS[section]
    name = table.get(selector, default)
    fields = [Field(f"{section}.{selector}", "choice", tuple(registry.names(kind)), default)]
    component = registry.components.get(kind, {}).get(name)
    if component is None or component.options is None:
        return fields
    if component.presets:
        presets = ("",) + tuple(sorted(component.presets))
        fields.append(Field(f"{section}.preset", "choice", presets, "", "named sizes"))
    return fields + [
        f for f in _fields_of(component.options, section) if f.path != f"{section}.preset"
    ]


def option_keys(registry: Registry, section: str, name: str) -> set[str]:
    """Top-level keys a component accepts in its table (used when switching component)."""
    selector, kind, _ = COMPONENT_SECTIONS[section]
    component = registry.components.get(kind, {}).get(name)
    keys = {selector}
    if component is not None and component.options is not None:
        keys |= set(component.options.model_fields)
    return keys
