import pytest


@pytest.fixture(scope="session")
def mnist1d_dir(tmp_path_factory):
    """A data directory holding the real MNIST-1D cache, generated once per test session."""
    from batchgap.data import load_dataset

    path = tmp_path_factory.mktemp("data")
    load_dataset("mnist1d", data_dir=path)
    return path
