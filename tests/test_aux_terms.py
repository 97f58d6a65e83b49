"""Auxiliary objectives ([[loss.aux]]): the spec, the captioning term's value and
gradient against a plain reference, the total loss, micro-batches, and what is refused."""

import json
import tomllib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.components import components
from clip_jax.errors import UserError
from clip_jax.models import chunks
from clip_jax.models.captioning import per_example_captioning
from clip_jax.models.decoder import VocabProjection
from clip_jax.models.layers import BlockConfig
from clip_jax.spec import SpecError, to_toml, validate
from tests.conftest import QUICKSTART

TINY = {"width": 32, "depth": 1, "heads": 2}


def raw_spec(aux, **loss):
    raw = tomllib.loads(QUICKSTART.read_text())
    raw["model"] = {
        "architecture": "clip",
        "preset": "tiny",
        "embed_dim": 16,
        "vision": {**TINY, "patch_size": 16},
        "text": {**TINY, "context_length": 8, "vocab_size": 64},
    }
    raw["loss"] = {"name": "sigmoid", **loss, "aux": aux}
    raw["train"]["batch_size"] = 8
    return raw


def test_a_spec_without_terms_resolves_to_the_same_text_as_before():
    spec = validate(tomllib.loads(QUICKSTART.read_text()))
    assert spec.loss.aux == [] and "aux" not in to_toml(spec)


def test_terms_resolve_with_their_defaults_and_read_back_equal():
    spec = validate(raw_spec([{"name": "captioning", "weight": 0.5, "depth": 1}]))
    (term,) = spec.loss.aux
    assert (term.name, term.weight, term.depth, term.parallel_fraction) == (
        "captioning",
        0.5,
        1,
        0.5,
    )
    text = to_toml(spec)
    assert '[[loss.aux]]\nname = "captioning"' in text  # the name first, as a user writes it
    assert validate(tomllib.loads(text)) == spec


@pytest.mark.parametrize(
    "entry, key",
    [
        ({"name": "captioning", "depth": 0}, "loss.aux.0.depth"),
        ({"name": "captioning", "weight": -1}, "loss.aux.0.weight"),
        ({"name": "captioning", "dpeth": 2}, "loss.aux.0.dpeth"),
        ({"name": "no_such_term"}, "loss.aux.0.name"),
        ({"weight": 1.0}, "loss.aux.0.name"),
        ([{"name": "captioning"}, {"name": "captioning", "weight": 2.0}], "loss.aux"),
    ],
)
def test_a_wrong_term_names_its_key(entry, key):
    with pytest.raises(SpecError) as caught:
        validate(raw_spec(entry if isinstance(entry, list) else [entry]))
    assert caught.value.key == key, caught.value.problems


def reference_captioning(logits, targets, pad_id):
    """Per caption: mean negative log-likelihood over its non-padding tokens, in numpy."""
    losses = []
    for row_logits, row_targets in zip(logits, targets, strict=True):
        nll = []
        for position_logits, target in zip(row_logits, row_targets, strict=True):
            if target == pad_id:
                continue
            shifted = position_logits - position_logits.max()
            nll.append(np.log(np.exp(shifted).sum()) - shifted[target])
        losses.append(np.mean(nll) if nll else 0.0)
    return np.asarray(losses)


def captioning_values(head, params, x, targets, vocab):
    nll, correct = head.apply(params, x, targets, vocab, method="cross_entropy")
    return per_example_captioning(nll, correct, targets, pad_id=0)


