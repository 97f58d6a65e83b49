"""Non-finite values and loss spikes: judged on the device, each policy end to end.

The faults come from poisoned batches: the real readers' batch, changed on its way to the
device (NaN images; captions shifted by one, so every pair is wrong once the model has
learned to match them).
"""

import itertools
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.errors import UserError
from clip_jax.run_folder import RunFolder
from clip_jax.spec import SpikeOptions, load_spec
from clip_jax.train import guards, loop
from clip_jax.train.trainer import train
from tests.conftest import QUICKSTART


def nan_images(batch):
    batch.images = np.full_like(batch.images, np.nan)
    return batch


def warns(batch):
    """What the data layer does with a shard it cannot read: one warning, from its thread."""
    logging.getLogger("clip_jax.data").warning("shard-7.tfrecord is unreadable; skipped")
    return batch


def wrong_pairs(batch):
    batch.captions = batch.captions[1:] + batch.captions[:1]
    return batch


@pytest.fixture
def poison(monkeypatch):
    """``poison({n: fault})``: the n-th batch of every reading (from a start, a resume or a
    rollback) goes through ``fault`` before it is put on the devices."""

    def install(faults: dict):
        real = loop.device_batches

        def device_batches(*args, **kwargs):
            prepare, count = real(*args, **kwargs), itertools.count(1)
            return lambda batch: prepare(faults.get(next(count), lambda b: b)(batch))

        monkeypatch.setattr(loop, "device_batches", device_batches)

    return install


def records(folder: RunFolder) -> dict[int, dict]:
    return {r["step"]: r for r in folder.metrics() if r["split"] == "train"}


