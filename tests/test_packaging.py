"""Every package builds as an sdist, its wheel is built *from that sdist*, and the wheels
installed into a clean venv work: `clipctl templates` lists the packaged templates and a
template name runs (`clipctl run quickstart ...`) away from any checkout.

The clean venv gets the versions this test's own environment has (as constraints), so
uv takes them from its cache and nothing new is resolved; the registry is asked only
for what the cache lacks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipctl.cli import cli
from tests.conftest import ROOT, SMALL_RUN


def workspace_packages() -> list[str]:
    """The distribution name of every workspace member (core, clipctl, each plugin)."""
    members = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]
    return [
        tomllib.loads((ROOT / member / "pyproject.toml").read_text())["project"]["name"]
        for member in members["members"]
    ]


PACKAGES = workspace_packages()
# What a user installs with `pip install clip-jax clipctl`, plus the example plugin.
INSTALLED = ["clip-jax", "clipctl", "clip-jax-convnext"]
TEMPLATES = sorted(p.name for p in (ROOT / "templates").glob("*.toml"))

needs_uv = pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv")


def test_a_template_name_works_where_a_spec_path_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no templates/ here: the name alone finds it
    runner = CliRunner()
    assert runner.invoke(cli, ["validate", "quickstart", "train.steps=5"]).stdout == "valid\n"
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)  # the run lit starts from
    (tmp_path / "runs" / "quickstart" / "tokenizer.json").write_text("{}")
    shown = runner.invoke(cli, ["show", "lit", "train.steps=7"])
    assert shown.exit_code == 0
    assert "steps = 7" in shown.stdout


def test_a_file_of_that_name_wins_over_the_template(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("[train]\nstpes = 1\n")
    result = CliRunner().invoke(cli, ["validate", "quickstart"])
    assert result.exit_code == 2
    assert "train.stpes" in result.stderr


def test_neither_a_file_nor_a_template_exits_2_listing_the_templates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", "quikstart"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: quikstart: no such spec file, and no template")
    assert "did you mean 'quickstart'?" in result.stderr
    assert all(name.removesuffix(".toml") in result.stderr for name in TEMPLATES)


def uv(*args: str | Path, cwd: Path = ROOT) -> str:
    result = subprocess.run(["uv", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def build_from_sdist(package: str, out: Path) -> tuple[Path, Path]:
    """(sdist, wheel): the wheel built from the unpacked sdist, as pip and uv do."""
    uv("build", "-q", "--offline", "--package", package, "--sdist", "--out-dir", out / "sdist")
    stem = package.replace("-", "_")
    (sdist,) = (out / "sdist").glob(f"{stem}-*.tar.gz")
    uv("build", "-q", "--offline", "--wheel", sdist, "--out-dir", out / "wheel")
    (wheel,) = (out / "wheel").glob(f"{stem}-*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("dist")
    return {package: build_from_sdist(package, out / package) for package in PACKAGES}


@pytest.mark.slow
@needs_uv
def test_the_templates_travel_in_clipctl_sdist_and_wheel(built):
    sdist, wheel = built["clipctl"]
    with tarfile.open(sdist) as archive:
        in_sdist = sorted(Path(n).name for n in archive.getnames() if "/templates/" in n)
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = sorted(
            Path(n).name for n in archive.namelist() if n.startswith("clipctl/templates/")
        )
    assert in_sdist == in_wheel == TEMPLATES
    with zipfile.ZipFile(wheel) as archive:
        packaged = archive.read("clipctl/templates/quickstart.toml")
    assert packaged == (ROOT / "templates" / "quickstart.toml").read_bytes()


@pytest.mark.slow
@needs_uv
def test_every_package_builds_a_wheel_from_its_sdist(built):
    assert set(INSTALLED) <= set(built)
    for package, (_, wheel) in built.items():
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
        assert f"{package.replace('-', '_')}/__init__.py" in names, package
        if package != "clip-jax":  # clipctl's templates and every plugin: an entry point
            entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
            with zipfile.ZipFile(wheel) as archive:
                assert "[clip_jax]" in archive.read(entry_points).decode(), package


@pytest.mark.slow
@needs_uv
def test_the_wheels_work_in_a_clean_venv(built, tmp_path, synthetic_dir):
    venv = tmp_path / "venv"
    uv("venv", "-q", venv, "--python", sys.executable)
    python = venv / "bin" / "python"
    constraints = tmp_path / "constraints.txt"
    frozen = uv("pip", "freeze", "--python", sys.executable).splitlines()
    # the workspace's own packages come from the wheels; local-file pins (torch) stay out
    constraints.write_text(
        "\n".join(line for line in frozen if " @ " not in line and "-e " not in line)
    )
    wheels = [built[package][1] for package in INSTALLED]
    uv("pip", "install", "-q", "--python", python, "-c", constraints, *wheels)

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    clipctl = venv / "bin" / "clipctl"
    work = tmp_path / "elsewhere"  # no templates/ folder here: they must come from the wheel
    work.mkdir()

    def in_venv(*command: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=600
        )

    where = in_venv(python, "-c", "import clipctl.templates as t; print(t.templates_dir())")
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stderr

    listed = in_venv(clipctl, "templates")
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines()} >= {
        name.removesuffix(".toml") for name in TEMPLATES
    }

    # the scaffold's files are package data of the wheel too
    scaffolded = in_venv(clipctl, "plugin", "new", "clip-jax-focal", "--kind", "loss")
    assert scaffolded.returncode == 0, scaffolded.stderr
    assert (work / "clip-jax-focal" / "tests" / "test_clip_jax_focal.py").exists()

    small = [*SMALL_RUN, f"data.dir={synthetic_dir}", "data.train_examples=1024"]
    small += ["data.validation_examples=256", "run.output_dir=runs/q", "train.checkpoint_every=5"]
    ran = in_venv(clipctl, "run", "quickstart", "train.steps=5", *small)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result["run_dir"] == "runs/q"
    assert (work / "runs" / "q" / "spec.resolved.toml").exists()
