"""Commands that use a trained model: ``clipctl export`` and ``clipctl predict``.

A model is a run folder or published weights (``hf:PATH``). Mistakes (a missing folder, an
architecture the format cannot express, an unreadable image) are one line and exit 2.
"""

from __future__ import annotations

import json
import sys

import click

EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
    click.secho("error: ", fg="red", bold=True, err=True, nl=False)
    click.echo(message, err=True)
    sys.exit(EXIT_USER_ERROR)


@click.command(name="export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())
@click.option(
    "--format",
    "format_",
    default="hf",
    show_default=True,
    help="hf: a folder transformers loads (CLIPModel or SiglipModel, tokenizer, processor).",
)
@click.option("--step", type=int, default=None, help="Checkpoint step (default: latest).")
def export_command(run_dir: str, out: str, format_: str, step: int | None) -> None:
    """Write RUN_DIR's model to OUT in another format (Hugging Face transformers)."""
    from clip_jax.errors import UserError
    from clip_jax.export import export

    try:
        path = export(run_dir, out, format_, step)
    except UserError as exc:
        _fail(str(exc))
    click.echo(f"wrote {path} ({format_})")


@click.command(name="predict")
@click.argument("model")
@click.option(
    "--image", "images", multiple=True, required=True, type=click.Path(dir_okay=False),
    help="An image file; repeat for several.",
)  # fmt: skip
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
    from clip_jax.errors import UserError

    classes = [label.strip() for label in labels.split(",") if label.strip()]
    if not classes:
        _fail("--labels: give at least one class name")
    prompts = list(templates) or ["a photo of a {}."]
    bad = [t for t in prompts if t.count("{}") != 1]
    if bad:
        _fail(f"--template {bad[0]!r}: a template holds {{}} exactly once")
    try:
        from clip_jax.inference import load

        loaded = load(model)
        probs = loaded.classify(list(images), classes, prompts)
    except UserError as exc:
        _fail(str(exc))
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
