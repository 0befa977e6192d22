import socket
import sys
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Two cores on CI, one test process per core (pytest -n 2): one thread each, for torch and for the
# BLAS under numpy and scipy, which would otherwise start a thread per core in every process.
torch.set_num_threads(1)
threadpool_limits(1)

FIXTURES = ROOT / "tests" / "fixtures"


def free_port() -> int:
    """A TCP port on the loopback that is free now, for a test's process-group rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fixtures_dir() -> Path:
    """The folder of reference outputs of the authors' release (tests/fixtures/README.md)."""
    return FIXTURES
