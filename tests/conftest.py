import os

import pytest
import torch

# two cores: keep tests from oversubscribing when pytest and torch both spawn threads
torch.set_num_threads(int(os.environ.get("EDGEKD_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def digits32():
    from edgekd.data.datamodule import load_data

    return load_data("digits", resolution=32, channels=3, seed=0)


def pytest_collection_modifyitems(config, items):
    """CUDA tests run only when asked for (`pytest -m cuda` on a GPU machine): CI and these 2-core machines have
    no GPU, and there they would fail, not skip."""
    if "cuda" in (config.option.markexpr or ""):
        return
    deselected = [item for item in items if "cuda" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "cuda" not in item.keywords]
