"""A pipeline's own prompt encoding: its tokenizers and text encoders, loaded from the folder, called as it calls them.

A :class:`PromptEncoder` names the parts of a pipeline folder it needs and turns a batch of
prompts into the tensors the denoising network takes (``embeddings`` (B, L, D) as
``encoder_hidden_states``; ``pooled`` (B, D_pooled) where the network takes one). The
:data:`PROMPT_ENCODERS` table picks one from the folder's ``model_index.json``; each part is
loaded with transformers' ``from_pretrained``, offline, in the teacher's dtype.

* ``clip`` (Stable Diffusion 1.x / 2.x): ``tokenizer`` + ``text_encoder`` (``CLIPTextModel``); the
  last hidden state of the prompt padded to the tokenizer's ``model_max_length``, as
  ``StableDiffusionPipeline.encode_prompt`` computes it (no clip skip).
* ``sdxl``: ``text_encoder`` (``CLIPTextModel``) and ``text_encoder_2``
  (``CLIPTextModelWithProjection``): penultimate hidden states concatenated, the second's pooled
  projection; the empty negative prompt as zeros (``force_zeros_for_empty_prompt``).

The fingerprint (:meth:`PromptEncoder.fingerprint`) is read from the files without loading
them: configs and tokenizer files whole, weight files by size, header and a sample of bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from scoredistill.errors import UserError
from scoredistill.hashing import sha256_digest

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


def file_fingerprint(folder: Path, sample_bytes: int = 4096, samples: int = 64) -> str:
    """A digest of a model or tokenizer folder: small files whole, weight files by size, first 64 KiB (the safetensors
    header) and ``samples`` strided chunks, so a multi-GB encoder is fingerprinted in milliseconds."""
    def chunks():
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            yield str(path.relative_to(folder)).encode()
            if path.suffix not in WEIGHT_SUFFIXES:
                yield path.read_bytes()
                continue
            size = path.stat().st_size
            yield str(size).encode()
            with path.open("rb") as f:
                yield f.read(65536)
                for k in range(samples):
                    f.seek(size * k // samples)
                    yield f.read(sample_bytes)

    return sha256_digest(chunks())


class PromptEncoder:
    """A pipeline's prompt encoding (see the module docstring); subclasses per pipeline shape."""

    name = "?"
    #: the pipeline folder's subfolders it loads
    parts: tuple[str, ...] = ()

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        missing = [p for p in self.parts if not (self.folder / p).is_dir()]
        if missing:
            raise UserError(f"pipeline folder '{self.folder}' lacks {', '.join(p + '/' for p in missing)} needed to encode prompts "
                            f"({self.name}: {', '.join(self.parts)}); save the whole pipeline with save_pretrained")

    def fingerprint(self) -> str:
        return sha256_digest([self.name.encode(), *(file_fingerprint(self.folder / p).encode() for p in self.parts)])

    def zero_null(self, negative: str) -> bool:
        """Whether the pipeline's unconditional branch for ``negative`` is zeros rather than its embedding."""
        return False

    def load(self, dtype: torch.dtype, device: torch.device) -> Callable[[list[str]], dict[str, Tensor]]:  # pragma: no cover
        """Load the parts and return ``encode(prompts) -> {name: (B, ...)}``."""
        raise NotImplementedError


def _load(cls, folder: Path, **kw):
    from transformers.utils import logging

    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # our own progress is the cache's; a bar per part would only clutter stderr
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kw)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load {cls.__name__} from '{folder}' (missing or corrupt files?): {first}") from None
    finally:
        if bar:
            logging.enable_progress_bar()


class ClipPromptEncoder(PromptEncoder):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder's last hidden state (``StableDiffusionPipeline.encode_prompt``)."""

    name = "clip"
    parts = ("tokenizer", "text_encoder")

    def load(self, dtype: torch.dtype, device: torch.device) -> Callable[[list[str]], dict[str, Tensor]]:
        import transformers

        tokenizer = _load(transformers.AutoTokenizer, self.folder / "tokenizer")
        encoder = _load(transformers.CLIPTextModel, self.folder / "text_encoder", torch_dtype=dtype).to(device).eval()
        mask = bool(getattr(encoder.config, "use_attention_mask", False))

        @torch.no_grad()
        def encode(prompts: list[str]) -> dict[str, Tensor]:
            tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
            am = tok.attention_mask.to(device) if mask else None
            return {"embeddings": encoder(tok.input_ids.to(device), attention_mask=am)[0]}

        return encode


class SDXLPromptEncoder(PromptEncoder):
    """SDXL: two CLIP encoders' penultimate hidden states side by side, and the second's projected pooled embedding
    (``StableDiffusionXLPipeline.encode_prompt``); the empty negative prompt is zeros where the pipeline's
    ``force_zeros_for_empty_prompt`` says so."""

    name = "sdxl"
    parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

    def zero_null(self, negative: str) -> bool:
        index = json.loads((self.folder / "model_index.json").read_text())
        return negative == "" and bool(index.get("force_zeros_for_empty_prompt", True))

    def load(self, dtype: torch.dtype, device: torch.device) -> Callable[[list[str]], dict[str, Tensor]]:
        import transformers

        pairs = []
        for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            cls = transformers.CLIPTextModel if enc == "text_encoder" else transformers.CLIPTextModelWithProjection
            pairs.append((_load(transformers.AutoTokenizer, self.folder / tok),
                          _load(cls, self.folder / enc, torch_dtype=dtype).to(device).eval()))

        @torch.no_grad()
        def encode(prompts: list[str]) -> dict[str, Tensor]:
            hidden, pooled = [], None
            for tokenizer, encoder in pairs:
                ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids.to(device)
                out = encoder(ids, output_hidden_states=True)
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]  # the projected pooled embedding (the encoder with projection)
                hidden.append(out.hidden_states[-2])
            return {"embeddings": torch.cat(hidden, dim=-1), "pooled": pooled}

        return encode


#: pipeline shapes by the ``model_index.json`` entries that tell them apart (first match)
PROMPT_ENCODERS: list[tuple[Callable[[dict], bool], type[PromptEncoder]]] = [
    (lambda index: "text_encoder" in index and "text_encoder_2" not in index, ClipPromptEncoder),
    (lambda index: "text_encoder_2" in index and "text_encoder_3" not in index and "transformer" not in index, SDXLPromptEncoder),
]


def prompt_encoder(folder: Path) -> Optional[PromptEncoder]:
    """The prompt encoder of a pipeline folder, or ``None`` when it has no ``model_index.json`` or no text encoder."""
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        return None
    try:
        index = json.loads(index_file.read_text())
    except ValueError:
        raise UserError(f"cannot read {index_file}: not JSON") from None
    index = {k: v for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    for matches, cls in PROMPT_ENCODERS:
        if matches(index):
            return cls(folder)
    if any(k.startswith("text_encoder") for k in index):
        raise UserError(f"pipeline folder '{folder}' has text encoders ({', '.join(k for k in index if k.startswith('text_encoder'))}) "
                        "in a layout scoredistill does not encode yet (supported: Stable Diffusion 1.x / 2.x); give "
                        "teacher.embeddings=FILE.safetensors instead")
    return None
