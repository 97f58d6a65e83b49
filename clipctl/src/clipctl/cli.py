"""The ``clipctl`` command line.

Start-up stays fast: this module imports neither jax nor tensorflow; commands that
train or evaluate import the core trainer when they run. Errors take one path
(``clipctl.errors``): a command raises, the group prints and picks the exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import click

from clip_jax.errors import PathError, RunFolderError, UserError
from clipctl import __version__, info_command, model_commands, plugin_new
from clipctl.errors import (
    EXECUTES_PROGRAMS,
    ClipctlGroup,
    CommandFailed,
    claim_process,
    exit_interrupted,
)
from clipctl.spec_args import load, overrides_argument, spec_argument


@click.group(
    cls=ClipctlGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="clipctl")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Build, run and inspect clip-jax training runs.

    \b
    Quick start:
      clipctl run templates/quickstart.toml
      clipctl eval runs/quickstart --json
    """
    if ctx.invoked_subcommand is None:
        # People at a terminal get the TUI; scripts and pipes get the help, as before.
        if sys.stdin.isatty() and sys.stdout.isatty():
            from clipctl.app import main as tui_main

            tui_main()
        else:
            click.echo(ctx.get_help())


@cli.command()
@spec_argument
@overrides_argument
def validate(spec: str, overrides: tuple[str, ...]) -> None:
    """Check a spec (and overrides); print `valid` or every problem, exit 2 if invalid."""
    load(spec, overrides)
    click.echo("valid")


