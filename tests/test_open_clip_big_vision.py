"""open_clip and big_vision checkpoints in (``open_clip:PATH``, ``big_vision:FILE.npz``).

Neither library is installed here, so the reference checkpoints are random-init
transformers models (nothing is downloaded) whose tensors are put into open_clip's and
big_vision's layouts by mappings written in this file from the published conversion
scripts: transformers' ``convert_clip_original_pytorch_to_hf.py`` (OpenAI / open_clip
CLIP -> CLIPModel) and ``convert_siglip_to_hf.py`` (big_vision SigLIP -> SiglipModel),
each run backwards, and for open_clip's timm SigLIP trunk, open_clip's own big_vision
loader (``convert.py``) composed with the latter. None of this goes through our
converters. Parity is measured on unit-norm embeddings: max |ours - theirs| <= 1e-4.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from clip_jax import pretrained
from clip_jax.errors import UserError
from clip_jax.spec import SpecError, validate
from tests.conftest import LazyModule

torch = LazyModule("torch", reason="parity with transformers needs torch (CPU build)")
transformers = LazyModule("transformers", "needs transformers (parity group)", needs=(torch,))

from tests.test_interop import TOL, VOCAB, _normalized, hf_embeddings, inputs  # noqa: E402

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
CAPTIONS = ["a red circle", "a blue square at the top", "a small green triangle"] * 30


# --------------------------------------------------------------- reference models
def tiny_model(layout: str, act: str):
    """A random transformers model: ViT 32 px / patch 8, two layers per tower."""
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "hidden_act": act}  # fmt: skip
    text = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
            "hidden_act": act}  # fmt: skip
    torch.manual_seed(0)
    if layout == "clip":
        text["eos_token_id"] = VOCAB - 1
        config = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)
        model = transformers.CLIPModel(config).eval()
    else:
        text["projection_size"] = vision["hidden_size"]
        config = transformers.SiglipConfig(vision_config=vision, text_config=text)
        model = transformers.SiglipModel(config).eval()
        with torch.no_grad():  # not the init values, so that a mix-up would show
            model.logit_scale.fill_(2.5)
            model.logit_bias.fill_(-7.0)
    return model


def state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_parity(loaded, reference, layout: str) -> dict[str, float]:
    images, ids = inputs(layout)
    want_images, want_texts = hf_embeddings(reference, images, ids)
    diffs = {
        "images": float(np.abs(loaded.encode_images(images) - want_images).max()),
        "texts": float(np.abs(loaded._tokens(ids) - want_texts).max()),
    }
    print(f"{layout} max |ours - transformers|: {diffs}")
    assert max(diffs.values()) <= TOL, diffs
    assert loaded.temperature == pytest.approx(
        float(reference.logit_scale.detach().exp()), rel=1e-6
    )
    return diffs


# ---------------------------------------------- transformers -> open_clip layouts
def _packed(sd: dict, prefix: str, names=("q", "k", "v"), part: str = "weight") -> np.ndarray:
    return np.concatenate([sd[f"{prefix}.{n}_proj.{part}"] for n in names])


def _openai_block(sd: dict, out: dict, ours: str, hf: str) -> None:
    """OpenAI's ResidualAttentionBlock from CLIPEncoderLayer (copy_layer, reversed)."""
    for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                 ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):  # fmt: skip
        out[f"{ours}.{a}.weight"] = sd[f"{hf}.{b}.weight"]
        out[f"{ours}.{a}.bias"] = sd[f"{hf}.{b}.bias"]
    out[f"{ours}.attn.in_proj_weight"] = _packed(sd, f"{hf}.self_attn")
    out[f"{ours}.attn.in_proj_bias"] = _packed(sd, f"{hf}.self_attn", part="bias")


def _text_tower(sd: dict, out: dict, prefix: str, depth: int) -> None:
    tm = "text_model"
    out[f"{prefix}token_embedding.weight"] = sd[f"{tm}.embeddings.token_embedding.weight"]
    out[f"{prefix}positional_embedding"] = sd[f"{tm}.embeddings.position_embedding.weight"]
    for i in range(depth):
        _openai_block(sd, out, f"{prefix}transformer.resblocks.{i}", f"{tm}.encoder.layers.{i}")
    out[f"{prefix}ln_final.weight"] = sd[f"{tm}.final_layer_norm.weight"]
    out[f"{prefix}ln_final.bias"] = sd[f"{tm}.final_layer_norm.bias"]


