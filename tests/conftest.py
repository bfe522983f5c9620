"""Tests import the top-level scripts (`import dpo`, ...) from the repository root."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The suite runs on the CPU on every machine, GPU machines included: its exact checks (two runs write
# the same log, a shared row equals a fresh evaluation) hold there, while on CUDA the atomic adds of
# backward kernels make two runs differ in the last bits. The scripts and the command lines they start
# see no GPU; tests/test_cuda.py gives the GPU back to the command lines it starts.
VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny models run faster on one thread, and the command lines the tests start share the CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "core: the core tier (losses, weights, the gather equals the "
                                       "definition, each stage end to end at a tiny size): "
                                       "python -m pytest -q -m core")
    config.addinivalue_line("markers", "before_the_rest: starts command lines (on the session's runner, or "
                                       "processes of their own) whose checks are marked after_the_rest")
    config.addinivalue_line("markers", "after_the_rest: checks of command lines started before the rest; "
                                       "they run last: those command lines run while the other tests do")


def pytest_collection_modifyitems(items):
    first = [item for item in items if item.get_closest_marker("before_the_rest")]
    last = [item for item in items if item.get_closest_marker("after_the_rest")]
    items[:] = first + [item for item in items if item not in first and item not in last] + last
