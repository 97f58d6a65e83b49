"""Exporting a NaFlex run (``preprocess.resize = "naflex"``) as a transformers folder.

SigLIP layout: a Siglip2Model, which takes the same padded patch sequences as our ViT
(``NaflexImages`` -> ``pixel_values``, ``spatial_shapes``, ``pixel_attention_mask``) and
must give the same embeddings for any grid, the table's own, larger (positions
upsampled) or smaller (downsampled); its processor cuts an image into the grid ours
does. CLIP layout: transformers has no NaFlex CLIPModel, so the fixed-size model with a
squashing processor, and a warning that says so.

The models are random-init ones made here (nothing is downloaded). Parity is measured on
unit-norm embeddings: max |ours - theirs| <= 1e-5.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import QUICKSTART, LazyModule

torch = LazyModule("torch", reason="parity with transformers needs torch (CPU build)")
transformers = LazyModule("transformers", "needs transformers (parity group)", needs=(torch,))

VOCAB = 512
PATCH, SIDE = 8, 4  # 32 px images: the learned position table is a 4 x 4 grid
BUDGET = 40  # preprocess.max_patches: room for grids larger than the table's (6 x 6)
TOL = 1e-5
TEXTS = ["a red circle", "a small blue square at the top", "green"]


def naflex_spec(layout: str, tokenizer: dict | None = None):
    """A tiny NaFlex run in the SigLIP or CLIP layout (test_interop's tower sizes)."""
    from clip_jax.spec import validate

    vision = {"image_size": PATCH * SIDE, "patch_size": PATCH, "width": 48, "depth": 2,
              "heads": 4, "mlp_dim": 96}  # fmt: skip
    text = {"vocab_size": VOCAB, "context_length": 16, "width": 32, "depth": 2, "heads": 4,
            "mlp_dim": 64}  # fmt: skip
    siglip = layout == "siglip"
    raw = {
        "model": {
            "preset": "siglip-b16" if siglip else "tiny",  # the layout; sizes below
            "embed_dim": 48 if siglip else 24,
            "vision": vision,
            "text": text,
        },
        "loss": {"name": "sigmoid" if siglip else "softmax"},
        "preprocess": {"resize": "naflex", "max_patches": BUDGET, "interpolation": "bilinear",
                       "mean": [0.5] * 3, "std": [0.5] * 3},
    }  # fmt: skip
    if tokenizer is not None:
        raw["tokenizer"] = tokenizer
    return validate(raw, pretrained=False)


class RandomRun:
    """A random-init model of ``naflex_spec(layout)`` (every parameter, biases and norm
    scales included, away from its initial constant) and its tokenizer's file: a BPE
    trained here, or the SentencePiece model at ``sentencepiece``."""

    def __init__(self, layout: str, root: Path, sentencepiece: Path | None = None) -> None:
        import flax.linen as nn
        import jax

        from clip_jax import pretrained
        from clip_jax.components import components
        from clip_jax.data.tokenizer import train_bpe
        from clip_jax.train.state import dummy_inputs, make_encoders

        options = (
            None if sentencepiece is None else {"name": "sentencepiece", "path": str(sentencepiece)}
        )
        self.spec = naflex_spec(layout, options)
        comps = components(self.spec)
        boxed = jax.jit(comps.model.init)(jax.random.key(0), *dummy_inputs(self.spec))
        rng = np.random.default_rng(0)
        self.params = jax.tree.map(
            lambda p: np.asarray(p) + 0.05 * rng.normal(size=np.shape(p)).astype(np.float32),
            nn.unbox(boxed["params"]),
        )
        self.flat = pretrained.flatten(self.params)
        self.tokenizer_file = root / f"{layout}-tokenizer.json"
        if sentencepiece is None:
            captions = ["a red circle", "a blue square at the top", "a small green triangle"]
            train_bpe(captions * 30, VOCAB).save(str(self.tokenizer_file))
        else:
            comps.tokenizer().save(self.tokenizer_file)  # the run folder's copy of it
        self.tokenizer = comps.tokenizer(saved=self.tokenizer_file)
        self.encode_images, self.encode_texts = make_encoders(comps.model)

    def export(self, out: Path) -> Path:
        from clip_jax.models.hf_export import write_folder

        write_folder(dict(self.flat), self.spec, self.tokenizer_file, out)
        return out

    def image_embeddings(self, batch) -> np.ndarray:
        return _unit(self.encode_images(self.params, batch))

    def text_embeddings(self, ids: np.ndarray) -> np.ndarray:
        return _unit(self.encode_texts(self.params, ids))


def _unit(features) -> np.ndarray:
    features = np.array(getattr(features, "pooler_output", features), np.float32)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def naflex_batch(grids: list[tuple[int, int]], seed: int = 0):
    """Random preprocessed images with these patch grids, padded to the budget."""
    from clip_jax.models.naflex import pad_batch

    rng = np.random.default_rng(seed)
    images = [rng.normal(size=(r * PATCH, c * PATCH, 3)).astype(np.float32) for r, c in grids]
    return pad_batch(images, PATCH, BUDGET)


def hf_image_embeddings(model, batch) -> np.ndarray:
    """Siglip2's image features from exactly our NaFlex inputs."""
    with torch.no_grad():
        features = model.get_image_features(
            pixel_values=torch.tensor(np.asarray(batch.patches_BxNxP)),
            pixel_attention_mask=torch.tensor(np.asarray(batch.valid_BxN), dtype=torch.int32),
            spatial_shapes=torch.tensor(np.asarray(batch.grid_Bx2), dtype=torch.long),
        )
    return _unit(features)


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory) -> RandomRun:
    return RandomRun("siglip", tmp_path_factory.mktemp("naflex-siglip"))


