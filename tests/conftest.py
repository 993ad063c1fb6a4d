"""Shared test configuration."""

import os

import torch

# Keep tests deterministic and friendly to a 2-core CI machine.
torch.set_num_threads(int(os.environ.get("JDOPTIM_TEST_THREADS", "1")))
