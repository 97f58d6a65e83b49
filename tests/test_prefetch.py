"""Batches prepared ahead by a thread: order, positions, errors and a clean stop."""

import threading
import time

import numpy as np
import pytest

from clip_jax.data.readers import Readers, data_checkpoint
from clip_jax.errors import UserError
from clip_jax.schemas import RecordKeys
from clip_jax.train.prefetch import Prefetch


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prefetch"]


def test_items_come_in_order_prepared_and_the_end_ends_the_iteration():
    with Prefetch(iter(range(50)), lambda i: i * i) as items:
        assert list(items) == [i * i for i in range(50)]
    assert not prefetch_threads()


@pytest.mark.parametrize("where", ["source", "prepare"])
def test_an_error_in_the_thread_is_raised_where_its_batch_is_taken(where):
    def source():
        yield from range(3)
        if where == "source":
            raise UserError("bad record")
        yield 3

    def prepare(i):
        if where == "prepare" and i == 3:
            raise UserError("bad record")
        return i

    with Prefetch(source(), prepare) as items:
        assert [next(items) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(UserError, match="bad record"):
            next(items)
        with pytest.raises(UserError, match="bad record"):  # not a hang on a later call
            next(items)
    assert not prefetch_threads()


def test_leaving_early_stops_the_thread_after_at_most_a_few_items_ahead():
    taken = []

    def source():
        for i in range(10_000):
            taken.append(i)
            yield i

    with pytest.raises(KeyboardInterrupt), Prefetch(source(), lambda i: i, depth=2) as items:
        assert next(items) == 0
        time.sleep(0.2)  # let the thread fill its queue
        raise KeyboardInterrupt  # as a second Ctrl-C would
    assert not prefetch_threads()
    assert len(taken) <= 1 + 2 + 1  # the one used, the queue, the one in hand


def test_closing_while_the_thread_waits_on_a_full_queue_does_not_hang():
    started = time.monotonic()
    items = Prefetch(iter(range(100)), lambda i: i, depth=1)
    time.sleep(0.1)
    items.close()
    assert time.monotonic() - started < 5
    assert not prefetch_threads()


@pytest.mark.slow
def test_prefetched_batches_carry_the_positions_after_them(synthetic_dir):
    files = sorted(str(p) for p in (synthetic_dir / "train").glob("*.tfrecord"))

    def readers(resume):
        return Readers(
            files,
            RecordKeys(readers=2, shuffle_buffer=64),
            image_size=32,
            global_batch=32,
            seed=0,
            resume=resume,
        )

    plain = readers(None)
    expected = [(b.captions, b.positions.copy()) for b in (next(plain) for _ in range(6))]
    with Prefetch(readers(None), lambda batch: batch) as batches:
        got = [next(batches) for _ in range(3)]
        time.sleep(0.5)  # the thread reads ahead; the batches' positions do not move
        got += [next(batches) for _ in range(3)]
    for batch, (captions, positions) in zip(got, expected, strict=True):
        assert batch.captions == captions
        np.testing.assert_array_equal(batch.positions, positions)
    # A resume from batch 3's positions reads what followed it.
    resumed = readers(data_checkpoint(got[2].positions))
    assert next(resumed).captions == expected[3][0]
