"""Published weights in and out: transformers' CLIPModel and SiglipModel, both directions.

The reference models are random-init transformers models made here (nothing is
downloaded). Parity is measured on unit-norm embeddings: max |ours - theirs| <= 1e-4.
"""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest

from clip_jax import pretrained
from clip_jax.errors import UserError
from clip_jax.spec import SpecError, validate
from tests.conftest import QUICKSTART, LazyModule

torch = LazyModule("torch", reason="parity with transformers needs torch (CPU build)")
transformers = LazyModule("transformers", "needs transformers (parity group)", needs=(torch,))

VOCAB = 512
TOL = 1e-4


def _normalized(features) -> np.ndarray:
    features = getattr(features, "pooler_output", features).detach().numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def hf_embeddings(model, images_BxHxWx3: np.ndarray, ids_BxL: np.ndarray, mask=None):
    with torch.no_grad():
        pixels = torch.tensor(images_BxHxWx3).permute(0, 3, 1, 2)
        images = model.get_image_features(pixel_values=pixels)
        extra = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        texts = model.get_text_features(input_ids=torch.tensor(ids_BxL), **extra)
    return _normalized(images), _normalized(texts)


def tiny_hf_model(layout: str, **sizes):
    """A random transformers model, ViT 32 px / patch 8, two layers per tower."""
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}  # fmt: skip
    text = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
            "eos_token_id": VOCAB - 1}  # fmt: skip
    torch.manual_seed(0)
    if layout == "clip":
        config = transformers.CLIPConfig(
            vision_config=vision, text_config=text, projection_dim=24, **sizes
        )
        return transformers.CLIPModel(config).eval()
    text["projection_size"] = vision["hidden_size"]
    config = transformers.SiglipConfig(vision_config=vision, text_config=text, **sizes)
    return transformers.SiglipModel(config).eval()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict:
    """Saved random CLIP and SigLIP folders, each with a tokenizer."""
    from clip_jax.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("hf")
    captions = ["a red circle", "a blue square at the top", "a small green triangle"] * 30
    folders = {}
    for layout in ("clip", "siglip"):
        model = tiny_hf_model(layout)
        model.save_pretrained(root / layout)
        train_bpe(captions, VOCAB).save(str(root / layout / "tokenizer.json"))
        folders[layout] = (root / layout, model)
    return folders


def inputs(layout: str):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    if layout == "siglip":  # read at the last position, nothing masked: any ids
        return images, rng.integers(0, VOCAB, size=(3, 16)).astype(np.int32)
    ids = rng.integers(3, VOCAB - 1, size=(3, 16)).astype(np.int32)
    for row, end in enumerate((9, 4, 15)):  # end-of-text token, then padding 0
        ids[row, end] = VOCAB - 1
        ids[row, end + 1 :] = 0
    ids[0, 2] = 0  # CLIP's "!" is id 0: inside a text it is no padding
    return images, ids


@pytest.mark.parametrize("layout", ["clip", "siglip"])
@pytest.mark.slow
def test_import_matches_transformers(hf_folders, layout):
    import clip_jax

    folder, reference = hf_folders[layout]
    loaded = clip_jax.load(f"hf:{folder}")
    images, ids = inputs(layout)
    want_images, want_texts = hf_embeddings(reference, images, ids)
    assert np.abs(loaded.encode_images(images) - want_images).max() <= TOL
    assert np.abs(loaded._tokens(ids) - want_texts).max() <= TOL
    assert loaded.temperature == pytest.approx(
        float(reference.logit_scale.detach().exp()), rel=1e-6
    )
    assert loaded.spec.loss.name == ("sigmoid" if layout == "siglip" else "softmax")


