"""webdataset tar shards (the clip-jax-webdataset plugin) read through clip-jax's own
streams: the same batches as the same examples in tfrecords, exact resume, bad records
counted by reason, and a real run. Real tar files, written here and by Python's tarfile."""

import io
import logging
import tarfile

import numpy as np
import pytest

from clip_jax.data import synthetic
from clip_jax.data.formats import TFRECORD, ShardError, record_format
from clip_jax.data.readers import FIELDS, REASONS, Readers, data_checkpoint
from clip_jax.errors import UserError
from clip_jax.schemas import RecordKeys
from clip_jax_webdataset.format import WEBDATASET, WebdatasetFormat
from clip_jax_webdataset.tar_records import examples

SIZE = 16
SHARD_SIZES = [23, 31, 17, 29, 26, 19]  # uneven, as real shards are


def example(shard: int, index: int) -> tuple[str, bytes, str, int]:
    """A unique caption per example; every 9th is undecodable or has an empty caption."""
    key = f"{shard:05d}{index:04d}"
    image, caption, label = synthetic.make_example(shard, index, SIZE)
    kind = (shard * 7 + index) % 9
    if kind == 3:
        image = b"\xff\xd8 not a jpeg"
    elif kind == 6:
        caption = "  "
    return key, image, f"{caption} #{shard}-{index}" if caption.strip() else caption, label


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> dict[str, list[str]]:
    """The same examples as tfrecord and as tar shards."""
    root = tmp_path_factory.mktemp("wds")
    paths: dict[str, list[str]] = {"tfrecord": [], "webdataset": []}
    for shard, count in enumerate(SHARD_SIZES):
        shard_examples = [example(shard, i) for i in range(count)]
        for shard_format in (TFRECORD, WEBDATASET):
            path = str(root / f"{shard:05d}{shard_format.suffix}")
            assert shard_format.write_shard(path, shard_examples) == count
            paths[shard_format.name].append(path)
    return paths


def readers(files, resume=None, *, label_key="label", count=2, window=24, **kwargs) -> Readers:
    keys = RecordKeys(readers=count, shuffle_buffer=window * count, label_key=label_key)
    fmt = WebdatasetFormat(label_key) if files[0].endswith(".tar") else TFRECORD
    return Readers(
        files, keys, image_size=SIZE, global_batch=16, seed=7, resume=resume, labels=True,
        record_format=fmt, **kwargs,
    )  # fmt: skip


def test_tar_members_group_into_examples_that_resume_at_their_offsets(tmp_path):
    """Members with one key make one example; long names (pax), directories and names
    without an extension are handled as webdataset does; any example's offset resumes."""
    path = tmp_path / "00000.tar"
    long_key = "deep/" + "x" * 120 + "/000000001"
    members = [
        ("000000000.jpg", b"J0"), ("000000000.txt", b"t0"), ("000000000.json", b"{}"),
        ("README", b"no extension"),
        (f"{long_key}.jpg", b"J1"), (f"{long_key}.TXT", b"t1"),
        ("000000002.txt", b"t2"), ("000000002.jpg", b"J2"),
    ]  # fmt: skip
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a regular member: skipped
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    got = list(examples(str(path)))
    assert [(key, fields) for key, fields, _ in got] == [
        ("000000000", {"jpg": b"J0", "txt": b"t0", "json": b"{}"}),
        (long_key, {"jpg": b"J1", "txt": b"t1"}),
        ("000000002", {"txt": b"t2", "jpg": b"J2"}),
    ]
    offsets = [after for _, _, after in got]
    assert offsets == sorted(offsets) and all(o % 512 == 0 for o in offsets)
    assert [after for _, _, after in examples(str(path), data=False)] == offsets
    for j, offset in enumerate(offsets):
        assert list(examples(str(path), offset)) == got[j + 1 :]