@pytest.mark.parametrize(
    "chunk_logits",
    [pytest.param(None, marks=pytest.mark.slow), 3 * 2 * 7],  # one chunk; 2 + 2 + 1 positions
)
def test_captioning_value_and_gradient_match_a_plain_reference(monkeypatch, chunk_logits):
    """The cross-entropy a chunk of positions at a time (the decoder's output layer,
    under jax.checkpoint) equals the per-token formula, with its gradients."""
    if chunk_logits:
        monkeypatch.setattr(chunks, "CHUNK_LOGITS", chunk_logits)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 4)).astype(np.float32))
    targets = jnp.asarray([[1, 4, 2, 0, 0], [3, 3, 3, 6, 2], [0, 0, 0, 0, 0]])
    head = VocabProjection(BlockConfig(heads=1, mlp_hidden=4), width=4, vocab_size=9)
    params = nn.unbox(head.init(jax.random.key(0), x))  # 9 ids: 7 scored, 2 of the decoder's
    params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32), params)
    logits = np.asarray(head.apply(params, x, 7))
    assert logits.shape == (3, 5, 7)
    out = captioning_values(head, params, x, targets, vocab=7)
    np.testing.assert_allclose(out["loss"], reference_captioning(logits, targets, 0), rtol=1e-5)
    valid = np.asarray(targets) != 0
    correct = (logits.argmax(-1) == np.asarray(targets)) & valid
    expected = correct.sum(1) / np.maximum(valid.sum(1), 1)
    np.testing.assert_allclose(out["token_accuracy"], expected, rtol=1e-6)

    # d(mean loss)/d logits = (softmax - onehot) / (count * batch) on valid positions,
    # carried to the layer's input and parameters by the chain rule
    def dense(params, x):
        logits = head.apply(params, x, 7)
        probs = jax.nn.softmax(logits, axis=-1)
        onehot = jax.nn.one_hot(targets, 7)
        count = np.maximum(valid.sum(axis=1, keepdims=True), 1)
        weight = jax.lax.stop_gradient((probs - onehot) * valid[..., None] / count[..., None] / 3)
        return jnp.sum(weight * logits)

    def chunked(params, x):
        return captioning_values(head, params, x, targets, vocab=7)["loss"].mean()

    got, expected = jax.grad(chunked, (0, 1))(params, x), jax.grad(dense, (0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, expected)
    assert not np.any(got[0]["params"]["kernel"][:, 7:])  # the decoder's own ids: not scored


@pytest.fixture(scope="module")
def aux_run():
    spec = validate(
        raw_spec([{"name": "captioning", "weight": 0.5, "depth": 1, "parallel_fraction": 0.0}])
    )
    comps = components(spec)
    size = spec.model.vision.image_size
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(8, size, size, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, 64, size=(8, 8)), jnp.int32)
    boxed = jax.jit(comps.model.init)(jax.random.key(0), images, tokens)["params"]
    params = nn.meta.unbox(boxed)
    return comps, params, images, tokens


@pytest.mark.slow  # compiles the model
def test_the_total_is_the_contrastive_loss_plus_the_weighted_term(aux_run):
    comps, params, images, tokens = aux_run
    assert "aux_captioning" in params
    objective = comps.objective()
    (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
        params, images, tokens, None, jax.random.key(2)
    )
    model = comps.model
    apply = jax.jit(lambda p: model.apply({"params": p}, images, tokens, aux=True))
    img, txt, log_scale, bias, outputs = apply(params)
    contrastive = comps.loss.fn(img, txt, log_scale, bias)
    captioning = outputs["captioning"]["loss"].mean()
    np.testing.assert_allclose(metrics["loss/contrastive"], contrastive, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/captioning"], captioning, rtol=1e-6)
    np.testing.assert_allclose(loss, contrastive + 0.5 * captioning, rtol=1e-6)
    assert 0 <= metrics["captioning/token_accuracy"] <= 1
    assert float(jnp.abs(grads["aux_captioning"]["decoder"]["logits"]["kernel"]).sum()) > 0


@pytest.mark.slow  # compiles the model
def test_micro_batches_give_the_full_batch_loss_and_gradients_with_a_term(aux_run):
    from clip_jax.train.microbatch import cached_value_and_grad

    comps, params, images, tokens = aux_run
    objective = comps.objective()
    inputs = (images, tokens, None, jax.random.key(3))
    (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params, *inputs)
    (loss2, metrics2), grads2 = jax.jit(cached_value_and_grad(objective, 2))(params, *inputs)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    np.testing.assert_allclose(metrics2["loss/captioning"], metrics["loss/captioning"], rtol=1e-5)
    # float32 sums in another order: close on the scale of the largest gradient
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-5)


def test_a_term_with_a_classification_head_is_refused():
    raw = raw_spec([{"name": "captioning"}])
    raw["head"] = {"name": "image_classification", "num_classes": 3}
    raw["data"]["label_key"] = "label"
    with pytest.raises(UserError, match="loss.aux"):
        _ = components(validate(raw)).model


@pytest.mark.slow
def test_a_run_with_a_captioning_term_logs_it_evaluates_captions_and_captions(small_run, tmp_path):
    import clip_jax
    from clip_jax.run_folder import RunFolder
    from clip_jax.spec import load_spec
    from clip_jax.train.trainer import train

    aux = 'loss.aux=[{name = "captioning", depth = 1, heads = 2}]'
    spec = load_spec(QUICKSTART, small_run + ["loss.name=sigmoid", aux, "train.steps=10"])
    results = train(spec)
    assert 0 <= results["caption_exact_match"] <= results["caption_word_accuracy"] <= 1
    records = [r for r in RunFolder(spec.run.output_dir).metrics() if r["split"] == "train"]
    assert {"loss/contrastive", "loss/captioning", "captioning/token_accuracy"} <= set(records[-1])

    model = clip_jax.load(spec.run.output_dir)
    images = np.zeros((3, 32, 32, 3), np.uint8)
    captions = model.caption(images)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)

    from click.testing import CliRunner

    from clip_jax.data.synthetic import make_example
    from clipctl.cli import cli

    files = []
    for index in range(2):
        files.append(tmp_path / f"shape{index}.jpg")
        files[-1].write_bytes(make_example(0, index, 32)[0])
    args = ["caption", spec.run.output_dir, "--json"] + [f"--image={f}" for f in files]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["image"] for row in rows] == [str(f) for f in files]
    assert all(isinstance(row["caption"], str) for row in rows)


