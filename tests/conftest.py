"""Shared fixtures: tiny ACE-Step checkpoints built once per session, the shared test corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two threads on two busy cores run ~50x slower than one.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

# CI has the corpus beside the checkout; ACESTEP_CORPUS points elsewhere.
CORPUS = Path(os.environ.get("ACESTEP_CORPUS") or Path(__file__).resolve().parents[1].parent / "shared" / "corpus")


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"test corpus missing at {CORPUS} (CI must provide ../shared/corpus)")
        pytest.skip(f"test corpus not found at {CORPUS}; clone beside ../shared to run corpus tests")
    return CORPUS


def _tiny(tmp_path_factory, variant: str) -> Path:
    from acestep_dist.families.ace_step_15.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{variant}") / "model", variant=variant)


@pytest.fixture(scope="session")
def tiny_turbo(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "turbo")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "base")


@pytest.fixture(scope="session")
def tiny_xl(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "xl-sft")
