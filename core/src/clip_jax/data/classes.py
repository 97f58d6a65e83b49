"""Class names and prompt templates for zero-shot classification.

``load_classes("imagenet")`` gives OpenAI's ImageNet prompt set, bundled in
``class_files/imagenet.json``: the 1000 class names and 80 templates from the CLIP
repository's ``notebooks/Prompt_Engineering_for_ImageNet.ipynb`` (identical to
open_clip's ``IMAGENET_CLASSNAMES`` and ``OPENAI_IMAGENET_TEMPLATES``). The names are kept
exactly as published, so zero-shot numbers compare with published ones; that includes
two repeated names ("missile" at 657 and 744, "sunglasses" at 836 and 837), since the
index, not the name, is the class.
"""

from __future__ import annotations

import json
from pathlib import Path

from clip_jax.errors import UserError

CLASS_FILES = Path(__file__).with_name("class_files")
DEFAULT_TEMPLATES = ["a photo of a {}."]


def bundled_class_sets() -> list[str]:
    """Names ``load_classes`` accepts besides a path."""
    return sorted(p.stem for p in CLASS_FILES.glob("*.json"))


def _template_ok(template: object) -> bool:
    """A str with one ``{}``, and ``str.format`` works on it (the evaluator calls it)."""
    if not isinstance(template, str) or template.count("{}") != 1:
        return False
    try:
        template.format("")
    except (IndexError, KeyError, ValueError):
        return False
    return True


def load_classes(name_or_path: str | Path) -> tuple[list[str], list[str]]:
    """(classes, templates) from a bundled set's name or a JSON file's path.

    The file is ``{"classes": [...], "templates": [...]}``; each template holds ``{}``
    where the class name goes. ``templates`` may be left out (one plain prompt then), as
    for a tfrecord source's ``classes_file``.
    """
    name = str(name_or_path)
    bundled = CLASS_FILES / f"{name}.json"
    path = bundled if name in bundled_class_sets() else Path(name_or_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(bundled_class_sets())
        raise UserError(f"classes file {path} not found (bundled sets: {known})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read classes file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"classes file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "classes" not in data:
        raise UserError(f'classes file {path} must be {{"classes": [...], "templates": [...]}}')
    classes = data["classes"]
    templates = data.get("templates", DEFAULT_TEMPLATES)
    if not classes or not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise UserError(f'classes file {path}: "classes" must be a non-empty list of strings')
    if not templates or not isinstance(templates, list) or not all(map(_template_ok, templates)):
        raise UserError(
            f'classes file {path}: "templates" must be a non-empty list of strings, each with '
            'one "{}" for the class name and no other format fields'
        )
    return list(classes), list(templates)
