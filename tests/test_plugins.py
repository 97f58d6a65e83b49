"""The plugin spine: built-ins, in-process plugins, broken plugins, entry-point filters."""

import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import Field

from clip_jax.components import components
from clip_jax.plugins import (
    UnknownComponentError,
    get_registry,
    hookimpl,
    unregister_plugin,
)
from clip_jax.schemas import Options
from clip_jax.spec import SpecError, validate

BUILTINS = {
    "architecture": {"clip"},
    "loss": {"softmax", "sigmoid", "chunked_sigmoid"},
    "sharding": {"dp", "fsdp", "tp", "fsdp_tp"},
    "data_source": {"tfrecord", "synthetic"},
    "tokenizer": {"bpe", "sentencepiece"},
    "optimizer": {"adamw"},
    "head": {"contrastive", "image_classification", "text_classification", "lit"},
    "logger": {"jsonl", "tensorboard"},
    "aux_loss": {"captioning", "self_distillation", "masked_prediction"},
}
# Built-ins configured by their own table; jsonl takes no options (the run folder's).
WITHOUT_OPTIONS = {("logger", "jsonl")}


pytestmark = pytest.mark.usefixtures("fresh_registry")  # and `plugin`: tests/conftest.py


def plugin_info(name):
    found = [p for p in get_registry().plugins if p.name == name]
    assert len(found) == 1, [p.name for p in get_registry().plugins]
    return found[0]


# ----------------------------------------------------------------------- test plugins
class MarginOptions(Options):
    margin: float = Field(0.5, gt=0)
    squared: bool = False


class MarginLossPlugin:
    """A third-party loss with its own options schema."""

    built = []

    @hookimpl
    def register_losses(self, register):
        def factory(options, layout=None):
            MarginLossPlugin.built.append(options)
            return ("margin-loss", options.margin)

        register("margin", factory, options=MarginOptions, description="a test loss")


class BrokenPlugin:
    @hookimpl
    def register_losses(self, register):
        raise RuntimeError("boom from the broken plugin")


class HalfBrokenPlugin:
    """Registers an architecture fine, then fails in another hook."""

    @hookimpl
    def register_architectures(self, register):
        register("half-arch", lambda options, *args: None)

    @hookimpl
    def register_sharding_strategies(self, register):
        raise ValueError("no sharding today")


class DuplicateLossPlugin:
    @hookimpl
    def register_losses(self, register):
        register("margin", lambda options: None)


class ShadowSoftmaxPlugin:
    @hookimpl
    def register_losses(self, register):
        register("softmax", lambda options: "not the real one")


# ---------------------------------------------------------------------------- tests
def test_builtins_are_registered():
    registry = get_registry()
    for kind, names in BUILTINS.items():
        assert names <= set(registry.names(kind)), kind
        for name in names:
            component = registry.get(kind, name)
            assert component.plugin == "builtins"
            assert (component.options is not None) != ((kind, name) in WITHOUT_OPTIONS)
            assert component.description
    builtins = plugin_info("builtins")
    assert builtins.errors == []
    assert builtins.distribution == "clip-jax"
    assert {k: set(v) for k, v in builtins.registers.items()} == BUILTINS
    assert "tiny" in registry.get("architecture", "clip").presets


def test_clipctl_templates_plugin_from_entry_point():
    registry = get_registry()
    info = plugin_info("clipctl-templates")
    assert info.distribution == "clipctl"
    assert info.version
    assert info.errors == []
    assert "quickstart" in info.registers["template"]
    template = registry.templates["quickstart"]
    assert template.path.is_file()
    assert template.plugin == "clipctl-templates"
    assert template.description  # the template's first comment line


