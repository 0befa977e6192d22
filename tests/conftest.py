import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Two cores on CI: one thread per test process keeps timings predictable.
torch.set_num_threads(1)

FIXTURES = ROOT.parent / "shared" / "fixtures"


def free_port() -> int:
    """A TCP port on the loopback that is free now, for a test's process-group rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fixtures_dir() -> Path:
    """The reference fixtures folder; tests that need it skip in a clone without ../shared."""
    if not (FIXTURES / "official_unet_small.pt").exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (they live beside the repository, not in it)")
    return FIXTURES
