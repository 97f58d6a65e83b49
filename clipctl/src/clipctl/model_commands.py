"""Commands that use a trained model: ``clipctl eval``, ``export`` and ``predict``.

A model is a run folder or published weights (``hf:PATH``). Mistakes (a missing folder, an
architecture the format cannot express, an unreadable image) are UserErrors, raised where
they are found and reported by the ``clipctl`` group: one line, exit 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

import click

from clip_jax.errors import UserError


@click.command(name="eval")
@click.argument("run_dir")
@click.option("--step", type=int, default=None, help="Checkpoint step (default: latest).")
@click.option(
    "--data",
    default=None,
    help="Labelled tfrecord shards (glob) instead of the run's validation split.",
)
@click.option(
    "--classes",
    default=None,
    help="Class names + templates JSON, or 'imagenet' (OpenAI's 1000 names, 80 prompts).",
)
@click.option(
    "--linear-probe", is_flag=True, help="Also fit a logistic regression on frozen embeddings."
)
@click.option(
    "--probe-data",
    default=None,
    help="Shards the probe trains on (default: the run's training shards).",
)
@click.option("--image-key", default=None, help="Image feature of --data (default: the run's).")
@click.option(
    "--label-key", default=None, help="Integer label feature of --data (default: the run's)."
)
@click.option("--caption-key", default=None, help="Caption feature of --data ('' for none).")
@click.option("--max-examples", type=int, default=None, help="Evaluate at most this many examples.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(
    run_dir: str,
    step: int | None,
    data: str | None,
    classes: str | None,
    linear_probe: bool,
    probe_data: str | None,
    image_key: str | None,
    label_key: str | None,
    caption_key: str | None,
    max_examples: int | None,
    as_json: bool,
) -> None:
    """Evaluate a run (or hf:PATH weights): zero-shot accuracy, retrieval recall, linear
    probe, head accuracy; results are appended to the run's metrics.jsonl."""
    from clip_jax.inference import evaluate_run

    with echoed_warnings("clip_jax.eval_sets"):  # what was skipped, and why: on stderr
        results = evaluate_run(
            run_dir, step, data=data, classes=classes, linear_probe=linear_probe,
            probe_data=probe_data, image_key=image_key, caption_key=caption_key,
            label_key=label_key, max_examples=max_examples,
        )  # fmt: skip
    if as_json:
        click.echo(json.dumps(results))
        return
    width = max(map(len, results), default=0)
    for key, value in results.items():
        click.echo(f"{key:<{width}}  {_metric(value)}")


def _metric(value: object) -> str:
    """A metric for the eval table: 4 decimals, small floats (a loss of 1e-5) in 4
    significant digits rather than as 0.0000."""
    if isinstance(value, float):
        return f"{value:.4g}" if value and abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


@click.command(name="export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())
@click.option(
    "--format",
    "format_",
    default="hf",
    show_default=True,
    help="hf, the one format export writes: a folder transformers loads (CLIPModel, "
    "SiglipModel or, for NaFlex runs, Siglip2Model; tokenizer, processor). open_clip and "
    'big_vision are import formats (train.init_from = "open_clip:PATH").',
)
@click.option("--step", type=int, default=None, help="Checkpoint step (default: latest).")
def export_command(run_dir: str, out: str, format_: str, step: int | None) -> None:
    """Write RUN_DIR's model to OUT in another format (Hugging Face transformers)."""
    from clip_jax.export import export

    with echoed_warnings("clip_jax.export"):
        path = export(run_dir, out, format_, step)
    click.echo(f"wrote {path} ({format_})")


@contextlib.contextmanager
def echoed_warnings(logger: str) -> Iterator[None]:
    """The logger's warnings as ``warning: ...`` lines on stderr while the block runs:
    what a converter has to say about its output (a NaFlex run exported at a fixed
    size, say) reaches the person at the terminal, once, in clipctl's own style."""

    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            click.secho("warning: ", fg="yellow", bold=True, err=True, nl=False)
            click.echo(record.getMessage(), err=True)

    target, handler = logging.getLogger(logger), Echo(logging.WARNING)
    propagate, target.propagate = target.propagate, False
    target.addHandler(handler)
    try:
        yield
    finally:
        target.removeHandler(handler)
        target.propagate = propagate


images_option = click.option(
    "--image", "images", multiple=True, required=True, type=click.Path(dir_okay=False),
    help="An image file; repeat for several.",
)  # fmt: skip


@click.command(name="predict")
@click.argument("model")
@images_option
@click.option("--labels", required=True, help='Comma-separated class names: "cat,dog,bird".')
@click.option(
    "--template", "templates", multiple=True,
    help='Prompt template with {} for the label (repeatable; default "a photo of a {}.").',
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
def predict_command(
    model: str, images: tuple[str, ...], labels: str, templates: tuple[str, ...], as_json: bool
) -> None:
    """Zero-shot classify images with MODEL (a run folder or hf:PATH)."""
    classes = [label.strip() for label in labels.split(",") if label.strip()]
    if not classes:
        raise UserError("give at least one class name", key="--labels")
    prompts = list(templates) or ["a photo of a {}."]
    bad = [t for t in prompts if t.count("{}") != 1]
    if bad:
        raise UserError(f"{bad[0]!r}: a template holds {{}} exactly once", key="--template")
    from clip_jax.inference import load  # jax: only once the options are known good

    probs = load(model).classify(list(images), classes, prompts)
    rows = [
        {
            "image": image,
            "label": classes[int(row.argmax())],
            "probs": {name: round(float(p), 6) for name, p in zip(classes, row, strict=True)},
        }
        for image, row in zip(images, probs, strict=True)
    ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        best = row["label"]
        click.echo(f"{row['image']}: {best} ({row['probs'][best]:.3f})")


@click.command(name="caption")
@click.argument("model")
@images_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
def caption_command(model: str, images: tuple[str, ...], as_json: bool) -> None:
    """Caption images with a run trained with the captioning term ([[loss.aux]])."""
    from clip_jax.inference import load  # jax: only once the options are known good

    rows = zip(images, load(model).caption(list(images)), strict=True)
    if as_json:
        click.echo(json.dumps([{"image": image, "caption": text} for image, text in rows]))
        return
    for image, text in rows:
        click.echo(f"{image}: {text}")
