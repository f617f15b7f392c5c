"""Peak memory of the prompt-embedding cache against the number of prompts (a tiny SD1.5-shaped pipeline's CLIP).

For each prompt count, a fresh process fills the cache (the pipeline's own encoder, in batches, into safetensors
shards) and then reads random batches of rows by index, as training does; it reports its peak RSS after each
phase, the fill time and the cache's size on disk. Flat peaks mean the prompt table is never held in memory.

    python benchmarks/prompt_cache.py --counts 1000 10000 100000 --out benchmarks/results/prompt_cache_rss.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["a", "the", "red", "cat", "dog", "big", "small", "photo", "of", "on", "grass", "blue", "sky"]


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts from a small vocabulary (the tiny tokenizer knows their letters)."""
    out = []
    for k in range(n):
        words, j = [], k
        while True:
            words.append(WORDS[j % len(WORDS)])
            j //= len(WORDS)
            if j == 0:
                break
        out.append(" ".join(words))
    return out


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb(field: str = "VmRSS") -> float:
    """The resident memory now (Linux ``VmRSS``; ``RssAnon``: the process's own, ``RssFile``: mapped file pages, such
    as the cache's shards read through mmap, which the kernel drops under memory pressure)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(count: int, pipeline: Path, cache: Path, batches: int, batch_size: int) -> dict:
    """One process's measurement (see the module docstring)."""
    import torch

    from scoredistill.images.prompts import prompt_tables
    from scoredistill.images.text_encoders import prompt_encoder

    torch.set_num_threads(1)
    encoder = prompt_encoder(pipeline)
    start_mb, start_rss, start_anon = peak_mb(), rss_mb(), rss_mb("RssAnon")
    t0 = time.perf_counter()
    tables = prompt_tables(cache, prompts(count), "", encoder.fingerprint(), lambda: encoder.load(torch.float32, torch.device("cpu")),
                           batch_size=256, progress=False)
    fill_s = time.perf_counter() - t0
    fill_mb, fill_rss = peak_mb(), rss_mb()
    table = tables["embeddings"]
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(batches):
        rows = table[torch.randint(0, count + 1, (batch_size,), generator=g)]
    read_ms = (time.perf_counter() - t0) / batches * 1e3
    disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    return {"prompts": count, "row_shape": list(table.row_shape), "fill_seconds": round(fill_s, 2),
            "table_mb_if_held": round(count * table.row_shape[0] * table.row_shape[1] * 4 / 2**20, 1),
            "rss_mb_before_fill": round(start_rss, 1), "rss_mb_after_fill": round(fill_rss, 1), "rss_mb_after_reads": round(rss_mb(), 1),
            "anon_rss_mb_before_fill": round(start_anon, 1), "anon_rss_mb_after_reads": round(rss_mb("RssAnon"), 1),
            "file_rss_mb_after_reads": round(rss_mb("RssFile"), 1),
            "peak_rss_mb_before_fill": round(start_mb, 1), "peak_rss_mb_after_fill": round(fill_mb, 1),
            "peak_rss_mb_after_reads": round(peak_mb(), 1), "read_ms_per_batch": round(read_ms, 3),
            "batch_size": batch_size, "batch_shape": list(rows.shape), "cache_mb_on_disk": round(disk / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--batches", type=int, default=200, help="random batches read after the fill")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # (a child process: one count)
    p.add_argument("--pipeline", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        with tempfile.TemporaryDirectory() as cache:
            print(json.dumps(measure(args.one, args.pipeline, Path(cache), args.batches, args.batch_size)))
        return 0
    from scoredistill.images.testing import tiny_sd_pipeline_folder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = tiny_sd_pipeline_folder(Path(tmp) / "pipe", text_dim=64, max_length=16)  # 4 KiB a prompt
        for count in args.counts:
            cmd = [sys.executable, __file__, "--one", str(count), "--pipeline", str(pipeline), "--batches", str(args.batches),
                   "--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                return proc.returncode
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{count:>8} prompts ({r['table_mb_if_held']} MB as a table)  fill {r['fill_seconds']:>6.1f} s  RSS "
                  f"{r['rss_mb_before_fill']:.0f} -> {r['rss_mb_after_fill']:.0f} -> {r['rss_mb_after_reads']:.0f} MB (before fill, "
                  f"after, after reads; anonymous {r['anon_rss_mb_before_fill']:.0f} -> {r['anon_rss_mb_after_reads']:.0f} MB, "
                  f"mapped files {r['file_rss_mb_after_reads']:.0f} MB), peak {r['peak_rss_mb_after_reads']:.0f} MB  read {r['read_ms_per_batch']:.2f} ms/batch  "
                  f"disk {r['cache_mb_on_disk']} MB", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": f"{os.cpu_count()}-core CPU, {platform.machine()}",
                                        "date": time.strftime("%Y-%m-%d"), "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
