"""The run spec: TOML + ``key.path=value`` overrides -> a validated, frozen RunSpec.

Fixed tables (``run``, ``train``, ``eval``, ``distributed``) have their schema in
``run_options``. Component tables
(``model``, ``loss``, ...) are validated by the schema of the component their selector
key names (``loss.name = "sigmoid"`` -> the sigmoid loss's options), so a plugin's
options are checked exactly like the built-ins'. Every error names the full key path.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
)

from clip_jax.aux_terms import aux_entries_type
from clip_jax.errors import UserError
from clip_jax.plugins import Registry, UnknownComponentError, get_registry
from clip_jax.run_options import (  # noqa: F401  (re-exported: clip_jax.spec.TrainOptions)
    DistributedOptions,
    EvalOptions,
    LoggingOptions,
    RunOptions,
    SpikeOptions,
    TrainOptions,
    logging_section,
)
from clip_jax.schemas import Options, PreprocessOptions
from clip_jax.spec_checks import cross_table_problems

FIXED_SECTIONS: dict[str, type[Options]] = {
    "run": RunOptions,
    "train": TrainOptions,
    "eval": EvalOptions,
    "distributed": DistributedOptions,
    "preprocess": PreprocessOptions,
}

# section -> (selector key, registry kind, default component)
COMPONENT_SECTIONS: dict[str, tuple[str, str, str]] = {
    "model": ("architecture", "architecture", "clip"),
    "loss": ("name", "loss", "softmax"),
    "head": ("name", "head", "contrastive"),  # contrastive: no head, the two towers alone
    "optimizer": ("name", "optimizer", "adamw"),
    "data": ("source", "data_source", "synthetic"),
    "tokenizer": ("name", "tokenizer", "bpe"),
    "sharding": ("strategy", "sharding", "dp"),
}

DEFAULT_LOGGING = LoggingOptions().model_dump(mode="json")

SECTION_ORDER = [
    "run",
    "model",
    "loss",
    "head",
    "optimizer",
    "train",
    "data",
    "preprocess",
    "tokenizer",
    "sharding",
    "eval",
]


class SpecError(UserError):
    """A spec that cannot be used; ``problems`` holds (key path, message) pairs.

    Every problem is collected before raising, so that one ``clipctl validate`` shows
    them all; the key is the first problem's, for code that reads one key.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("\n".join(f"{path}: {msg}" if path else msg for path, msg in problems))
        self.key = (problems[0][0] or None) if problems else None
        self.problems = list(problems)


class RunSpec(Options):
    """Base of the per-registry RunSpec classes built by ``validate``."""


