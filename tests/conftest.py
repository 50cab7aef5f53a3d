import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may come from a hub, in tests or defaults
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# where diffusers copies a folder's code under trust_remote_code=True: a temporary folder, not ~/.cache
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="diffunet-tests-hf-modules-"))

import pytest
import torch

from diffunet import UNet


def tiny(**overrides) -> UNet:
    """A UNet small enough that one forward takes milliseconds on a CPU."""
    kwargs = dict(sample_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  norm_groups=4, attention_resolutions=(8,), num_heads=2)
    kwargs.update(overrides)
    return UNet(**kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    # accelerate keeps one process-wide state; each test's run builds its own (precision, processes)
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def one_thread():
    """Small networks: a second OpenMP thread only adds spinning on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
