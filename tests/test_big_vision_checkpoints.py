"""big_vision checkpoints in (``big_vision:FILE.npz``).

The reference SigLIP (tests/pretrained_reference.py) is put into big_vision's layout by a
mapping written in this file from transformers' published ``convert_siglip_to_hf.py``
(big_vision SigLIP -> SiglipModel), run backwards. None of this goes through our
converters.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from clip_jax import pretrained
from clip_jax.errors import UserError
from clip_jax.spec import SpecError, validate
from tests.pretrained_reference import CAPTIONS, assert_parity, state, tiny_model, torch
from tests.test_interop import TOL, VOCAB, _normalized


def to_big_vision(model, scanned: bool) -> dict[str, np.ndarray]:
    """big_vision's SigLIP .npz (convert_siglip_to_hf.py's rename_key, reversed)."""
    sd, vm, tm = state(model), "vision_model", "text_model"
    out: dict[str, np.ndarray] = {}

    def block(ours: str, hf: str, i: int, heads: int) -> None:
        blk = f"{ours}/encoderblock/" if scanned else f"{ours}/encoderblock_{i}/"
        parts = {
            "LayerNorm_0/scale": sd[f"{hf}.layer_norm1.weight"],
            "LayerNorm_0/bias": sd[f"{hf}.layer_norm1.bias"],
            "LayerNorm_1/scale": sd[f"{hf}.layer_norm2.weight"],
            "LayerNorm_1/bias": sd[f"{hf}.layer_norm2.bias"],
            "MlpBlock_0/Dense_0/kernel": sd[f"{hf}.mlp.fc1.weight"].T,
            "MlpBlock_0/Dense_0/bias": sd[f"{hf}.mlp.fc1.bias"],
            "MlpBlock_0/Dense_1/kernel": sd[f"{hf}.mlp.fc2.weight"].T,
            "MlpBlock_0/Dense_1/bias": sd[f"{hf}.mlp.fc2.bias"],
        }
        attn = attention(
            [sd[f"{hf}.self_attn.{n}_proj.weight"] for n in "qkv"],
            [sd[f"{hf}.self_attn.{n}_proj.bias"] for n in "qkv"],
            sd[f"{hf}.self_attn.out_proj.weight"],
            sd[f"{hf}.self_attn.out_proj.bias"],
            heads,
        )
        for key, value in {**parts, **attn}.items():
            if scanned:
                out.setdefault(blk + key, []).append(value)
            else:
                out[blk + key] = value

    def attention(weights, biases, out_weight, out_bias, heads) -> dict[str, np.ndarray]:
        width = out_weight.shape[0]
        parts = {}
        for name, w, b in zip(("query", "key", "value"), weights, biases, strict=True):
            parts[f"MultiHeadDotProductAttention_0/{name}/kernel"] = w.T.reshape(width, heads, -1)
            parts[f"MultiHeadDotProductAttention_0/{name}/bias"] = b.reshape(heads, -1)
        parts["MultiHeadDotProductAttention_0/out/kernel"] = out_weight.T.reshape(heads, -1, width)
        parts["MultiHeadDotProductAttention_0/out/bias"] = out_bias
        return parts

    out["img/embedding/kernel"] = sd[f"{vm}.embeddings.patch_embedding.weight"].transpose(
        2, 3, 1, 0
    )
    out["img/embedding/bias"] = sd[f"{vm}.embeddings.patch_embedding.bias"]
    out["img/pos_embedding"] = sd[f"{vm}.embeddings.position_embedding.weight"][None]
    heads = model.config.vision_config.num_attention_heads
    for i in range(model.config.vision_config.num_hidden_layers):
        block("img/Transformer", f"{vm}.encoder.layers.{i}", i, heads)
    out["img/Transformer/encoder_norm/scale"] = sd[f"{vm}.post_layernorm.weight"]
    out["img/Transformer/encoder_norm/bias"] = sd[f"{vm}.post_layernorm.bias"]
    head = f"{vm}.head"
    out["img/MAPHead_0/probe"] = sd[f"{head}.probe"]
    for key, value in attention(
        np.split(sd[f"{head}.attention.in_proj_weight"], 3),
        np.split(sd[f"{head}.attention.in_proj_bias"], 3),
        sd[f"{head}.attention.out_proj.weight"],
        sd[f"{head}.attention.out_proj.bias"],
        heads,
    ).items():
        out[f"img/MAPHead_0/{key}"] = value
    out["img/MAPHead_0/LayerNorm_0/scale"] = sd[f"{head}.layernorm.weight"]
    out["img/MAPHead_0/LayerNorm_0/bias"] = sd[f"{head}.layernorm.bias"]
    for i in range(2):
        out[f"img/MAPHead_0/MlpBlock_0/Dense_{i}/kernel"] = sd[f"{head}.mlp.fc{i + 1}.weight"].T
        out[f"img/MAPHead_0/MlpBlock_0/Dense_{i}/bias"] = sd[f"{head}.mlp.fc{i + 1}.bias"]
    out["txt/Embed_0/embedding"] = sd[f"{tm}.embeddings.token_embedding.weight"]
    out["txt/pos_embedding"] = sd[f"{tm}.embeddings.position_embedding.weight"][None]
    for i in range(model.config.text_config.num_hidden_layers):
        block(
            "txt/Encoder_0",
            f"{tm}.encoder.layers.{i}",
            i,
            model.config.text_config.num_attention_heads,
        )
    out["txt/Encoder_0/encoder_norm/scale"] = sd[f"{tm}.final_layer_norm.weight"]
    out["txt/Encoder_0/encoder_norm/bias"] = sd[f"{tm}.final_layer_norm.bias"]
    out["txt/head/kernel"] = sd[f"{tm}.head.weight"].T
    out["txt/head/bias"] = sd[f"{tm}.head.bias"]
    out["t"], out["b"] = sd["logit_scale"], sd["logit_bias"]
    return {f"params/{k}": np.stack(v) if isinstance(v, list) else v for k, v in out.items()}


def write_spiece(path) -> None:
    """A ~200-piece unigram model with SigLIP's special ids (<pad> 0, </s> 1, <unk> 2)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS * 5), model_writer=out, vocab_size=60,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(out.getvalue())


