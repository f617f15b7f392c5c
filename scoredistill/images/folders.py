"""Folders of real images, with or without captions, sized to the teacher and (for a latent teacher) VAE-encoded once.

``teacher.data`` (``--data FOLDER``) names a folder in one of the layouts users have:

* Hugging Face ``imagefolder``: images (any depth) and a ``metadata.jsonl`` or ``metadata.csv``
  (in the folder or a subfolder) whose rows name a ``file_name`` (relative to that metadata
  file) and its caption in ``text`` or ``caption`` (``teacher.caption_column`` picks another);
* images with a same-stem ``.txt`` caption beside each (``cat.png`` + ``cat.txt``);
* images alone (no captions: real data for unconditional and class teachers, and the FID reference).

Every image must have a caption once one has; a metadata row must name an image that exists.
Images whose size is not the teacher's are refused unless ``teacher.resize`` is set: then the
shorter side is scaled to the target (bicubic) and the image cropped to it, in the centre
(``teacher.crop=center``) or at a random offset (``random``: one offset per image, drawn from a
fixed seed, so the cached latents stay valid). Images are ``(N, C, H, W)`` in ``[-1, 1]``.

:func:`cached_latents` encodes the images of a latent teacher through its VAE in batches once,
into ``CACHE/real_latents/<key>.safetensors``; the key is the VAE's file fingerprint, the
network dtype, the files (names, sizes, modification times) and the sizing options.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from scoredistill.errors import UserError
from scoredistill.hashing import stable_hash

from scoredistill.images.data import IMAGE_EXTENSIONS
from scoredistill.images.prompts import json_lines

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")
CROP_SEED = 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def scan_image_folder(folder: str | Path, caption_column: Optional[str] = None) -> tuple[list[Path], Optional[list[str]]]:
    """``(image files, their captions or None)`` of a folder in one of the layouts of the module docstring; one-line
    errors for a missing folder, no images, a metadata row naming no image or no caption, an image without a caption."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder '{folder}' does not exist: give a folder of {'/'.join(IMAGE_EXTENSIONS)} files")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"image folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    metas = sorted(p for p in root.rglob("metadata.*") if p.name in METADATA_FILES)
    if metas:
        captions: dict[Path, str] = {}
        for meta in metas:
            for n, row in _metadata_rows(meta):
                name = row.get("file_name")
                if not isinstance(name, str) or not name.strip():
                    raise UserError(f"{meta}, row {n}: no 'file_name' (an imagefolder metadata row names its image)")
                cols = [caption_column] if caption_column else [c for c in CAPTION_COLUMNS if c in row] or [CAPTION_COLUMNS[0]]
                text = row.get(cols[0])
                if not isinstance(text, str) or not text.strip():
                    raise UserError(f"{meta}, row {n}: no caption for '{name}' (a non-empty "
                                    f"{' or '.join(repr(c) for c in ([caption_column] if caption_column else CAPTION_COLUMNS))} field)")
                path = (meta.parent / name).resolve()
                if not path.is_file():
                    raise UserError(f"{meta}, row {n}: names '{name}', which is not an image in the folder")
                captions[path] = text.strip()
        missing = [f for f in files if f.resolve() not in captions]
        if missing:
            raise UserError(f"image '{missing[0]}' has no caption: {len(missing)} of {len(files)} images are not in "
                            f"{', '.join(m.name for m in metas)} (each image needs a row with file_name and text)")
        return files, [captions[f.resolve()] for f in files]
    texts = [f.with_suffix(".txt") for f in files]
    have = [t.is_file() for t in texts]
    if not any(have):
        return files, None
    if not all(have):
        k = have.index(False)
        raise UserError(f"image '{files[k]}' has no caption file '{texts[k].name}' ({sum(have)} of {len(files)} images have one)")
    out = []
    for t in texts:
        try:
            text = t.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read the caption file '{t}': {_first_line(exc)}") from None
        if not text:
            raise UserError(f"caption file '{t}' is empty")
        out.append(text)
    return files, out


def _metadata_rows(meta: Path) -> list[tuple[int, dict]]:
    try:
        text = meta.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read '{meta}': {_first_line(exc)}") from None
    if meta.suffix == ".csv":
        try:
            return [(n, row) for n, row in enumerate(csv.DictReader(text.splitlines()), 1)]
        except csv.Error as exc:
            raise UserError(f"cannot read '{meta}' as CSV: {_first_line(exc)}") from None
    return json_lines(text, str(meta))


def _open(path: Path):
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
        return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image '{path}': {_first_line(exc)}") from None


