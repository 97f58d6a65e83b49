"""The plugin manager and the component registry built from it.

Plugins are loaded from the ``clip_jax`` entry-point group. A plugin that fails to
import, or whose hook raises, is recorded with its error and skipped: listing plugins
and validating specs that do not use it keep working. Environment variables:

- ``CLIP_JAX_PLUGINS``: comma-separated allow-list of entry-point names to load
  (set but empty: load no third-party plugin);
- ``CLIP_JAX_DISABLE_PLUGINS``: comma-separated entry-point names to skip.

A plugin that declares a ``CLIP_JAX_HOOKSPEC`` this clip-jax does not satisfy
(``clip_jax.hookspecs``) is not registered: it is listed with the version it needs.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pluggy

from clip_jax import hookspecs
from clip_jax.errors import PluginError

PROJECT = "clip_jax"
hookimpl = pluggy.HookimplMarker(PROJECT)

# kind -> hook name. The kind is the word used in error messages and listings.
HOOKS: dict[str, str] = {
    "architecture": "register_architectures",
    "loss": "register_losses",
    "aux_loss": "register_aux_losses",
    "sharding": "register_sharding_strategies",
    "head": "register_heads",
    "data_source": "register_data_sources",
    "tokenizer": "register_tokenizers",
    "optimizer": "register_optimizers",
    "template": "register_templates",
    "logger": "register_loggers",
}


@dataclass(frozen=True)
class Component:
    """One registered component: its factory, options schema and origin."""

    kind: str
    name: str
    factory: Callable[..., Any]
    options: type | None
    description: str
    plugin: str
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Architectures: external weight format name -> "module:attr" of the object that
    # converts that format's checkpoints to and from this architecture's parameters.
    # Data sources: record format name -> "module:attr" of its ``RecordFormat``.
    formats: dict[str, str] = field(default_factory=dict)

    def load_format(self, name: str) -> Any:
        """The object ``formats`` names for ``name``, imported now (an architecture's
        weight converter, a data source's record format), or None."""
        target = self.formats.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    description: str
    plugin: str


@dataclass
class PluginInfo:
    """What `clipctl plugins` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    registers: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "registers": self.registers,
            "errors": self.errors,
        }


class UnknownComponentError(PluginError, LookupError):
    """A component name nothing registers: a user mistake (a typo, a plugin not
    installed or broken), so a PluginError; a LookupError for older callers."""


# The plugins that live in this repository (plugins/), so that a name they provide says
# what to install where only the core is (a wheel install: templates name them too).
FIRST_PARTY_PLUGINS = {
    ("data_source", "webdataset"): "clip-jax-webdataset",
    ("architecture", "convnext"): "clip-jax-convnext",
    ("logger", "wandb"): "clip-jax-wandb",
}


@dataclass
class Registry:
    components: dict[str, dict[str, Component]]
    templates: dict[str, Template]
    plugins: list[PluginInfo]

    def names(self, kind: str) -> list[str]:
        return sorted(self.components.get(kind, {}))

    def get(self, kind: str, name: str, key: str | None = None) -> Component:
        """Look a component up; the error names close matches and broken plugins.

        ``key`` is the spec key that chose the name (``loss.name``), for the message.
        """
        found = self.components.get(kind, {}).get(name)
        if found is not None:
            return found
        import difflib

        label = kind.replace("_", " ")
        message = f"unknown {label} {name!r}"
        close = difflib.get_close_matches(name, self.names(kind), n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        message += f" (available: {', '.join(self.names(kind)) or 'none'})"
        package = FIRST_PARTY_PLUGINS.get((kind, name))
        if package:
            message += f"; it comes with the plugin {package}: pip install {package}"
        broken = [p for p in self.plugins if p.errors]
        if broken:
            message += "; plugins that failed to load and may provide it: " + ", ".join(
                f"{p.name} ({p.errors[0].splitlines()[0]})" for p in broken
            )
        raise UnknownComponentError(message, key=key)

    def broken(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.errors]


# Plugin objects registered in-process (tests, notebooks): name -> object.
_extra_plugins: dict[str, object] = {}


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object for this process (e.g. in a test); clears the cache."""
    _extra_plugins[name] = plugin
    get_registry.cache_clear()


def unregister_plugin(name: str) -> None:
    _extra_plugins.pop(name, None)
    get_registry.cache_clear()


def _split_env(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _entry_points() -> list[md.EntryPoint]:
    allow = _split_env("CLIP_JAX_PLUGINS")
    deny = _split_env("CLIP_JAX_DISABLE_PLUGINS") or set()
    chosen = []
    for ep in md.entry_points(group=PROJECT):
        if ep.name in deny or (allow is not None and ep.name not in allow):
            continue
        chosen.append(ep)
    return sorted(chosen, key=lambda ep: ep.name)


def _short_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """Load every plugin once per process and collect what each one registers."""
    from clip_jax import builtins

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}

    dist = md.distribution("clip-jax") if _has_dist("clip-jax") else None
    pm.register(builtins, name="builtins")
    infos["builtins"] = PluginInfo("builtins", "clip-jax", dist.version if dist else None)

    for ep in _entry_points():
        info = PluginInfo(ep.name)
        if ep.dist is not None:
            info.distribution, info.version = ep.dist.name, ep.dist.version
        infos[ep.name] = info
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin is reported, never fatal
            info.errors.append(f"failed to load: {_short_error(exc)}")
            continue
        _register_checked(pm, plugin, info)

    for name, plugin in _extra_plugins.items():
        infos[name] = PluginInfo(name)
        _register_checked(pm, plugin, infos[name])

    components: dict[str, dict[str, Component]] = {kind: {} for kind in HOOKS}
    templates: dict[str, Template] = {}
    for kind, hook_name in HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = infos[impl.plugin_name]
            register = _make_register(kind, info, components, templates)
            try:
                impl.function(register=register)
            except Exception as exc:
                info.errors.append(f"{hook_name} failed: {_short_error(exc)}")
    return Registry(components, templates, list(infos.values()))


def _register_checked(pm: pluggy.PluginManager, plugin: object, info: PluginInfo) -> None:
    """Register ``plugin`` unless it needs another hookspec version; errors go to ``info``."""
    wrong_version = hookspec_problem(getattr(plugin, "CLIP_JAX_HOOKSPEC", None))
    if wrong_version is not None:
        info.errors.append(wrong_version)
        return
    try:
        pm.register(plugin, name=info.name)
    except Exception as exc:
        info.errors.append(f"failed to register: {_short_error(exc)}")


_COMPARISONS: dict[str, Callable[[int, int], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}


def hookspec_problem(required: Any, version: int = hookspecs.HOOKSPEC_VERSION) -> str | None:
    """Why a plugin declaring ``CLIP_JAX_HOOKSPEC = required`` cannot load here, or None.

    ``required`` is None (not declared: loaded), a whole number (``2``: ``>=2``) or
    comma-separated comparisons such as ``">=2,<4"``.
    """
    if required is None:
        return None
    text = str(required).strip()
    clauses = [c.strip() for c in text.split(",")]
    for clause in clauses:
        operator = next((op for op in _COMPARISONS if clause.startswith(op)), "")
        number = clause[len(operator) :].strip()
        if isinstance(required, bool) or not number.isdigit():
            return (
                f"CLIP_JAX_HOOKSPEC = {required!r} is not a hookspec version requirement "
                "(e.g. '>=2' or '>=2,<4')"
            )
        if not _COMPARISONS[operator or ">="](version, int(number)):
            return (
                f"needs clip-jax hookspec {text if operator else '>=' + number}, "
                f"this clip-jax has hookspec {version}: not loaded (upgrade clip-jax or "
                "the plugin)"
            )
    return None


def _has_dist(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


def _make_register(kind, info: PluginInfo, components, templates) -> Callable[..., None]:
    def register_template(name: str, path: str | Path, description: str = "") -> None:
        if name in templates:
            info.errors.append(f"template {name!r} already registered by {templates[name].plugin}")
            return
        path = Path(path)
        templates[name] = Template(name, path, description or _first_comment(path), info.name)
        info.registers.setdefault(kind, []).append(name)

    def register(
        name: str,
        factory: Callable[..., Any],
        options: type | None = None,
        description: str = "",
        presets: dict[str, dict[str, Any]] | None = None,
        formats: dict[str, str] | None = None,
    ) -> None:
        problem = _registration_problem(name, factory, options)
        if problem is not None:  # the plugin's bug: reported, the rest keeps working
            info.errors.append(f"{kind} {name!r} not registered: {problem}")
            return
        existing = components[kind].get(name)
        if existing is not None:
            info.errors.append(f"{kind} {name!r} already registered by {existing.plugin}; ignored")
            return
        components[kind][name] = Component(
            kind,
            name,
            factory,
            options,
            description,
            info.name,
            dict(presets or {}),
            dict(formats or {}),
        )
        info.registers.setdefault(kind, []).append(name)

    return register_template if kind == "template" else register


def _registration_problem(name: Any, factory: Any, options: Any) -> str | None:
    """Why a registration cannot work, caught here rather than as a crash when a spec
    first names the component (the spec schema is built from ``options``)."""
    from pydantic import BaseModel

    if not isinstance(name, str) or not name.strip():
        return "the name must be a non-empty string"
    if not callable(factory):
        return f"the factory must be callable (got {type(factory).__name__})"
    if options is not None and not (isinstance(options, type) and issubclass(options, BaseModel)):
        return f"options must be a pydantic model class (got {options!r})"
    return None


def _first_comment(path: Path) -> str:
    """A template's description is its first comment line."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                return line.lstrip("# ").strip()
    except OSError:
        pass
    return ""


def lazy(target: str) -> Callable[..., Any]:
    """A factory that imports ``module:attr`` only when called (keeps the CLI light)."""
    module_name, attr = target.split(":")

    def factory(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module_name), attr)(*args, **kwargs)

    factory.__qualname__ = f"lazy({target})"
    factory.resolve = lambda: getattr(importlib.import_module(module_name), attr)
    return factory