@cli.command()
@spec_argument
@overrides_argument
def show(spec: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved spec as TOML (templates, presets and overrides applied)."""
    from clip_jax.spec import to_toml

    click.echo(to_toml(load(spec, overrides)), nl=False)


@cli.command()
@spec_argument
@overrides_argument
@click.option("--force", is_flag=True, help="Use this spec in a run folder made by another.")
@click.option(
    "--hosts",
    default=None,
    metavar="tpu:NAME[@ZONE]|ssh:H1,H2,...|slurm[:NODES]",
    help="Run on every host of a TPU slice, SSH hosts or a Slurm job (see README).",
)
@click.option("--dry-run", is_flag=True, help="With --hosts: print the commands, start nothing.")
def run(
    spec: str, overrides: tuple[str, ...], force: bool, hosts: str | None, dry_run: bool
) -> None:
    """Train (or resume) the run a spec describes.

    Ctrl-C or SIGTERM (`clipctl stop`) finishes the step, saves a checkpoint and exits
    with code 130; rerunning the same command resumes.
    """
    if hosts is not None or dry_run:
        from clipctl.launch_command import run_on_hosts

        if hosts is None:
            raise UserError("--dry-run shows the commands of a --hosts launch: add --hosts")
        run_on_hosts(spec, overrides, hosts, force, dry_run)
        return
    # SIGTERM before the training loop (imports, data, tokenizer) stops like Ctrl-C
    # instead of killing the process and leaving the run folder saying "running".
    previous = _interrupt_on_sigterm()
    try:
        _run(spec, overrides, force)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(spec: str, overrides: tuple[str, ...], force: bool) -> None:
    resolved = load(spec, overrides)
    from clip_jax.run_folder import RunFolder
    from clip_jax.spec import to_toml

    # A finished run answers at once, before jax and TensorFlow are imported.
    done = RunFolder(resolved.run.output_dir).finished_result(
        to_toml(resolved), resolved.train.steps
    )
    if done is not None:
        click.echo(f"run already finished at step {done['step']}", err=True)
        click.echo(json.dumps({"run_dir": resolved.run.output_dir, **done}))
        return
    try:
        from clip_jax.train.trainer import train

        results = train(resolved, force=force)  # a UserError: the group reports it
    except KeyboardInterrupt:
        folder = RunFolder(resolved.run.output_dir)
        status = folder.status()
        ours = status.get("pid") == os.getpid()
        if status.get("state") == "starting" and ours:
            # stopped before the trainer took over from `clipctl resume`/the TUI
            fields = {k: status[k] for k in ("step", "steps") if k in status}
            folder.write_status("interrupted", **fields)
        elif status.get("state") == "interrupted" and ours:
            exit_interrupted()  # the trainer said where it stopped ("stopped at step N")
        click.echo("interrupted; rerun the same command to resume", err=True)
        exit_interrupted()
    click.echo(json.dumps({"run_dir": resolved.run.output_dir, **results}))


def _interrupt_on_sigterm():
    """Make SIGTERM raise KeyboardInterrupt; returns the previous handler (None if unset)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    from clip_jax.train.signals import request_stop

    def interrupt(signum, frame):
        request_stop()  # remembered, in case this exception is swallowed where it lands
        raise KeyboardInterrupt

    default_hook = sys.unraisablehook

    def quiet_when_swallowed(unraisable) -> None:
        # Landing in a gc callback (jax's), the exception is "ignored" with a printed
        # traceback; the request is remembered and honoured, so the traceback is noise.
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            default_hook(unraisable)

    sys.unraisablehook = quiet_when_swallowed
    return signal.signal(signal.SIGTERM, interrupt)


def _run_folder(run_dir: str) -> Path:
    """The run folder RUN, or a RunFolderError when it is not one."""
    from clip_jax import storage
    from clip_jax.run_folder import SPEC, STATUS

    path = storage.path(run_dir)  # a local folder or a URL (gs://)
    if not any((path / name).exists() for name in (SPEC, STATUS, "hosts.json")):
        raise RunFolderError(f"{run_dir} is not a run folder (no {SPEC} or {STATUS})")
    return path


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


@cli.command(name="runs")
@click.argument("root", type=click.Path(file_okay=False), default="runs", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per run.")
def runs_command(root: str, as_json: bool) -> None:
    """List the run folders under ROOT (default ./runs) with their state and progress."""
    from clip_jax import storage
    from clipctl import runs as runs_lib

    if not storage.path(root).is_dir():
        raise PathError(f"no folder {root}: pass the folder that holds your runs")
    found = runs_lib.find_runs(root)
    if as_json:
        click.echo(json.dumps([run.to_dict() for run in found], indent=2))
        return
    if not found:
        click.echo(f"no runs under {root}", err=True)
        return
    header = ("RUN", "STATE", "STEP", "LOSS", "ZERO-SHOT", "IMAGES/S", "ETA")
    rows = [
        (
            run.name,
            run.state,
            f"{run.step}/{run.steps}" if run.steps else str(run.step),
            _cell(run.loss, ".4f"),
            _cell((run.evaluation or {}).get("zero_shot_top1"), ".3f"),
            _cell(run.images_per_s, ",.0f"),
            runs_lib.format_duration(run.eta_s),
        )
        for run in found
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        left = [cell.ljust(width) for cell, width in zip(row[:2], widths[:2], strict=True)]
        right = [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        click.echo("  ".join(left + right).rstrip())


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))
@click.option("--wait", is_flag=True, help="Wait until the run has saved and stopped.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds --wait waits.")
def stop(run_dir: str, wait: bool, timeout: float) -> None:
    """Stop a running run gracefully: it finishes its step, saves a checkpoint and exits."""
    from clipctl import runs as runs_lib

    path = _run_folder(run_dir)
    if not runs_lib.stop(path):
        state = runs_lib.summarize(path).state
        raise RunFolderError(f"run {run_dir} is not running (state: {state}); nothing to stop")
    pid = runs_lib.summarize(path).pid
    click.echo(f"asked run {run_dir} (pid {pid}) to stop; it saves a checkpoint and exits")
    if not wait:
        return
    try:
        done = runs_lib.wait_for_state(path, runs_lib.ENDED, timeout)
    except TimeoutError as exc:
        raise CommandFailed(str(exc)) from None
    if done.state == "failed":
        raise CommandFailed(
            f"run {run_dir} failed while stopping: {done.error or 'see its run.log'}"
        )
    saved = f"; checkpoint at step {done.checkpoints[-1]}" if done.checkpoints else ""
    click.echo(f"run {run_dir} {done.state} at step {done.step}{saved}")


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))
def resume(run_dir: str) -> None:
    """Relaunch a stopped run in the background; it continues from its last checkpoint."""
    from clipctl import runs as runs_lib

    summary = runs_lib.resume(_run_folder(run_dir))  # refusals are RunFolderErrors
    path = Path(run_dir)
    follow = "clipctl runs" if path.parent == Path("runs") else f"clipctl runs {path.parent}"
    click.echo(
        f"resumed run {run_dir} in the background: pid {summary.pid}, output in "
        f"{path / runs_lib.LAUNCH_LOG} (follow it with `{follow}`)"
    )


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG file to write (default: RUN/curves.png).",
)
def plot(run_dir: str, out_path: str | None) -> None:
    """Draw a run's loss, learning rate and evaluation curves into a PNG."""
    from clipctl.plot import plot_run

    path = _run_folder(run_dir)
    click.echo(str(plot_run(path, out_path or path / "curves.png")))


