"""Prompt sets for text-to-image teachers: a prompts file, embedded once by the pipeline's own text encoders, cached.

``--prompts FILE`` (``teacher.prompts``) names a ``.txt`` (one prompt a line), ``.jsonl`` (a
``prompt`` field, or ``teacher.prompt_column``), ``.csv`` (that column) or ``.parquet`` (that
column; needs pyarrow) file of any size. :func:`prompt_tables` embeds it in batches with the
pipeline's encoders (:mod:`scoredistill.images.text_encoders`), with progress on stderr, into a
cache folder of safetensors shards keyed by the encoders' fingerprint and the prompts. A run
that stops keeps its finished shards: the next one computes the rest. Once the cache is
complete the encoders are not loaded at all.

The run then reads the cache lazily through :class:`PromptTable`: indexing it with a tensor of
prompt indices gathers those rows from the memory-mapped shards, on the index's device. Index
``P`` (one past the last prompt) is the unconditional branch of guidance: the embedding of the
negative prompt (default the empty prompt, as diffusers' pipelines do).
"""

from __future__ import annotations

import csv
import gc
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from scoredistill.errors import UserError
from scoredistill.hashing import sha256_digest, stable_hash
from scoredistill.io import fill_lock, save_tensors, write_json

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
INDEX_FILE = "index.json"
NULL_FILE = "null.safetensors"


def read_prompts(path: str, column: str = "prompt") -> list[str]:
    """The prompts of ``path`` in file order; one-line errors for a missing, unreadable or empty file or column."""
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise UserError(f"prompts file '{path}': unknown type '{suffix or 'none'}'; allowed: {', '.join(PROMPT_SUFFIXES)}")
    if not file.is_file():
        raise UserError(f"prompts file '{path}' does not exist (or is not a file)")
    try:
        if suffix == ".parquet":
            prompts = _parquet_column(file, column)
        else:
            text = file.read_text(encoding="utf-8")
            prompts = _text_prompts(text, suffix, column, path)
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read the prompts file '{path}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise UserError(f"prompts file '{path}' holds no prompt (every line or '{column}' value is empty)")
    return prompts


def _text_prompts(text: str, suffix: str, column: str, path: str) -> list[str]:
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines()]
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if column not in (reader.fieldnames or []):
            raise UserError(f"prompts file '{path}' has no column '{column}' (columns: {', '.join(reader.fieldnames or []) or 'none'}); "
                            "set teacher.prompt_column")
        return [str(row[column] or "") for row in reader]
    prompts = []
    for n, row in json_lines(text, f"prompts file '{path}'"):
        if not isinstance(row.get(column), str):
            raise UserError(f"prompts file '{path}', line {n}: no text field '{column}' (set teacher.prompt_column)")
        prompts.append(row[column])
    return prompts