def check_images(files: list[Path], shape: tuple[int, int, int], resize: bool, cache_dir: Optional[Path] = None) -> None:
    """Open every image's header (and check its data, ``verify``): one line for an unreadable file or, without
    ``resize``, a size other than the teacher's; reads no pixels into memory. With ``cache_dir`` a folder that passed
    is remembered (``cache_dir/checked_images``, by :func:`folder_digest`) and not read again."""
    from PIL import Image

    _, h, w = shape
    mark = Path(cache_dir) / "checked_images" / stable_hash(folder_digest(files), list(shape), resize) if cache_dir else None
    if mark is not None and mark.is_file():
        return
    for f in files:
        try:
            with Image.open(f) as img:
                size = img.size
                img.verify()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise UserError(f"cannot read image '{f}': {_first_line(exc)}") from None
        if size != (w, h) and not resize:
            raise UserError(f"image '{f}' is {size[0]}x{size[1]} but the teacher makes {w}x{h} images: resize the folder's "
                            "images, or set teacher.resize=true (scale and crop, teacher.crop=center|random)")
    if mark is not None:
        from scoredistill.io import atomic_write

        atomic_write(mark, lambda p: p.write_text(f"{len(files)} images\n"))


def load_images(files: list[Path], shape: tuple[int, int, int], resize: bool = False, crop: str = "center",
                start: int = 0) -> Tensor:
    """``files`` as ``(N, C, H, W)`` in [-1, 1] at ``shape``: resized (shorter side to the target, bicubic) and cropped
    (``center``, or ``random`` with an offset drawn for file number ``start + k`` from a fixed seed) when ``resize``."""
    import numpy as np
    from PIL import Image

    c, h, w = shape
    out = []
    for k, f in enumerate(files):
        img = _open(f).convert("L" if c == 1 else "RGB")
        if img.size != (w, h):
            if not resize:
                raise UserError(f"image '{f}' is {img.size[0]}x{img.size[1]} but the teacher makes {w}x{h} images: resize the "
                                "folder's images, or set teacher.resize=true (scale and crop, teacher.crop=center|random)")
            scale = max(w / img.width, h / img.height)
            nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
            img = img.resize((nw, nh), Image.BICUBIC)
            if crop == "random":
                rng = np.random.default_rng([CROP_SEED, start + k])
                left, top = int(rng.integers(0, nw - w + 1)), int(rng.integers(0, nh - h + 1))
            else:
                left, top = (nw - w) // 2, (nh - h) // 2
            img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32).reshape(h, w, c)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1


def folder_digest(files: list[Path]) -> list:
    """What identifies the files for a cache key without reading them: names, sizes, modification times."""
    stats = [f.stat() for f in files]
    return [(str(f), st.st_size, st.st_mtime_ns) for f, st in zip(files, stats)]


def cached_latents(files: list[Path], shape: tuple[int, int, int], resize: bool, crop: str, vae_key: str,
                   encode: Callable[[Tensor], Tensor], cache_dir: Path, *, batch_size: int = 16, progress: bool = True,
                   log: Callable[[str], None] = lambda m: None) -> Tensor:
    """The latents ``encode(images)`` of ``files`` (loaded as :func:`load_images`), computed in batches once and cached
    under ``cache_dir/real_latents`` by ``vae_key`` and :func:`folder_digest`; on the CPU."""
    from scoredistill.io import fill_lock, load_tensors, save_tensors

    key = stable_hash("real-latents-v1", vae_key, folder_digest(files), list(shape), resize, crop if resize else "", CROP_SEED)
    path = Path(cache_dir) / "real_latents" / f"{key}.safetensors"
    with fill_lock(path, log):  # the ranks of a run (or runs sharing the cache) encode the images once
        if path.is_file():
            try:
                return load_tensors(path)["latents"]
            except Exception:
                log(f"ignoring an unreadable latent cache {path}; encoding the images again")
        latents = _encode_files(files, shape, resize, crop, encode, batch_size, progress)
        save_tensors(path, {"latents": latents}, {"images": str(len(files))})
    return latents


def _encode_files(files: list[Path], shape: tuple[int, int, int], resize: bool, crop: str,
                  encode: Callable[[Tensor], Tensor], batch_size: int, progress: bool) -> Tensor:
    from scoredistill.progress import progress as make_progress

    parts = []
    with make_progress(progress) as bar:
        task = bar.add_task("real images -> latents", total=len(files))
        for b in range(0, len(files), batch_size):
            images = load_images(files[b : b + batch_size], shape, resize, crop, start=b)
            parts.append(encode(images).float().cpu())
            bar.advance(task, len(images))
    return torch.cat(parts)