@pytest.mark.slow
def test_checkpoint_config_gives_the_spec_defaults(hf_folders):
    folder, _ = hf_folders["siglip"]
    spec = validate(
        {"train": {"init_from": f"hf:{folder}"}, "model": {"vision": {"scan_layers": True}}}
    )
    v, t = spec.model.vision, spec.model.text
    assert (v.width, v.depth, v.pool, v.patch_bias, v.norm_pre) == (48, 2, "map", True, False)
    assert (t.causal, t.pool, t.pad_id, t.projection_bias) == (False, "last", None, True)
    assert v.scan_layers  # the user's own keys win over the checkpoint's
    assert spec.preprocess.resize == "squash" and spec.preprocess.mean == (0.5, 0.5, 0.5)
    params, names = pretrained.read_params(f"hf:{folder}", spec)
    stacked = params["vision"]["encoder"]["blocks"]["attn"]["query"]["kernel"]
    assert stacked.shape == (2, 48, 4, 12)
    assert names["vision/map_head/attn/key/bias"] == "vision_model.head.attention.in_proj_bias"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["clip", "siglip"])
def test_export_loads_in_transformers_with_the_same_embeddings(small_run, tmp_path, layout):
    """Train a few steps, export, load with AutoModel + AutoProcessor, compare."""
    from PIL import Image

    import clip_jax
    from clip_jax.export import export
    from clip_jax.spec import load_spec
    from clip_jax.train.trainer import train

    siglip = [
        "model.preset=siglip-b16", "loss.name=sigmoid", "model.vision.image_size=32",
        "model.vision.patch_size=8", "model.text.context_length=16",
        "model.text.vocab_size=1024", "model.embed_dim=64", "model.vision.depth=1",
        "model.text.depth=1", "model.vision.scan_layers=true", "preprocess.resize=squash",
        "preprocess.mean=[0.5,0.5,0.5]", "preprocess.std=[0.5,0.5,0.5]",
    ]  # fmt: skip
    spec = load_spec(QUICKSTART, [*small_run, "train.steps=3", *(siglip * (layout == "siglip"))])
    train(spec)
    out = export(spec.run.output_dir, tmp_path / "hf")
    model = transformers.AutoModel.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == ("SiglipModel" if layout == "siglip" else "CLIPModel")

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in
              ((32, 32, 3), (40, 56, 3), (64, 48, 3))]  # fmt: skip
    texts = ["a red circle", "a small blue square in the top left!", "green"]
    batch = processor(
        text=texts,
        images=[Image.fromarray(a) for a in arrays],
        return_tensors="pt",
        padding="max_length",
        max_length=spec.model.text.context_length,
    )
    with torch.no_grad():
        theirs_images = _normalized(model.get_image_features(pixel_values=batch["pixel_values"]))
        theirs_texts = _normalized(
            model.get_text_features(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
        )
    ours = clip_jax.load(spec.run.output_dir)
    pixels = batch["pixel_values"].permute(0, 2, 3, 1).numpy()
    if spec.preprocess.resize == "squash":  # PIL vs PIL, but resampled: close, not exact
        assert np.abs(ours.preprocess(arrays) - pixels).max() < 0.05
    else:
        np.testing.assert_allclose(ours.preprocess(arrays), pixels, atol=1e-5)
    assert np.abs(ours.encode_images(pixels) - theirs_images).max() <= TOL
    assert np.abs(ours.encode_texts(texts) - theirs_texts).max() <= TOL


@pytest.mark.slow
def test_b32_sized_clip_imports_with_parity(tmp_path):
    """transformers' default CLIPConfig is ViT-B/32: 151,277,313 parameters."""
    import clip_jax

    torch.manual_seed(0)
    reference = transformers.CLIPModel(transformers.CLIPConfig()).eval()
    assert sum(p.numel() for p in reference.parameters()) == 151_277_313
    reference.save_pretrained(tmp_path / "b32")
    from clip_jax.data.tokenizer import train_bpe

    train_bpe(["a photo of a cat"] * 10, 300).save(str(tmp_path / "b32" / "tokenizer.json"))
    loaded = clip_jax.load(f"hf:{tmp_path / 'b32'}")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
    ids = rng.integers(1, 49000, size=(2, 77)).astype(np.int32)
    ids[:, 20] = 49407  # transformers' default end-of-text id
    ids[:, 21:] = 0
    want_images, want_texts = hf_embeddings(reference, images, ids)
    assert np.abs(loaded.encode_images(images) - want_images).max() <= TOL
    assert np.abs(loaded._tokens(ids) - want_texts).max() <= TOL


# ----------------------------------------------------------------------- bad input
def test_missing_or_foreign_checkpoints_name_the_key(tmp_path):
    with pytest.raises(SpecError, match=r"train.init_from: .*nowhere does not exist"):
        validate({"train": {"init_from": f"hf:{tmp_path / 'nowhere'}"}})
    with pytest.raises(SpecError, match="train.init_from: no architecture reads"):
        validate({"train": {"init_from": f"hf:{tmp_path}"}})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SpecError, match="model_type 'bert' is not supported"):
        validate({"train": {"init_from": f"hf:{tmp_path}"}})