def saved_arrays(folder: RunFolder, step: int):
    """The parameters and optimizer state of the checkpoint at ``step``, as numpy."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(folder.checkpoints / str(step) / "state")


# --------------------------------------------------------------- on the device
def spike_options(**overrides) -> SpikeOptions:
    return SpikeOptions(**{"action": "skip", "window": 8, "min_history": 4, **overrides})


def history_of(values: list[float], window: int = 8) -> dict:
    guard = guards.init_guard(window)
    for value in values:
        _, _, guard = guards.judge(guard, jnp.float32(value), jnp.float32(value), spike_options())
    return guard


def test_a_value_far_above_the_recent_median_is_a_spike_and_stays_out_of_the_history():
    guard = history_of([1.0, 1.02, 0.98, 1.01, 0.99])
    ok, event, after = guards.judge(guard, jnp.float32(1.5), jnp.float32(1.0), spike_options())
    assert not ok and int(event) == 2
    assert int(after["spikes"]) == int(after["skipped_updates"]) == 1
    np.testing.assert_array_equal(after["history"], guard["history"])  # not learnt from

    ok, event, after = guards.judge(guard, jnp.float32(1.03), jnp.float32(1.0), spike_options())
    assert ok and int(event) == 0 and int(after["skipped_updates"]) == 0
    assert float(after["history"][0, -1]) == pytest.approx(1.03)


def test_spikes_are_judged_only_on_watched_values_and_after_min_history():
    young = history_of([1.0, 1.0, 1.0])  # 3 < min_history
    ok, _, _ = guards.judge(young, jnp.float32(50.0), jnp.float32(1.0), spike_options())
    assert ok
    guard = history_of([1.0, 1.02, 0.98, 1.01, 0.99])
    loss_only = spike_options(watch=["loss"])
    ok, _, _ = guards.judge(guard, jnp.float32(1.0), jnp.float32(50.0), loss_only)
    assert ok
    ok, _, _ = guards.judge(guard, jnp.float32(50.0), jnp.float32(1.0), spike_options(action="off"))
    assert ok


def test_a_non_finite_value_is_never_applied_whatever_the_spike_action():
    guard = history_of([1.0, 1.0, 1.0, 1.0, 1.0])
    for action in ("off", "skip"):
        ok, event, after = guards.judge(
            guard, jnp.float32(jnp.nan), jnp.float32(1.0), spike_options(action=action)
        )
        assert not ok and int(event) == 1
        assert int(after["nonfinite"]) == 1 and int(after["spikes"]) == 0
        new, old = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
        np.testing.assert_array_equal(guards.keep_if(ok, new, old)["w"], old["w"])


def test_spike_options_refuse_a_history_longer_than_the_window():
    with pytest.raises(ValueError, match="min_history"):
        SpikeOptions(window=8, min_history=9)


# ----------------------------------------------------------------- end to end
@pytest.mark.slow
def test_skip_drops_the_non_finite_update_and_counts_it(small_run, poison):
    poison({2: warns, 3: nan_images})
    overrides = ["train.steps=4", "train.log_every=1", "train.checkpoint_every=1"]
    spec = load_spec(
        QUICKSTART,
        small_run + overrides + ["train.keep_checkpoints=5", "train.on_nonfinite=skip"],
    )
    train(spec)
    folder = RunFolder(spec.run.output_dir)
    lines = records(folder)

    assert math.isnan(lines[3]["loss"])
    assert [lines[s]["guard/skipped_updates"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert lines[4]["guard/nonfinite"] == 1 and lines[4]["guard/spikes"] == 0
    before, skipped, after = (saved_arrays(folder, s) for s in (2, 3, 4))
    same = jax.tree.map(np.array_equal, before["params"], skipped["params"])
    assert all(jax.tree.leaves(same))  # the poisoned step changed nothing
    assert all(
        jax.tree.leaves(jax.tree.map(np.array_equal, before["opt_state"], skipped["opt_state"]))
    )
    assert not all(
        jax.tree.leaves(jax.tree.map(np.array_equal, skipped["params"], after["params"]))
    )
    log = folder.log_path.read_text()
    assert log.count("guard: step 3 had a non-finite loss or gradient") == 1
    assert log.count("warning: shard-7.tfrecord is unreadable; skipped") == 1
    assert folder.status()["state"] == "finished"


@pytest.mark.slow
def test_stop_ends_the_run_failed_with_the_good_state_saved(small_run, poison):
    poison({3: nan_images})
    overrides = ["train.steps=10", "train.log_every=5", "train.checkpoint_every=100"]
    spec = load_spec(QUICKSTART, small_run + overrides)
    assert spec.train.on_nonfinite == "stop"  # the default
    with pytest.raises(guards.NonFiniteStop) as stopped:
        train(spec)
    assert isinstance(stopped.value, UserError)
    message = str(stopped.value)
    assert message.startswith("train.on_nonfinite: step 3 had a non-finite loss")
    folder = RunFolder(spec.run.output_dir)
    status = folder.status()
    assert status["state"] == "failed" and "non-finite" in status["error"]
    saved = sorted(int(p.name) for p in folder.checkpoints.iterdir() if p.name.isdigit())
    assert saved == [4]  # found a step late, when the device had done step 4
    params = saved_arrays(folder, 4)["params"]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    assert "checkpoint at step 4 holds the last good state" in message


def clean_spike_setup(small_run, extra):
    common = [
        "train.steps=30",
        "train.log_every=1",
        "train.checkpoint_every=10",
        "optimizer.learning_rate=0.003",
        "train.spike.window=10",
        "train.spike.min_history=5",
        "train.spike.k=6",
        "train.spike.watch=['loss']",
    ]
    return load_spec(QUICKSTART, small_run + common + extra)


@pytest.mark.slow
def test_a_spike_is_skipped(small_run, poison):
    poison({25: wrong_pairs})
    spec = clean_spike_setup(small_run, ["train.spike.action=skip"])
    train(spec)
    folder = RunFolder(spec.run.output_dir)
    lines = records(folder)
    assert [lines[s]["guard/spikes"] for s in (24, 25, 30)] == [0, 1, 1]
    assert lines[30]["guard/skipped_updates"] == 1
    assert "guard: step 25 is a spike" in folder.log_path.read_text()


def data_item(folder: RunFolder, step: int) -> dict:
    return json.loads((folder.checkpoints / str(step) / "data" / "metadata").read_text())


@pytest.mark.slow
def test_rollback_restores_the_last_checkpoint_and_passes_over_batches(small_run, poison, tmp_path):
    poison({25: wrong_pairs})
    rollback = ["train.spike.action=rollback", "train.spike.rollback_skip_batches=3"]
    spec = clean_spike_setup(small_run, rollback)
    train(spec)
    folder = RunFolder(spec.run.output_dir)
    lines = records(folder)
    assert sorted(lines) == list(range(1, 31))  # steps 21-25 were trained again, once logged
    assert lines[30]["guard/rollbacks"] == 1 and lines[20]["guard/rollbacks"] == 0
    log = folder.log_path.read_text()
    assert "guard: step 25 is a spike" in log
    assert "rolled back to step 20; passing over the next 3 batches" in log
    assert folder.status()["state"] == "finished"

    # The data went on 3 batches further than the steps: step 30 ends where an
    # unpoisoned run's step 33 does.
    clean = load_spec(
        QUICKSTART,
        small_run
        + ["train.steps=33", "train.checkpoint_every=33", f"run.output_dir={tmp_path / 'clean'}"],
    )
    train(clean)
    assert data_item(folder, 30) == data_item(RunFolder(clean.run.output_dir), 33)


def test_the_median_of_a_partly_filled_history_is_numpys():
    rng = np.random.default_rng(0)
    for known in (1, 2, 5, 8):
        history = np.full((2, 8), np.nan, np.float32)
        history[:, 8 - known :] = rng.normal(size=(2, known))
        np.testing.assert_allclose(
            guards._median(jnp.asarray(history), jnp.int32(known)),
            np.nanmedian(history, axis=1),
            rtol=1e-6,
        )
