import os

import pytest
import torch

# Tests are CPU-only and small; a couple of threads keeps them stable on a 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# spawned workers and torchrun ranks inherit this: a rank that aborts (SIGABRT, SIGSEGV) prints the
# Python stack of every thread to its stderr, which pytest shows with the failure
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
