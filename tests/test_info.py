"""`clipctl info`: sizes and costs of a spec's model, without data or allocation."""

import json

import pytest
from click.testing import CliRunner

from clip_jax.info import model_info
from clip_jax.plugins import get_registry
from clip_jax.spec import load_spec
from clipctl.cli import cli

TEMPLATES = get_registry().templates


def analytic_train_flops(spec) -> float:
    """3 x forward, forward = 2 x multiply-adds of the matrix products (the usual estimate)."""
    v, t = spec.model.vision, spec.model.text
    patches = (v.image_size // v.patch_size) ** 2
    n_v, n_t = patches + 1, t.context_length

    def tower(width: int, depth: int, tokens: int, mlp_ratio: float) -> float:
        per_layer = (4 + 2 * mlp_ratio) * width**2 * tokens + 2 * tokens**2 * width
        return depth * per_layer

    macs = (
        tower(v.width, v.depth, n_v, v.mlp_ratio)
        + tower(t.width, t.depth, n_t, t.mlp_ratio)
        + patches * v.patch_size**2 * 3 * v.width
    )
    return 3 * 2 * macs


@pytest.mark.slow
def test_clip_b32_counts_and_flops():
    spec = load_spec(TEMPLATES["clip-b32"].path, ["data.train=/nowhere/*.tfrecord"])
    facts = model_info(spec)
    counts = facts["parameters"]
    assert counts["total"] == 151_277_313  # open_clip's ViT-B-32
    assert counts["vision"] + counts["text"] + counts["heads"] == counts["total"]
    assert counts["vision"] == 87_456_000
    assert facts["train_flops_per_pair"] == pytest.approx(analytic_train_flops(spec), rel=0.03)
    assert facts["param_bytes_per_device"] == facts["param_bytes_total"] == 4 * counts["total"]


@pytest.mark.slow
def test_per_device_bytes_follow_the_strategy_for_devices_not_here():
    spec = load_spec(TEMPLATES["siglip-b16"].path)
    facts = model_info(spec, devices=16)
    assert facts["mesh"] == {"data": 1, "fsdp": 16, "model": 1}
    share = facts["param_bytes_per_device"] / facts["param_bytes_total"]
    assert 1 / 16 <= share < 1.05 / 16  # every weight matrix is split, a few scalars are not


@pytest.mark.slow
def test_info_command_json_and_errors():
    runner = CliRunner()
    quickstart = str(TEMPLATES["quickstart"].path)
    result = runner.invoke(cli, ["info", quickstart, "loss.name=chunked_sigmoid", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["parameters"]["total"] > 0 and facts["train_flops_per_pair"] > 0
    bad = runner.invoke(cli, ["info", quickstart, "sharding.mesh.data=3", "--devices", "8"])
    assert bad.exit_code == 1
    assert "sharding.mesh" in bad.output
