"""Readers resume from a checkpoint's reader states: exactly, on any process count, and at
a cost that does not grow with the position. Real shards, read through tf.data."""

import numpy as np
import pytest

from clip_jax.data import synthetic
from clip_jax.data.readers import FIELDS, Readers, data_checkpoint
from clip_jax.data.shards import serialize, write_shard
from clip_jax.errors import UserError
from clip_jax.schemas import RecordKeys

SIZE = 16
SHARD_SIZES = [23, 31, 17, 29, 26, 19, 35, 21]  # uneven, as real shards are


def record(shard: int, index: int) -> bytes:
    """A unique caption per record; every 9th record is bad in one of three ways."""
    caption = f"shard {shard} record {index}"
    image = synthetic.make_example(shard, index, SIZE)[0]
    kind = (shard * 7 + index) % 9
    if kind == 3:
        image = b"\xff\xd8 not a jpeg"  # undecodable
    elif kind == 6:
        caption = "   "  # empty after strip
    return serialize(f"{shard}-{index}", image, caption)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("resume")
    paths = []
    for shard, count in enumerate(SHARD_SIZES):
        path = root / f"{shard:05d}.tfrecord"
        write_shard(path, [record(shard, i) for i in range(count)])
        paths.append(str(path))
    # one shard cut mid-record: its first records are read, then it counts as unreadable
    data = (root / "00001.tfrecord").read_bytes()
    (root / "00001.tfrecord").write_bytes(data[: len(data) * 2 // 3])
    return paths


def readers(files, resume=None, *, count=2, window=24, batch=16, **kwargs) -> Readers:
    keys = RecordKeys(readers=count, shuffle_buffer=window * count)
    return Readers(
        files, keys, image_size=SIZE, global_batch=batch, seed=7, resume=resume, **kwargs
    )


def same(a, b) -> None:
    assert a.captions == b.captions
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert a.skipped == b.skipped


def column(batch, name: str) -> np.ndarray:
    return batch.positions[:, FIELDS.index(name)]


@pytest.fixture(scope="module")
def uninterrupted(shards):
    stream = readers(shards)
    return [next(stream) for _ in range(30)]


def resume_point(got, point: str) -> int:
    """The batch to resume after. Per reader: 8 records a batch, windows of 24, epochs of
    ~100 records."""
    epochs = [tuple(column(b, "epoch")) for b in got]
    crossing = next(j for j in range(len(got) - 1) if epochs[j] != epochs[j + 1])
    if point == "mid_window":
        return next(j for j in range(len(got)) if column(got[j], "position")[0] % 24)
    return {"start": 0, "early": 2, "crossing": crossing, "after_crossing": crossing + 1,
            "late": 27}[point]  # fmt: skip


# Each resumed pipeline costs ~0.4 s: the fast tier resumes inside a shuffle window and
# at an epoch's end, the full suite at every point.
@pytest.mark.parametrize(
    "point",
    [
        "mid_window",
        "crossing",
        pytest.param("start", marks=pytest.mark.slow),
        pytest.param("early", marks=pytest.mark.slow),
        pytest.param("after_crossing", marks=pytest.mark.slow),
        pytest.param("late", marks=pytest.mark.slow),
    ],
)
def test_resumed_batches_equal_the_uninterrupted_ones(shards, uninterrupted, point):
    got = uninterrupted
    j = resume_point(got, point)
    resumed = readers(shards, data_checkpoint(np.stack(got[j].positions)))
    for expected in got[j + 1 : j + 3]:
        same(next(resumed), expected)


def test_the_stream_meets_every_kind_of_bad_record_and_counts_it(uninterrupted):
    last = uninterrupted[-1].skipped
    assert last["undecodable"] > 0 and last["empty_caption"] > 0
    assert last["unreadable_shard"] >= 2  # the cut shard, once per epoch
    assert last["missing_key"] == 0


def test_checkpoint_is_json_of_ints(uninterrupted):
    import json

    saved = data_checkpoint(uninterrupted[4].positions)
    assert json.loads(json.dumps(saved)) == saved
    assert saved["fields"] == list(FIELDS)
    assert np.array_equal(np.asarray(saved["readers"]), uninterrupted[4].positions)


@pytest.mark.slow
def test_two_processes_read_the_one_process_batches(shards, uninterrupted):
    def split(resume):
        return [
            readers(shards, resume, count=4, batch=32, process_index=p, process_count=2)
            for p in range(2)
        ]

    whole = readers(shards, count=4, batch=32)
    ones = [next(whole) for _ in range(6)]
    halves = split(None)
    for one in ones[:3]:
        first, second = (next(h) for h in halves)
        assert first.captions + second.captions == one.captions
        np.testing.assert_array_equal(np.concatenate([first.images, second.images]), one.images)
        np.testing.assert_array_equal(
            np.concatenate([first.positions, second.positions]), one.positions
        )
    # a 1-process checkpoint resumes on 2 processes, and the other way round
    resumed = split(data_checkpoint(ones[2].positions))
    parts = [next(h) for h in resumed]
    assert parts[0].captions + parts[1].captions == ones[3].captions
    rows = np.concatenate([p.positions for p in parts])  # what the trainer gathers
    single = readers(shards, data_checkpoint(rows), count=4, batch=32)
    same(next(single), ones[4])


def test_resume_reads_one_window_wherever_it_is(shards):
    window = 32
    stream = readers(shards, count=1, window=window, batch=32)
    near = next(stream).positions
    far = near
    while far[0, 0] < 100 * near[0, 0]:  # positions 100x apart: ~105 batches on
        far = next(stream).positions
    costs = []
    for state in (near, far):
        resumed = readers(shards, data_checkpoint(state), count=1, window=window, batch=32)
        next(resumed)
        costs.append(resumed.resume_reads)
    assert costs[0] == costs[1] <= window + max(SHARD_SIZES)


@pytest.mark.slow  # the legacy path
def test_older_checkpoints_resume_from_their_positions(shards, uninterrupted):
    """{"positions": [...], "skipped": n}: found by reading record headers."""
    state = uninterrupted[12].positions
    legacy = {"positions": [int(p) for p in state[:, 0]], "skipped": 5}
    resumed = next(readers(shards, legacy))
    assert resumed.captions == uninterrupted[13].captions
    np.testing.assert_array_equal(resumed.images, uninterrupted[13].images)


def test_a_changed_spec_is_refused(shards, uninterrupted):
    saved = data_checkpoint(uninterrupted[3].positions)
    with pytest.raises(UserError, match="^data.readers: the checkpoint has 2 reader"):
        readers(shards, saved, count=4, batch=32)
    with pytest.raises(UserError, match="^data.shuffle_buffer: .*written with 48"):
        readers(shards, saved, window=12)
    with pytest.raises(UserError, match="^data.train: the checkpoint's readers had 8 shards"):
        readers(shards[:6], saved)


def test_tfrecord_reader_agrees_with_tensorflow(shards):
    """Our reader gives tf.data's records, resumes at any offset it gave, and its
    header-only pass finds the same offsets (what older checkpoints are re-found with)."""
    from clip_jax.data import tfrecord
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    path = shards[0]
    ours = list(tfrecord.records(path))
    theirs = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    assert [record for record, _ in ours] == theirs and len(ours) == SHARD_SIZES[0]
    offset = ours[9][1]
    assert [r for r, _ in tfrecord.records(path, offset)] == theirs[10:]
    assert [o for _, o in tfrecord.records(path, data=False)] == [o for _, o in ours]
    with pytest.raises(tfrecord.ShardError, match="truncated"):  # the cut shard
        list(tfrecord.records(shards[1], data=False))


def test_a_closed_stream_stops_reading_and_closes_promptly(shards):
    """close() ends the generator before dropping tf.data's iterator (dropping it while
    a tf.data thread waits for the GIL to run the generator never returns)."""
    import time

    from clip_jax.data.stream import CLOSE_WAIT_S

    stream = readers(shards).streams[0]
    next(stream)
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < CLOSE_WAIT_S
    read = stream.raw.records_read
    time.sleep(0.3)
    assert stream.raw.records_read == read  # nothing is read after the close
    stream.close()  # twice is harmless
