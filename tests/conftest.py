"""Pytest fixtures and hooks only; shared test code lives in helpers.py."""

from __future__ import annotations

import pytest
from helpers import reset_accelerate


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """Accelerate keeps process-wide singletons; start every test from a clean slate."""
    yield
    reset_accelerate()
