import pytest
import torch

# Small tensors: one intra-op thread is as fast as two, and it does not collapse when other processes
# share the cores (OpenMP workers spin-wait; two threads on a busy 2-core machine ran 50x slower).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist1d_dir(tmp_path_factory):
    """A data directory holding the real MNIST-1D cache, generated once per test session."""
    from batchgap.data import load_dataset

    path = tmp_path_factory.mktemp("data")
    load_dataset("mnist1d", data_dir=path)
    return path