@pytest.mark.slow
def test_tensors_that_do_not_fit_are_named(hf_folders, tmp_path):
    from safetensors.numpy import save_file

    folder, _ = hf_folders["clip"]
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3  # the file has two
    bad = tmp_path / "deeper"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    tensors = pretrained.read_tensors(folder)
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    spec = validate({"train": {"init_from": f"hf:{bad}"}})
    with pytest.raises(UserError, match="no tensor text_model.encoder.layers.2"):
        pretrained.read_params(f"hf:{bad}", spec)

    config["text_config"]["num_hidden_layers"] = 2
    config["vision_config"]["intermediate_size"] = 64  # the file has 96
    (bad / "config.json").write_text(json.dumps(config))
    spec = validate({"train": {"init_from": f"hf:{bad}"}})
    import clip_jax

    with pytest.raises(UserError, match=r"vision_model.encoder.layers.0.mlp.fc1"):
        clip_jax.load(f"hf:{bad}")


# Without torch, a .bin file is refused before anything reads it; with torch (~1.5 s to
# import, so in the full suite only) torch.load(weights_only=True) must refuse it.
@pytest.mark.parametrize("with_torch", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch, with_torch):
    if with_torch:
        pytest.importorskip("torch", reason="torch.load's refusal needs torch")
    else:
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bin_file = tmp_path / "pytorch_model.bin"
    bin_file.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(UserError, match="refused" if with_torch else "torch is not installed"):
        pretrained.read_tensors(bin_file)
    assert not marker.exists()


def test_export_refuses_what_transformers_cannot_express():
    from clip_jax.models.hf_format import layout_of

    spec = validate({"model": {"preset": "tiny", "vision": {"pool": "gap"}}})
    with pytest.raises(UserError, match=r"model.vision.pool = 'gap'"):
        layout_of(spec.model)
    spec = validate({"model": {"preset": "tiny", "text": {"activation": "swiglu"}}})
    with pytest.raises(UserError, match=r"model.text.activation = 'swiglu'"):
        layout_of(spec.model)
    # every obstacle in one message, not one per train-and-export round
    many = {"pool": "map", "patch_bias": False, "norm_pre": True, "projection": "linear"}
    spec = validate({"model": {"preset": "tiny", "vision": many}})
    with pytest.raises(UserError) as refused:
        layout_of(spec.model)
    for key in ("patch_bias", "norm_pre", "projection"):
        assert f"model.vision.{key} = " in str(refused.value)


