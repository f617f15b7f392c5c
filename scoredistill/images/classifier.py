"""The digits feature extractor for FID: a small timm ResNet trained by the project on the digits train split.

Used for evaluation only (FID features, class histograms), never as a training loss.
Architecture: ``timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10,
channels=(32, 64, 64, 64), stem_width=32)`` on images bilinearly upsampled from 8x8 to
32x32; the FID features are its 64-dimensional pre-logits (global average pool).
Trained with Adam on the 1,500 train images (random one-pixel shifts), seeded; cached as
``CACHE/classifiers/digits-resnet18-<key>.safetensors`` with its held-out (test split)
accuracy in the file's metadata.

Inputs are images in clean-fid's convention: float ``[0, 255]``, ``(N, C, H, W)``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from scoredistill.io import load_tensors, save_tensors
from scoredistill.roles import default_cache_dir, stable_hash

from scoredistill.images.data import DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE, digits, to_uint8

ARCH = "resnet18"


class ClassifierSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: tuple[int, int, int, int] = (32, 64, 64, 64)
    stem_width: int = 32
    input_size: int = 32
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


class DigitsClassifier(nn.Module):
    """A timm ResNet-18 (narrow, random init) on upsampled digits; ``features`` are FID's embedding."""

    def __init__(self, settings: ClassifierSettings = ClassifierSettings()) -> None:
        super().__init__()
        import timm

        self.settings = settings
        self.net = timm.create_model(ARCH, pretrained=False, in_chans=1, num_classes=10, channels=settings.channels,
                                     stem_width=settings.stem_width)

    def _prepare(self, images: Tensor) -> Tensor:
        x = images.float() / 127.5 - 1
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        return F.interpolate(x, size=self.settings.input_size, mode="bilinear", align_corners=False)

    def features(self, images: Tensor) -> Tensor:
        return self.net.forward_head(self.net.forward_features(self._prepare(images)), pre_logits=True)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self._prepare(images))

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 500) -> Tensor:
        self.eval()
        return torch.cat([self(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translations by -1, 0 or +1 pixel (zero = black background padding)."""
    pad = F.pad(x, (1, 1, 1, 1), value=0.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    return float((model.predict(images) == labels).float().mean())


def train_classifier(settings: ClassifierSettings = ClassifierSettings(), log=None) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(settings.seed)
    model = DigitsClassifier(settings)
    x, y = digits("train")
    x = to_uint8(x).float()
    gen = torch.Generator().manual_seed(settings.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = (len(x) + settings.batch_size - 1) // settings.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), settings.batch_size):
            idx = perm[i : i + settings.batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    xt, yt = digits("test")
    info = {"arch": f"timm {ARCH} channels={list(settings.channels)} (no pretrained weights)",
            "test_accuracy": round(accuracy(model, to_uint8(xt).float(), yt), 4),
            "train_accuracy": round(accuracy(model, x, y), 4), "seconds": round(time.perf_counter() - t0, 1),
            "settings": settings.model_dump(mode="json"), "test_size": len(yt)}
    if log:
        log(f"digits classifier: held-out accuracy {info['test_accuracy']:.4f} ({info['seconds']} s)")
    return model.requires_grad_(False), info


def classifier_path(settings: ClassifierSettings, cache_dir: Optional[Path] = None) -> Path:
    key = stable_hash("digits-classifier-v1", settings.model_dump(mode="json"), DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
    return Path(cache_dir or default_cache_dir()) / "classifiers" / f"digits-{ARCH}-{key}.safetensors"


_LOADED: dict[str, tuple[DigitsClassifier, dict]] = {}


def load_classifier(settings: ClassifierSettings = ClassifierSettings(), cache_dir: Optional[Path] = None,
                    log=None) -> tuple[DigitsClassifier, dict]:
    """The cached digits classifier (trained on first use, about a minute) and its info (held-out accuracy)."""
    path = classifier_path(settings, cache_dir)
    if str(path) in _LOADED:
        return _LOADED[str(path)]
    model = info = None
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                info = json.loads(f.metadata()["info"])
            model = DigitsClassifier(settings)
            model.load_state_dict(load_tensors(path))
            model.eval().requires_grad_(False)
        except Exception:  # damaged cache: retrain
            model = None
    if model is None:
        if log:
            log(f"training the digits FID classifier (cached at {path})")
        model, info = train_classifier(settings, log=log)
        save_tensors(path, model.state_dict(), {"info": json.dumps(info)})
    _LOADED[str(path)] = (model, info)
    return model, info
