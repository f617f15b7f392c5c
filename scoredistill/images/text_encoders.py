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
* ``sd3``: CLIP-L and CLIP-G (both with projection) and T5 (optional: zeros without it), the
  CLIP states padded to T5's width and put before T5's tokens; pooled: both projections.
* ``flux``: T5's tokens and CLIP's pooled output.

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


def _clip_pairs(folder: Path, names: list[tuple[str, str]], dtype: torch.dtype, device: torch.device) -> list:
    import transformers

    def model(enc: str):
        cls = getattr(transformers, cls_name(folder, enc), None) or transformers.CLIPTextModelWithProjection
        return _load(cls, folder / enc, torch_dtype=dtype).to(device).eval()

    return [(_load(transformers.AutoTokenizer, folder / tok), model(enc)) for tok, enc in names]


def cls_name(folder: Path, part: str) -> str:
    index = json.loads((folder / "model_index.json").read_text())
    entry = index.get(part) or [None, None]
    return str(entry[1])


def _t5(folder: Path, tok: str, enc: str, dtype: torch.dtype, device: torch.device, max_length: int) -> Callable[[list[str]], Tensor]:
    import transformers

    tokenizer = _load(transformers.AutoTokenizer, folder / tok)
    encoder = _load(transformers.T5EncoderModel, folder / enc, torch_dtype=dtype).to(device).eval()

    def encode(prompts: list[str]) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                        return_tensors="pt").input_ids.to(device)
        return encoder(ids)[0]

    return encode


def _clip_ids(tokenizer, prompts: list[str], device: torch.device) -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


class SD3PromptEncoder(PromptEncoder):
    """SD3: CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5's tokens
    (``max_sequence_length``, default 256), or zeros where the pipeline has no T5; pooled: both CLIPs' projections
    (``StableDiffusion3Pipeline.encode_prompt``)."""

    name = "sd3"
    parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    max_sequence_length = 256

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.has_t5 = (self.folder / "text_encoder_3").is_dir()
        if self.has_t5:
            self.parts = (*self.parts, "tokenizer_3", "text_encoder_3")
            super().__init__(folder)  # T5's parts checked too

    def fingerprint(self) -> str:
        return sha256_digest([super().fingerprint().encode(), str(self.max_sequence_length).encode()])

    def load(self, dtype: torch.dtype, device: torch.device) -> Callable[[list[str]], dict[str, Tensor]]:
        pairs = _clip_pairs(self.folder, [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")], dtype, device)
        t5 = _t5(self.folder, "tokenizer_3", "text_encoder_3", dtype, device, self.max_sequence_length) if self.has_t5 else None
        width = int(json.loads((self.folder / "transformer" / "config.json").read_text())["joint_attention_dim"])

        @torch.no_grad()
        def encode(prompts: list[str]) -> dict[str, Tensor]:
            outs = [encoder(_clip_ids(tok, prompts, device), output_hidden_states=True) for tok, encoder in pairs]
            clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            tokens = t5(prompts) if t5 is not None else clip.new_zeros((len(prompts), self.max_sequence_length, width))
            clip = torch.nn.functional.pad(clip, (0, tokens.shape[-1] - clip.shape[-1]))
            return {"embeddings": torch.cat([clip, tokens.to(clip.dtype)], dim=-2), "pooled": torch.cat([o[0] for o in outs], dim=-1)}

        return encode


class FluxPromptEncoder(PromptEncoder):
    """Flux: T5's tokens (``max_sequence_length``, default 512) and CLIP's pooled output (``FluxPipeline.encode_prompt``)."""

    name = "flux"
    parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    max_sequence_length = 512

    def fingerprint(self) -> str:
        return sha256_digest([super().fingerprint().encode(), str(self.max_sequence_length).encode()])

    def load(self, dtype: torch.dtype, device: torch.device) -> Callable[[list[str]], dict[str, Tensor]]:
        import transformers

        tokenizer = _load(transformers.AutoTokenizer, self.folder / "tokenizer")
        clip = _load(transformers.CLIPTextModel, self.folder / "text_encoder", torch_dtype=dtype).to(device).eval()
        t5 = _t5(self.folder, "tokenizer_2", "text_encoder_2", dtype, device, self.max_sequence_length)

        @torch.no_grad()
        def encode(prompts: list[str]) -> dict[str, Tensor]:
            return {"embeddings": t5(prompts), "pooled": clip(_clip_ids(tokenizer, prompts, device), output_hidden_states=False).pooler_output}

        return encode


def _transformer(index: dict) -> str:
    return str((index.get("transformer") or [None, None])[1])


#: pipeline shapes by the ``model_index.json`` entries that tell them apart (first match)
PROMPT_ENCODERS: list[tuple[Callable[[dict], bool], type[PromptEncoder]]] = [
    (lambda index: "text_encoder" in index and "text_encoder_2" not in index and "transformer" not in index, ClipPromptEncoder),
    (lambda index: "text_encoder_2" in index and "transformer" not in index, SDXLPromptEncoder),
    (lambda index: _transformer(index) == "SD3Transformer2DModel", SD3PromptEncoder),
    (lambda index: _transformer(index) == "FluxTransformer2DModel", FluxPromptEncoder),
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
                        "in a layout scoredistill does not encode (supported: Stable Diffusion 1.x / 2.x, SDXL, SD3, Flux); give "
                        "teacher.embeddings=FILE.safetensors instead")
    return None
