"""Experiment loggers: ``[logging] loggers`` -> subscribers of the training loop's events.

Each logger is a component of kind ``logger`` (``register_loggers``), built by
``factory(options, run)`` with a ``RunContext``. The built-ins:

- ``jsonl``: metrics.jsonl and status.json (``RunFolderWriter``). The run folder is the
  contract that ``clipctl runs``, the TUI and resuming read, so the trainer subscribes it
  always: listing ``jsonl`` or not changes nothing (it is the default, for clarity);
- ``tensorboard``: event files in ``<run.output_dir>/tensorboard/``, one run with the
  tags ``train/<key>`` and ``eval/<key>``, and the spec, parameter counts and machine as
  text (``run/...``) and scalars (``parameters/...``).

Only the main process logs. A tracker that fails, when it starts or later, is switched
off with one warning in run.log (``events.Tolerant``): tracking never stops training.
"""

from __future__ import annotations

import math
import platform
import socket
from dataclasses import dataclass
from typing import Any

from clip_jax.run_folder import RunFolder
from clip_jax.train.events import Events, Subscriber, Tolerant

TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class RunContext:
    """What a logger factory knows about the run before it starts."""

    name: str  # run.name
    folder: Any  # the run folder: a pathlib.Path, or a gs:// path (clip_jax.storage)
    spec: dict[str, Any]  # the resolved spec, as plain data (clip_jax.spec.to_dict)
    steps: int  # train.steps

    @classmethod
    def of(cls, spec: Any, folder: RunFolder) -> RunContext:
        from clip_jax import spec as spec_lib

        return cls(spec.run.name, folder.path, spec_lib.to_dict(spec), spec.train.steps)


def subscribe(events: Events, spec: Any, folder: RunFolder, registry: Any = None) -> None:
    """Build the spec's loggers (besides ``jsonl``, which the trainer always has) and
    subscribe each, wrapped in ``Tolerant``. A factory that raises is one warning."""
    if not folder.writable:  # every process but the main one: the main one logs
        return
    from clip_jax.plugins import get_registry

    registry = registry or get_registry()
    run = RunContext.of(spec, folder)
    for name in spec.logging.loggers:
        if name == "jsonl":
            continue
        component = registry.get("logger", name, key="logging.loggers")
        try:
            logger = component.factory(getattr(spec.logging, name, None), run)
        except Exception as exc:
            events.message(
                f"warning: logger {name!r} could not start ({type(exc).__name__}: {exc}); "
                "the run goes on without it"
            )
            continue
        events.subscribe(Tolerant(logger, name, events.message))


def run_info(spec: Any, params: Any) -> dict[str, Any]:
    """What every logger records once at the start: the resolved spec, the parameter
    counts and the machine."""
    from clip_jax import spec as spec_lib

    return {
        "spec": spec_lib.to_dict(spec),
        "parameters": parameter_counts(params),
        "machine": machine(),
    }


def parameter_counts(params: Any) -> dict[str, int]:
    """``total`` and one count per top-level parameter group (vision, text, head...)."""
    import jax

    def count(tree: Any) -> int:
        return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))

    counts = {"total": count(params)}
    counts.update({str(name): count(tree) for name, tree in params.items()})
    return counts


def machine() -> dict[str, Any]:
    """The host, the software and the devices the run trains on."""
    import jax

    devices = jax.devices()
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
    }


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric values (what a tracker can plot), without its step, split
    and wall time."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in ("step", "split", "time")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


# ------------------------------------------------------------------------ factories
def jsonl_logger(options: Any, run: RunContext) -> Subscriber:
    """``jsonl`` is registered so that ``logging.loggers`` may list it and ``clipctl
    plugins`` shows it; the trainer's own ``RunFolderWriter`` writes metrics.jsonl and
    status.json, listed or not (``subscribe`` skips this name). A no-op: a second writer
    would hold a second ``storage.Appender`` on the same files, and on a URL two of them
    overwrite each other's lines."""
    return Subscriber()


def tensorboard_logger(options: Any, run: RunContext) -> Subscriber:
    """TensorBoard event files in ``<run folder>/tensorboard/``."""
    return TensorBoardLogger(run.folder / TENSORBOARD_DIR, options.flush_seconds)


class TensorBoardLogger(Subscriber):
    """Writes through TensorFlow's summary writer (TensorFlow is already the input
    pipeline's): no extra dependency, and any TensorBoard reads the files.

    ``tf.summary.scalar`` and ``text`` live in the tensorboard package, which is not a
    dependency: the summaries are written with ``tf.summary.write`` and the plugin
    metadata (``scalars``, ``text``) that TensorBoard's own functions attach.
    """

    def __init__(self, logdir: Any, flush_seconds: float = 10.0):
        from clip_jax.data.tf_setup import import_tf

        self.tf = import_tf()
        self.writer = self.tf.summary.create_file_writer(
            str(logdir), flush_millis=int(flush_seconds * 1000)
        )
        self.metadata = {
            plugin: self.tf.compat.v1.SummaryMetadata(
                plugin_data=self.tf.compat.v1.SummaryMetadata.PluginData(plugin_name=plugin)
            ).SerializeToString()
            for plugin in ("scalars", "text")
        }

    def _scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
        tf = self.tf
        with self.writer.as_default(step=step):
            for key, value in values.items():
                tensor = tf.constant(value, tf.float32)
                tf.summary.write(f"{prefix}/{key}", tensor, metadata=self.metadata["scalars"])

    def _text(self, step: int, tag: str, text: str) -> None:
        with self.writer.as_default(step=step):
            self.tf.summary.write(tag, self.tf.constant(text), metadata=self.metadata["text"])

    def on_run_info(self, step: int, info: dict[str, Any]) -> None:
        import tomlkit

        # TensorBoard renders text as Markdown: indented lines stay verbatim
        spec = tomlkit.dumps(info["spec"])
        self._text(step, "run/spec", "\n".join("    " + line for line in spec.split("\n")))
        rows = "\n".join(f"| {k} | {v} |" for k, v in info["machine"].items())
        self._text(step, "run/machine", f"| | |\n|---|---|\n{rows}")
        self._scalars("parameters", step, info["parameters"])
        self.writer.flush()

    def on_step(self, step: int, record: dict[str, Any]) -> None:
        self._scalars("train", step, numbers(record))

    def on_eval(self, step: int, results: dict[str, Any]) -> None:
        self._scalars("eval", step, numbers(results))
        self.writer.flush()

    def on_guard(self, step: int, event: str, text: str) -> None:
        self._text(step, "run/guard", f"{event}: {text}")

    def on_rollback(self, step: int, to_step: int) -> None:
        """Event files cannot take points back: the steps after ``to_step`` are trained
        again and appear twice. Marked, so a chart's doubled stretch has its reason:
        ``guard/rollback_from`` (the step it came from) at the step it went back to."""
        self._scalars("guard", to_step, {"rollback_from": float(step)})
        self._text(to_step, "run/guard", f"rollback: steps {to_step + 1}..{step} again")
        self.writer.flush()

    def _close(self, *args: Any) -> None:  # a stop can be followed by a failure
        if self.writer is not None:
            self.writer.close()  # flushes
            self.writer = None

    on_finish = on_stop = on_failure = _close
