"""Test-wide settings. The environment variables must be set before transformers, diffusers or triton
are imported anywhere, which is why they live here and not in a fixture."""

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through the interpreter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# builtin synthetic datasets and other caches go to a throwaway folder, not the user's ~/.cache
os.environ.setdefault("DIFFALIGN_CACHE", tempfile.mkdtemp(prefix="diffalign-test-cache-"))


@pytest.fixture
def one_torch_thread():
    """For tests of many small torch ops: with torch's default threads on a busy 2-core machine they were
    measured 40x slower. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
