"""open_clip checkpoints in (``open_clip:PATH``).

The reference checkpoints (tests/pretrained_reference.py) are put into open_clip's layouts
by mappings written in this file from the published conversion scripts: transformers'
``convert_clip_original_pytorch_to_hf.py`` (OpenAI / open_clip CLIP -> CLIPModel), run
backwards, and for open_clip's timm SigLIP trunk, open_clip's own big_vision loader
(``convert.py``) composed with ``convert_siglip_to_hf.py`` (big_vision SigLIP ->
SiglipModel), also run backwards. None of this goes through our converters.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_jax import pretrained
from clip_jax.errors import UserError
from clip_jax.spec import SpecError, validate
from tests.pretrained_reference import CAPTIONS, assert_parity, state, tiny_model, torch
from tests.test_interop import VOCAB

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


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
