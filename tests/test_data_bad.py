"""Bad data, explained: every kind of bad record or shard is skipped, counted by reason,
and named once; odd but valid images train. Real shards, read through tf.data."""

import io
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import synthetic
from clip_jax.data.readers import REASONS, Readers
from clip_jax.data.shards import serialize, write_shard
from clip_jax.errors import UserError
from clip_jax.schemas import BpeTokenizerOptions, RecordKeys, SentencePieceTokenizerOptions

SIZE = 16


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def odd_images() -> dict[str, bytes]:
    """Valid images that are not plain 8-bit RGB JPEGs: all of them must train."""
    rgb = Image.new("RGB", (20, 12), (200, 30, 30))
    return {
        "jpeg": synthetic.make_example(0, 0, SIZE)[0],
        "cmyk": encoded(rgb.convert("CMYK"), "JPEG"),
        "png16": encoded(Image.fromarray(np.full((10, 10), 40000, np.uint16)), "PNG"),
        "gif": encoded(rgb.convert("P"), "GIF"),
        "webp": encoded(rgb, "WEBP"),
        "1x1": encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "2000x8": encoded(Image.new("RGB", (2000, 8), (0, 90, 0)), "JPEG"),
        "bmp": encoded(rgb, "BMP"),
        "grey": encoded(rgb.convert("L"), "JPEG"),
        "rgba": encoded(rgb.convert("RGBA"), "PNG"),
    }