@pytest.fixture(scope="module")
def big_vision_files(tmp_path_factory) -> dict:
    """SigLIP .npz files, blocks one by one and scanned, each with a spiece.model beside."""
    reference = tiny_model("siglip", "gelu_pytorch_tanh")  # big_vision's tanh GELU
    files = {}
    for scanned in (False, True):
        folder = tmp_path_factory.mktemp("scanned" if scanned else "blocks")
        np.savez(folder / "siglip.npz", **to_big_vision(reference, scanned))
        write_spiece(folder / "spiece.model")
        files[scanned] = folder / "siglip.npz"
    return {"reference": reference, **files}


@pytest.mark.parametrize("scanned", [False, True], ids=["blocks", "scanned"])
@pytest.mark.slow
def test_big_vision_npz_matches_transformers(big_vision_files, scanned):
    import clip_jax

    reference = big_vision_files["reference"]
    loaded = clip_jax.load(f"big_vision:{big_vision_files[scanned]}")
    assert_parity(loaded, reference, "siglip")
    spec = loaded.spec
    v, t = spec.model.vision, spec.model.text
    assert (v.width, v.depth, v.heads, v.mlp_dim, v.patch_size, v.image_size) == (
        48, 2, 4, 96, 8, 32,
    )  # fmt: skip
    assert (t.vocab_size, t.context_length, t.width, t.heads, t.pad_id) == (VOCAB, 16, 32, 4, None)
    assert (v.activation, t.activation, v.norm_eps) == ("gelu_tanh", "gelu_tanh", 1e-6)
    assert (spec.loss.name, spec.tokenizer.name, spec.preprocess.interpolation) == (
        "sigmoid", "sentencepiece", "bilinear",
    )  # fmt: skip
    assert float(loaded.params["logit_bias"]) == pytest.approx(-7.0)
    # The spiece.model beside the file tokenizes; the texts embed as transformers' do.
    texts = ["a red circle", "a small green triangle"]
    ids = loaded.tokenizer(texts)
    with torch.no_grad():
        want = _normalized(reference.get_text_features(input_ids=torch.tensor(ids)))
    assert np.abs(loaded.encode_texts(texts) - want).max() <= TOL


