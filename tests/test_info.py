"""`clipctl info`: sizes and costs of a spec's model, without data or allocation."""

import json

import pytest
from click.testing import CliRunner

from clip_jax import fits, memory
from clip_jax.errors import UserError
from clip_jax.info import model_info
from clip_jax.plugins import get_registry
from clip_jax.spec import load_spec
from clipctl.cli import cli
from tests.conftest import QUICKSTART, SMALL_RUN, clipctl_in_a_fresh_interpreter

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
def test_auxiliary_terms_count_in_the_flops_and_parameters():
    """siglip2-tiny trains a captioning decoder and the teacher's terms with its towers:
    their work (the teacher pass, the views) is part of every step's FLOPs."""
    with_terms = model_info(load_spec(TEMPLATES["siglip2-tiny"].path))
    towers = model_info(load_spec(TEMPLATES["siglip2-tiny"].path, ["loss.aux=[]"]))
    counts = with_terms["parameters"]
    assert counts["aux"] > 0 and "aux" not in towers["parameters"]
    assert counts["total"] == towers["parameters"]["total"] + counts["aux"]
    assert counts["heads"] == towers["parameters"]["heads"]
    assert with_terms["train_flops_per_pair"] > 2 * towers["train_flops_per_pair"]
    shown = CliRunner().invoke(cli, ["info", str(TEMPLATES["siglip2-tiny"].path), "--no-memory"])
    assert shown.exit_code == 0, shown.output
    (line,) = [x for x in shown.output.splitlines() if x.startswith("  auxiliary terms ")]
    assert line.split()[-1] == f"{counts['aux']:,}"


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
    estimate = facts["memory"]["estimates"][0]  # the ring loss compiled for 8 devices
    assert estimate["strategy"] == "dp" and estimate["peak"] > estimate["arguments"] > 0
    bad = runner.invoke(cli, ["info", quickstart, "sharding.mesh.data=3", "--devices", "8"])
    assert bad.exit_code == 2
    assert "sharding.mesh" in bad.output


# ------------------------------------------------------------- will it fit?
SMALL_FSDP = [*SMALL_RUN, "sharding.strategy=fsdp"]  # batch 64, data=1 x fsdp=-1
INPUT_BYTES = 32 * 32 * 3 * 4 + 16 * 4  # one float32 32px image and its 16 int32 tokens


def test_sizes_and_accelerators():
    assert fits.parse_size("16GiB") == fits.parse_size("16G") == 16 * 2**30
    assert fits.parse_size("80GB") == 80 * 10**9
    assert fits.parse_size("512 MiB") == 2**29 and fits.parse_size("1e9") == 10**9
    for bad in ("16XB", "GiB", "-1G", "0"):
        with pytest.raises(UserError, match="--device-memory"):
            fits.parse_size(bad)
    assert fits.device_memory("tpu-v5e")["bytes"] == 16 * 2**30
    h100 = fits.device_memory("H100")
    assert h100["bytes"] == int(0.75 * 79.6 * 2**30) and "75% of 79.6 GiB" in h100["label"]
    with pytest.raises(UserError, match="did you mean 'h100'"):
        fits.device_memory("h101")
    assert fits.device_memory() is None


