"""What a run needs around the training step: the log, stop requests, the output
folder, the training images, memory figures and precision settings."""

import contextlib
import os
import resource
import signal
import socket
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from utils import data as data_utils
from utils.distributed import DistEnv, barrier
from utils.errors import UserFileError

PRECISIONS = ("tf32", "fp32", "bf16")


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


# Steps between two stop polls of a multi-process run: every rank takes part in each poll (a host
# barrier through gloo), so all stop at the same step, a multiple of this. 20 CIFAR-10 steps are
# a few seconds of training; a single process checks its flag every step, which costs nothing.
STOP_POLL_EVERY = 20
# Seconds a signalled process waits for its next poll before it exits on its own. A rank stuck in
# a collective because another one died would otherwise wait for torchrun's kill; the polls are a
# few seconds apart, and only compilation or an evaluation (whose checkpoint is already written)
# keeps the loop from them longer.
STOP_GRACE_S = 60.0


class StopRequest:
    """SIGTERM / SIGINT ask the loop to save and stop at the next poll (requested(step)).

    The handler only sets a flag and starts a timer: if no poll sees the request within
    ``grace_s`` seconds, the process prints an `error:` line and exits at once (os._exit). With
    several processes the flag is combined over ranks through a gloo group on CPU tensors every
    STOP_POLL_EVERY steps: no device sync, and every rank stops at the same step even if only some
    received the signal. A second Ctrl-C aborts at once.
    """

    def __init__(self, env: DistEnv, *, grace_s: float = STOP_GRACE_S):
        self.signum = None
        self.grace_s = grace_s
        self.timer = None
        self.group = dist.new_group(backend="gloo") if env.world_size > 1 else None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        self.timer = threading.Timer(self.grace_s, self._give_up, args=(signum,))
        self.timer.daemon = True
        self.timer.start()

    def _give_up(self, signum) -> None:
        print(f"error: no step boundary reached {self.grace_s:g} s after {signal.Signals(signum).name} (another "
              f"process may have failed, or compilation or an evaluation is running); exiting without saving, "
              f"the last checkpoint is kept", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def requested(self, step: int) -> bool:
        """Whether to stop before `step`: polled on all ranks when `step` is a multiple of STOP_POLL_EVERY."""
        if self.group is None:
            signum = self.signum or 0
        elif step % STOP_POLL_EVERY:
            return False
        else:
            flag = torch.tensor([self.signum or 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            signum = int(flag.item())
            if signum and self.signum is None:  # asked on another rank
                self.signum = signum
        if signum:
            self._cancel_timer()  # this step boundary is reached: the loop saves and returns
        return signum != 0

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def restore(self) -> None:
        """Put back the previous handlers; a pending timer is cancelled, the loop being over."""
        self._cancel_timer()
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_output_dir(out: Path) -> None:
    """Create the folder and prove it is writable before any work."""
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserFileError(f"cannot write to --output_dir {out} ({type(e).__name__}: {e}); "
                        f"choose a writable folder") from e


def load_training_images(dataset: str, *, data_path: str, env: DistEnv) -> torch.Tensor:
    """uint8 [N, C, H, W]; a missing dataset fails within seconds when offline (FileNotFoundError).

    One process per node reads (and, online, downloads) first: torchvision writes the archive in
    place, so concurrent downloads into one folder would corrupt it.
    """
    if env.local_rank != 0:
        barrier()
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable mirror must not hang the start of a job
    try:
        images = data_utils.load_dataset(dataset, data_path=data_path, train=True)
    finally:
        socket.setdefaulttimeout(old)
    if env.local_rank == 0:
        barrier()
    return images


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


def apply_precision(precision: str) -> None:
    """CUDA's float32 matmul and convolution settings for --precision (no effect on CPU).

    bf16 keeps TF32 for what runs outside autocast (the loss arithmetic is elementwise).
    """
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


@contextlib.contextmanager
def precision_settings(precision: str):
    """apply_precision(precision) for a block, then the settings that were in force before."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    apply_precision(precision)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
