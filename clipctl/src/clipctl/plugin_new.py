"""``clipctl plugin new NAME --kind KIND``: write a plugin package that works as written.

The package's files are ``string.Template`` texts in ``clipctl/scaffold`` (package
data): ``common/`` for every kind (pyproject with the ``clip_jax`` entry point, README),
``<kind>/`` for the hook module, the component's module and its test. The names the
user gives are checked against a strict pattern before they reach a file: they become
a Python module name and a TOML string, never code; a module name that is installed
already (jax, json, numpy) is refused, since the plugin would shadow it or be shadowed.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

import click

from clip_jax.errors import PathError, UserError

KINDS: dict[str, tuple[str, str]] = {
    # kind -> (words for people, how a spec uses it)
    "loss": ("loss", '`[loss]` `name = "{component}"`'),
    "architecture": ("architecture", '`[model]` `architecture = "{component}"`'),
    "data_source": ("data source", '`[data]` `source = "{component}"`, `dir = "..."`'),
    "logger": ("logger", '`[logging]` `loggers = ["{component}"]`'),
    "head": ("head", '`[head]` `name = "{component}"`, `num_classes = ...`'),
}
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9]*([-_][A-Za-z0-9]+)*")
RESERVED = {"clip_jax", "clipctl", "test", "tests"}


@dataclass(frozen=True)
class PluginNames:
    """The names one plugin package uses, all derived from NAME."""

    dist: str  # distribution and folder: clip-jax-focal
    module: str  # import package: clip_jax_focal
    component: str  # registered name and entry point: focal
    title: str  # class-name prefix: Focal

    @classmethod
    def from_name(cls, name: str) -> PluginNames:
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(
                "a plugin name is letters and digits, optionally joined by - or _, "
                "starting with a letter (e.g. clip-jax-focal)",
                key="NAME",
            )
        module = name.replace("-", "_").lower()
        if module in RESERVED or keyword.iskeyword(module):
            raise UserError(f"{module!r} is taken: choose another plugin name", key="NAME")
        component = re.sub(r"^clip_jax_", "", module) or module
        if not component[0].isalpha():  # it starts class names: 2dOptions is no Python
            raise UserError(
                f"{component!r} (the name after clip-jax-) must start with a letter",
                key="NAME",
            )
        if importlib.util.find_spec(module) is not None:
            # installed next to it, one of the two would hide the other on import
            raise UserError(
                f"a module {module!r} is installed already (import {module} finds it): "
                "choose another plugin name, e.g. clip-jax-" + component.replace("_", "-"),
                key="NAME",
            )
        title = "".join(part.capitalize() for part in component.split("_"))
        return cls(name, module, component, title)


def write_package(name: str, kind: str, parent: str | Path = ".") -> Path:
    """Write the plugin package ``parent/NAME`` and return its folder; a PathError if
    it exists (nothing is overwritten)."""
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r} (kinds: {', '.join(KINDS)})", key="--kind")
    names = PluginNames.from_name(name)
    root = Path(parent) / names.dist
    if root.exists():
        raise PathError("exists; not overwriting it: choose another name or folder", key=str(root))
    words, usage = KINDS[kind]
    values = {
        **names.__dict__,
        "kind": kind,
        "kind_words": words,
        "usage": usage.format(component=names.component),
    }
    for target, text in _files(kind, names):
        path = root / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(text).substitute(values))
    return root


def _files(kind: str, names: PluginNames) -> list[tuple[str, str]]:
    """(path in the package, template text) for every file of a ``kind`` plugin."""
    scaffold = resources.files("clipctl") / "scaffold"
    files = [
        ("pyproject.toml", (scaffold / "common" / "pyproject.toml.tmpl").read_text()),
        ("README.md", (scaffold / "common" / "README.md.tmpl").read_text()),
        (".gitignore", (scaffold / "common" / "gitignore.tmpl").read_text()),
    ]
    for item in sorted((scaffold / kind).iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".py.tmpl"):
            continue
        stem = item.name.removesuffix(".tmpl")
        if stem == "test.py":
            target = f"tests/test_{names.module}.py"
        else:
            target = f"src/{names.module}/{stem}"
        files.append((target, item.read_text()))
    return files


@click.group()
def plugin() -> None:
    """Write plugin packages (see docs/plugins.md)."""


@plugin.command(name="new")
@click.argument("name")
@click.option("--kind", type=click.Choice(list(KINDS)), required=True, help="What the plugin adds.")
@click.option(
    "--dir",
    "parent",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Folder to write the package NAME/ in.",
)
def new(name: str, kind: str, parent: str) -> None:
    """Write the plugin package NAME/: pyproject (entry point), hook module, component,
    options schema, a test that passes as written, README."""
    root = write_package(name, kind, parent)
    names = PluginNames.from_name(name)
    click.echo(f"wrote {root}: a {KINDS[kind][0]} {names.component!r} in module {names.module}")
    # into the environment this clipctl runs in, wherever the package was written
    python, folder = shlex.quote(sys.executable), shlex.quote(str(root))
    install = f"uv pip install --python {python} -e {folder}"
    click.echo(f"next: {install} && clipctl plugins && cd {folder} && {python} -m pytest tests")
