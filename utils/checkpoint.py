"""Checkpoints: atomic writes (of every file we save), safe load (ours and the authors'), rebuilding networks.

The authors' files hold `{"model", "optimizer", "lr_schedule", "epoch", "args"}` with `args` an
argparse.Namespace and no network config; `infer_unet_config` recovers the config from the weights.
"""
import argparse
import inspect
import os
import re
import threading
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from models.unet import SongUNet
from utils.errors import UserFileError, UserValueError

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


def _resolutions(keys: list[str], part: str) -> list[int]:
    """Distinct R of `{part}.{R}x{R}_...` keys, largest first."""
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{part}\.(\d+)x\1_", k))}
    return sorted(found, reverse=True)


def _filter_1d(filter_2d: torch.Tensor) -> list:
    """Recover [1,3,3,1] from the buffer outer(f, f) / sum(f)^2: row sums give f / sum(f)."""
    f = filter_2d.reshape(filter_2d.shape[-2:]).double().sum(dim=1)
    f = f / f.abs()[f.abs() > 0].min()
    rounded = f.round()
    if torch.allclose(f, rounded, atol=1e-4):
        return [int(v) for v in rounded.tolist()]
    return f.tolist()


def infer_unet_config(net_state_dict: dict) -> dict:
    """SongUNet keyword arguments that rebuild a network from its state dict (keys without "net." prefix).

    Reads the structure from key names and shapes. Not recoverable from weights: dropout and
    label_dropout (set to 0, right for evaluation) and attention at resolutions the network lacks.
    """
    sd = net_state_dict
    keys = list(sd)
    enc_res = _resolutions(keys, "enc")
    if not enc_res or f"enc.{enc_res[0]}x{enc_res[0]}_conv.weight" not in sd:
        raise UserValueError("not a SongUNet state dict: no enc.<R>x<R>_conv.weight key (pass one network's "
                         "weights, e.g. {k[4:]: v for k, v in model.items() if k.startswith('net.')})")
    res = enc_res[0]
    conv_in = sd[f"enc.{res}x{res}_conv.weight"]
    model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
    num_blocks = len({k.split(".")[1] for k in keys if re.match(rf"enc\.{res}x{res}_block\d+\.", k)})
    # The decoder has num_blocks + 1 blocks per level; the last one of each level carries attention
    # exactly where attn_resolutions asks, even when num_blocks is 0.
    channel_mult, attn_resolutions = [], []
    for r in enc_res:
        out_ch = sd[f"dec.{r}x{r}_block{num_blocks}.conv1.weight"].shape[0]
        channel_mult.append(out_ch // model_channels)
        if f"dec.{r}x{r}_block{num_blocks}.qkv.weight" in sd:
            attn_resolutions.append(r)
    layer0 = sd["map_layer0.weight"]  # [emb_channels, 2 * noise_channels]: t and h embeddings concatenated
    filters = [v for k, v in sd.items() if k.endswith("resample_filter")]
    dec_aux = _resolutions([k for k in keys if "_aux_conv" in k], "dec")
    if any("_aux_skip" in k for k in keys):
        encoder_type = "skip"
    elif any("_aux_residual" in k for k in keys):
        encoder_type = "residual"
    else:
        encoder_type = "standard"
    return dict(
        img_resolution=res,
        in_channels=in_channels,
        out_channels=sd[f"dec.{res}x{res}_aux_conv.weight"].shape[0],
        label_dim=sd["map_label.weight"].shape[1] if "map_label.weight" in sd else 0,
        augment_dim=sd["map_augment.weight"].shape[1] if "map_augment.weight" in sd else 0,
        model_channels=model_channels,
        channel_mult=channel_mult,
        channel_mult_emb=layer0.shape[0] // model_channels,
        num_blocks=num_blocks,
        attn_resolutions=attn_resolutions,
        dropout=0.0,
        label_dropout=0,
        embedding_type="fourier" if "map_noise.freqs" in sd else "positional",
        channel_mult_noise=layer0.shape[1] // (2 * model_channels),
        encoder_type=encoder_type,
        decoder_type="skip" if len(dec_aux) > 1 else "standard",
        resample_filter=_filter_1d(filters[0]) if filters else [1, 1],
    )


def _model_state(ckpt: dict) -> dict:
    return ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt


def available_networks(ckpt: dict) -> list[str]:
    """Names of the networks stored in a checkpoint: ["net", "net_ema", "net_ema1", ...]."""
    names = {k.split(".", 1)[0] for k in _model_state(ckpt) if ".enc." in k and k.endswith("_conv.weight")}
    return sorted(names, key=lambda n: (len(n), n))


def load_network(path_or_ckpt, ema: str = "net_ema", model_config: dict | None = None,
                 device: str | torch.device = "cpu") -> SongUNet:
    """Build a SongUNet in eval mode from one network of a checkpoint (ours or the authors').

    path_or_ckpt: a path or an already loaded checkpoint dict. ema: "net", "net_ema", "net_ema1", ...
    Config: ckpt["model_config"] if the file has one, else `model_config`, else inferred from the weights.
    """
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    where = "the given checkpoint" if isinstance(path_or_ckpt, dict) else str(path_or_ckpt)
    prefix = ema + "."
    state = {k[len(prefix):]: v for k, v in _model_state(ckpt).items() if k.startswith(prefix)}
    if not state:
        raise UserValueError(f"no network {ema!r} in {where}; available: {available_networks(ckpt)}")
    config = ckpt.get("model_config") or model_config or infer_unet_config(state)
    try:
        inspect.signature(SongUNet).bind(**config)
    except TypeError as e:
        raise UserValueError(f"model config {config} does not fit SongUNet ({e}); fix --model_config") from e
    net = SongUNet(**config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserFileError(f"weights of {ema!r} in {where} do not fit SongUNet({config}): {e}") from e
    return net.to(device).eval()
