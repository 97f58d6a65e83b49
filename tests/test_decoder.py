"""The captioning decoder (CapPa / LocCa): causality, parallel prediction, the loss
against a plain reference, and that it learns to caption a handful of images."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax.models.decoder import (
    CaptionDecoder,
    captioning_loss,
    greedy_decode,
    teacher_inputs,
)
from clip_jax.models.layers import BlockConfig

VOCAB, LENGTH, PAD, BOS, EOS, MASK = 32, 8, 0, 1, 2, 3


def make_decoder(width=32, depth=2):
    cfg = BlockConfig(heads=4, mlp_hidden=4 * width, activation="gelu")
    return CaptionDecoder(cfg, width, depth, VOCAB, LENGTH, MASK)


@pytest.fixture(scope="module")
def decoder_and_params():
    decoder = make_decoder()
    image = jax.random.normal(jax.random.key(0), (3, 5, 16))
    inputs = jax.random.randint(jax.random.key(1), (3, LENGTH), 4, VOCAB)
    return decoder, jax.jit(decoder.init)(jax.random.key(2), image, inputs), image, inputs


@pytest.mark.slow  # compiles the decoder; the captioning term's value is checked fast in test_aux_terms
def test_a_position_reads_only_the_past(decoder_and_params):
    decoder, params, image, inputs = decoder_and_params
    changed = inputs.at[:, 5].set((inputs[:, 5] + 1) % VOCAB)
    apply = jax.jit(decoder.apply)
    a, b = apply(params, image, inputs), apply(params, image, changed)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert not np.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.slow  # compiles the decoder; the captioning term's value is checked fast in test_aux_terms
def test_parallel_prediction_ignores_the_inputs_but_not_the_image(decoder_and_params):
    decoder, params, image, inputs = decoder_and_params
    parallel = jnp.array([True, False, True])
    other = jax.random.randint(jax.random.key(3), inputs.shape, 4, VOCAB)
    apply = jax.jit(decoder.apply)  # one compilation for the three calls
    a = apply(params, image, inputs, parallel)
    b = apply(params, image, other, parallel)
    np.testing.assert_array_equal(a[parallel], b[parallel])  # inputs replaced by masks
    assert not np.allclose(a[~parallel], b[~parallel])
    c = apply(params, image + 1.0, inputs, parallel)
    assert not np.allclose(a[parallel], c[parallel])


def test_loss_and_accuracy_match_a_plain_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
    targets = np.array([[4, 5, 2, 0], [1, 3, 0, 0]])
    loss, accuracy = captioning_loss(jnp.asarray(logits), jnp.asarray(targets), pad_id=0)
    nll, hits = [], []
    for b in range(2):
        for t in range(4):
            if targets[b, t] == 0:
                continue
            row = logits[b, t].astype(np.float64)
            nll.append(np.log(np.exp(row).sum()) - row[targets[b, t]])
            hits.append(row.argmax() == targets[b, t])
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-6)
    np.testing.assert_allclose(accuracy, np.mean(hits))
    assert teacher_inputs(jnp.asarray(targets), BOS).tolist() == [[1, 4, 5, 2], [1, 1, 3, 0]]


@pytest.mark.slow
def test_it_learns_to_caption_a_handful_of_images():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 5, 16)), jnp.float32)
    captions = np.zeros((4, LENGTH), np.int32)
    for i, n in enumerate((3, 5, 4, 6)):  # different lengths, each ended by EOS
        captions[i, :n] = rng.integers(4, VOCAB, n)
        captions[i, n] = EOS
    captions = jnp.asarray(captions)
    decoder = make_decoder()
    params = decoder.init(jax.random.key(0), images, captions)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = decoder.apply(p, images, teacher_inputs(captions, BOS))
            return captioning_loss(logits, captions, PAD)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in range(150):
        params, opt_state, loss = step(params, opt_state)
    assert loss < 0.05
    decode = jax.jit(lambda image, inputs: decoder.apply(params, image, inputs))
    decoded = greedy_decode(decode, images, LENGTH, BOS, EOS, PAD)
    np.testing.assert_array_equal(decoded, np.asarray(captions))
