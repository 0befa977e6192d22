"""Checkpoints: atomic writes (of every file we save), background writes, safe load (ours and the authors').

The authors' files hold `{"model", "optimizer", "lr_schedule", "epoch", "args"}` with `args` an
argparse.Namespace and no network config; training/build.py's load_network rebuilds a network from
them (models/networks.py infers its config from the weights).
"""
import argparse
import os
import threading
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from utils.errors import UserFileError

# Types besides tensors and builtins that a checkpoint may hold: the release stores its arguments
# as an argparse.Namespace. Nothing else is unpickled.
SAFE_GLOBALS = [argparse.Namespace]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *, what: str = "file") -> None:
    """Write `path` through `write(f)` (f a binary file) so that it always holds either the old or the new file.

    The bytes go to a temporary file in the same folder, are flushed to disk, then renamed over
    `path` (a rename within a folder is atomic), and the folder is synced so the rename lasts. On
    any failure the temporary file is removed and an existing file is left as it was. Raises
    UserFileError (a RuntimeError) naming `what` and `path` when the OS refuses (unwritable folder,
    full disk), RuntimeError when `write` fails otherwise.
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "xb")
    except OSError as e:
        raise UserFileError(f"cannot write {what} {path}: the folder {folder} is not writable "
                            f"({type(e).__name__}: {e}); choose another output folder") from e
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):
            error = UserFileError if isinstance(e, OSError) else RuntimeError
            raise error(f"writing {what} {path} failed ({type(e).__name__}: {e}); "
                        f"any previous file at that path is unchanged") from e
        raise
    _fsync_folder(folder)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save `state` to `path` with atomic_write: a crash never leaves half a checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f), what="checkpoint")


class BackgroundSaver:
    """Checkpoints written by a background thread, one at a time, so that training goes on meanwhile.

    save(state, paths) copies every tensor of `state` to the CPU before it returns (the files hold
    the state of that moment, whatever the training does next), then a thread writes each path in
    turn with save_checkpoint (atomic: a file is replaced only once its successor is complete). A
    save first waits for the previous write. An error of a write is raised in the caller's thread
    by the next save() or wait(); call wait() before the process ends.
    """

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, state: dict, paths: list[str | Path]) -> None:
        self.wait()
        copy = cpu_copy(state)
        # Not a daemon: the interpreter waits for a write in progress even on an unexpected exit.
        self.thread = threading.Thread(target=self._write, args=(copy, [Path(p) for p in paths]),
                                       name="checkpoint-writer")
        self.thread.start()

    def _write(self, state: dict, paths: list[Path]) -> None:
        try:
            for path in paths:
                save_checkpoint(state, path)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self.error = e

    def wait(self) -> None:
        """Return once the pending write is on disk; raise its error, if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None:
            raise error


def cpu_copy(obj):
    """`obj` (nested dicts, lists, tuples) with every tensor replaced by a copy in CPU memory."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copy = type(obj)((k, cpu_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module's state_dict: the versions load_state_dict reads
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); silently skipped where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, trusted: bool = False) -> dict:
    """Load a checkpoint dict written by save_checkpoint or by the authors' release.

    Uses torch.load(weights_only=True), which only rebuilds tensors, builtins and SAFE_GLOBALS.
    trusted=True switches to full unpickling, which can run arbitrary code: only for files you made.
    Raises FileNotFoundError if missing, UserFileError (a RuntimeError) naming the file if it is damaged or not
    a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path passed to --resume / --ckpt")
    try:
        if trusted:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if "weights only load failed" in str(e).lower() and "unsupported global" in str(e).lower():
            raise UserFileError(f"checkpoint {path} contains Python objects that are not loaded for safety "
                               f"({str(e).splitlines()[0]} ...); if you made this file yourself, load it with "
                               f"load_checkpoint(..., trusted=True)") from e
        raise UserFileError(f"checkpoint {path} is truncated or not a checkpoint ({type(e).__name__}); "
                            f"delete it or pass another file to --resume / --ckpt") from e
    if not isinstance(ckpt, dict):
        raise UserFileError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict; "
                            f"delete it or pass another file to --resume / --ckpt")
    return ckpt


def model_state(ckpt: dict) -> dict:
    """The networks' weights of a checkpoint dict ("net.*", "net_ema.*", ...): ckpt["model"], or the dict itself."""
    return ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt


def available_networks(ckpt: dict) -> list[str]:
    """Names of the networks stored in a checkpoint: ["net", "net_ema", "net_ema1", ...]."""
    names = {k.split(".", 1)[0] for k in model_state(ckpt) if "." in k}
    return sorted(names, key=lambda n: (len(n), n))


def checkpoint_dataset(ckpt: dict) -> str | None:
    """Training dataset recorded in a checkpoint (ours: config['dataset']; the authors': args.dataset)."""
    config = ckpt.get("config")
    if isinstance(config, dict) and config.get("dataset"):
        return str(config["dataset"])
    return getattr(ckpt.get("args"), "dataset", None)


def ema_decays(ckpt: dict) -> dict:
    """{network name: EMA decay} as far as the checkpoint records them (ours: ema_decays; the authors': args)."""
    if isinstance(ckpt.get("ema_decays"), dict):
        return dict(ckpt["ema_decays"])
    args = ckpt.get("args")
    if args is not None and hasattr(args, "ema_decay"):
        extra = list(getattr(args, "ema_decays", []))
        return {name: d for name, d in zip(["net_ema"] + [f"net_ema{i + 1}" for i in range(len(extra))],
                                          [args.ema_decay] + extra)}
    return {}
