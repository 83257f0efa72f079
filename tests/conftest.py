"""The suite runs spread over the CPU cores (pytest-xdist, `-n auto` in pytest.ini). Each worker
then trains with one thread, and so do the commands it starts: two workers of two threads on a
2-core machine fight for the cores (OpenMP threads spin while they wait) and run slower than one."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # the subprocesses' torch
    import torch

    torch.set_num_threads(1)