@pytest.mark.slow  # compiles the model on the 8-device mesh, twice
def test_a_term_composes_with_the_chunked_loss_on_the_mesh():
    """The chunked sigmoid loss (embeddings passed round the devices) plus a term equals
    the plain sigmoid loss plus the same term."""
    entry = [{"name": "captioning", "depth": 1, "parallel_fraction": 0.0}]
    losses = {}
    for name in ("sigmoid", "chunked_sigmoid"):
        raw = raw_spec(entry, init_temperature=10.0, init_bias=-10.0)
        raw["loss"]["name"] = name
        raw["train"]["batch_size"] = 16
        raw["sharding"] = {"strategy": "fsdp"}
        spec = validate(raw)
        comps = components(spec)
        assert comps.layout.mesh.size == 8
        size = spec.model.vision.image_size
        rng = np.random.default_rng(4)
        images = jnp.asarray(rng.normal(size=(16, size, size, 3)), jnp.float32)
        tokens = jnp.asarray(rng.integers(1, 64, size=(16, 8)), jnp.int32)
        params = nn.meta.unbox(jax.jit(comps.model.init)(jax.random.key(0), images, tokens))
        objective = comps.objective()
        with comps.layout.activate():
            loss, metrics = jax.jit(objective)(
                params["params"], images, tokens, None, jax.random.key(5)
            )
        losses[name] = (float(loss), float(metrics["loss/captioning"]))
    np.testing.assert_allclose(losses["chunked_sigmoid"], losses["sigmoid"], rtol=1e-5)


@pytest.mark.slow  # compiles the model and the greedy decoder
def test_the_decoder_does_not_read_naflex_padding():
    """The same image padded to two budgets: the same captioning values (the decoder's
    cross-attention skips the padding tokens, as the tower's attention does)."""
    from clip_jax.models.naflex import pad_batch

    raw = raw_spec([{"name": "captioning", "depth": 1, "parallel_fraction": 0.0}])
    raw["model"]["vision"]["patch_size"] = 8
    raw["preprocess"] = {"resize": "naflex"}
    comps = components(validate(raw))
    image = np.random.default_rng(5).normal(size=(16, 8, 3)).astype(np.float32)  # 2 x 1 patches
    tokens = jnp.asarray(np.random.default_rng(6).integers(1, 64, size=(1, 8)), jnp.int32)
    short, long = pad_batch([image], 8, 2), pad_batch([image], 8, 16)
    params = jax.jit(comps.model.init)(jax.random.key(0), long, tokens)

    @jax.jit
    def captioning(images):
        return comps.model.apply(params, images, tokens, aux=True)[-1]["captioning"]

    np.testing.assert_allclose(captioning(short)["loss"], captioning(long)["loss"], rtol=1e-5)
    from clip_jax.models.captioning import greedy_captioner

    class Tokenizer:  # what the captioner needs of one
        eos_id = 2
        decode = None

    decode = greedy_captioner(comps.model, Tokenizer())
    np.testing.assert_array_equal(decode(params["params"], short), decode(params["params"], long))


def test_the_terminal_apps_editor_keeps_the_term_tables(tmp_path):
    """siglip2-tiny opened in the editor, a field changed, saved: the [[loss.aux]] tables
    (captioning and the teacher's two terms) are all still there and validate."""
    import asyncio

    from textual.widgets import Input

    from clipctl.app import ClipctlApp
    from tests.tui_support import SIZE, show_section, type_into

    template = QUICKSTART.parent / "siglip2-tiny.toml"
    saved = tmp_path / "mine.toml"

    async def scenario():
        app = ClipctlApp(runs_root=tmp_path / "runs", cwd=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            app.open_editor(tmp_path / "x.toml", template)
            await pilot.pause()
            editor = app.screen
            await show_section(pilot, editor, "train")
            await type_into(pilot, editor, "train.steps", "300")
            assert editor.problems == {}
            await pilot.press("ctrl+s")
            app.screen.query_one("#save-path", Input).value = str(saved)
            await pilot.press("enter")
            await pilot.pause()

    asyncio.run(scenario())
    spec = validate(tomllib.loads(saved.read_text()))
    assert spec.train.steps == 300
    assert [t.name for t in spec.loss.aux] == [
        "captioning",
        "self_distillation",
        "masked_prediction",
    ]
    assert spec.loss.aux[2].weight == 0.25 and spec.loss.aux[1].local_crops == 2