def json_lines(text: str, where: str) -> list[tuple[int, dict]]:
    """The JSON objects of a ``.jsonl`` text with their line numbers (blank lines skipped); else one line naming ``where``."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise UserError(f"{where}, line {n}: not a JSON object")
        rows.append((n, row))
    return rows


def _parquet_column(file: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"prompts file '{file}' is .parquet, which needs pyarrow (pip install pyarrow); or give .txt, .jsonl or .csv") from None
    names = pq.read_schema(file).names
    if column not in names:
        raise UserError(f"prompts file '{file}' has no column '{column}' (columns: {', '.join(names)}); set teacher.prompt_column")
    return [str(v) if v is not None else "" for v in pq.read_table(file, columns=[column]).column(column).to_pylist()]


def prompts_digest(prompts: list[str]) -> str:
    return sha256_digest(p.encode("utf-8") + b"\0" for p in prompts)


class PromptTable:
    """``P + 1`` rows of one embedding (``embeddings`` (L, D) or ``pooled`` (D,)) stored in shards on disk:
    ``table[index]`` gathers rows ``index`` (a long tensor) onto ``index.device``; row ``P`` is the null prompt's.

    Only the gathered rows are read (the shards are memory-mapped); a copy of a module holding the table shares it.
    ``extra`` (:meth:`extend`): another table whose prompts follow the null row, at ``P + 1 + j`` (the captions of
    real images, for a conditional discriminator); ``len`` and ``shape`` count the run's own prompts only.
    """

    def __init__(self, folder: Path, key: str = "embeddings") -> None:
        self.folder, self.key = Path(folder), key
        index = json.loads((self.folder / INDEX_FILE).read_text())
        self.count, self.shard_size = int(index["count"]), int(index["shard_size"])
        self.row_shape = tuple(index["shapes"][key])
        self.fingerprint = index["key"] + ":" + key
        from safetensors.torch import load_file

        self.null = load_file(str(self.folder / NULL_FILE))[key]
        self._files: dict[int, object] = {}
        self.extra: Optional["PromptTable"] = None

    def extend(self, extra: "PromptTable") -> None:
        """Make ``extra``'s prompts rows ``P + 1 ..`` of this table (its null row is not used)."""
        if extra.row_shape != self.row_shape:
            raise ValueError(f"extra rows of shape {extra.row_shape} for a table of {self.row_shape}")
        self.extra = extra

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count + 1, *self.row_shape)

    def __len__(self) -> int:
        return self.count + 1

    def _shard(self, k: int):
        handle = self._files.get(k)
        if handle is None:
            from safetensors import safe_open

            handle = self._files[k] = safe_open(str(self.folder / shard_name(k)), framework="pt")
        return handle

    def __getitem__(self, index: Tensor) -> Tensor:
        flat = torch.as_tensor(index).reshape(-1).tolist()
        rows = []
        for i in flat:
            rows.append(self._row(i))
        out = torch.stack(rows) if rows else self.null.new_zeros((0, *self.row_shape))
        device = index.device if isinstance(index, Tensor) else torch.device("cpu")
        return out.reshape(*torch.as_tensor(index).shape, *self.row_shape).to(device)

    def _row(self, i: int) -> Tensor:
        extra = self.extra.count if self.extra is not None else 0
        if not 0 <= i <= self.count + extra:
            raise IndexError(f"prompt index {i} outside 0..{self.count + extra}")
        if i == self.count:
            return self.null
        if i > self.count:
            return self.extra._row(i - self.count - 1)
        k, r = divmod(i, self.shard_size)
        return self._shard(k).get_slice(self.key)[r : r + 1][0]

    def __deepcopy__(self, memo) -> "PromptTable":
        return self  # read-only: copies of a denoiser share it

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _shard_complete(path: Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("embeddings").get_shape()[0] == rows
    except Exception:
        return False


def prompt_tables(folder: Path, prompts: list[str], negative: str, fingerprint: str,
                  encoder: Callable[[], Callable[[list[str]], dict[str, Tensor]]], *, batch_size: int = 64,
                  shard_size: int = 1024, progress: bool = True, log: Callable[[str], None] = lambda m: None,
                  zero_null: bool = False, what: str = "prompt embeddings") -> dict[str, PromptTable]:
    """The cached embeddings of ``prompts`` (``{"embeddings": table, "pooled": table, ...}`` as the encoder gives them).

    ``folder`` is the cache root; the cache lives in a subfolder named by ``fingerprint`` (the encoders'), the
    prompts and ``negative``. ``encoder()`` loads the encoders and returns ``encode(list of prompts) -> {name:
    (B, ...)}``; it is called only when some shard is missing, and dropped when all are written. ``zero_null``: the
    unconditional branch is zeros shaped like ``negative``'s embedding (SDXL's ``force_zeros_for_empty_prompt``).
    """
    key = stable_hash("prompt-cache-v1", fingerprint, prompts_digest(prompts), negative, zero_null, shard_size)
    cache = Path(folder) / key
    if not (cache / INDEX_FILE).is_file():
        with fill_lock(cache, log):  # the ranks of a run (or runs sharing the cache) fill it once
            if not (cache / INDEX_FILE).is_file():
                _fill(cache, key, prompts, negative, encoder, batch_size, shard_size, progress, log, zero_null, what)
    names = json.loads((cache / INDEX_FILE).read_text())["shapes"]
    return {name: PromptTable(cache, name) for name in names}


def _fill(cache: Path, key: str, prompts: list[str], negative: str, encoder, batch_size: int, shard_size: int,
          progress: bool, log: Callable[[str], None], zero_null: bool, what: str) -> None:
    """Write the shards :func:`prompt_tables` misses, the null row and the index last (its presence: complete)."""
    cache.mkdir(parents=True, exist_ok=True)
    shards = (len(prompts) + shard_size - 1) // shard_size
    todo = [k for k in range(shards) if not _shard_complete(cache / shard_name(k), min(shard_size, len(prompts) - k * shard_size))]
    encode = encoder()
    null = {name: torch.zeros_like(t[0]) if zero_null else t[0] for name, t in encode([negative]).items()}
    save_tensors(cache / NULL_FILE, null)
    done = len(prompts) - sum(min(shard_size, len(prompts) - k * shard_size) for k in todo)
    if done:
        log(f"{what}: {done} of {len(prompts)} already cached in {cache}")
    from scoredistill.progress import progress as make_progress

    with make_progress(progress) as bar:
        task = bar.add_task(what, total=len(prompts), completed=done)
        for k in todo:
            part = prompts[k * shard_size : (k + 1) * shard_size]
            out: dict[str, list[Tensor]] = {}
            for b in range(0, len(part), batch_size):
                for name, t in encode(part[b : b + batch_size]).items():
                    out.setdefault(name, []).append(t.detach().cpu())
                bar.advance(task, min(batch_size, len(part) - b))
            save_tensors(cache / shard_name(k), {name: torch.cat(ts).contiguous() for name, ts in out.items()})
    del encode
    write_json(cache / INDEX_FILE, {"key": key, "count": len(prompts), "shard_size": shard_size, "negative_prompt": negative,
                                    "shapes": {name: list(t.shape) for name, t in null.items()}})
    gc.collect()  # the encoders leave memory here


def attach_prompt_cache(den, config, dtype: torch.dtype, ctx=None) -> list[str]:
    """Read ``teacher.prompts`` (``config``: the ``diffusers`` teacher's), embed them with the pipeline's own encoders in
    ``dtype`` into the prompt cache (once), and condition the denoiser ``den`` on the cache's lazy tables. Returns the
    prompts."""
    if den.conditioning != "text":
        raise UserError(f"--prompts (teacher.prompts) was given but the teacher {type(den.unet).__name__} is not text-conditional "
                        f"(conditioning: {den.conditioning}); drop --prompts")
    prompts = read_prompts(config.prompts, config.prompt_column)
    tables = _cached_tables(prompts, config, dtype, ctx)
    den.set_prompt_table(tables["embeddings"], tables.get("pooled"))
    return prompts


def attach_caption_cache(den, config, dtype: torch.dtype, captions: list[str], ctx=None) -> int:
    """Embed the captions of real images like prompts (the pipeline's own encoders, the same cache) and append them to
    ``den``'s prompt tables after the null row (:meth:`PromptTable.extend`): caption ``j`` is condition ``P + 1 + j``.
    Returns ``P + 1``. Needs the prompt cache (``--prompts``), whose tables the fake score's copies share."""
    if not isinstance(den.prompt_embeddings, PromptTable):
        raise UserError("captioned real images (teacher.data) are embedded into the prompt cache: give the prompts with "
                        "--prompts FILE (teacher.prompts), not teacher.embeddings")
    tables = _cached_tables(captions, config, dtype, ctx, what="caption embeddings")
    den.prompt_embeddings.extend(tables["embeddings"])
    if isinstance(den.prompt_pooled, PromptTable) and "pooled" in tables:
        den.prompt_pooled.extend(tables["pooled"])
    return den.prompt_embeddings.count + 1


def _cached_tables(texts: list[str], config, dtype: torch.dtype, ctx, what: str = "prompt embeddings") -> dict[str, PromptTable]:
    """:func:`prompt_tables` of ``texts`` with the encoders of the pipeline ``config.path`` (one-line errors without them)."""
    from scoredistill.images.loading import resolve_model_folder
    from scoredistill.images.text_encoders import prompt_encoder
    from scoredistill.roles import default_cache_dir

    folder = resolve_model_folder(config.path)
    encoder = prompt_encoder(folder)
    if encoder is None:
        raise UserError(f"--prompts needs the pipeline's text encoders, but '{config.path}' is not a pipeline folder with them "
                        "(model_index.json, tokenizer/, text_encoder/); give teacher.embeddings=FILE.safetensors instead")
    if config.max_sequence_length is not None:
        if not hasattr(encoder, "max_sequence_length"):
            raise UserError(f"teacher.max_sequence_length is T5's token count (SD3, Flux); this pipeline's prompts are encoded by {encoder.name}")
        encoder.max_sequence_length = config.max_sequence_length
    device = ctx.device if ctx is not None else torch.device("cpu")
    cache_root = (ctx.cache_dir if ctx is not None else default_cache_dir()) / "prompt_embeddings"
    progress = ctx.extra.get("progress", True) if ctx is not None else True
    return prompt_tables(cache_root, texts, config.negative_prompt, encoder.fingerprint() + config.dtype,
                         lambda: encoder.load(dtype, device), batch_size=config.text_batch_size, progress=progress,
                         log=print_log, zero_null=encoder.zero_null(config.negative_prompt), what=what)


def print_log(msg: str) -> None:
    print(f"scoredistill: {msg}", file=sys.stderr)
