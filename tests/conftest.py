import os

import pytest
import torch

# two cores: keep tests from oversubscribing when pytest and torch both spawn threads
torch.set_num_threads(int(os.environ.get("EDGEKD_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def digits32():
    from edgekd.data.datamodule import load_data

    return load_data("digits", resolution=32, channels=3, seed=0)
