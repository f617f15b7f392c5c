"""The one SHA-256 hasher of the project: cache keys, checkpoint digests, weight hashes.

Every digest is SHA-256 (FIPS 180-4) over a sequence of chunks; a tensor chunk is its raw
bytes in logical (row-major) order, whatever its dtype, device or strides.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

Chunk = Union[bytes, Tensor]


def tensor_bytes(t: Tensor) -> bytes:
    """``t``'s raw bytes in logical order, read from a copy.

    A copy: ``numpy()`` on the tensor itself would mark its storage (a live parameter's, perhaps)
    as not resizable, which FSDP needs.
    """
    return t.detach().reshape(-1).clone().cpu().view(torch.uint8).numpy().tobytes()


def sha256_digest(chunks: Iterable[Chunk], length: Optional[int] = 16) -> str:
    """The hex SHA-256 of ``chunks`` (bytes, or tensors as :func:`tensor_bytes`), cut to ``length`` characters."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(tensor_bytes(chunk) if isinstance(chunk, Tensor) else chunk)
    digest = h.hexdigest()
    return digest if length is None else digest[:length]


def stable_hash(*parts: Any) -> str:
    """A short hex digest of the parts: tensors by their bytes, floats rounded to 12 significant digits, the rest by ``repr``."""
    return sha256_digest(p if isinstance(p, Tensor) else (f"{p:.12g}" if isinstance(p, float) else repr(p)).encode()
                         for p in parts)


def state_hash(tensors: dict[str, Tensor]) -> str:
    """A short hex digest of a state dict: every entry's key and bytes, in key order."""
    return sha256_digest(chunk for key in sorted(tensors) for chunk in (key.encode(), tensors[key]))