def openai_state_dict(model) -> dict[str, np.ndarray]:
    """OpenAI / open_clip CLIP (convert_clip_original_pytorch_to_hf.py, reversed)."""
    sd, vm, out = state(model), "vision_model", {}
    out["visual.conv1.weight"] = sd[f"{vm}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[f"{vm}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[f"{vm}.embeddings.position_embedding.weight"]
    for ours, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[f"visual.{ours}.weight"] = sd[f"{vm}.{hf}.weight"]
        out[f"visual.{ours}.bias"] = sd[f"{vm}.{hf}.bias"]
    for i in range(model.config.vision_config.num_hidden_layers):
        _openai_block(sd, out, f"visual.transformer.resblocks.{i}", f"{vm}.encoder.layers.{i}")
    out["visual.proj"] = sd["visual_projection.weight"].T  # used as x @ proj
    _text_tower(sd, out, "", model.config.text_config.num_hidden_layers)
    out["text_projection"] = sd["text_projection.weight"].T
    out["logit_scale"] = sd["logit_scale"]
    return out


def timm_siglip_state_dict(model) -> dict[str, np.ndarray]:
    """open_clip's timm SigLIP (CustomTextCLIP): convert.py's big_vision -> timm mapping
    composed with convert_siglip_to_hf.py's big_vision -> transformers one."""
    sd, vm, trunk, out = state(model), "vision_model", "visual.trunk", {}
    out[f"{trunk}.patch_embed.proj.weight"] = sd[f"{vm}.embeddings.patch_embedding.weight"]
    out[f"{trunk}.patch_embed.proj.bias"] = sd[f"{vm}.embeddings.patch_embedding.bias"]
    out[f"{trunk}.pos_embed"] = sd[f"{vm}.embeddings.position_embedding.weight"][None]
    for i in range(model.config.vision_config.num_hidden_layers):
        ours, hf = f"{trunk}.blocks.{i}", f"{vm}.encoder.layers.{i}"
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"),
                     ("mlp.fc2", "mlp.fc2"), ("attn.proj", "self_attn.out_proj")):  # fmt: skip
            out[f"{ours}.{a}.weight"] = sd[f"{hf}.{b}.weight"]
            out[f"{ours}.{a}.bias"] = sd[f"{hf}.{b}.bias"]
        out[f"{ours}.attn.qkv.weight"] = _packed(sd, f"{hf}.self_attn")
        out[f"{ours}.attn.qkv.bias"] = _packed(sd, f"{hf}.self_attn", part="bias")
    out[f"{trunk}.norm.weight"] = sd[f"{vm}.post_layernorm.weight"]
    out[f"{trunk}.norm.bias"] = sd[f"{vm}.post_layernorm.bias"]
    pool, head, width = f"{trunk}.attn_pool", f"{vm}.head", model.config.vision_config.hidden_size
    out[f"{pool}.latent"] = sd[f"{head}.probe"]
    weight, bias = sd[f"{head}.attention.in_proj_weight"], sd[f"{head}.attention.in_proj_bias"]
    out[f"{pool}.q.weight"], out[f"{pool}.kv.weight"] = weight[:width], weight[width:]
    out[f"{pool}.q.bias"], out[f"{pool}.kv.bias"] = bias[:width], bias[width:]
    for a, b in (("proj", "attention.out_proj"), ("norm", "layernorm"), ("mlp.fc1", "mlp.fc1"),
                 ("mlp.fc2", "mlp.fc2")):  # fmt: skip
        out[f"{pool}.{a}.weight"] = sd[f"{head}.{b}.weight"]
        out[f"{pool}.{a}.bias"] = sd[f"{head}.{b}.bias"]
    _text_tower(sd, out, "text.", model.config.text_config.num_hidden_layers)
    out["text.text_projection.weight"] = sd["text_model.head.weight"]
    out["text.text_projection.bias"] = sd["text_model.head.bias"]
    out["logit_scale"], out["logit_bias"] = sd["logit_scale"], sd["logit_bias"]
    return out


CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 12,
                   "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 32, "heads": 4,
                 "layers": 2, "mlp_ratio": 2.0},
}  # fmt: skip
SIGLIP_CFG = {
    "embed_dim": 48,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {
        "image_size": 32,
        "timm_model_name": "vit_base_patch16_siglip_224",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
        "timm_model_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0,
                              "patch_size": 8, "img_size": 32},
    },
    "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 32, "heads": 4,
                 "layers": 2, "mlp_ratio": 2.0, "no_causal_mask": True, "proj_bias": True,
                 "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
                 "tokenizer_kwargs": {"clean": "canonicalize"}},
}  # fmt: skip


