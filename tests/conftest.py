"""Pytest fixtures and hooks only; shared test code lives in helpers.py."""

from __future__ import annotations

import gc
import os

# The tests run in two pytest processes (pyproject.toml's addopts), and many launch training
# processes of their own: more threads than cores. OpenMP threads that spin while they wait then
# take the cores from the ones with work (the fast tests took 228 s instead of 54 s on 2 cores).
# Set before torch is imported here, so every launched process inherits it too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import reset_accelerate  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """Accelerate keeps process-wide singletons; start every test from a clean slate. A process
    group a test left in this process is destroyed and collected here (last, after the test's
    own fixtures): a DataLoader worker that a later test forks would otherwise inherit it and can
    hang at its exit in the group's destructor. (Collected only then: a collection after every
    test costs the suite minutes.)"""
    yield
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if group:
        torch.distributed.destroy_process_group()
    reset_accelerate()
    if group:
        gc.collect()
