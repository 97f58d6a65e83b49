"""open_clip's train step on the configurations bench/train_throughput.py measures, for
a side-by-side figure. It imports only torch and open_clip, so it runs in a scratch
environment outside the project:

    python3 -m venv /tmp/ocvenv && /tmp/ocvenv/bin/pip install torch torchvision open_clip_torch
    /tmp/ocvenv/bin/python bench/open_clip_step.py tiny-64 --loss softmax --precision amp_bf16

Configurations (same shapes as ours): ``tiny-64`` (64 px / patch 8, width 256, depth 6
in both towers, batch 64; the overrides are printed by ``--ours``), ``clip-b32``
(ViT-B-32-quickgelu, batch 32). Precision ``fp32`` or ``amp_bf16`` (torch's bf16
autocast, open_clip's ``--precision amp_bf16``). Prints images/s (best of three rounds).
"""

from __future__ import annotations

import argparse
import json
import time

TINY_64 = {
    "embed_dim": 256,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 6, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 1024, "width": 256, "heads": 4, "layers": 6},
}
OURS = {
    "tiny-64": "model.vision.image_size=64 model.vision.patch_size=8 model.vision.width=256 "
    "model.vision.depth=6 model.vision.heads=4 model.text.width=256 model.text.depth=6 "
    "model.text.heads=4 model.embed_dim=256 train.batch_size=64",
    "clip-b32": "model.preset=clip-b32 train.batch_size=32",
}
BATCH = {"tiny-64": 64, "clip-b32": 32}


def build(config: str, logit_bias: float | None):
    import open_clip

    extra = {"output_dict": True, "init_logit_bias": logit_bias}
    if config == "tiny-64":
        from open_clip.model import CLIP

        return CLIP(**TINY_64, **extra), 64, 16, 1024
    return open_clip.create_model("ViT-B-32-quickgelu", **extra), 224, 77, 49408


def measure(config: str, loss_name: str, precision: str, steps: int, threads: int) -> dict:
    import contextlib

    import torch
    from open_clip.loss import ClipLoss, SigLipLoss

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    sigmoid = loss_name == "sigmoid"
    model, image_size, context, vocab = build(config, -10.0 if sigmoid else None)
    loss_fn = SigLipLoss() if sigmoid else ClipLoss()
    model.train()
    batch = BATCH[config]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images = torch.randn(batch, 3, image_size, image_size)
    tokens = torch.randint(1, vocab, (batch, context))
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "amp_bf16"
        else contextlib.nullcontext
    )

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(images, tokens)
            args = [out["image_features"], out["text_features"], out["logit_scale"]]
            if loss_name == "sigmoid":
                args.append(out["logit_bias"])
            loss = loss_fn(*args)
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    step()  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return {
        "config": config,
        "loss": loss_name,
        "precision": precision,
        "batch_size": batch,
        "threads": threads,
        "images_per_s": batch / best,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", choices=sorted(BATCH))
    parser.add_argument("--loss", choices=["softmax", "sigmoid"], default="softmax")
    parser.add_argument("--precision", choices=["fp32", "amp_bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ours", action="store_true", help="print our overrides and exit")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.ours:
        print(OURS[args.config])
        return
    result = measure(args.config, args.loss, args.precision, args.steps, args.threads)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"open_clip {result['config']} {result['loss']} {result['precision']} "
            f"(batch {result['batch_size']}, {result['threads']} threads, torch "
            f"{result['torch']}): {result['images_per_s']:.1f} images/s"
        )


if __name__ == "__main__":
    main()
