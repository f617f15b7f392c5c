"""Shared fixtures: an isolated cache, the real plugin manager, small mixtures."""

from __future__ import annotations

import pytest
import torch

from scoredistill.plugins import Hooks, make_plugin_manager


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SCOREDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    # one thread per test worker (pytest -n 2 on 2 cores), in this process and in the CLIs it starts:
    # presets that leave runtime.num_threads to torch would otherwise take every core in each worker
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture
def hooks() -> Hooks:
    return Hooks(make_plugin_manager())


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A tiny digits teacher (a few training steps), trained once per test session: set it as the cached digits teacher
    with :func:`scoredistill.images.testing.run_on_tiny_digits`."""
    from scoredistill.images.testing import tiny_teacher_folder

    return tiny_teacher_folder(tmp_path_factory.mktemp("teacher") / "digits")
