import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny():
    from remix.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def default_base():
    """The embedded SmolLM2-135M-Instruct (converted once into the cache, < 2 s after)."""
    from remix.models import load_base

    return load_base()
