"""The MeanFlow authors' JAX DiT checkpoints -> models.dit.DiT, in two steps.

1. `read_flax_checkpoint(folder)` reads their checkpoint folder (written by
   `flax.training.checkpoints.save_checkpoint_multiprocess`, orbax's format) into flat numpy
   dicts of the trained and the EMA parameters. Needs jax, flax and orbax-checkpoint, imported
   only here.
2. `state_dict_from_flax(flat)` maps such a flat dict to DiT keyword arguments and a torch state
   dict: pure numpy/torch.

    params = read_flax_checkpoint("ckpts/checkpoint_1200000")["ema_params"]
    config, state_dict = state_dict_from_flax(params)
    net = DiT(**config); net.load_state_dict(state_dict)

`infer_config(state_dict)` rebuilds DiT keyword arguments from one of our state dicts.
"""

import math
import re
from pathlib import Path

import numpy as np
import torch

from models.dit import DIT_CONFIGS, DiT, sincos_pos_embed

FLAX_PACKAGES_HINT = "pip install jax flax orbax-checkpoint"
# Attention heads are not in the weights; the authors' configs fix them by width.
HEADS_BY_WIDTH = {config["hidden_size"]: config["num_heads"] for config in DIT_CONFIGS.values()}


def read_flax_checkpoint(folder: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{"params": flat, "ema_params": flat} of their DiT from a Flax checkpoint folder.

    folder: one checkpoint (`.../checkpoint_<step>`) or their work dir (the latest one is read).
    Flat names are '/'-joined Flax paths inside the DiT, as `flax.traverse_util.flatten_dict(
    params, sep='/')` gives them (their train state nests the DiT under 'net', which is dropped).
    """
    traverse_util, checkpoints = import_flax_checkpoints()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no Flax checkpoint folder at {folder}: pass the checkpoint_<step> folder "
                                "or the work dir that holds it")
    state = checkpoints.restore_checkpoint(str(folder), target=None)
    if not isinstance(state, dict) or "params" not in state or "ema_params" not in state:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{folder} is not a checkpoint of the authors' train state (params and ema_params); "
                         f"found {found}")
    out = {}
    for key in ("params", "ema_params"):
        tree = state[key]
        tree = tree.get("net", tree)
        out[key] = {name: np.asarray(value) for name, value in traverse_util.flatten_dict(tree, sep="/").items()}
    return out


def import_flax_checkpoints():
    """flax's traverse_util and training.checkpoints, or one ModuleNotFoundError line saying what to install."""
    try:
        from flax import traverse_util
        from flax.training import checkpoints
        import orbax.checkpoint  # noqa: F401  (flax reads and writes checkpoints through it)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"reading a Flax checkpoint needs the package {e.name!r}, which is not "
                                  f"installed: {FLAX_PACKAGES_HINT}", name=e.name) from None
    return traverse_util, checkpoints


def state_dict_from_flax(flat: dict[str, np.ndarray], *, img_resolution: int = 32, num_heads: int | None = None
                         ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Their flat parameters -> (DiT keyword arguments, state dict for `DiT(**config)`).

    Names: Flax's wrapper scopes (`_flax_linear`, `_flax_embedding`) are dropped and `layers_<i>`
    becomes `<i>`. Values: Dense kernels [in, out] are transposed to [out, in], the patch
    convolution's HWIO kernel becomes OIHW, embeddings and biases are kept. Neither the input size
    nor the head count is in the weights: img_resolution defaults to the ImageNet latents' 32 and
    num_heads, when None, comes from the authors' config of the same width (HEADS_BY_WIDTH).
    """
    if flat and all(name.startswith("net/") for name in flat):
        flat = {name[len("net/"):]: value for name, value in flat.items()}
    state_dict = {torch_name(name): _torch_value(name, np.asarray(value)) for name, value in flat.items()}
    if "x_embedder.proj.weight" not in state_dict:
        raise ValueError(f"not the authors' DiT parameters: no 'x_embedder/proj/kernel' among {sorted(flat)[:5]}...")
    hidden, _, patch, _ = state_dict["x_embedder.proj.weight"].shape
    if img_resolution % patch:
        raise ValueError(f"img_resolution={img_resolution} is not a multiple of the checkpoint's patch size {patch}")
    state_dict["pos_embed"] = sincos_pos_embed(hidden, img_resolution // patch).float()[None]
    config = infer_config(state_dict, num_heads=num_heads)
    _check_matches(state_dict, config)
    return config, state_dict


def infer_config(state_dict: dict[str, torch.Tensor], *, num_heads: int | None = None) -> dict:
    """DiT keyword arguments from a DiT state dict (its key names and shapes).

    num_heads, when None, comes from the authors' config of the same width (HEADS_BY_WIDTH);
    pass it for other widths.
    """
    try:
        hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
        tokens = state_dict["pos_embed"].shape[1]
        num_labels = state_dict["y_embedder.embedding_table.weight"].shape[0]
        frequency_embedding_size = state_dict["t_embedder.mlp.0.weight"].shape[1]
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a DiT state dict: no {e.args[0]!r} (strip a prefix such as 'net.' first)") from None
    if num_heads is None:
        if hidden not in HEADS_BY_WIDTH:
            raise ValueError(f"hidden size {hidden} is none of the authors' configs {sorted(HEADS_BY_WIDTH)}, so the "
                             "number of attention heads is unknown: pass num_heads")
        num_heads = HEADS_BY_WIDTH[hidden]
    grid = math.isqrt(tokens)
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    return dict(img_resolution=grid * patch, in_channels=in_channels, patch_size=patch, hidden_size=hidden,
                depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=num_labels - 1,
                frequency_embedding_size=frequency_embedding_size)


def torch_name(flax_name: str) -> str:
    """'blocks/layers_0/attn/qkv/_flax_linear/kernel' -> 'blocks.0.attn.qkv.weight'."""
    parts = [part for part in flax_name.split("/") if not part.startswith("_flax_")]
    parts = [re.sub(r"^layers_(\d+)$", r"\1", part) for part in parts]
    parts[-1] = {"kernel": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts)


def _torch_value(flax_name: str, value: np.ndarray) -> torch.Tensor:
    if flax_name.endswith("/kernel"):
        if value.ndim == 2:  # Dense [in, out] -> Linear [out, in]
            value = value.T
        elif value.ndim == 4:  # Conv HWIO -> OIHW
            value = value.transpose(3, 2, 0, 1)
        else:
            raise ValueError(f"{flax_name}: a kernel of shape {value.shape} is neither Dense nor 2-D Conv")
    return torch.from_numpy(np.ascontiguousarray(value))


def _check_matches(state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """Raise ValueError naming the keys or shapes that differ from DiT(**config)'s."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in DiT(**config).state_dict().items()}
    got = {key: tuple(value.shape) for key, value in state_dict.items()}
    problems = [f"missing {key}" for key in expected.keys() - got.keys()]
    problems += [f"unexpected {key}" for key in got.keys() - expected.keys()]
    problems += [f"{key}: {got[key]} instead of {shape}" for key, shape in expected.items()
                 if key in got and got[key] != shape]
    if problems:
        raise ValueError(f"the parameters do not form a DiT{config}: " + "; ".join(sorted(problems)[:8]))
