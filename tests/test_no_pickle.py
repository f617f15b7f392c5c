"""No unrestricted pickle load anywhere: a file that anyone can write into the cache (a shared cache on a
cluster) must never run code on the next run (torch.load without weights_only=True, pickle, dill, joblib)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from scoredistill.images.testing import tiny_teacher_settings
from scoredistill.images.training import STATE_FILE, train_digits_teacher

ROOT = Path(__file__).resolve().parents[1]
#: everything in the repository that runs: the package, the plugins, the scripts, the benchmarks, the docs' examples
SOURCES = [ROOT / d for d in ("scoredistill", "plugins", "scripts", "benchmarks", "docs")]
UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(cPickle|dill|cloudpickle|joblib|shelve|marshal)\.(loads?|open)\("), "an unpickler"),
    (re.compile(r"\bUnpickler\("), "pickle.Unpickler"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy's allow_pickle=True"),
    (re.compile(r"\.read_pickle\("), "pandas.read_pickle"),
]


def _torch_loads_without_weights_only(text: str) -> list[str]:
    """Every ``torch.load(...)`` call (its whole argument list) that does not say ``weights_only=True``."""
    bad = []
    for m in re.finditer(r"\btorch\.load\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        call = text[m.start():i]
        if not re.search(r"weights_only\s*=\s*True", call):
            bad.append(call)
    return bad


def unsafe_loads(paths: list[Path]) -> list[str]:
    found = []
    for folder in paths:
        for path in sorted(folder.rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            rel = path.relative_to(folder.parent)
            found += [f"{rel}: {call.splitlines()[0]}" for call in _torch_loads_without_weights_only(text)]
            found += [f"{rel}: {what}" for pattern, what in UNSAFE if pattern.search(text)]
    return found


def test_the_source_tree_loads_no_pickle():
    assert unsafe_loads(SOURCES) == []


def test_the_scan_finds_each_kind_of_unsafe_load(tmp_path):
    calls = ["torch.load(p)", "torch.load(p, map_location='cpu',\n    weights_only=False)", "pickle.load(f)", "pickle.loads(b)",
             "dill.load(f)", "numpy.load(p, allow_pickle=True)", "pandas.read_pickle(p)"]
    for i, call in enumerate(calls):
        (tmp_path / f"m{i}.py").write_text(f"x = {call}\n")
    (tmp_path / "ok.py").write_text("x = torch.load(p, map_location='cpu', weights_only=True)\n")
    assert len(unsafe_loads([tmp_path])) == len(calls)


class _Planted:
    """A pickle that, when loaded without restriction, creates a file (as an attacker's payload would run a command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_planted_pickle_in_the_teachers_training_state_runs_no_code(tmp_path):
    import torch

    s = tiny_teacher_settings(train_steps=2)
    folder = tmp_path / "digits"
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"unet": _Planted(marker)}, partial / STATE_FILE)
    messages: list[str] = []
    assert train_digits_teacher(s, folder, progress=False, log=messages.append) == folder
    assert not marker.exists()
    assert "training from scratch" in messages[0], messages