def test_registering_does_not_import_jax_or_tensorflow():
    # factories are lazy: building the registry only imports schemas
    import subprocess

    code = (
        "import sys; from clip_jax.plugins import get_registry; get_registry();"
        "from clip_jax.spec import validate; validate({});"
        "bad = [m for m in ('jax', 'tensorflow', 'flax', 'wandb') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_component_lookup():
    with pytest.raises(UnknownComponentError, match="did you mean 'softmax'"):
        get_registry().get("loss", "softmx")


def test_test_plugin_adds_a_loss_with_its_own_options(plugin):
    plugin(MarginLossPlugin(), "test-plugin")
    registry = get_registry()
    assert "margin" in registry.names("loss")
    component = registry.get("loss", "margin")
    assert component.plugin == "test-plugin"
    assert component.options is MarginOptions
    assert plugin_info("test-plugin").registers == {"loss": ["margin"]}
    assert plugin_info("test-plugin").errors == []

    spec = validate({"loss": {"name": "margin", "margin": 2.0}})
    assert spec.loss.name == "margin"
    assert spec.loss.margin == 2.0
    assert spec.loss.squared is False
    assert isinstance(spec.loss, MarginOptions)
    # the spec's component is built by the plugin's factory, from its validated options
    MarginLossPlugin.built.clear()
    assert components(spec).loss == ("margin-loss", 2.0)
    assert MarginLossPlugin.built == [spec.loss]


def test_test_plugin_options_are_validated(plugin):
    plugin(MarginLossPlugin(), "test-plugin")
    with pytest.raises(SpecError) as info:
        validate({"loss": {"name": "margin", "margn": 1.0, "squared": "perhaps"}})
    problems = dict(info.value.problems)
    assert set(problems) == {"loss.margn", "loss.squared"}
    assert "did you mean 'loss.margin'" in problems["loss.margn"]
    with pytest.raises(SpecError) as info:
        validate({"loss": {"name": "margin", "margin": -1}})
    assert [p for p, _ in info.value.problems] == ["loss.margin"]


def test_unregistered_plugin_is_gone(plugin):
    plugin(MarginLossPlugin(), "test-plugin")
    assert "margin" in get_registry().names("loss")
    unregister_plugin("test-plugin")
    assert "margin" not in get_registry().names("loss")
    with pytest.raises(SpecError, match="unknown loss 'margin'"):
        validate({"loss": {"name": "margin"}})


def test_broken_plugin_is_reported_and_does_not_break_the_registry(plugin):
    plugin(BrokenPlugin(), "test-broken")
    plugin(MarginLossPlugin(), "test-plugin")
    registry = get_registry()
    broken = plugin_info("test-broken")
    assert len(broken.errors) == 1
    assert "register_losses failed" in broken.errors[0]
    assert "RuntimeError: boom from the broken plugin" in broken.errors[0]
    assert [p.name for p in registry.broken()] == ["test-broken"]
    # everything else still works
    assert BUILTINS["loss"] | {"margin"} <= set(registry.names("loss"))
    assert validate({"loss": {"name": "sigmoid"}}).loss.name == "sigmoid"
    assert validate({"loss": {"name": "margin"}}).loss.margin == 0.5


def test_half_broken_plugin_keeps_what_it_registered(plugin):
    plugin(HalfBrokenPlugin(), "test-half")
    registry = get_registry()
    assert "half-arch" in registry.names("architecture")
    info = plugin_info("test-half")
    assert info.registers == {"architecture": ["half-arch"]}
    assert len(info.errors) == 1
    assert "register_sharding_strategies failed" in info.errors[0]
    assert "no sharding today" in info.errors[0]


def test_unknown_component_error_names_broken_plugin(plugin):
    plugin(BrokenPlugin(), "test-broken")
    with pytest.raises(SpecError) as info:
        validate({"loss": {"name": "fancy"}})
    problems = dict(info.value.problems)
    assert list(problems) == ["loss.name"]
    assert "unknown loss 'fancy'" in problems["loss.name"]
    assert "test-broken" in problems["loss.name"]
    assert "boom from the broken plugin" in problems["loss.name"]


def test_duplicate_registration_is_an_error_of_the_second_plugin(plugin):
    plugin(MarginLossPlugin(), "test-plugin")
    plugin(DuplicateLossPlugin(), "test-duplicate")
    registry = get_registry()
    assert registry.get("loss", "margin").plugin == "test-plugin"
    assert plugin_info("test-plugin").errors == []
    errors = plugin_info("test-duplicate").errors
    assert len(errors) == 1
    assert "'margin'" in errors[0]
    assert "already registered by test-plugin" in errors[0]
    assert plugin_info("test-duplicate").registers == {}


def test_a_plugin_cannot_replace_a_builtin(plugin):
    plugin(ShadowSoftmaxPlugin(), "test-shadow")
    assert get_registry().get("loss", "softmax").plugin == "builtins"
    assert "already registered by builtins" in plugin_info("test-shadow").errors[0]


def test_same_object_registered_twice_is_reported(plugin):
    obj = MarginLossPlugin()
    plugin(obj, "test-plugin")
    plugin(obj, "test-plugin-again")
    assert get_registry().get("loss", "margin").plugin == "test-plugin"
    errors = plugin_info("test-plugin-again").errors
    assert errors and "failed to register" in errors[0]


def test_module_like_plugin(plugin):
    import types

    module = types.ModuleType("clip_jax_test_module_plugin")

    @hookimpl
    def register_tokenizers(register):
        register("test-tok", lambda *args: None, description="module plugin")

    module.register_tokenizers = register_tokenizers
    plugin(module, "test-module")
    assert get_registry().get("tokenizer", "test-tok").plugin == "test-module"
    assert validate({"tokenizer": {"name": "test-tok"}}).tokenizer.name == "test-tok"
    # a component registered without a schema takes no options
    with pytest.raises(SpecError) as info:
        validate({"tokenizer": {"name": "test-tok", "vocab_size": 3}})
    assert [p for p, _ in info.value.problems] == ["tokenizer.vocab_size"]


# --------------------------------------------------------------- entry points and env
@pytest.fixture
def broken_distribution(tmp_path, monkeypatch):
    """An installed distribution whose ``clip_jax`` entry point fails to import."""
    site = tmp_path / "site"
    info = site / "clip_jax_test_broken-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: clip-jax-test-broken\nVersion: 0.3\n"
    )
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [clip_jax]
            test-broken-ep = clip_jax_test_broken_module_that_does_not_exist
            """
        )
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_plugin_that_fails_to_import_is_reported(broken_distribution):
    registry = get_registry()
    info = plugin_info("test-broken-ep")
    assert info.distribution == "clip-jax-test-broken"
    assert info.version == "0.3"
    assert len(info.errors) == 1
    assert "failed to load" in info.errors[0]
    assert "ModuleNotFoundError" in info.errors[0]
    # the rest keeps working, and a spec naming a missing component mentions the plugin
    assert "quickstart" in registry.templates
    assert validate({"loss": {"name": "sigmoid"}}).loss.name == "sigmoid"
    with pytest.raises(SpecError, match="test-broken-ep"):
        validate({"model": {"architecture": "from-the-broken-plugin"}})


def test_disable_plugins_env(monkeypatch, broken_distribution):
    monkeypatch.setenv("CLIP_JAX_DISABLE_PLUGINS", "clipctl-templates, test-broken-ep")
    get_registry.cache_clear()
    registry = get_registry()
    names = [p.name for p in registry.plugins]
    assert "clipctl-templates" not in names
    assert "test-broken-ep" not in names
    assert registry.templates == {}
    assert registry.broken() == []
    # the built-ins are not an entry point: they are always there
    assert BUILTINS["loss"] <= set(registry.names("loss"))


def test_allow_list_env(monkeypatch, broken_distribution):
    monkeypatch.setenv("CLIP_JAX_PLUGINS", "clipctl-templates")
    get_registry.cache_clear()
    names = [p.name for p in get_registry().plugins]
    assert names == ["builtins", "clipctl-templates"]

    monkeypatch.setenv("CLIP_JAX_PLUGINS", "")
    get_registry.cache_clear()
    assert [p.name for p in get_registry().plugins] == ["builtins"]
    assert get_registry().templates == {}

    monkeypatch.setenv("CLIP_JAX_PLUGINS", "test-broken-ep,clipctl-templates")
    get_registry.cache_clear()
    names = {p.name for p in get_registry().plugins}
    assert names == {"builtins", "clipctl-templates", "test-broken-ep"}


def test_disable_wins_over_allow(monkeypatch):
    monkeypatch.setenv("CLIP_JAX_PLUGINS", "clipctl-templates")
    monkeypatch.setenv("CLIP_JAX_DISABLE_PLUGINS", "clipctl-templates")
    get_registry.cache_clear()
    assert [p.name for p in get_registry().plugins] == ["builtins"]


def test_in_process_plugins_are_not_filtered_by_env(monkeypatch, plugin):
    monkeypatch.setenv("CLIP_JAX_PLUGINS", "")
    plugin(MarginLossPlugin(), "test-plugin")
    assert "margin" in get_registry().names("loss")


def test_cache_is_rebuilt_after_env_change(monkeypatch):
    assert "quickstart" in get_registry().templates
    monkeypatch.setenv("CLIP_JAX_DISABLE_PLUGINS", "clipctl-templates")
    # cached until cleared
    assert "quickstart" in get_registry().templates
    get_registry.cache_clear()
    assert "quickstart" not in get_registry().templates


def test_templates_dir_exists():
    from clipctl.templates import templates_dir

    assert (Path(templates_dir()) / "quickstart.toml").is_file()


# ------------------------------------------------------------ plugin mistakes
def test_an_unknown_component_is_a_user_error_naming_the_key():
    from clip_jax.errors import PluginError, UserError

    with pytest.raises(UnknownComponentError) as info:
        get_registry().get("loss", "sigmod", key="loss.name")
    error = info.value
    assert isinstance(error, PluginError) and isinstance(error, UserError)
    assert isinstance(error, LookupError)  # what older callers catch
    assert error.key == "loss.name"
    assert str(error).startswith("loss.name: unknown loss 'sigmod'; did you mean 'sigmoid'?")


def test_a_name_from_one_of_our_plugins_says_which_package_brings_it():
    """Where only the core is installed (a wheel install), a template or spec that names
    the webdataset source says what to install."""
    import copy

    core_only = copy.copy(get_registry())
    core_only.components = {k: dict(v) for k, v in core_only.components.items()}
    core_only.components["data_source"].pop("webdataset", None)
    with pytest.raises(UnknownComponentError, match="pip install clip-jax-webdataset"):
        core_only.get("data_source", "webdataset", key="data.source")


class MistakenRegistrations:
    """A plugin whose registrations are wrong: each is reported, the good one kept."""

    @hookimpl
    def register_losses(self, register):
        register("", lambda options: None)
        register("not_callable", "softmax")
        register("dict_options", lambda options: None, options={"margin": 1.0})
        register("fine", lambda options: None, options=MarginOptions)


def test_mistaken_registrations_are_reported_not_fatal(plugin):
    plugin(MistakenRegistrations(), "test-mistakes")
    info = plugin_info("test-mistakes")
    assert info.registers == {"loss": ["fine"]}
    assert [e.split(": ", 1)[1] for e in info.errors] == [
        "the name must be a non-empty string",
        "the factory must be callable (got str)",
        "options must be a pydantic model class (got {'margin': 1.0})",
    ]
    assert info.errors[1].startswith("loss 'not_callable' not registered: ")
    # the spec names the rejected one as unknown, with the plugin's errors; no crash
    with pytest.raises(SpecError) as spec_error:
        validate({"loss": {"name": "dict_options"}})
    (path, message), *_ = spec_error.value.problems
    assert path == "loss.name" and "test-mistakes" in message
    assert validate({"loss": {"name": "fine"}}).loss.name == "fine"