@pytest.fixture(scope="module")
def siglip2_folder(siglip_run, tmp_path_factory) -> Path:
    return siglip_run.export(tmp_path_factory.mktemp("naflex-hf") / "siglip2")


# ------------------------------------------------------------ what is written
def test_siglip_layout_writes_a_siglip2_folder(siglip_run, siglip2_folder):
    config = json.loads((siglip2_folder / "config.json").read_text())
    assert config["model_type"] == "siglip2" and config["architectures"] == ["Siglip2Model"]
    vision = config["vision_config"]
    assert vision["model_type"] == "siglip2_vision_model" and "image_size" not in vision
    assert (vision["num_patches"], vision["patch_size"]) == (SIDE * SIDE, PATCH)
    assert config["text_config"]["model_type"] == "siglip2_text_model"
    processor = json.loads((siglip2_folder / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "Siglip2ImageProcessor"
    assert processor["processor_class"] == "Siglip2Processor"
    assert (processor["patch_size"], processor["max_num_patches"]) == (PATCH, BUDGET)
    assert (processor["resample"], processor["image_mean"]) == (2, [0.5] * 3)
    # Siglip2Processor's call defaults (16 px, 256 patches, 64 tokens) lose to these
    tokenizer = json.loads((siglip2_folder / "tokenizer_config.json").read_text())
    assert (tokenizer["patch_size"], tokenizer["max_num_patches"]) == (PATCH, BUDGET)
    assert tokenizer["max_length"] == 16

    from safetensors.numpy import load_file

    tensors = load_file(siglip2_folder / "model.safetensors")
    weights_mode = (siglip2_folder / "model.safetensors").stat().st_mode
    assert weights_mode == (siglip2_folder / "config.json").stat().st_mode  # not 0600
    linear = tensors["vision_model.embeddings.patch_embedding.weight"]
    assert linear.shape == (48, PATCH * PATCH * 3)
    # a Linear on patchify's (row, column, channel) vectors is the patch convolution
    from clip_jax.models.naflex import patchify

    image = np.random.default_rng(1).normal(size=(2 * PATCH, 3 * PATCH, 3))
    kernel = siglip_run.flat["vision/patch_embed/kernel"]
    conv = np.einsum("hpwqc,pqcd->hwd", image.reshape(2, PATCH, 3, PATCH, 3), kernel)
    np.testing.assert_allclose(patchify(image, PATCH) @ linear.T, conv.reshape(6, 48), atol=1e-5)


def test_siglip2_export_says_which_tokenizer_to_load(siglip_run, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="clip_jax.export")
    siglip_run.export(tmp_path / "out")
    (message,) = [r.getMessage() for r in caplog.records if r.name == "clip_jax.export"]
    assert "tokenizer=PreTrainedTokenizerFast.from_pretrained(OUT)" in message


def test_clip_layout_exports_the_fixed_size_model_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="clip_jax.export")
    out = RandomRun("clip", tmp_path).export(tmp_path / "out")
    (message,) = [r.getMessage() for r in caplog.records if r.name == "clip_jax.export"]
    assert "CLIPModel has no NaFlex mode" in message and "squashed to 32x32" in message
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clip" and config["vision_config"]["image_size"] == 32
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "CLIPImageProcessor"
    assert processor["processor_class"] == "CLIPProcessor"
    assert processor["size"] == {"height": 32, "width": 32}
    assert processor["do_center_crop"] is False


# ------------------------------------------------------------ parity with transformers
@pytest.fixture(scope="module")
def siglip2_model(siglip2_folder):
    model = transformers.AutoModel.from_pretrained(siglip2_folder).eval()
    assert type(model).__name__ == "Siglip2Model"
    return model


# Grids (rows, columns) against the 4 x 4 table: its own, larger (positions upsampled),
# smaller (downsampled: antialiased, as transformers and big_vision resample), and
# larger one way and smaller the other. Three images a batch: one compiled program.
GRIDS = {
    "own": [(4, 4), (4, 4), (4, 4)],
    "larger": [(4, 6), (6, 4), (6, 6)],
    "smaller": [(2, 2), (1, 3), (3, 1)],
    "larger-and-smaller": [(2, 8), (8, 3), (1, 1)],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GRIDS))
