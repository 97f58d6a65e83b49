"""Bundled zero-shot class sets and the JSON loader."""

import json

import pytest

from clip_jax.data.classes import bundled_class_sets, load_classes
from clip_jax.errors import UserError


def test_imagenet():
    classes, templates = load_classes("imagenet")
    assert len(classes) == 1000 and len(templates) == 80
    assert classes[0] == "tench" and classes[1] == "goldfish"
    assert classes[-1] == "toilet paper"
    assert classes[21] == "kite (bird of prey)"
    # OpenAI's list repeats two names at different indices; kept as published.
    assert classes[657] == classes[744] == "missile"
    assert classes[836] == classes[837] == "sunglasses"
    assert len(set(classes)) == 998
    assert len(set(templates)) == 80
    assert all(t.count("{}") == 1 for t in templates)
    assert templates[0] == "a bad photo of a {}."
    assert "itap of a {}." in templates
    assert templates[-1] == "a tattoo of the {}."
    assert "imagenet" in bundled_class_sets()


def test_custom_file(tmp_path):
    path = tmp_path / "pets.json"
    path.write_text(json.dumps({"classes": ["cat", "dog"], "templates": ["a {} pet."]}))
    assert load_classes(path) == (["cat", "dog"], ["a {} pet."])
    assert load_classes(str(path)) == (["cat", "dog"], ["a {} pet."])
    path.write_text(json.dumps({"classes": ["cat"]}))  # templates optional, as classes_file
    assert load_classes(path) == (["cat"], ["a photo of a {}."])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be"),
        ('{"classes": []}', '"classes"'),
        ('{"classes": ["a", 3]}', '"classes"'),
        ('{"classes": ["a"], "templates": ["no slot"]}', '"templates"'),
        ('{"classes": ["a"], "templates": ["{} and {}"]}', '"templates"'),
        ('{"classes": ["a"], "templates": ["{} {name}"]}', '"templates"'),
    ],
)
def test_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "broken.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_classes(path)
    assert str(path) in str(info.value)
