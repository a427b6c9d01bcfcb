import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


# Tests that take the `device` fixture run on the CPU and, where a CUDA device is present, again on it
# (the CUDA case skips itself without one; select it alone with -m cuda).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                    reason="needs a CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def tiny():
    from remix.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def default_base():
    """The embedded SmolLM2-135M-Instruct (converted once into the cache, < 2 s after)."""
    from remix.models import load_base

    return load_base()


# A server of the default base (no adapters) for the modules that talk to it over HTTP (tools, the Responses API); a
# module with servers of its own (adapters, keys) defines its own `server` and `client`, which take precedence.
@pytest.fixture(scope="module")
def server():
    from tests.helpers import LiveServer

    srv = LiveServer(["--max-model-len", "2048", "--max-num-seqs", "8"])
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
