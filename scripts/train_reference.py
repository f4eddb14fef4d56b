"""Train vitedge's reference ViT on real handwritten digits, reproducibly, on a CPU.

Data: the UCI optical-recognition handwritten digits (1,797 scans, 8x8, 16 grey levels) that
scikit-learn ships inside its wheel (``sklearn.datasets.load_digits``) - no download.

The script
  1. writes the images as PNG files under ``calibration_data/digits/`` (``calib/`` from the
     training split for calibration, ``val/`` = the held-out split, both ``class/image``),
  2. trains a small classic ViT (64x64 input, 16x16 patches) on the training split, reading the
     PNGs through vitedge's own preprocessing, so deployment sees exactly what training saw,
  3. saves ``vitedge/assets/digits_vit.safetensors`` (weights + config + preprocessing + labels)
     and ``vitedge/assets/digits_vit.json`` (held-out accuracy and the training recipe).

Run:  python scripts/train_reference.py         (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitedge.models.loading import ModelSpec, save_checkpoint
from vitedge.models.vit import ViTConfig, VisionTransformer
from vitedge.preprocess import Preprocessing

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "calibration_data" / "digits"
ASSETS = ROOT / "vitedge" / "assets"

CONFIG = ViTConfig(img_size=64, patch_size=16, in_channels=3, num_classes=10, d_model=96, num_heads=3,
                   num_layers=4, d_ff=384, dropout=0.0)
PREPROCESSING = Preprocessing(img_size=(64, 64), resize=None, center_crop=False, interpolation="bilinear",
                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
LABELS = [str(i) for i in range(10)]


def write_images(seed: int, calib_per_class: int) -> tuple[list[Path], list[int], list[Path], list[int]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    idx_train, idx_val = train_test_split(np.arange(len(images)), test_size=0.2, random_state=seed, stratify=digits.target)
    if DATA.exists():
        shutil.rmtree(DATA)
    train_paths, train_y, val_paths, val_y = [], [], [], []
    per_class: dict[int, int] = {}
    scratch = ROOT / "build" / "digits_train"
    if scratch.exists():
        shutil.rmtree(scratch)
    for i in idx_train:
        y = int(digits.target[i])
        per_class[y] = per_class.get(y, 0) + 1
        in_calib = per_class[y] <= calib_per_class
        folder = (DATA / "calib" if in_calib else scratch) / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"digit_{i:04d}.png"
        Image.fromarray(images[i], mode="L").save(p, optimize=True)
        train_paths.append(p)
        train_y.append(y)
    for i in idx_val:
        y = int(digits.target[i])
        folder = DATA / "val" / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"digit_{i:04d}.png"
        Image.fromarray(images[i], mode="L").save(p, optimize=True)
        val_paths.append(p)
        val_y.append(y)
    return train_paths, train_y, val_paths, val_y


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine jitter (rotation, scale, shift) - digits are written by hand."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) - 0.5) * 0.35
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-per-class", type=int, default=10)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    train_paths, train_y, val_paths, val_y = write_images(args.seed, args.calib_per_class)
    x_train = torch.from_numpy(PREPROCESSING.batch(train_paths))
    y_train = torch.tensor(train_y)
    x_val = torch.from_numpy(PREPROCESSING.batch(val_paths))
    y_val = torch.tensor(val_y)
    shutil.rmtree(ROOT / "build" / "digits_train", ignore_errors=True)

    model = VisionTransformer.from_config(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = (len(x_train) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            loss = F.cross_entropy(model(augment(x_train[b], gen)), y_train[b], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            model.eval()
            with torch.no_grad():
                acc = (model(x_val).argmax(1) == y_val).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out top-1 {acc:.4f}")
    model.eval()
    with torch.no_grad():
        logits = model(x_val)
    top1 = (logits.argmax(1) == y_val).float().mean().item()
    ASSETS.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ModelSpec(model, PREPROCESSING, CONFIG, LABELS, "digits"), ASSETS / "digits_vit.safetensors")
    info = {
        "dataset": "UCI handwritten digits via sklearn.datasets.load_digits (1,797 images, 10 classes)",
        "split": {"train": len(train_paths), "held_out": len(val_paths), "seed": args.seed, "stratified": True},
        "held_out_top1": round(top1, 4),
        "held_out_images": "calibration_data/digits/val",
        "epochs": args.epochs,
        "train_seconds": round(time.time() - t0, 1),
        "config": CONFIG.to_dict(),
        "torch": torch.__version__,
    }
    (ASSETS / "digits_vit.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