@pytest.mark.parametrize(
    "peak_of, start",
    [
        (lambda b: 10_000 + 37 * b, 64),  # affine: the line is exact
        (lambda b: 10_000 + 3 * b + b * b // 50, 8),  # convex: softmax's B x B logits
        (lambda b: 10_000 + 37 * b + (4_000 if b > 300 else 0), 4096),  # a jump, from above
        (lambda b: 10_000 + 37 * b + 500 * (b % 64 == 0), 8),  # not even monotone
    ],
)
def test_largest_batch_search(peak_of, start):
    limit, unit = 30_000, 8
    lo, hi, peaks = fits.largest_batch(peak_of, unit, limit, start)
    assert lo % unit == 0 and peak_of(lo) <= limit < peak_of(hi) and hi == lo + unit
    assert set(peaks) >= {lo, hi} and len(peaks) <= 9  # each probe is a compile
    assert fits.largest_batch(lambda b: 10**9, unit, limit, 64)[:2] == (0, unit)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--devices", "0"], "0 is not in the range x>=1"),
        (["--device", "tpu-v9"], "unknown accelerator 'tpu-v9'"),
        (["--device-memory", "lots"], "--device-memory: 'lots' is not a size"),
        (["--device", "h100", "--device-memory", "1GiB"], "not both"),
        (["--microbatches", "two"], "--microbatches: 'two' is not a comma list"),
        (["--max-batch", "--no-memory"], "drop --no-memory"),
    ],
)
def test_info_refuses_bad_options_with_exit_code_2(args, message):
    result = CliRunner().invoke(cli, ["info", str(QUICKSTART), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_info_refuses_a_batch_the_devices_do_not_divide_and_max_batch_without_memory():
    runner = CliRunner()
    bad = runner.invoke(
        cli, ["info", str(QUICKSTART), *SMALL_RUN, "--devices", "8", "--batch", "100"]
    )
    assert bad.exit_code == 2, bad.output
    assert "batch 100 must be a multiple of the 8 devices of the batch axes" in bad.output
    assert "e.g. 96" in bad.output
    blind = runner.invoke(cli, ["info", str(QUICKSTART), *SMALL_RUN, "--max-batch"])
    assert blind.exit_code == 2  # CPU devices report no memory, and none was given
    assert "--max-batch needs the device's memory" in blind.output


def test_info_help_imports_no_jax():
    result = clipctl_in_a_fresh_interpreter(["info", "--help"])
    assert "--max-batch" in result.stdout


@pytest.mark.slow
def test_estimate_grows_with_the_batch_and_fsdp_shrinks_it_per_device():
    on_8 = memory.Estimator(QUICKSTART, SMALL_FSDP, devices=8)
    small, large = on_8.estimate("fsdp", 64), on_8.estimate("fsdp", 128)
    assert small.mesh == {"data": 1, "fsdp": 8, "model": 1} and small.per_device_batch == 8
    assert large.peak > small.peak and large.temporaries > small.temporaries
    # the batch is split over the 8 devices: 64 more pairs are 8 more per device
    assert large.arguments - small.arguments == 8 * INPUT_BYTES
    assert small.peak == small.arguments + small.outputs - small.aliased + small.temporaries
    # gradient caching: the same batch in 2 micro-batches keeps half the activations
    halves = on_8.estimate("fsdp", 128, microbatches=2)
    assert halves.arguments == large.arguments and halves.temporaries < large.temporaries
    with pytest.raises(UserError, match="multiple of 2 micro-batches x the 8 devices"):
        on_8.estimate("fsdp", 136, microbatches=2)

    state = {}  # per-device state bytes (parameters and AdamW's two moments), by devices
    peaks = {}
    for devices in (2, 8, 16):  # 16: more than this process has, simulated in a subprocess
        if devices == 8:
            found = small.to_dict()
        else:
            report = memory.report(QUICKSTART, SMALL_FSDP, devices=devices, memory=None)
            (found,) = report["estimates"]
            assert report["devices"] == devices and "simulated CPU devices" in report["note"]
        assert found["mesh"]["fsdp"] == devices and found["batch"] == 64
        peaks[devices] = found["peak"]
        state[devices] = found["arguments"] - 64 // devices * INPUT_BYTES
        params = model_info(load_spec(QUICKSTART, SMALL_FSDP), devices)
        assert state[devices] == pytest.approx(3 * params["param_bytes_per_device"], rel=0.01)
    assert peaks[2] > peaks[8] > peaks[16]
    assert state[2] > 3.5 * state[8] and state[8] > 1.8 * state[16]


@pytest.mark.slow
def test_max_batch_fits_and_its_double_does_not():
    limit = 16 * 2**20
    args = ["info", str(QUICKSTART), *SMALL_RUN, "--devices", "8", "--device-memory", "16MiB"]
    result = CliRunner().invoke(cli, [*args, "--max-batch", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)["memory"]
    assert facts["device_memory"]["bytes"] == limit
    (found,) = facts["max_batch"]
    batch = found["batch"]
    assert found["strategy"] == "dp" and batch % 8 == 0 and found["next_batch"] == batch + 8
    assert found["peak"] <= limit < found["next_peak"]
    assert found["compiles"] <= 6  # the search follows the (nearly linear) peak

    # checked again by the estimate itself, in a fresh estimator
    check = memory.Estimator(QUICKSTART, SMALL_RUN, devices=8)
    assert check.estimate("dp", batch).peak <= limit
    assert check.estimate("dp", 2 * batch).peak > limit


@pytest.mark.slow
def test_a_naflex_runs_estimate_compiles_its_patch_sequences():
    """The batch a NaFlex step reads: budget x patch^2 x 3 floats, a grid and a mask per
    image, at the run's own budget (here 64 patches, 4x the square 32 px grid's 16)."""
    naflex = [*SMALL_RUN, "preprocess.resize=naflex", "preprocess.max_patches=64"]
    square, flex = (memory.Estimator(QUICKSTART, o, devices=1) for o in (SMALL_RUN, naflex))
    per_image = (64 * 8 * 8 * 3 * 4 + 2 * 4 + 64) - 32 * 32 * 3 * 4
    gap = flex.estimate("dp", 64).arguments - square.estimate("dp", 64).arguments
    assert gap == 64 * per_image


@pytest.mark.slow
def test_a_gpu_runs_cudnn_attention_is_sized_here_with_xlas():
    """Sizing a GPU run on a laptop: the fused kernel cannot compile here, so the estimate
    uses XLA's attention and says so (its memory is an upper bound)."""
    gpu_run = [*SMALL_RUN, "model.text.attention=cudnn", "model.text.dtype=bfloat16"]
    result = CliRunner().invoke(cli, ["info", str(QUICKSTART), *gpu_run, "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["xla_attention_for"] == ["model.text.attention"]
    plain = model_info(load_spec(QUICKSTART, [*SMALL_RUN, "model.text.dtype=bfloat16"]))
    assert facts["train_flops_per_pair"] == plain["train_flops_per_pair"]
    assert "model.text.attention = 'cudnn' estimated with XLA's" in facts["memory"]["note"]
    shown = CliRunner().invoke(cli, ["info", str(QUICKSTART), *gpu_run, "--no-memory"])
    assert "model.text.attention = 'cudnn' counted with XLA's attention" in shown.output


DEEP = [*SMALL_RUN, "model.vision.depth=4", "model.text.depth=4"]
REMAT = ["model.vision.remat=full", "model.text.remat=full"]
SCAN = ["model.vision.scan_layers=true", "model.text.scan_layers=true"]


@pytest.mark.slow
def test_an_unrolled_remat_is_estimated_as_the_scanned_one_on_a_cpu():
    """XLA's CPU compiler drops remat's barriers before scheduling: unrolled, remat saves
    nothing there (checked first, the reason for what follows); the estimate of a GPU/TPU
    run compiles the scanned form, which keeps remat on every backend, and says so."""
    import jax

    from clip_jax.components import components
    from clip_jax.train.state import make_train_step, state_shardings

    # 8 devices: the mesh a run in this process builds (the test session's 8 CPU devices)
    plain, unrolled = (memory.Estimator(QUICKSTART, [*DEEP, *o], devices=8) for o in ([], REMAT))
    none = plain.estimate("dp", 64).temporaries

    # the step as a run on this CPU compiles it: unrolled remat, the same temporaries
    comps = components(load_spec(QUICKSTART, [*DEEP, *REMAT]))
    tx, schedule = comps.optimizer()
    _, abstract, shardings = state_shardings(comps.model, tx, comps.layout, comps.spec)
    step = make_train_step(comps.model, comps.loss.fn, tx, schedule, shardings, comps.layout)
    v, t = comps.spec.model.vision, comps.spec.model.text
    images = jax.ShapeDtypeStruct((64, v.image_size, v.image_size, 3), "float32")
    tokens = jax.ShapeDtypeStruct((64, t.context_length), "int32")
    compiled = step.lower(abstract, images, tokens, None).compile()
    assert compiled.memory_analysis().temp_size_in_bytes == pytest.approx(none, rel=0.01)

    assert unrolled.estimate("dp", 64).temporaries < none / 2
    assert unrolled.scanned == ["model.vision.remat", "model.text.remat"]
    assert plain.scanned == []
    assert "model.vision.remat, model.text.remat with unrolled layers" in memory._note(unrolled, 8)


@pytest.mark.slow
def test_flops_count_the_model_whatever_its_scan_remat_and_chunks(monkeypatch):
    """XLA's cost analysis counts a loop's body once: a scanned tower, or a head that
    forms its logits a chunk at a time (here forced into loops at info's batch of 2),
    would undercount. info counts the unrolled model without remat, in one chunk."""
    from clip_jax.models import chunks

    path = TEMPLATES["siglip2-tiny"].path
    plain = model_info(load_spec(path))["train_flops_per_pair"]
    monkeypatch.setattr(chunks, "CHUNK_LOGITS", 64)
    looped = model_info(load_spec(path, [*REMAT, *SCAN]))["train_flops_per_pair"]
    assert looped == plain


def test_a_size_1_mesh_axis_splits_nothing_so_tp_is_dp_and_fsdp_tp_is_fsdp():
    """The layouts `--strategies all` compares: built from the mesh alone, no compile."""
    keys = {}
    for mesh in ("model=1", "model=2"):
        on_8 = memory.Estimator(QUICKSTART, [*SMALL_RUN, f"sharding.mesh.{mesh}"], devices=8)
        keys[mesh] = {name: on_8.layout_key(name) for name in ("dp", "fsdp", "tp", "fsdp_tp")}
    one, two = keys["model=1"], keys["model=2"]
    assert one["tp"] == one["dp"] and one["fsdp_tp"] == one["fsdp"] != one["dp"]
    assert len(set(two.values())) == 4  # with a model axis to split over, all differ


@pytest.mark.slow
def test_all_strategies_compile_each_layout_once_and_say_which_they_skipped():
    """With sharding.mesh.model = 1 (the templates'), tp partitions as dp does and fsdp_tp
    as fsdp: `--strategies all` sizes dp and fsdp and lists the other two as skipped, with
    why; its progress is one plain line per compile (what a log or a pipe shows)."""
    said = []
    found = memory.report(
        QUICKSTART, SMALL_RUN, devices=8, memory=None, strategies=["all"], progress=said.append
    )
    assert [e["strategy"] for e in found["estimates"]] == ["dp", "fsdp"]
    assert found["compiles"] == 2
    assert {s["strategy"]: s["error"] for s in found["skipped"]} == {
        "tp": "same layout as dp on this mesh",
        "fsdp_tp": "same layout as fsdp on this mesh",
    }
    assert "tp: not sized: same layout as dp on this mesh" in fits.format_report(found)
    compiled = [line for line in said if line.startswith("compiled ")]
    assert len(compiled) == 2 and compiled[1].startswith("compiled fsdp at batch 64: peak ")
    assert compiled[1].endswith("(2 compiles)")
    # named one by one, a strategy is sized as asked, even when it repeats a layout
    named = memory.report(QUICKSTART, SMALL_RUN, devices=8, memory=None, strategies=["dp", "tp"])
    assert [e["strategy"] for e in named["estimates"]] == ["dp", "tp"] and not named["skipped"]


def test_print_progress_writes_plain_lines_to_stderr(capsys):
    """The progress `clipctl info` needs where stderr is no terminal: lines, no escapes."""
    memory.print_progress("compiled dp at batch 64: peak 1.00 GiB (1 compile)")
    assert capsys.readouterr().err == "compiled dp at batch 64: peak 1.00 GiB (1 compile)\n"


def test_a_cpu_run_with_unrolled_remat_is_told_what_saves_memory():
    from clip_jax.components import unrolled_remat_notes

    (note,) = unrolled_remat_notes(load_spec(QUICKSTART, ["model.vision.remat=full"]))
    assert note.startswith("model.vision.remat saves no memory on a CPU")
    assert note.endswith("set model.vision.scan_layers = true")
    assert unrolled_remat_notes(load_spec(QUICKSTART, [*REMAT, *SCAN])) == []
    assert unrolled_remat_notes(load_spec(QUICKSTART)) == []