def save_safetensors(tensors: dict[str, np.ndarray], path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))


def write_bpe(folder) -> None:
    from clip_jax.data.tokenizer import train_bpe

    train_bpe(CAPTIONS, VOCAB).save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def open_clip_folders(tmp_path_factory) -> dict:
    """open_clip hub exports: open_clip_config.json + open_clip_model.safetensors."""
    root = tmp_path_factory.mktemp("open_clip")
    folders = {}
    for layout, act, cfg, to_layout, preprocess in (
        ("clip", "quick_gelu", {**CLIP_CFG, "quick_gelu": True}, openai_state_dict,
         {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
          "resize_mode": "shortest", "size": 32}),
        ("siglip", "gelu", SIGLIP_CFG, timm_siglip_state_dict,
         {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
          "resize_mode": "squash", "size": 32}),
    ):  # fmt: skip
        model, folder = tiny_model(layout, act), root / layout
        folder.mkdir()
        save_safetensors(to_layout(model), folder / "open_clip_model.safetensors")
        config = {"model_cfg": cfg, "preprocess_cfg": preprocess}
        (folder / "open_clip_config.json").write_text(json.dumps(config))
        write_bpe(folder)
        folders[layout] = (folder, model)
    return folders


# ------------------------------------------------------------------ open_clip
@pytest.mark.parametrize("layout", ["clip", "siglip"])
@pytest.mark.slow
def test_open_clip_folder_matches_transformers(open_clip_folders, layout):
    import clip_jax

    folder, reference = open_clip_folders[layout]
    loaded = clip_jax.load(f"open_clip:{folder}")
    assert_parity(loaded, reference, layout)
    spec = loaded.spec
    if layout == "siglip":
        assert spec.loss.name == "sigmoid"
        assert float(loaded.params["logit_bias"]) == pytest.approx(-7.0)
        # open_clip runs this trunk and its text tower with exact GELU. (Unit-norm parity
        # cannot tell: GELU's tanh approximation is within 5e-4 of it everywhere.)
        assert (spec.model.vision.activation, spec.model.text.activation) == ("gelu", "gelu")
        assert spec.model.text.pad_id is None
        assert spec.preprocess.resize == "squash" and spec.preprocess.mean == (0.5, 0.5, 0.5)
    else:
        assert spec.loss.name == "softmax"
        assert (spec.model.vision.activation, spec.model.text.activation) == ("quick_gelu",) * 2
        assert spec.preprocess.resize == "crop" and spec.preprocess.interpolation == "bicubic"


@pytest.mark.slow
def test_open_clip_training_checkpoint_with_a_bare_config_beside_it(tmp_path):
    """A .pt as open_clip's training writes it ({"state_dict": {"module.…"}}), GELU (not
    quick_gelu: the config does not say so), its model config as FILE's stem + .json."""
    import clip_jax

    reference = tiny_model("clip", "gelu")
    tensors = {f"module.{k}": torch.tensor(v) for k, v in openai_state_dict(reference).items()}
    torch.save({"epoch": 3, "state_dict": tensors}, tmp_path / "epoch_3.pt")
    (tmp_path / "epoch_3.json").write_text(json.dumps(CLIP_CFG))
    write_bpe(tmp_path)
    loaded = clip_jax.load(f"open_clip:{tmp_path / 'epoch_3.pt'}")
    assert loaded.spec.model.vision.activation == "gelu"
    assert loaded.spec.preprocess.mean == tuple(OPENAI_MEAN)
    assert_parity(loaded, reference, "clip")


@pytest.mark.slow
def test_open_clip_model_names_give_the_presets(open_clip_folders):
    folder, _ = open_clip_folders["clip"]
    ckpt = folder / "open_clip_model.safetensors"
    spec = validate({"train": {"init_from": f"open_clip:{ckpt}#ViT-B-32"}})
    v, t = spec.model.vision, spec.model.text
    assert (v.width, v.depth, v.heads, v.patch_size, v.image_size) == (768, 12, 12, 32, 224)
    assert (t.width, t.depth, t.heads, t.context_length) == (512, 12, 8, 77)
    assert (v.activation, t.activation, t.pool, t.pad_id) == ("gelu", "gelu", "eos", 0)
    spec = validate({"train": {"init_from": f"open_clip:{ckpt}#ViT-L-14-quickgelu"}})
    assert (spec.model.vision.width, spec.model.vision.activation) == (1024, "quick_gelu")
    spec = validate({"train": {"init_from": f"open_clip:{folder}#ViT-SO400M-14-SigLIP"}})
    v, t = spec.model.vision, spec.model.text
    assert (v.width, v.depth, v.heads, v.mlp_dim, v.pool) == (1152, 27, 16, 4304, "map")
    assert (t.context_length, t.pad_id, t.causal, spec.loss.name) == (16, None, False, "sigmoid")
    # A name that does not fit the file: the shapes name the tensor.
    import clip_jax

    with pytest.raises(UserError, match=r"tensor visual\.\S+ of shape"):
        clip_jax.load(f"open_clip:{ckpt}#ViT-B-32")