@pytest.mark.slow
def test_scanned_and_unscanned_files_read_the_same(big_vision_files):
    spec = validate({"train": {"init_from": f"big_vision:{big_vision_files[False]}"}})
    blocks, _ = pretrained.read_params(f"big_vision:{big_vision_files[False]}", spec)
    scanned, names = pretrained.read_params(f"big_vision:{big_vision_files[True]}", spec)
    flat_blocks, flat_scanned = pretrained.flatten(blocks), pretrained.flatten(scanned)
    assert flat_blocks.keys() == flat_scanned.keys()
    for key, value in flat_blocks.items():
        np.testing.assert_array_equal(value, flat_scanned[key])
    assert names["vision/encoder/block_1/attn/query/kernel"] == (
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel[1]"
    )
    # A scanned model reads either file with its blocks stacked.
    spec = validate(
        {"train": {"init_from": f"big_vision:{big_vision_files[False]}"},
         "model": {"text": {"scan_layers": True}}}
    )  # fmt: skip
    params, _ = pretrained.read_params(f"big_vision:{big_vision_files[False]}", spec)
    assert params["text"]["encoder"]["blocks"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)


@pytest.mark.slow
def test_big_vision_bad_input_names_the_key(big_vision_files, tmp_path):
    import clip_jax

    with pytest.raises(SpecError, match=r"train.init_from: .*nowhere.npz does not exist"):
        validate({"train": {"init_from": f"big_vision:{tmp_path / 'nowhere.npz'}"}})
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(SpecError, match=r"train.init_from: .*junk.npz is not a readable .npz"):
        validate({"train": {"init_from": f"big_vision:{tmp_path / 'junk.npz'}"}})

    with np.load(big_vision_files[False]) as npz:
        tensors = {k: npz[k] for k in npz.files}
    # No tokenizer beside it: the spec must give one.
    np.savez(tmp_path / "siglip.npz", **tensors)
    with pytest.raises(SpecError, match=r"tokenizer.path: required key is missing"):
        validate({"train": {"init_from": f"big_vision:{tmp_path / 'siglip.npz'}"}})
    spiece = big_vision_files[False].parent / "spiece.model"
    spec = validate(
        {"train": {"init_from": f"big_vision:{tmp_path / 'siglip.npz'}"},
         "tokenizer": {"path": str(spiece)}}
    )  # fmt: skip
    assert spec.tokenizer.path == str(spiece)

    # A tensor of the wrong shape (the model is read off block 0) is named.
    write_spiece(tmp_path / "spiece.model")
    name = "params/img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"
    np.savez(tmp_path / "siglip.npz", **{**tensors, name: tensors[name][:, :64]})
    with pytest.raises(UserError, match=r"tensor img/Transformer/encoderblock_1/MlpBlock_0"):
        clip_jax.load(f"big_vision:{tmp_path / 'siglip.npz'}")
    # A tensor the shapes cannot place, and one the model needs but the file lacks.
    np.savez(tmp_path / "siglip.npz", **{**tensors, "params/img/extra": tensors["params/t"]})
    with pytest.raises(UserError, match=r"tensor img/extra .*has no place"):
        clip_jax.load(f"big_vision:{tmp_path / 'siglip.npz'}")
    missing = {k: v for k, v in tensors.items() if "encoder_norm" not in k}
    np.savez(tmp_path / "siglip.npz", **missing)
    with pytest.raises(UserError, match=r"no tensor img/Transformer/encoder_norm/scale"):
        clip_jax.load(f"big_vision:{tmp_path / 'siglip.npz'}")
    # Not a SigLIP image tower.
    no_head = {k: v for k, v in tensors.items() if "MAPHead" not in k}
    np.savez(tmp_path / "siglip.npz", **no_head)
    with pytest.raises(SpecError, match=r"train.init_from: .*average pooling is not supported"):
        validate({"train": {"init_from": f"big_vision:{tmp_path / 'siglip.npz'}"}})
    with pytest.raises(UserError, match="not supported yet"):
        pretrained.find_format(f"big_vision:{tmp_path / 'siglip.npz'}")[1].write(
            {}, None, None, tmp_path / "out"
        )