# ----------------------------------------------------------------------- reading
def read_toml(path: str | Path) -> dict[str, Any]:
    """The spec file as a dict; a missing, unreadable or malformed file is a SpecError
    naming the file (and, for TOML syntax, the line and column)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")  # as tomllib.load: no newline translation
    except FileNotFoundError:
        raise SpecError([(str(path), "spec file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError([(str(path), f"cannot read the spec file: {reason}")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([(str(path), _toml_problem(exc, text))]) from None


def _toml_problem(exc: tomllib.TOMLDecodeError, source: str) -> str:
    """'line L, column C: not valid TOML: <what>', so an editor can jump to the spot.

    Python 3.11's TOMLDecodeError has no lineno attribute: the position is parsed from
    its message, "... (at line L, column C)" or "... (at end of document)".
    """
    text = str(exc)
    at = re.search(r"\(at (?:line (\d+), column (\d+)|end of document)\)$", text)
    if at is None:
        return f"not valid TOML: {text}"
    if at[1] is not None:
        where = f"line {at[1]}, column {at[2]}"
    else:
        lines = source.split("\n")
        where = f"line {len(lines)}, column {len(lines[-1]) + 1} (the end of the file)"
    return f"{where}: not valid TOML: {text[: at.start()].strip()}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value``: the value is read as a TOML value, else kept as a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError([("", f"override {item!r} is not of the form key.path=value")])
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    result = copy.deepcopy(dict(raw))
    for item in overrides:
        keys, value = parse_override(item)
        table = result
        for depth, key in enumerate(keys[:-1]):
            nxt = table.setdefault(key, {})
            if not isinstance(nxt, dict):
                path = ".".join(keys[: depth + 1])
                raise SpecError([(path, f"is a value, not a table; cannot set {'.'.join(keys)}")])
            table = nxt
        table[keys[-1]] = value
    return result


def load_spec(
    path: str | Path, overrides: Iterable[str] = (), registry: Registry | None = None
) -> RunSpec:
    """Read a TOML spec, apply overrides, validate against the registered components."""
    return validate(apply_overrides(read_toml(path), overrides), registry)


# -------------------------------------------------------------------- validating
def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validate(
    raw: Mapping[str, Any], registry: Registry | None = None, pretrained: bool = True
) -> RunSpec:
    """Validate a raw spec dict; raise SpecError listing every problem found.

    With ``pretrained``, a ``train.init_from = "hf:PATH"`` checkpoint's own config gives
    the defaults of the model, loss, tokenizer and preprocess tables (like a preset). A
    spec read back from a run folder is already resolved: pass False so that reading it
    never needs the checkpoint it started from.
    """
    from clip_jax import pretrained as pretrained_lib

    registry = registry or get_registry()
    impossible = list(_impossible_values(raw))
    problems: list[tuple[str, str]] = []
    raw = migrate(dict(raw))
    if pretrained:
        try:
            raw = pretrained_lib.with_defaults(raw, registry)
        except UserError as exc:
            problems.append(("train.init_from", str(exc)))
    fields: dict[str, Any] = {}
    for section, (selector, kind, default) in COMPONENT_SECTIONS.items():
        # Until a section's component is known it is a plain table, so that the rest of
        # the spec is still checked and every problem is reported at once.
        fields[section] = dict[str, Any]
        table = raw.get(section, {})
        if not isinstance(table, Mapping):
            continue  # pydantic reports "must be a table"
        name = table.get(selector, default)
        if not isinstance(name, str):
            problems.append((f"{section}.{selector}", f"must be a string (got {name!r})"))
            continue
        try:
            component = registry.get(kind, name)
        except UnknownComponentError as exc:
            problems.append((f"{section}.{selector}", str(exc)))
            continue
        preset = table.get("preset")
        if preset is not None:
            if not isinstance(preset, str) or preset not in component.presets:
                known = ", ".join(sorted(component.presets)) or "none"
                problems.append(
                    (f"{section}.preset", f"unknown preset {preset!r} (available: {known})")
                )
                continue
            raw[section] = deep_merge(component.presets[preset], table)
        fields[section] = _section_model(section, selector, name, component.options or Options)
    if fields["loss"] != dict[str, Any]:  # [[loss.aux]]: terms added to the loss
        fields["loss"] = _with_aux(fields["loss"], aux_entries_type(registry))
    fields.update(FIXED_SECTIONS)
    raw, fields["logging"], found = logging_section(raw, registry)
    problems += found

    spec_model = _spec_model(tuple(fields.items()))
    try:
        spec = spec_model.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(err, spec_model, raw) for err in exc.errors()]
    else:  # across tables: only once each table is valid on its own
        problems += cross_table_problems(spec)
    if impossible or problems:
        said = {path for path, _ in impossible}  # once, not again by pydantic or a loader
        problems = impossible + [p for p in problems if p[0] not in said]
        raise SpecError(sorted(set(problems), key=problems.index))
    return spec


INT64 = 2**63


def _impossible_values(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Values no option can mean: integers beyond TOML's 64 bits (Python reads them
    anyway, then jax or the OS overflows on them mid-run), NaN and infinities, and
    strings holding a NUL character (no path, name or URL can; the OS refuses them).

    Checked over the whole raw spec, so that every option (a plugin's too) is covered
    without each schema saying so.
    """
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _impossible_values(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield from _impossible_values(value, f"{path}.{index}")
    elif isinstance(node, str) and "\x00" in node:
        yield path, f"must not contain a NUL character (got {node!r})"
    elif isinstance(node, int) and not isinstance(node, bool):
        if not -INT64 <= node < INT64:
            yield path, f"{node} is out of range (integers are 64-bit: below 2**63)"
    elif isinstance(node, float) and not math.isfinite(node):
        yield path, f"must be a finite number (got {node})"


# Built classes are cached so that validating equal input twice gives equal specs
# (pydantic compares the class as well as the values).
@cache
def _section_model(section: str, selector: str, name: str, options: type) -> type[BaseModel]:
    return create_model(
        f"{section.title()}Spec", __base__=options, **{selector: (typing.Literal[name], name)}
    )


@cache
def _with_aux(loss_model: type[BaseModel], entries: Any) -> type[BaseModel]:
    return create_model(
        loss_model.__name__, __base__=loss_model, aux=(entries, Field(default_factory=list))
    )


@cache
def _spec_model(sections: tuple[tuple[str, type], ...]) -> type[RunSpec]:
    fields = {
        name: (kind, Field(default_factory=dict, validate_default=kind is not dict[str, Any]))
        for name, kind in sections
    }
    return create_model("RunSpec", __base__=RunSpec, **fields)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _unknown_key(loc: tuple, choices: list[str]) -> tuple[str, str]:
    path = ".".join(map(str, loc))
    close = difflib.get_close_matches(str(loc[-1]), choices, n=1, cutoff=0.6)
    hint = f"; did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?" if close else ""
    return path, f"unknown key{hint}"


def _key_path(loc: tuple, raw: Any) -> tuple:
    """The user's key path in a pydantic error location, without pydantic's own steps.

    A location also holds validator and union tags ("function-after[...]", "list[str]"):
    a part is the user's key when the spec has it there, else a field name (never with
    "["). Checking the spec keeps the user's own keys that hold "[" (or are empty).
    """
    path, node = [], raw
    for part in loc:
        if _holds(node, part):
            path.append(part)
            node = node[part]
        elif isinstance(node, Mapping) and node.get("name") == part:
            continue  # the tag of a union chosen by name ([[loss.aux]] terms)
        elif not (isinstance(part, str) and "[" in part):
            path.append(part)
            node = None
    return tuple(path)


def _holds(node: Any, part: Any) -> bool:
    """Whether ``node[part]`` is a key or an index the spec itself has."""
    if isinstance(node, Mapping):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _describe(
    err: Mapping[str, Any], spec_model: type[BaseModel], raw: Mapping[str, Any]
) -> tuple[str, str]:
    loc = _key_path(tuple(err["loc"]), raw)
    if err["type"] == "extra_forbidden":
        parent = _model_at(spec_model, loc[:-1])
        return _unknown_key(loc, list(parent.model_fields) if parent else [])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a term's name
        loc, message = (*loc, "name"), _tag_message(err)
    path = ".".join(map(str, loc))
    if err["type"] == "missing":
        message = "required key is missing"
    elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        message = f"must be a table (got {err['input']!r})"
    elif "input" in err and not isinstance(err["input"], Mapping):
        message += f" (got {err['input']!r})"
    return path, message


def _tag_message(err: Mapping[str, Any]) -> str:
    """Which names a table chosen by ``name`` may have, as a user reads it."""
    expected = err.get("ctx", {}).get("expected_tags", "")
    if err["type"] == "union_tag_not_found":
        return f"required key is missing (one of {expected})"
    return f"unknown name {err['ctx'].get('tag')!r}: expected one of {expected}"


# -------------------------------------------------------------------------- output
def to_dict(spec: RunSpec) -> dict[str, Any]:
    """The resolved spec as plain data, tables in a stable order, None values left out."""
    data = spec.model_dump(mode="json", exclude_none=True)
    terms = data.get("loss", {}).get("aux")
    if terms == []:
        del data["loss"]["aux"]  # no terms: the same text as before [[loss.aux]] existed
    elif terms:
        data["loss"]["aux"] = [{"name": t["name"], **t} for t in terms]  # name first
    ordered = {key: data[key] for key in SECTION_ORDER if key in data}
    # [logging] only when set: a spec without it resolves to the same text as before it
    if data.get("logging", DEFAULT_LOGGING) != DEFAULT_LOGGING:
        ordered["logging"] = data["logging"]
    return ordered


def to_toml(spec: RunSpec) -> str:
    import tomlkit

    return tomlkit.dumps(to_dict(spec))


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Keys of older specs moved to where they live now, so old run folders stay usable."""
    model = raw.get("model")
    if isinstance(model, Mapping) and "projection_bias" in model:  # before per-tower heads
        model = dict(model)
        bias = model.pop("projection_bias")
        for tower in ("vision", "text"):
            table = model.get(tower, {})
            if isinstance(table, Mapping):
                model[tower] = {"projection_bias": bias, **table}
        raw["model"] = model
    return raw


def diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Key paths whose values differ between two spec dicts."""
    keys = sorted(set(a) | set(b))
    changed: list[str] = []
    for key in keys:
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            changed += diff(va, vb, path + ".")
        elif va != vb:
            changed.append(path)
    return changed
