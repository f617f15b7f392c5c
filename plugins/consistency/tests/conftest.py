"""The consistency plugin's tests: an isolated cache, one thread, the real plugin manager."""

from __future__ import annotations

import pytest
import torch

from scoredistill.plugins import Hooks, make_plugin_manager


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture
def hooks() -> Hooks:
    return Hooks(make_plugin_manager())