def bad_records() -> dict[str, tuple[str, bytes]]:
    """caption -> (reason, record)."""
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    image = synthetic.make_example(0, 1, SIZE)[0]

    def example(**features) -> bytes:
        def feature(value):
            if isinstance(value, int):
                return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

        proto = {k: feature(v) for k, v in features.items()}
        return tf.train.Example(features=tf.train.Features(feature=proto)).SerializeToString()

    return {
        "broken jpeg": ("undecodable", serialize("a", b"\xff\xd8 not a jpeg", "broken jpeg")),
        "no bytes": ("undecodable", serialize("b", b"", "no bytes")),
        "not a proto": ("undecodable", b"\x00\x01 this is not a tf.train.Example \xfe"),
        "caption as int": ("undecodable", example(jpg=image, txt=7)),
        "no image": ("missing_key", example(txt=b"no image")),
        "no caption": ("missing_key", example(jpg=image)),
        "": ("empty_caption", serialize("c", image, "")),
        " \n\t": ("empty_caption", serialize("d", image, " \n\t")),
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"))


def write_zoo(root):
    """Shards: one of odd and bad records, one cut mid-record, one empty, one not a
    TFRecord file. Returns (paths, the good captions, bad counts per epoch)."""
    good = {f"odd {name}": image for name, image in odd_images().items()}
    records = [serialize(caption, image, caption) for caption, image in good.items()]
    bad = bad_records()
    records += [record for _, record in bad.values()]
    write_shard(root / "00000.tfrecord", records)
    cut = [
        serialize(f"cut {i}", synthetic.make_example(1, i, SIZE)[0], f"cut {i}") for i in range(4)
    ]
    write_shard(root / "00001.tfrecord", cut)
    data = (root / "00001.tfrecord").read_bytes()
    (root / "00001.tfrecord").write_bytes(data[: len(data) * 5 // 8])  # cut inside record 2
    (root / "00002.tfrecord").write_bytes(b"")
    (root / "00003.tfrecord").write_text("key,url,caption\n0,http://x,not a tfrecord\n")
    per_epoch = {reason: sum(r == reason for r, _ in bad.values()) for reason in REASONS}
    per_epoch["unreadable_shard"] = 2  # the cut one and the text file; the empty one is fine
    paths = sorted(str(p) for p in root.iterdir())
    return paths, set(good) | {"cut 0", "cut 1"}, per_epoch


def reader(paths, window: int = 20, batch: int = 6, **kwargs) -> Readers:
    keys = RecordKeys(readers=1, shuffle_buffer=window)
    return Readers(paths, keys, image_size=SIZE, global_batch=batch, seed=3, resume=None, **kwargs)


def test_bad_records_are_skipped_and_counted_by_reason(zoo, caplog):
    paths, good, per_epoch = zoo
    readable = len(good) + sum(per_epoch[r] for r in REASONS if r != "unreadable_shard")
    caplog.set_level(logging.WARNING, logger="clip_jax.data")
    stream = reader(paths)
    batches = [next(stream) for _ in range(12)]  # 72 good records: 6 epochs
    seen = [c for b in batches for c in b.captions]
    assert set(seen) == good  # every good record trains (odd images too), no bad one
    for batch in batches:
        assert batch.images.shape == (6, SIZE, SIZE, 3) and np.isfinite(batch.images).all()
    position = int(batch.positions[0, 0])
    epochs = position / readable
    assert epochs > 5
    for reason in REASONS:
        low, high = int(epochs) * per_epoch[reason], (int(epochs) + 1) * per_epoch[reason]
        assert low <= batch.skipped[reason] <= high, (reason, batch.skipped)
    # counts only grow, and every gap in the positions has a reason
    totals = [sum(b.skipped.values()) - b.skipped["unreadable_shard"] for b in batches]
    assert totals == sorted(totals)
    assert int(batches[-1].positions[0, 0]) - totals[-1] == 12 * 6
    # each bad shard named once, in 6 epochs of reading it
    warnings = [r.getMessage() for r in caplog.records if r.name == "clip_jax.data"]
    assert len(warnings) == 2
    assert any("00001.tfrecord: truncated" in w for w in warnings)
    assert any("00003.tfrecord: not a TFRecord" in w for w in warnings)


def test_no_readable_record_is_a_user_error(tmp_path):
    (tmp_path / "a.tfrecord").write_bytes(b"")
    (tmp_path / "b.tfrecord").write_text("not a tfrecord at all")
    write_shard(tmp_path / "c.tfrecord", [serialize("k", b"x", "cut")])
    data = (tmp_path / "c.tfrecord").read_bytes()
    (tmp_path / "c.tfrecord").write_bytes(data[:-3])
    paths = sorted(str(p) for p in tmp_path.iterdir())
    stream = reader(paths)
    with pytest.raises(UserError, match=r"^data.train: the 3 shards of reader 0 hold no readable"):
        next(stream)


@pytest.mark.slow  # a subprocess that imports TensorFlow
def test_no_tensorflow_noise_on_the_console(zoo):
    """Corrupt records and shards, read in a fresh process: stderr holds only our own
    warnings (one per bad shard; the trainer routes them to run.log), nothing from TF."""
    paths, _, _ = zoo
    script = textwrap.dedent(f"""
        from clip_jax.data.readers import Readers
        from clip_jax.schemas import RecordKeys
        stream = Readers({paths!r}, RecordKeys(readers=1, shuffle_buffer=20), image_size=16,
                         global_batch=6, seed=3, resume=None)
        for _ in range(8):
            next(stream)
        print("read")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "read"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all("skipping the rest of that shard" in line for line in lines), (
        lines
    )


def test_missing_tokenizer_paths_are_user_errors(tmp_path):
    from clip_jax.data.sentencepiece_tokenizer import sentencepiece_tokenizer
    from clip_jax.data.tokenizer import bpe_tokenizer

    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(UserError, match=f"^tokenizer.path: {missing} does not exist"):
        bpe_tokenizer(BpeTokenizerOptions(path=str(missing)), 16)
    options = SentencePieceTokenizerOptions(path=str(tmp_path / "spiece.model"))
    with pytest.raises(UserError, match=f"^tokenizer.path: {tmp_path}/spiece.model does not"):
        sentencepiece_tokenizer(options, 16)
