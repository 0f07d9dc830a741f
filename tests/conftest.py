"""Session-wide fixtures. Tiny random reference checkpoints are built once per test
session by the fixture modules in tests/refs/ (one per component)."""
import pathlib

import pytest
import torch

pytest_plugins = [
    "tests.refs.clip",
    "tests.refs.prior",
    "tests.refs.unet",
    "tests.refs.movq",
    "tests.refs.prior_pipeline",
    "tests.refs.decoder_pipeline",
]

DATA = pathlib.Path(__file__).parent / "data"

# One thread per test process: `pytest -n 2` on 2 cores is then 2 threads in all (oversubscribed
# threads make tiny models many times slower on a loaded machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference_configs() -> pathlib.Path:
    """Folder holding the real hub configs of the four Kandinsky 2.2 repos."""
    return DATA
