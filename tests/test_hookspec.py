"""Hookspec versions: a plugin that needs another version than this clip-jax's is not
loaded and is listed as broken with the version it needs."""

import textwrap

import pytest

from clip_jax.hookspecs import HOOKSPEC_VERSION
from clip_jax.plugins import get_registry, hookimpl, register_plugin, unregister_plugin
from clip_jax.spec import SpecError, validate


@pytest.fixture(autouse=True)
def fresh_registry():
    get_registry.cache_clear()
    yield
    get_registry.cache_clear()


def plugin_info(name):
    (found,) = [p for p in get_registry().plugins if p.name == name]
    return found


def test_hookspec_requirements():
    from clip_jax.plugins import hookspec_problem

    assert HOOKSPEC_VERSION >= 2  # 2: register_loggers
    for fine in (None, 1, 2, "2", ">=2", ">=1,<99", "!=1", " >= 2 , < 99 "):
        assert hookspec_problem(fine) is None, fine
    assert hookspec_problem("==2", version=2) is None
    assert hookspec_problem(3, version=2) == (
        "needs clip-jax hookspec >=3, this clip-jax has hookspec 2: not loaded (upgrade "
        "clip-jax or the plugin)"
    )
    assert "needs clip-jax hookspec <2," in hookspec_problem("<2")
    assert "needs clip-jax hookspec >=1,<2," in hookspec_problem(">=1,<2")
    for wrong in ("two", ">=2.0", "~=2", True, ""):
        assert "is not a hookspec version requirement" in hookspec_problem(wrong), wrong


class FuturePlugin:
    """Written for a hookspec this clip-jax does not have yet."""

    CLIP_JAX_HOOKSPEC = f">={HOOKSPEC_VERSION + 1}"

    @hookimpl
    def register_losses(self, register):
        register("from-the-future", lambda options, layout=None: None)


def test_an_in_process_plugin_of_another_hookspec_is_not_loaded():
    register_plugin(FuturePlugin(), "test-future")
    try:
        info = plugin_info("test-future")
        assert info.registers == {}
        assert info.errors == [
            f"needs clip-jax hookspec >={HOOKSPEC_VERSION + 1}, this clip-jax has hookspec "
            f"{HOOKSPEC_VERSION}: not loaded (upgrade clip-jax or the plugin)"
        ]
        assert "from-the-future" not in get_registry().names("loss")
    finally:
        unregister_plugin("test-future")


@pytest.fixture
def distribution_needing_hookspec(tmp_path, monkeypatch):
    """An installed distribution (a real entry point) whose module needs hookspec 99,
    and one that declares it is fine with this one."""
    site = tmp_path / "site"
    for name, requirement in (("future", ">=99"), ("current", ">=2,<99")):
        info = site / f"clip_jax_test_{name}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: clip-jax-test-{name}\nVersion: 1.0\n"
        )
        (info / "entry_points.txt").write_text(
            f"[clip_jax]\ntest-{name}-ep = clip_jax_test_{name}_plugin\n"
        )
        (site / f"clip_jax_test_{name}_plugin.py").write_text(
            textwrap.dedent(
                f"""\
                from clip_jax.plugins import hookimpl

                CLIP_JAX_HOOKSPEC = {requirement!r}


                @hookimpl
                def register_loggers(register):
                    register("test-{name}-logger", lambda options, run: None)
                """
            )
        )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_an_entry_point_of_another_hookspec_is_listed_broken(distribution_needing_hookspec):
    from click.testing import CliRunner

    from clipctl.cli import cli

    registry = get_registry()
    future = plugin_info("test-future-ep")
    assert future.distribution == "clip-jax-test-future" and future.version == "1.0"
    assert future.registers == {}
    assert len(future.errors) == 1
    needs = f"needs clip-jax hookspec >=99, this clip-jax has hookspec {HOOKSPEC_VERSION}"
    assert needs in future.errors[0]
    assert "test-future-logger" not in registry.names("logger")
    current = plugin_info("test-current-ep")
    assert current.errors == []
    assert current.registers == {"logger": ["test-current-logger"]}

    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "error: needs clip-jax hookspec >=99" in result.stdout
    # a spec naming the plugin's logger says why it is missing
    with pytest.raises(SpecError) as info:
        validate({"logging": {"loggers": ["test-future-logger"]}})
    (path, message), *_ = info.value.problems
    assert path == "logging.loggers"
    assert "test-future-ep (needs clip-jax hookspec >=99" in message