def test_timm_names_give_the_trunk_sizes(tmp_path):
    """A real SigLIP config (no timm_model_kwargs): the trunk's sizes come from its name."""
    cfg = json.loads(json.dumps(SIGLIP_CFG))
    del cfg["vision_cfg"]["timm_model_kwargs"]
    cfg["vision_cfg"] |= {"timm_model_name": "vit_so400m_patch14_siglip_224", "image_size": 224}
    cfg["embed_dim"] = 1152
    cfg["text_cfg"] |= {"width": 1152, "heads": 16, "layers": 27, "mlp_ratio": 3.7362}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    spec = validate({"train": {"init_from": f"open_clip:{tmp_path}"}, "tokenizer": {"path": "x"}})
    v = spec.model.vision
    assert (v.width, v.depth, v.heads, v.mlp_dim, v.patch_size, v.image_size) == (
        1152, 27, 16, 4304, 14, 224,
    )  # fmt: skip
    assert v.activation == "gelu"  # timm builds this trunk with nn.GELU
    cfg["vision_cfg"] |= {"timm_model_name": "vit_so400m_patch16_siglip_384", "image_size": 384}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    spec = validate({"train": {"init_from": f"open_clip:{tmp_path}"}, "tokenizer": {"path": "x"}})
    v = spec.model.vision
    assert (v.activation, v.patch_size, v.image_size) == ("gelu_tanh", 16, 384)


@pytest.mark.slow
def test_open_clip_bad_input_names_the_key(open_clip_folders, tmp_path):
    import clip_jax

    with pytest.raises(SpecError, match=r"train.init_from: .*nowhere.pt does not exist"):
        validate({"train": {"init_from": f"open_clip:{tmp_path / 'nowhere.pt'}"}})
    folder, _ = open_clip_folders["clip"]
    ckpt = folder / "open_clip_model.safetensors"
    with pytest.raises(SpecError, match=r"train.init_from: open_clip model 'ViT-Q-99'"):
        validate({"train": {"init_from": f"open_clip:{ckpt}#ViT-Q-99"}})
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(ckpt.read_bytes())
    with pytest.raises(SpecError, match=r"train.init_from: .*no open_clip config.*#NAME"):
        validate({"train": {"init_from": f"open_clip:{lonely}"}})

    # A tensor of the wrong shape is named, wherever it is found out.
    tensors = pretrained.read_tensors(ckpt)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "open_clip_config.json").write_bytes((folder / "open_clip_config.json").read_bytes())
    write_bpe(bad)
    name = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    save_safetensors({**tensors, name: tensors[name][:64]}, bad / "open_clip_model.safetensors")
    with pytest.raises(UserError, match=rf"tensor {name}"):
        clip_jax.load(f"open_clip:{bad}")
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    save_safetensors({**tensors, name: tensors[name][:-1]}, bad / "open_clip_model.safetensors")
    with pytest.raises(UserError, match=rf"tensor {name} of shape \(143, 48\) does not fit"):
        clip_jax.load(f"open_clip:{bad}")
    save_safetensors({**tensors, "visual.extra": tensors["logit_scale"]}, bad / "open_clip_model.safetensors")  # fmt: skip
    with pytest.raises(UserError, match=r"tensor visual.extra .*has no place"):
        clip_jax.load(f"open_clip:{bad}")
    # No tokenizer.json beside it: the tokenizer names the key to set.
    save_safetensors(tensors, bad / "open_clip_model.safetensors")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"tokenizer.path: .*tokenizer.json does not exist"):
        clip_jax.load(f"open_clip:{bad}")
    (bad / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {**CLIP_CFG, "vision_cfg": {"layers": [3, 4, 6, 3]}}})
    )
    with pytest.raises(SpecError, match=r"train.init_from: .*ResNet image towers"):
        validate({"train": {"init_from": f"open_clip:{bad}"}})
    with pytest.raises(UserError, match="not supported yet"):
        pretrained.find_format(f"open_clip:{bad}")[1].write({}, None, None, tmp_path / "out")


# ----------------------------------------------------------------- big_vision
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
