"""``clipctl info``: parameter counts, FLOPs, per-device bytes, and will it fit.

Its own module because the memory options (``--device``, ``--max-batch``...) need their
own parsing; mistakes in them are UserErrors, reported by the group like every other.
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

import click

from clip_jax.errors import UserError
from clipctl.errors import CommandFailed
from clipctl.spec_args import load, overrides_argument, resolve_spec, spec_argument


@click.command()
@spec_argument
@overrides_argument
@click.option("--devices", type=click.IntRange(min=1), help="Size the mesh for N devices.")
@click.option("--batch", type=click.IntRange(min=1), help="Global batch (default: the spec's).")
@click.option("--device", "device_name", metavar="NAME", help="Accelerator: tpu-v5e, h100...")
@click.option("--device-memory", "memory_size", metavar="SIZE", help="Per device: 16GiB, 80GB...")
@click.option("--max-batch", is_flag=True, help="Search the largest global batch that fits.")
@click.option("--strategies", metavar="LIST", help="Sharding strategies: a comma list, or all.")
@click.option("--microbatches", metavar="LIST", help="Micro-batch counts: a comma list.")
@click.option("--no-memory", is_flag=True, help="Skip the compiled memory estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(spec: str, overrides: tuple[str, ...], **options: Any) -> None:
    """Parameter counts, training FLOPs per pair, per-device bytes, and will it fit.

    \b
    The memory per device is XLA's for the compiled train step (no data, nothing
    allocated) on a mesh of --devices, simulated on CPU when this machine has fewer,
    compared with --device NAME, --device-memory SIZE or the local accelerator's.
    --max-batch finds the largest global batch that fits, per strategy
    (--strategies all) and micro-batch count (--microbatches 1,2,4).
    """
    resolved = load(spec, overrides)
    from clip_jax.info import model_info

    memory = _memory_request(**options)
    facts = model_info(resolved, options["devices"])
    if memory is not None:
        try:
            path = str(resolve_spec(spec))  # a template's name works here too
            facts["memory"] = _memory_report(path, overrides, facts["devices"], memory)
        except RuntimeError as exc:  # the simulated-devices subprocess failed
            raise CommandFailed(str(exc)) from None
    if options["as_json"]:
        click.echo(json.dumps(facts))
        return
    _print_facts(facts, resolved.sharding.strategy)


def _print_facts(facts: dict[str, Any], strategy: str) -> None:
    """The human-readable table (and the memory report, when there is one)."""
    counts = facts["parameters"]
    mesh = " x ".join(f"{axis}={size}" for axis, size in facts["mesh"].items())
    rows = [
        ("parameters", f"{counts['total']:,}"),
        ("  vision tower", f"{counts['vision']:,}"),
        ("  text tower", f"{counts['text']:,}"),
        ("  projections, scale", f"{counts['heads']:,}"),
        *([("  auxiliary terms", f"{counts['aux']:,}")] if "aux" in counts else []),
        ("train FLOPs / pair", f"{facts['train_flops_per_pair'] / 1e9:,.2f} G"),
        (
            f"mesh ({facts['devices']} device{'s' * (facts['devices'] != 1)})",
            f"{mesh} ({strategy})",
        ),
        ("param bytes / device", f"{facts['param_bytes_per_device'] / 2**20:,.1f} MiB"),
        ("param bytes, all", f"{facts['param_bytes_total'] / 2**20:,.1f} MiB"),
    ]
    for label, value in rows:
        click.echo(f"{label:<22} {value}")
    if "xla_attention_for" in facts and "memory" not in facts:  # else the report says so
        keys = ", ".join(facts["xla_attention_for"])
        click.echo(f"* {keys} = 'cudnn' counted with XLA's attention (no GPU here)")
    if "memory" in facts:
        from clip_jax.fits import format_report

        click.echo("\n" + format_report(facts["memory"]))


def _memory_request(**options: Any) -> dict | None:
    """``clip_jax.memory.report``'s arguments from the info options (None: no estimate)."""
    from clip_jax.fits import device_memory

    if options["no_memory"]:
        if options["max_batch"]:
            raise UserError("needs the memory estimate: drop --no-memory", key="--max-batch")
        return None
    micro, strategies = options["microbatches"], options["strategies"]
    try:
        counts = [int(k) for k in micro.split(",")] if micro else None
    except ValueError:
        raise UserError(
            f"{micro!r} is not a comma list of integers", key="--microbatches"
        ) from None
    return {
        "batch": options["batch"],
        "memory": device_memory(options["device_name"], options["memory_size"]) or "local",
        "search": options["max_batch"],
        "strategies": [s.strip() for s in strategies.split(",")] if strategies else None,
        "microbatches": counts,
        "live": None if options["as_json"] else sys.stderr.isatty(),  # None: quiet
    }


def _memory_report(spec: str, overrides: tuple[str, ...], devices: int, request: dict) -> dict:
    """Run the estimate, showing its progress on one rewritten line at a terminal."""
    from clip_jax.memory import print_progress, report

    live = request.pop("live")
    width = shutil.get_terminal_size().columns - 4

    def show(message: str) -> None:  # one line, rewritten in place, cleared at the end
        click.echo(f"\r\x1b[2K{message[:width]}...", nl=False, err=True)

    plain = print_progress if live is False else None  # a log or a pipe: plain lines
    try:
        return report(spec, overrides, devices, progress=show if live else plain, **request)
    finally:
        if live:
            click.echo("\r\x1b[2K", nl=False, err=True)