def test_siglip2_gives_our_image_embeddings(siglip_run, siglip2_model, case):
    batch = naflex_batch(GRIDS[case], seed=len(case))
    ours, theirs = siglip_run.image_embeddings(batch), hf_image_embeddings(siglip2_model, batch)
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.slow
def test_siglip2_gives_our_text_embeddings(siglip_run, siglip2_model):
    ids = np.asarray(siglip_run.tokenizer(TEXTS))
    with torch.no_grad():
        features = siglip2_model.get_text_features(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(ids != 0, dtype=torch.long),  # our run masks padding
        )
    assert np.abs(siglip_run.text_embeddings(ids) - _unit(features)).max() <= TOL


@pytest.mark.slow
def test_the_processor_cuts_images_into_our_grids(siglip2_folder):
    """AutoProcessor as saved: each image at its own aspect ratio, within the budget."""
    from PIL import Image

    from clip_jax.models.naflex import grid_for

    processor = transformers.AutoProcessor.from_pretrained(siglip2_folder)
    assert type(processor).__name__ == "Siglip2Processor"
    rng = np.random.default_rng(0)
    for height, width in ((40, 100), (100, 40), (13, 77), (300, 20), (32, 32), (50, 51)):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        batch = processor(images=[Image.fromarray(pixels)], return_tensors="np")
        assert batch["pixel_values"].shape == (1, BUDGET, PATCH * PATCH * 3)
        rows, cols = grid_for(height, width, PATCH, BUDGET)
        assert batch["spatial_shapes"].tolist() == [[rows, cols]], (height, width)
        assert batch["pixel_attention_mask"].sum() == rows * cols


@pytest.mark.slow
def test_the_processor_with_the_runs_tokenizer_gives_our_text_embeddings(
    siglip_run, siglip2_folder, siglip2_model
):
    """transformers 5 gives a siglip2 folder Gemma's tokenizer: the export's warning says
    to pass the run's own, and with it the processor's ids and mask are ours."""
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(siglip2_folder)
    processor = transformers.AutoProcessor.from_pretrained(siglip2_folder, tokenizer=tokenizer)
    batch = processor(text=TEXTS, return_tensors="pt")  # padded to the context, 16
    ids = np.asarray(siglip_run.tokenizer(TEXTS))
    np.testing.assert_array_equal(batch["input_ids"].numpy(), ids)
    with torch.no_grad():
        features = siglip2_model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
    assert np.abs(siglip_run.text_embeddings(ids) - _unit(features)).max() <= TOL


@pytest.mark.slow
def test_a_sentencepiece_run_names_siglips_tokenizer_and_tokenizes_alike(tmp_path, caplog):
    """A run on SigLIP's own tokenizer: the warning names SiglipTokenizer, and the
    processor made with it gives the run's ids, padded to its context length."""
    from tests.test_sentencepiece_tokenizer import train_model

    run = RandomRun("siglip", tmp_path, sentencepiece=train_model(tmp_path, VOCAB))
    caplog.set_level(logging.WARNING, logger="clip_jax.export")
    out = run.export(tmp_path / "out")
    (message,) = [r.getMessage() for r in caplog.records if r.name == "clip_jax.export"]
    assert "tokenizer=SiglipTokenizer.from_pretrained(OUT)" in message
    tokenizer = transformers.SiglipTokenizer.from_pretrained(out)
    processor = transformers.AutoProcessor.from_pretrained(out, tokenizer=tokenizer)
    batch = processor(text=TEXTS, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], np.asarray(run.tokenizer(TEXTS)))