@pytest.mark.slow
def test_from_pretrained_template_trains_from_the_checkpoint(hf_folders, synthetic_dir, tmp_path):
    """The template on a random transformers CLIP: the run starts from its weights."""
    import clip_jax
    from clip_jax.spec import load_spec
    from clip_jax.train.trainer import train
    from tests.conftest import ROOT

    folder, reference = hf_folders["clip"]
    run = tmp_path / "run"
    common = [
        f"train.init_from=hf:{folder}", f"data.dir={synthetic_dir}", f"run.output_dir={run}",
        "data.train_examples=1024", "data.validation_examples=256", "train.batch_size=32",
        "eval.batch_size=64", "train.log_every=1",
    ]  # fmt: skip
    template = ROOT / "templates" / "from-pretrained.toml"
    # Everything frozen: one step leaves exactly the imported weights in the checkpoint.
    spec = load_spec(template, [*common, "train.steps=1", 'train.freeze=[".*"]'])
    train(spec)
    loaded = clip_jax.load(run)
    images, ids = inputs("clip")
    want_images, want_texts = hf_embeddings(reference, images, ids)
    assert np.abs(loaded.encode_images(images) - want_images).max() <= TOL
    assert np.abs(loaded._tokens(ids) - want_texts).max() <= TOL
    assert (run / "tokenizer.json").exists()
    resolved = (run / "spec.resolved.toml").read_text()
    assert "[preprocess]" in resolved and "width = 48" in resolved

    spec = load_spec(template, [*common, "train.steps=3", f"run.output_dir={tmp_path / 'ft'}"])
    results = train(spec)
    assert "zero_shot_top1" in results
    assert np.abs(clip_jax.load(tmp_path / "ft").encode_images(images) - want_images).max() > TOL


@pytest.mark.slow
def test_siglip_sentencepiece_tokenizer_comes_along(hf_folders, tmp_path):
    """A SigLIP folder whose tokenizer is spiece.model tokenizes as transformers does."""
    import shutil

    import clip_jax
    from tests.test_sentencepiece_tokenizer import train_model

    folder, reference = hf_folders["siglip"]
    copy = tmp_path / "siglip"
    shutil.copytree(folder, copy)
    (copy / "tokenizer.json").unlink()
    theirs = transformers.SiglipTokenizer(vocab_file=str(train_model(tmp_path, VOCAB)))
    theirs.save_pretrained(copy)
    assert (copy / "spiece.model").exists()
    loaded = clip_jax.load(f"hf:{copy}")
    assert loaded.spec.tokenizer.name == "sentencepiece"
    texts = ["A small RED circle!", "the dog </s> and cat", "green " * 30]
    ids = theirs(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    np.testing.assert_array_equal(loaded.tokenizer(texts), np.asarray(ids))
    _, want_texts = hf_embeddings(reference, np.zeros((1, 32, 32, 3), np.float32), np.asarray(ids))
    assert np.abs(loaded.encode_texts(texts) - want_texts).max() <= TOL

    # exported again, its tokenizer is SigLIP's own: transformers reads the same ids
    from clip_jax.models.hf_export import write_folder

    loaded.tokenizer.save(tmp_path / "saved.json")
    params = pretrained.flatten(jax_to_numpy(loaded.params))
    write_folder(params, loaded.spec, tmp_path / "saved.json", tmp_path / "out")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    out = again(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ids))


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


@pytest.mark.slow
def test_options_that_change_the_checkpoints_model_are_refused(hf_folders):
    folder, _ = hf_folders["clip"]
    for key, value in (("norm_pre", False), ("use_bias", False), ("pool", "gap")):
        spec = validate({"train": {"init_from": f"hf:{folder}"}, "model": {"vision": {key: value}}})
        with pytest.raises(UserError, match=f"model.vision.{key}"):
            pretrained.read_params(f"hf:{folder}", spec)


@pytest.mark.slow
def test_bfloat16_checkpoints_import(hf_folders, tmp_path):
    """Many published checkpoints are bfloat16: read without torch, computed in float32."""
    import shutil

    import clip_jax

    folder, reference = hf_folders["clip"]
    rounded = tiny_hf_model("clip").to(torch.bfloat16)
    rounded.save_pretrained(tmp_path / "bf16")
    shutil.copy(folder / "tokenizer.json", tmp_path / "bf16")
    header = pretrained.read_tensors(tmp_path / "bf16")
    assert str(header["logit_scale"].dtype) == "bfloat16"
    loaded = clip_jax.load(f"hf:{tmp_path / 'bf16'}")
    images, ids = inputs("clip")
    want_images, want_texts = hf_embeddings(rounded.float(), images, ids)
    assert np.abs(loaded.encode_images(images) - want_images).max() <= TOL
    assert np.abs(loaded._tokens(ids) - want_texts).max() <= TOL
