"""`clipctl plugin new`: the package it writes installs, is listed, and passes its own test.

The slow test installs the generated packages with `uv pip install -e` into a throwaway
venv layered on the project's environment (a `.pth` file that adds the project's
site-packages with `site.addsitedir`, so its editable installs load too): the shared
project venv is never changed, and nothing is downloaded.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipctl.cli import cli
from clipctl.plugin_new import KINDS, PluginNames

HOOKS = {
    "loss": "register_losses",
    "architecture": "register_architectures",
    "data_source": "register_data_sources",
    "logger": "register_loggers",
    "head": "register_heads",
}


def new(*args: str):
    return CliRunner().invoke(cli, ["plugin", "new", *args])


def test_names_come_from_NAME():
    names = PluginNames.from_name("clip-jax-focal")
    assert (names.dist, names.module, names.component, names.title) == (
        "clip-jax-focal",
        "clip_jax_focal",
        "focal",
        "Focal",
    )
    assert PluginNames.from_name("MyLoss_2").component == "myloss_2"


@pytest.mark.parametrize(
    "name",
    [
        "../evil", "a b", "x;touch PWNED", "1loss", "clip_jax", "class",
        "clip-jax-2d",  # class 2dOptions would be a SyntaxError
        "jax", "json", "numpy", "clip-jax-wandb",  # installed modules: one shadows the other
    ],
)  # fmt: skip
def test_a_bad_name_exits_2_and_writes_nothing(tmp_path, name):
    result = new(name, "--kind", "loss", "--dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: NAME: ")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_never_overwritten(tmp_path):
    (tmp_path / "clip-jax-focal").mkdir()
    (tmp_path / "clip-jax-focal" / "keep.txt").write_text("mine")
    result = new("clip-jax-focal", "--kind", "loss", "--dir", str(tmp_path))
    assert result.exit_code == 2
    assert "not overwriting" in result.stderr
    assert [p.name for p in (tmp_path / "clip-jax-focal").iterdir()] == ["keep.txt"]


def test_an_unknown_kind_exits_2(tmp_path):
    result = new("clip-jax-x", "--kind", "sampler", "--dir", str(tmp_path))
    assert result.exit_code == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_writes_a_complete_package(tmp_path, kind):
    result = new("clip-jax-mine", "--kind", kind, "--dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    root = tmp_path / "clip-jax-mine"
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "clip-jax-mine"
    assert project["project"]["entry-points"]["clip_jax"] == {"mine": "clip_jax_mine"}
    hook_module = root / "src" / "clip_jax_mine" / "__init__.py"
    sources = [*root.glob("src/clip_jax_mine/*.py"), root / "tests" / "test_clip_jax_mine.py"]
    assert len(sources) == 3
    for source in sources:  # parsed, never run: valid Python with nothing left to fill in
        text = source.read_text()
        ast.parse(text, str(source))
        assert "${" not in text
    tree = ast.parse(hook_module.read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert HOOKS[kind] in functions
    assert "CLIP_JAX_HOOKSPEC" in hook_module.read_text()
    assert "clip-jax-mine" in (root / "README.md").read_text()


def test_the_generated_logger_writes_a_url_run_folder(tmp_path, monkeypatch):
    """The scaffold teaches clip_jax.storage: a gs:// run folder (ram:// here, served by
    the same tf.io.gfile) must not become a local folder "gs:"."""
    import uuid

    from clip_jax.train.loggers import RunContext

    assert new("clip-jax-csvurl", "--kind", "logger", "--dir", str(tmp_path)).exit_code == 0
    monkeypatch.syspath_prepend(str(tmp_path / "clip-jax-csvurl" / "src"))
    monkeypatch.chdir(tmp_path)  # where Path("ram://...") would have written
    import clip_jax_csvurl
    from clip_jax_csvurl.logger import build

    try:
        url = f"ram://clip-jax-tests/{uuid.uuid4().hex}"
        run = RunContext(name="t", folder=url, spec={}, steps=2)
        logger = build(clip_jax_csvurl.CsvurlOptions(keys=["loss"]), run)
        logger.on_step(1, {"loss": 2.5})
        logger.on_step(2, {"loss": 2.25})
        logger.on_finish(2, {})
        from clip_jax import storage

        text = storage.path(f"{url}/metrics.csv").read_text()
        assert list(csv.reader(text.splitlines())) == [
            ["step", "loss"],
            ["1", "2.5"],
            ["2", "2.25"],
        ]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-jax-csvurl"]
    finally:
        for name in [m for m in sys.modules if m.startswith("clip_jax_csvurl")]:
            del sys.modules[name]


def layered_venv(path: Path) -> Path:
    """A venv whose interpreter also sees the project environment's packages (``.pth``
    with ``site.addsitedir``): installing into it leaves the project venv untouched."""
    subprocess.run(["uv", "venv", "-q", str(path), "--python", sys.executable], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    project_site = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "_clip_jax_project.pth").write_text(
        f"import site; site.addsitedir({project_site!r})\n"
    )
    return python


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv")
def test_generated_packages_install_list_and_pass_their_own_tests(tmp_path):
    for kind in KINDS:
        assert new(f"clip-jax-my-{kind}", "--kind", kind, "--dir", str(tmp_path)).exit_code == 0
    packages = sorted(tmp_path.glob("clip-jax-my-*"))
    python = layered_venv(tmp_path / "venv")
    editable = [arg for package in packages for arg in ("-e", str(package))]
    subprocess.run(
        ["uv", "pip", "install", "-q", "--offline", "--no-deps", "--python", python, *editable],
        check=True,
    )

    listed = subprocess.run(
        [python, "-m", "clipctl.cli", "plugins", "--json"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    for kind in KINDS:
        component = f"my_{kind}"
        assert plugins[component]["errors"] == []
        assert plugins[component]["distribution"] == f"clip-jax-my-{kind}"
        assert plugins[component]["registers"] == {kind: [component]}

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    tests = [str(package / "tests") for package in packages]
    result = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "16 passed" in result.stdout
