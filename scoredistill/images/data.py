"""Image data: scikit-learn's bundled digits (the embedded default) and the uint8 format images are evaluated in.

Every image tensor in scoredistill is ``(N, C, H, W)`` float in ``[-1, 1]``.

``digits``: the 1,797 handwritten digits that ship with scikit-learn (8x8, grey levels
0..16), scaled by ``v / 16 * 2 - 1``. One fixed, stratified split is used everywhere:
the *test* split (297 images, ``random_state=0``) is held out for evaluation only; the
*train* split has exactly 1,500 images, which is also the number of generated samples
of the FID protocol, so the "real data" floor uses the same sample count.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from scoredistill.errors import UserError

DIGITS_TEST_SIZE = 297
DIGITS_SPLIT_SEED = 0
DIGITS_SHAPE = (1, 8, 8)
DIGITS_LEVELS = 16
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@lru_cache(maxsize=1)
def _digits_split() -> dict[str, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / DIGITS_LEVELS * 2 - 1
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=DIGITS_TEST_SIZE, stratify=d.target, random_state=DIGITS_SPLIT_SEED)
    train_idx, test_idx = sorted(train_idx), sorted(test_idx)
    return {"train_x": x[train_idx], "train_y": y[train_idx], "test_x": x[test_idx], "test_y": y[test_idx]}


def digits(split: str = "train") -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of the fixed digits split ``train`` (1,500) or ``test`` (297), images in [-1, 1]."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train, test or all (got {split!r})")
    s = _digits_split()
    if split == "all":
        return torch.cat([s["train_x"], s["test_x"]]), torch.cat([s["train_y"], s["test_y"]])
    return s[f"{split}_x"].clone(), s[f"{split}_y"].clone()


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats to uint8 [0, 255] (rounded, clipped): the format images are evaluated in."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def check_shape(x: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape[1:]) != tuple(shape):
        raise UserError(f"{what} has image shape {tuple(x.shape[1:])} but {tuple(shape)} is needed")