# ------------------------------------------------------------ the CLIP layout, end to end
@pytest.mark.slow
def test_clipctl_export_of_a_naflex_clip_run_warns_and_loads(small_run, tmp_path):
    """A trained NaFlex run in the CLIP layout: ``clipctl export`` prints the warning, and
    transformers loads the fixed-size CLIPModel and a processor that squashes to 32 px."""
    from click.testing import CliRunner
    from PIL import Image

    from clip_jax.spec import load_spec
    from clip_jax.train.trainer import train
    from clipctl.cli import cli

    naflex = ["train.steps=2", "preprocess.resize=naflex", f"preprocess.max_patches={BUDGET}"]
    spec = load_spec(QUICKSTART, [*small_run, *naflex])
    train(spec)
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export", str(spec.run.output_dir), str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: preprocess.resize = 'naflex': transformers' CLIPModel" in result.stderr
    assert f"wrote {out}" in result.stdout

    model = transformers.AutoModel.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "CLIPModel"
    image = np.random.default_rng(0).integers(0, 256, size=(40, 100, 3), dtype=np.uint8)
    batch = processor(
        text=TEXTS, images=[Image.fromarray(image)], return_tensors="pt", padding="max_length",
        max_length=spec.model.text.context_length,
    )  # fmt: skip
    assert tuple(batch["pixel_values"].shape) == (1, 3, 32, 32)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=batch["pixel_values"])
    assert _unit(features).shape == (1, spec.model.embed_dim)


# ---------------------------------------------------------------- importing Siglip2
@pytest.mark.slow
def test_the_export_imports_back_as_the_same_naflex_run(siglip_run, siglip2_folder):
    import clip_jax
    from clip_jax import pretrained

    loaded = clip_jax.load(f"hf:{siglip2_folder}")
    pre, vision = loaded.spec.preprocess, loaded.spec.model.vision
    assert (pre.resize, pre.max_patches, pre.interpolation) == ("naflex", BUDGET, "bilinear")
    assert (vision.image_size, vision.patch_size, vision.pool) == (PATCH * SIDE, PATCH, "map")
    flat = pretrained.flatten(jax_numpy(loaded.params))
    assert flat.keys() == siglip_run.flat.keys()
    for name, value in siglip_run.flat.items():
        np.testing.assert_array_equal(flat[name], value, err_msg=name)


@pytest.mark.slow
def test_a_siglip2_model_made_by_transformers_imports_with_parity(siglip_run, tmp_path):
    """Tensor names and config as transformers itself writes them (as published SigLIP 2
    NaFlex checkpoints are), not as our export does."""
    import clip_jax
    from clip_jax.train.state import make_encoders

    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_patches": SIDE * SIDE, "patch_size": PATCH}  # fmt: skip
    text = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
            "projection_size": 48}  # fmt: skip
    torch.manual_seed(0)
    config = transformers.Siglip2Config(vision_config=vision, text_config=text)
    reference = transformers.Siglip2Model(config).eval()
    folder = tmp_path / "made-by-transformers"
    reference.save_pretrained(folder)
    siglip_run.tokenizer.save(folder / "tokenizer.json")
    loaded = clip_jax.load(f"hf:{folder}")
    assert loaded.spec.preprocess.resize == "naflex"
    assert loaded.spec.preprocess.max_patches == 256  # Siglip2ImageProcessor's default
    encode_images, _ = make_encoders(loaded.comps.model)
    for case in ("own", "smaller", "larger-and-smaller"):
        batch = naflex_batch(GRIDS[case], seed=3)
        ours = _unit(encode_images(loaded.params, batch))
        assert np.abs(ours - hf_image_embeddings(reference, batch)).max() <= TOL, case
    ids = np.asarray(loaded.tokenizer(TEXTS))
    with torch.no_grad():
        want = reference.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long))
    assert np.abs(loaded._tokens(ids) - _unit(want)).max() <= TOL


def jax_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)