def test_damage_at_a_header_keeps_the_complete_example_before_it(tmp_path):
    """The next example's first header corrupt or cut: the example before it was read
    whole and is yielded before the error; a cut inside a member's data loses its
    example only."""
    path = tmp_path / "00000.tar"
    WEBDATASET.write_shard(str(path), [example(4, 0), example(4, 1)])
    second = next(examples(str(path)))[2]  # the second example's first header
    data = path.read_bytes()
    corrupt = data[:second] + b"\x00garbage" + data[second + 9 :]
    for damaged in (corrupt, data[: second + 300], data[: second + 512 + 10]):
        path.write_bytes(damaged)
        got = []
        with pytest.raises(ShardError):
            for key, _, after in examples(str(path)):
                got.append((key, after))
        assert got == [(example(4, 0)[0], second)], len(damaged)  # never the cut one


def test_records_are_the_examples_a_tfrecord_holds_and_gfile_paths_work():
    """Through tf.io.gfile (ram://, as gs:// would be): the format's records parse as
    tf.train.Examples with the tfrecord writer's features, the label as an int."""
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    written = [example(9, i) for i in range(5)]
    WEBDATASET.write_shard("ram://wds/00000.tar", written)
    records = list(WEBDATASET.records("ram://wds/00000.tar"))
    assert len(records) == 5
    parsed = tf.train.Example.FromString(records[1][0]).features.feature
    key, image, caption, label = written[1]
    assert parsed["jpg"].bytes_list.value == [image]
    assert parsed["txt"].bytes_list.value == [caption.encode()]
    assert parsed["cls"].int64_list.value == [label]
    assert parsed["__key__"].bytes_list.value == [key.encode()]
    rest = list(WEBDATASET.records("ram://wds/00000.tar", records[1][1]))
    assert rest == records[2:]


@pytest.mark.slow  # two pipelines read end to end
def test_batches_equal_the_tfrecord_sources(both):
    """The stream order depends only on positions, so the same examples in the same
    shards give the same batches, labels and skip counts in either format."""
    tar, tfr = readers(both["webdataset"], label_key="cls"), readers(both["tfrecord"])
    for _ in range(16):  # 256 examples: past the first epoch (145)
        a, b = next(tar), next(tfr)
        assert a.captions == b.captions
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.positions[:, :3], b.positions[:, :3])  # not bytes
        assert a.skipped == b.skipped
    assert a.skipped["undecodable"] > 0 and a.skipped["empty_caption"] > 0
    assert (a.labels >= 0).all()


@pytest.mark.slow  # two pipelines read end to end
def test_resumed_batches_equal_the_uninterrupted_ones(both):
    files = both["webdataset"]
    got = [b for b, _ in zip(readers(files, label_key="cls"), range(14), strict=False)]
    column = lambda b: b.positions[:, FIELDS.index("position")]
    mid_window = next(j for j in range(len(got) - 2) if column(got[j])[0] % 24)
    crossing = next(
        j for j in range(len(got) - 1)
        if (got[j].positions[:, 1] != got[j + 1].positions[:, 1]).any()
    )  # fmt: skip
    for j in sorted({mid_window, crossing}):
        resumed = readers(files, data_checkpoint(got[j].positions), label_key="cls")
        for expected in got[j + 1 : j + 3]:
            actual = next(resumed)
            assert actual.captions == expected.captions
            np.testing.assert_array_equal(actual.images, expected.images)
            np.testing.assert_array_equal(actual.positions, expected.positions)
    # an older checkpoint's bare positions: found again by reading tar headers only
    old = {"positions": [int(p) for p in column(got[5])]}
    assert next(readers(files, old, label_key="cls")).captions == got[6].captions


