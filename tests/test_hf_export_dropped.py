"""What an hf export leaves behind, and which formats export writes.

A transformers CLIPModel / SiglipModel holds the two towers and the logit scale (and
SigLIP's bias). A classification head, an auxiliary term's parameters (the caption
decoder...) and, in a CLIPModel, the sigmoid loss's learned bias have no place there:
none changes what the exported towers compute, so the export goes on and warns once per
part, naming its spec key. The message path is tested on parameters of the right
shapes (zeros, nothing trained); one slow test trains and runs ``clipctl export``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner

from clipctl.cli import cli
from tests.conftest import QUICKSTART

HEAD = {"model": {"preset": "tiny"}, "head": {"name": "image_classification", "num_classes": 16}}
SIGMOID_CAPTIONING = {
    "model": {"preset": "tiny"},
    "loss": {"name": "sigmoid", "aux": [{"name": "captioning", "depth": 1, "heads": 2}]},
}


def zero_params(raw: dict):
    """(spec, flat parameters of its model as zeros): shapes only, no initialisation."""
    import flax.linen as nn
    import jax

    from clip_jax.components import components
    from clip_jax.pretrained import flatten
    from clip_jax.spec import validate
    from clip_jax.train.state import dummy_inputs

    spec = validate(raw, pretrained=False)
    shapes = jax.eval_shape(components(spec).model.init, jax.random.key(0), *dummy_inputs(spec))
    flat = flatten(nn.unbox(shapes["params"]))
    params = {k: np.zeros(v.shape, np.float32) for k, v in flat.items()}
    if "logit_bias" in params:
        params["logit_bias"] = np.full((), -7.5, np.float32)
    return spec, params


def export_messages(raw: dict, out, caplog) -> list[str]:
    from clip_jax.models.hf_export import write_folder

    caplog.set_level(logging.WARNING, logger="clip_jax.export")
    spec, params = zero_params(raw)
    write_folder(params, spec, None, out)
    return [r.getMessage() for r in caplog.records if r.name == "clip_jax.export"]


@pytest.mark.slow  # writes a folder (seconds); the fast tier keeps the CLI's test
def test_a_classification_head_is_named_and_the_towers_exported(tmp_path, caplog):
    (message,) = export_messages(HEAD, tmp_path / "out", caplog)
    assert message.startswith("head.name = 'image_classification': the head")
    assert "16 classes" in message and "not exported (a CLIPModel has none" in message
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and "num_labels" not in config


def test_sigmoid_bias_and_caption_decoder_are_named(tmp_path, caplog):
    decoder, bias = export_messages(SIGMOID_CAPTIONING, tmp_path / "out", caplog)
    assert decoder.startswith("loss.aux captioning: the caption decoder (aux_captioning/...)")
    assert "not exported" in decoder
    assert bias.startswith("loss.name = 'sigmoid': the learned bias (b = -7.5)")
    assert "not in a CLIPModel" in bias and "logits_per_image is scale x cosine" in bias
    # CLIP-layout towers (class token, causal text) are not SiglipModel's: a CLIPModel
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]


@pytest.mark.slow  # writes a folder (seconds); the fast tier keeps the CLI's test
def test_a_siglip_layout_run_keeps_its_bias_without_a_word(tmp_path, caplog):
    vision = {"image_size": 32, "patch_size": 8, "width": 48, "depth": 1, "heads": 4,
              "mlp_dim": 96}  # fmt: skip
    text = {"vocab_size": 64, "context_length": 8, "width": 32, "depth": 1, "heads": 4,
            "mlp_dim": 64}  # fmt: skip
    raw = {"model": {"preset": "siglip-b16", "embed_dim": 48, "vision": vision, "text": text},
           "loss": {"name": "sigmoid"}}  # fmt: skip
    assert export_messages(raw, tmp_path / "out", caplog) == []
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert float(tensors["logit_bias"].reshape(())) == -7.5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["SiglipModel"]


# ------------------------------------------------------------------ clipctl export
def run_folder(tmp_path, raw: dict):
    """A run folder holding only its spec (no checkpoint)."""
    from clip_jax.spec import to_toml, validate

    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.resolved.toml").write_text(to_toml(validate(raw, pretrained=False)))
    return run


def test_clipctl_export_prints_each_dropped_part(tmp_path, monkeypatch):
    """The warnings reach the terminal as ``warning:`` lines; the export is written."""
    from clip_jax.pretrained import unflatten
    from clip_jax.train import warm_start

    run = run_folder(tmp_path, SIGMOID_CAPTIONING)
    spec, params = zero_params(SIGMOID_CAPTIONING)
    monkeypatch.setattr(warm_start, "params_of_run", lambda *_: (unflatten(params), spec, 1))
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export", str(run), str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: loss.aux captioning: the caption decoder" in result.stderr
    assert "warning: loss.name = 'sigmoid': the learned bias" in result.stderr
    assert f"wrote {out} (hf)" in result.stdout


def test_formats_export_cannot_write_are_told_apart(tmp_path):
    run, runner = run_folder(tmp_path, {"model": {"preset": "tiny"}}), CliRunner()

    def export(fmt: str):
        return runner.invoke(cli, ["export", str(run), str(tmp_path / "out"), "--format", fmt])

    unknown = export("onnx")
    assert unknown.exit_code == 2 and "cannot be written as 'onnx'" in unknown.stderr
    assert "(export writes: hf)" in unknown.stderr and "open_clip" not in unknown.stderr
    for fmt in ("open_clip", "big_vision"):
        imported = export(fmt)
        assert imported.exit_code == 2, imported.output
        assert f"{fmt!r} is an import format" in imported.stderr
        assert f'train.init_from = "{fmt}:PATH"' in imported.stderr
        assert "export writes: hf" in imported.stderr
        assert "not supported yet" not in imported.stderr
    assert not (tmp_path / "out").exists()
    helped = runner.invoke(cli, ["export", "--help"])
    assert "hf, the one format export writes" in " ".join(helped.stdout.split())


@pytest.mark.slow
def test_clipctl_export_of_a_trained_sigmoid_captioning_run(small_run, tmp_path):
    """templates/siglip2-tiny's recipe in short: trained, exported, both parts named."""
    from clip_jax.spec import apply_overrides, read_toml, validate
    from clip_jax.train.trainer import train

    raw = apply_overrides(read_toml(QUICKSTART), [*small_run, "train.steps=2"])
    raw["loss"] = {"name": "sigmoid", "aux": [{"name": "captioning", "depth": 1, "heads": 2}]}
    spec = validate(raw)
    train(spec)
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export", str(spec.run.output_dir), str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: loss.aux captioning: the caption decoder" in result.stderr
    assert "warning: loss.name = 'sigmoid': the learned bias" in result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]
