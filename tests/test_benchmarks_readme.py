"""benchmarks/README.md is a results page: every results file is listed with its machine and date, and every
results file that the page, the scripts or the docs name exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def test_every_results_file_is_listed_with_machine_and_date():
    text = (BENCH / "README.md").read_text()
    rows = {m[1]: m[0] for m in re.finditer(r"^\| `([\w.]+)` \|.*\| (\d{4}-\d\d-\d\d[^|]*) \|$", text, flags=re.MULTILINE)}
    assert sorted(rows) == sorted(p.name for p in (BENCH / "results").iterdir())


def test_every_named_results_file_exists():
    named = set()
    for path in [BENCH / "README.md", *BENCH.glob("*.py"), *BENCH.glob("*.sh"), *(ROOT / "docs").rglob("*.md"),
                 *(ROOT / "scoredistill").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        named |= set(re.findall(r"\bresults/([\w.-]+\.(?:jsonl|json|md|txt))\b", path.read_text()))
    scripts_write = {"overhead_cpu.json", "digits_fid_by_seed.jsonl", "cuda_graph_vs_eager.json", "gpu_dmd_throughput.json",
                     "scaling_time_memory.json"}  # default --out of the scripts (a new measurement lands there)
    docs_results = {p.name for p in (ROOT / "docs" / "results").iterdir()}
    missing = named - scripts_write - docs_results - {p.name for p in (BENCH / "results").iterdir()}
    assert not missing, missing