def bad_shards(root) -> tuple[list[str], dict[str, int]]:
    """One shard of bad examples, one cut mid-member, one empty, one not a tar file.
    Returns the paths and the bad examples per epoch, by reason."""
    good = [example(1, 0), example(1, 1)]  # kinds 7 and 8: both fine
    image = good[0][1]
    members = [
        (f"{key}.{extension}", payload)
        for key, jpg, caption, label in good
        for extension, payload in (("jpg", jpg), ("txt", caption.encode()), ("cls", b"%d" % label))
    ] + [
        ("b1.jpg", image), ("b1.json", b'{"caption": "no txt member"}'),  # missing_key
        ("b2.txt", b"no image member"), ("b2.json", b"{}"),  # missing_key
        ("b3.jpg", b"\xff\xd8 broken"), ("b3.txt", b"broken jpeg"),  # undecodable
        ("b4.jpg", image), ("b4.txt", b" \n"),  # empty_caption
        ("b5.jpg", image), ("b5.txt", b"a label that is not a number"),
        ("b5.cls", b"seven"),  # trains, with label -1
    ]  # fmt: skip
    with tarfile.open(root / "00000.tar", "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    WEBDATASET.write_shard(str(root / "00001.tar"), [example(2, i) for i in (0, 1, 2)])
    after_first = next(examples(str(root / "00001.tar")))[2]  # example 1's first header
    data = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(data[: after_first + 512 + 100])  # inside its image
    (root / "00002.tar").write_bytes(b"")
    (root / "00003.tar").write_text("key,url,caption\n0,http://x,not a tar file\n" * 20)
    per_epoch = {"missing_key": 2, "undecodable": 1, "empty_caption": 1, "unreadable_shard": 2}
    return sorted(str(p) for p in root.iterdir()), per_epoch


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path, caplog):
    paths, per_epoch = bad_shards(tmp_path)
    caplog.set_level(logging.WARNING, logger="clip_jax.data")
    keys = RecordKeys(readers=1, shuffle_buffer=12, label_key="cls")
    stream = Readers(
        paths, keys, image_size=SIZE, global_batch=4, seed=3, labels=True,
        record_format=WebdatasetFormat("cls"),
    )  # fmt: skip
    batches = [next(stream) for _ in range(8)]  # 32 good examples: 4 per epoch, 8 epochs
    captions = {c for b in batches for c in b.captions}
    assert captions == {
        example(1, 0)[2],
        example(1, 1)[2],
        example(2, 0)[2],
        "a label that is not a number",
    }
    labels = {c: int(x) for b in batches for c, x in zip(b.captions, b.labels, strict=True)}
    assert labels["a label that is not a number"] == -1
    assert labels[example(1, 0)[2]] == example(1, 0)[3]
    epochs = int(batches[-1].positions[0, 0]) / 8  # 8 readable examples an epoch
    for reason in REASONS:
        low, high = int(epochs) * per_epoch[reason], (int(epochs) + 1) * per_epoch[reason]
        assert low <= batches[-1].skipped[reason] <= high, (reason, batches[-1].skipped)
    warnings = [r.getMessage() for r in caplog.records if r.name == "clip_jax.data"]
    assert len(warnings) == 2
    assert any("00001.tar: truncated" in w for w in warnings)
    assert any("00003.tar: not a tar file" in w for w in warnings)
    with pytest.raises(ShardError, match="truncated"):
        list(WEBDATASET.records(paths[1], data=False))


def test_no_readable_example_is_a_user_error(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.tar").write_text("not a tar file at all")
    keys = RecordKeys(readers=1, shuffle_buffer=4)
    stream = Readers(
        sorted(str(p) for p in tmp_path.iterdir()), keys, image_size=SIZE, global_batch=2,
        seed=0, record_format=WEBDATASET,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"^data.train: .* not a webdataset file"):
        next(stream)


def test_source_synth_evaluation_and_tokenizer_captions_read_tar(tmp_path):
    """The registered source, `data synth`'s writer, the unshuffled evaluation reader
    and the tokenizer's caption reader all take the format from the source."""
    from clip_jax.data import pipeline
    from clip_jax.data.synth_writer import write_synthetic
    from clip_jax.plugins import get_registry

    fmt = record_format("webdataset")
    with pytest.raises(UserError, match="^--format: unknown record format 'webdatset'"):
        record_format("webdatset")
    write_synthetic(tmp_path, 48, 20, image_size=SIZE, workers=1, record_format=fmt)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        f"{i:05d}.tar" for i in range(8)
    ]
    component = get_registry().get("data_source", "webdataset")
    options = component.options(
        train=str(tmp_path / "train/*.tar"), validation=str(tmp_path / "validation/*.tar"),
        classes_file=str(tmp_path / "classes.json"), label_key="cls",
    )  # fmt: skip
    source = component.factory(options)
    assert source.record_format.name == "webdataset" and len(source.classes) == 16
    dataset = pipeline.make_dataset(
        source.validation_files, image_size=SIZE, batch_size=8, label_key="cls", train=False,
        record_format=source.record_format,
    )  # fmt: skip
    batches = list(pipeline.iterate(dataset))
    assert [len(b.captions) for b in batches] == [8, 8, 4]
    expected = [synthetic.make_example(1_000_003, i, SIZE) for i in range(20)]
    assert [c for b in batches for c in b.captions] == [caption for _, caption, _ in expected]
    assert [int(x) for b in batches for x in b.labels] == [label for *_, label in expected]
    captions = list(pipeline.read_captions(source.train_files, "txt", 10, source.record_format))
    assert captions == [synthetic.make_example(0, i, SIZE)[1] for i in range(10)]