@cli.group(invoke_without_command=True)
@click.pass_context
def templates(ctx: click.Context) -> None:
    """List the run-spec templates of every plugin (or copy one)."""
    if ctx.invoked_subcommand is not None:
        return
    from clip_jax.plugins import get_registry

    found = get_registry().templates
    width = max((len(name) for name in found), default=0)
    for name, template in sorted(found.items()):
        click.echo(f"{name:<{width}}  {template.description}")


@templates.command(name="copy")
@click.argument("name")
@click.argument("dest", type=click.Path())
def templates_copy(name: str, dest: str) -> None:
    """Copy template NAME to DEST (a file, or a folder to copy into)."""
    from clip_jax.plugins import get_registry

    found = get_registry().templates
    if name not in found:
        raise UserError(_unknown_template(name, sorted(found)))
    target = Path(dest)
    if target.is_dir():
        target = target / found[name].path.name
    if target.exists():
        raise PathError("exists; not overwriting it: choose another name", key=str(target))
    shutil.copyfile(found[name].path, target)
    click.echo(str(target))


def _unknown_template(name: str, names: list[str]) -> str:
    """The message for a template name nobody registers, with the closest one."""
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown template {name!r}{hint} (available: {', '.join(names)})"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List plugins: distribution, version, what each registers, load errors."""
    from clip_jax.plugins import get_registry

    infos = [p.as_dict() for p in get_registry().plugins]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    for info in infos:
        origin = f"{info['distribution'] or '-'} {info['version'] or ''}".strip()
        click.secho(f"{info['name']}", bold=True, nl=False)
        click.echo(f"  ({origin})")
        for kind, names in info["registers"].items():
            click.echo(f"  {kind}: {', '.join(names)}")
        for error in info["errors"]:
            click.secho(f"  error: {error}", fg="red")


@cli.group()
def data() -> None:
    """Datasets: write the embedded synthetic dataset."""


@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--train-examples", default=20000, show_default=True)
@click.option("--validation-examples", default=1024, show_default=True)
@click.option("--image-size", default=32, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--format",
    "format_name",
    default="tfrecord",
    show_default=True,
    help="record format of the shards: tfrecord, or one a data source plugin adds (webdataset)",
)
def synth(
    out_dir: str,
    train_examples: int,
    validation_examples: int,
    image_size: int,
    seed: int,
    format_name: str,
) -> None:
    """Write captioned synthetic shapes as img2dataset-style shards (tfrecord or tar)."""
    from clip_jax.data.formats import record_format
    from clip_jax.data.synth_writer import write_synthetic

    shards = record_format(format_name)  # an unknown name: a UserError naming --format
    # A folder synth did not write is never touched: a PathError naming it.
    settings = write_synthetic(
        out_dir, train_examples, validation_examples, image_size, seed, record_format=shards
    )
    click.echo(
        f"wrote {settings['train_examples']} train and {settings['validation_examples']} "
        f"validation examples ({len(settings['classes'])} classes) to {out_dir}"
    )


cli.add_command(info_command.info)
cli.add_command(model_commands.eval_command)
cli.add_command(model_commands.export_command)
cli.add_command(model_commands.predict_command)
cli.add_command(model_commands.caption_command)
cli.add_command(plugin_new.plugin)


# Commands that run XLA programs (EXECUTES_PROGRAMS) re-execute themselves with huge
# pages for XLA's scratch memory first (clip_jax.host_memory); the others start as they are.


def main() -> None:
    claim_process()
    if EXECUTES_PROGRAMS.intersection(sys.argv[1:2]):
        from clip_jax.host_memory import reexec_with_huge_pages

        reexec_with_huge_pages()
    cli()


if __name__ == "__main__":
    main()
