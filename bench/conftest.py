"""Benchmarks run on one thread so that numbers are comparable across machines and runs."""

import torch

torch.set_num_threads(1)
