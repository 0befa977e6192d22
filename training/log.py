"""What a run prints and records: the log, memory figures, and warnings no user can act on."""

import resource
import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm


class Log:
    """Rank 0 prints (above the progress bar) and appends to OUTPUT_DIR/log.txt; other ranks stay quiet."""

    def __init__(self, enabled: bool, path: Path | None):
        self.enabled, self.path = enabled, path

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory, or the process's peak resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def quiet_jit_deprecation() -> None:
    """Hide torch's warning that torch.jit.script is deprecated: its forward-mode AD builds its own
    decompositions with it, which no user can act on. Any category: torch 2.11 raises it as a
    DeprecationWarning, 2.14 as a FutureWarning."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