@pytest.mark.slow  # two short training runs
def test_a_run_from_tar_shards_learns_as_the_tfrecord_one(synthetic_dir, tmp_path):
    """The same embedded examples as tar shards train the same model: the losses of a
    run from them equal the tfrecord run's, step by step."""
    from clip_jax.data.synth_writer import write_synthetic
    from clip_jax.run_folder import RunFolder
    from clip_jax.spec import load_spec
    from clip_jax.train.trainer import train
    from tests.conftest import QUICKSTART, SMALL_RUN

    tar_dir = tmp_path / "wds"
    write_synthetic(tar_dir, 1024, 256, workers=1, record_format=record_format("webdataset"))
    common = SMALL_RUN + ["train.steps=30", "train.checkpoint_every=30", "eval.every=30"]
    tfrecord_spec = load_spec(
        QUICKSTART,
        common + [f"data.dir={synthetic_dir}", "data.train_examples=1024",
                  "data.validation_examples=256", f"run.output_dir={tmp_path / 'tfrecord'}"],
    )  # fmt: skip
    tar_spec = load_spec(
        QUICKSTART.parent / "quickstart-webdataset.toml",
        common + [f"data.train={tar_dir}/train/*.tar", f"data.validation={tar_dir}/validation/*.tar",
                  f"data.classes_file={tar_dir}/classes.json", f"run.output_dir={tmp_path / 'tar'}"],
    )  # fmt: skip
    results = {name: train(spec) for name, spec in (("tfr", tfrecord_spec), ("tar", tar_spec))}
    losses = {}
    for name, spec in (("tfr", tfrecord_spec), ("tar", tar_spec)):
        lines = [r for r in RunFolder(spec.run.output_dir).metrics() if r["split"] == "train"]
        assert lines[-1]["skipped_records"] == 0
        losses[name] = [r["loss"] for r in lines]
    assert losses["tar"][-1] < losses["tar"][0] - 0.3
    np.testing.assert_allclose(losses["tar"], losses["tfr"], rtol=1e-4)
    assert results["tar"]["zero_shot_top1"] == pytest.approx(results["tfr"]["zero_shot_top1"])
    assert results["tar"]["zero_shot_top1"] > 1 / 16
    # `clipctl eval RUN --max-examples N` reads the run's validation tar shards too
    from clip_jax.inference import evaluate_run

    evaluated = evaluate_run(tar_spec.run.output_dir, max_examples=100)
    assert evaluated["examples"] == 100 and evaluated["zero_shot_top1"] > 1 / 16


def test_synth_format_is_checked_by_the_cli(tmp_path):
    from click.testing import CliRunner

    from clipctl.cli import cli

    result = CliRunner().invoke(cli, ["data", "synth", str(tmp_path / "x"), "--format", "zip"])
    assert result.exit_code == 2
    assert "--format: unknown record format 'zip' (available: tfrecord, webdataset" in result.output
    assert not (tmp_path / "x").exists()
