"""Shared fixtures. Eight simulated CPU devices, set before anything imports jax."""

import atexit
import os
import shutil
import sys
import tempfile

# Where PYTHONDONTWRITEBYTECODE is set (this project's CI machines), every process would
# compile TensorFlow's ~3,000 modules from source on import: 7.7 s instead of 3.3 s, paid
# again by each `clipctl` process a test starts. The session writes and reuses bytecode,
# as Python does by default.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def _fast_compile_flags() -> str:
    """XLA options that make CPU compilation ~1.5x cheaper for the tests' small programs:
    no LLVM optimisation of the generated code. Compiling is most of a jax test's cost here
    (a fast-tier session compiles ~300 programs); the code runs slower, which the tests'
    small models do not notice, and the programs (HLO, memory analyses) are the same.
    Results agree with the default build's to float rounding. (The older fusion emitters,
    --xla_cpu_use_fusion_emitters=false, would halve compile time again, but together with
    these they moved one gradient of test_scan_remat.py's remat comparison past its
    tolerance.) Set only where this jaxlib knows both flags: an unknown flag in XLA_FLAGS
    aborts the process."""
    import importlib.util
    import mmap

    flags = ("xla_backend_optimization_level=0", "xla_llvm_disable_expensive_passes=true")
    try:
        jaxlib = importlib.util.find_spec("jaxlib")  # finds it, imports nothing
        library = os.path.join(os.path.dirname(jaxlib.origin), "libjax_common.so")
        with open(library, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if all(m.find(flag.split("=")[0].encode()) >= 0 for flag in flags):
                return " ".join(f"--{flag}" for flag in flags)
    except (AttributeError, OSError, TypeError, ValueError):
        pass
    return ""


FAST_COMPILE_FLAGS = _fast_compile_flags()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process with `devices` simulated CPU devices (and the flags above)."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}".strip()


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One XLA compilation cache for the session, inherited by the `clipctl run` processes
# the tests start: many tests train the same small model, and each in-process train()
# or launched run would otherwise compile the same programs again (-40 s on test_train
# and test_runs). Per session, so no test ever reads another session's executables.
_cache: str | None = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="clip-jax-tests-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "templates" / "quickstart.toml"

# A model and run small enough for a test: a few seconds per run on 2 cores.
SMALL_RUN = [
    "model.vision.width=64",
    "model.vision.depth=1",
    "model.vision.heads=2",
    "model.text.width=64",
    "model.text.depth=1",
    "model.text.heads=2",
    "model.embed_dim=32",
    "train.batch_size=64",
    "train.log_every=5",
    "eval.batch_size=64",
    "eval.every=0",
    "optimizer.warmup_steps=5",
    "tokenizer.vocab_size=512",
]


class LazyModule:
    """A module imported on first use, for test files whose reference libraries (torch,
    transformers: ~2 s to import) only their slow tests need: collecting the file, or
    running its other tests, imports nothing. A test that uses it is skipped, as
    pytest.importorskip would, where the library is missing."""

    def __init__(self, name: str, reason: str, needs: tuple["LazyModule", ...] = ()) -> None:
        self._name, self._reason, self._needs = name, reason, needs

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # pytest's collection looks for its own markers here
            raise AttributeError(attr)
        for module in self._needs:  # transformers imports without torch, then fails in use
            pytest.importorskip(module._name, reason=module._reason)
        return getattr(pytest.importorskip(self._name, reason=self._reason), attr)


HEAVY_MODULES = ("jax", "tensorflow", "flax", "optax")


def clipctl_in_a_fresh_interpreter(args: list[str], exit_codes: tuple = (0, None)):
    """``clipctl ARGS`` in a new Python process that then fails if it imported jax,
    TensorFlow, flax or optax (what `--help` and `validate` must stay fast without).
    Returns the finished process (its stdout and stderr as text)."""
    import subprocess
    import textwrap

    code = textwrap.dedent(
        f"""
        import sys
        import clipctl.cli
        try:
            clipctl.cli.cli({args!r})
        except SystemExit as exit:
            assert exit.code in {exit_codes!r}, exit.code
        heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]
        assert not heavy, heavy
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small copy of the embedded dataset (written once per test session)."""
    from clip_jax.data.synth_writer import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, train_examples=1024, validation_examples=256, workers=1)
    return out


@pytest.fixture
def small_run(synthetic_dir, tmp_path) -> list[str]:
    """Overrides that turn the quickstart into a seconds-long run in tmp_path."""
    return SMALL_RUN + [
        f"data.dir={synthetic_dir}",
        "data.train_examples=1024",
        "data.validation_examples=256",
        f"run.output_dir={tmp_path / 'run'}",
    ]


@pytest.fixture
def fresh_registry():
    """The test starts and ends with a registry rebuilt from the current environment."""
    from clip_jax.plugins import get_registry

    get_registry.cache_clear()
    yield
    get_registry.cache_clear()


@pytest.fixture
def plugin():
    """register_plugin(obj, name) for the test; unregistered afterwards."""
    from clip_jax.plugins import register_plugin, unregister_plugin

    names = []

    def add(obj, name):
        names.append(name)
        register_plugin(obj, name)

    yield add
    for name in names:
        unregister_plugin(name)


def _slow_tests_deselected(config) -> bool:
    """True for the fast tier: a -m expression that leaves out tests marked slow."""
    markexpr = config.getoption("markexpr", "") or ""
    if not markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression

        return not Expression.compile(markexpr).evaluate(lambda name, **_: name == "slow")
    except Exception:  # an expression pytest itself will refuse, or another pytest
        return "not slow" in markexpr


def pytest_configure(config) -> None:
    """The fast tier (-m "not slow") fuzzes fewer specs per property in test_spec_fuzz.py
    (30 examples instead of 150: the same properties, 2 s less); the full suite keeps 150,
    and CLIP_JAX_FUZZ_EXAMPLES, when set, wins in both."""
    if _slow_tests_deselected(config):
        os.environ.setdefault("CLIP_JAX_FUZZ_EXAMPLES", "30")


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Leave without the interpreter's teardown. Dozens of tf.data pipelines, XLA
    thread pools and jax runtimes built in one process are torn down there, and twice
    in CI that teardown never returned (a dropped tf.data iterator waiting for its
    autotuning thread; the pipelines no longer autotune, and the `clipctl` processes the
    tests start exit normally). A hung pytest would hold CI until its time limit; the
    report is complete by now. CLIP_JAX_TESTS_FULL_TEARDOWN=1 tears down as usual."""
    if not _exit_status or os.environ.get("CLIP_JAX_TESTS_FULL_TEARDOWN"):
        return
    if _cache is not None:
        shutil.rmtree(_cache, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[-1])
