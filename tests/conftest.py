"""Shared test setup: deterministic, small, CPU-only."""
import os

import pytest
import torch

# 2 shared cores: keep each test process on a fixed, small thread count so timings and results are stable.
torch.set_num_threads(int(os.environ.get("TIMETUNER_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
