"""The authors' iMF parameters <-> ImfDiT state dicts.

Their PyTorch checkpoints (`iMF-B-2.pth`, ...) are the state dict of their `iMeanFlow` wrapper built
for inference: every key starts with `net.`, linear layers and the label table sit one level
deeper (`q_proj._flax_linear.weight`, `embedding_table._flax_embedding.weight`), and there are no
v-head blocks. Apart from that our names are theirs, so the map is a rename:

    net.shared_blocks.0.attn.q_proj._flax_linear.weight  <->  shared_blocks.0.attn.q_proj.weight

Their inference network keeps `v_final_layer` without the v-head blocks in front of it; its v
output is that layer applied to the shared trunk, not a trained velocity. Our network without
the v-head has no such layer: `from_official` drops it, and `to_official` writes it back as their
initialisation (unit norm, zero linear map) when the network has none, since their loader wants it.

Their JAX parameters (flax, `traverse_util.flatten_dict(params, sep='/')`) map the same way, with
Dense kernels [in, out] transposed to [out, in] and the patch convolution's HWIO kernel to OIHW.
"""

import inspect
import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from models.imf_dit import IMF_CONFIGS, ImfDiT

_WRAPPERS = re.compile(r"\._flax_(linear|embedding)(?=\.)")


def _drop_unused_v_layer(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without v-head blocks, v_final_layer is not part of our network (see the module docstring)."""
    if any(k.startswith("v_heads.") for k in state_dict):
        return state_dict
    return {k: v for k, v in state_dict.items() if not k.startswith("v_final_layer.")}


def from_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their PyTorch state dict (keys `net.*`) -> ImfDiT's, for a network with v_head = has v_heads.* keys."""
    if not state_dict or not all(k.startswith("net.") for k in state_dict):
        raise ValueError("not a state dict of the authors' iMeanFlow: its keys should all start with 'net.' "
                         "(pass the dict that torch.load returns for iMF-*.pth)")
    return _drop_unused_v_layer({_WRAPPERS.sub("", k[len("net."):]): v for k, v in state_dict.items()})


def import_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One network's state dict, prefix stripped, in our layout: the wrapper levels of theirs removed and
    their unused v_final_layer dropped; ours comes back unchanged."""
    return _drop_unused_v_layer({_WRAPPERS.sub("", k): v for k, v in state_dict.items()})


def _as_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return from_official(state_dict) if all(k.startswith("net.") for k in state_dict) else dict(state_dict)


def infer_config(state_dict: Mapping[str, torch.Tensor], *, img_resolution: int = 32) -> dict:
    """ImfDiT's keyword arguments for a state dict, ours or theirs.

    The image side is not in the parameters (RoPE's positions are not saved): give it; their
    checkpoints are for 32 x 32 latents.
    """
    sd = _as_ours(state_dict)
    if "x_embedder.proj.weight" not in sd:
        raise ValueError("not an imfDiT state dict: no x_embedder.proj.weight")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape

    def blocks(name: str) -> int:
        return len({k.split(".")[1] for k in sd if k.startswith(name + ".")})

    shared, u_head, v_head = blocks("shared_blocks"), blocks("u_heads"), blocks("v_heads")
    if v_head not in (0, u_head):
        raise ValueError(f"the state dict has {u_head} u-head and {v_head} v-head blocks; "
                         "an imfDiT's two heads have the same depth")
    head_dim = next(v for k, v in sd.items() if k.endswith("attn.q_norm.weight")).numel()
    mlp_hidden = next(v for k, v in sd.items() if k.endswith("mlp.w1.weight")).shape[0]
    # ImfDiT's MLP width is int(hidden * mlp_ratio): take the ratio that gives this width back.
    ratios = (8 / 3, mlp_hidden / hidden, (mlp_hidden + 0.5) / hidden)
    mlp_ratio = next(r for r in ratios if int(hidden * r) == mlp_hidden)
    return dict(
        img_resolution=img_resolution, in_channels=in_channels,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        patch_size=patch, hidden_size=hidden, depth=shared + u_head, num_heads=hidden // head_dim, mlp_ratio=mlp_ratio,
        aux_head_depth=u_head, v_head=v_head > 0, num_class_tokens=len(sd["class_tokens"]),
        num_time_tokens=len(sd["time_tokens"]), num_cfg_tokens=len(sd["omega_tokens"]),
        num_interval_tokens=len(sd["t_min_tokens"]),
    )


def config_name(config: Mapping) -> str | None:
    """The name of the authors' configuration (IMF_CONFIGS: B/2 ... XL/2 with ImfDiT's defaults otherwise: 32 x 32
    x 4 latents, 1000 classes) that the ImfDiT keyword arguments `config` build, or None for another network."""
    defaults = {name: p.default for name, p in inspect.signature(ImfDiT).parameters.items() if name != "v_head"}
    built = {k: config.get(k, default) for k, default in defaults.items()}
    return next((name for name, size in IMF_CONFIGS.items() if built == {**defaults, **size}), None)


def load_official(state_dict: Mapping[str, torch.Tensor], *, img_resolution: int = 32) -> ImfDiT:
    """An ImfDiT holding a state dict of theirs (or ours), its config inferred, loaded with strict=True."""
    sd = _as_ours(state_dict)
    net = ImfDiT(**infer_config(sd, img_resolution=img_resolution))
    net.load_state_dict(sd, strict=True)
    return net


def to_official(state_dict: Mapping[str, torch.Tensor], *, keep_v_heads: bool = False) -> dict[str, torch.Tensor]:
    """ImfDiT's state dict -> their layout: `iMeanFlow(model_str)` built for inference loads it (strict).

    keep_v_heads=True keeps the v-head blocks (the layout of their imfDiT(eval_mode=False) under `net.`).
    """
    sd = dict(state_dict)
    if not keep_v_heads:
        sd = {k: v for k, v in sd.items() if not k.startswith("v_heads.")}
    elif not any(k.startswith("v_heads.") for k in sd):
        raise ValueError("keep_v_heads=True but the state dict has no v-head blocks "
                         "(a network built with v_head=False): export with keep_v_heads=False")
    config = infer_config(sd)
    with torch.device("meta"):  # names and module types only
        net = ImfDiT(**{**config, "v_head": True})
    if "v_final_layer.norm.weight" not in sd:
        # Their initialisation of the layer, which their inference network never uses for u.
        like = sd["u_final_layer.linear.weight"]
        sd |= {"v_final_layer.norm.weight": torch.ones_like(sd["u_final_layer.norm.weight"]),
               "v_final_layer.linear.weight": torch.zeros_like(like),
               "v_final_layer.linear.bias": torch.zeros_like(sd["u_final_layer.linear.bias"])}
    names = {}
    for module_name, module in net.named_modules():
        wrapper = {nn.Linear: "._flax_linear", nn.Embedding: "._flax_embedding"}.get(type(module), "")
        for param_name, _ in module.named_parameters(recurse=False):
            ours = f"{module_name}.{param_name}" if module_name else param_name
            names[ours] = f"net.{module_name}{wrapper}.{param_name}" if module_name else f"net.{param_name}"
    return {names[k]: v for k, v in sd.items()}


def from_jax(params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Their flax parameters, flattened with '/' (with or without the leading `net/`) -> ImfDiT's state dict.

    float32 tensors; a network without v-head blocks loses v_final_layer as in from_official.
    """
    sd = {}
    for path, value in params.items():
        parts = path.split("/")
        parts = parts[1:] if parts[0] == "net" else parts
        parts = [p for p in parts if p not in ("_flax_linear", "_flax_embedding")]
        # flax names list members name_i (shared_blocks_0) and Sequential layers layers_i.
        parts = [re.sub(r"^(?:layers_(\d+)|(shared_blocks|u_heads|v_heads)_(\d+))$",
                        lambda m: m[1] if m[1] else f"{m[2]}.{m[3]}", p) for p in parts]
        tensor = torch.from_numpy(np.array(value, dtype=np.float32))
        leaf = parts[-1]
        if leaf == "kernel":
            parts[-1] = "weight"
            if tensor.ndim == 2:    # Dense [in, out] -> Linear [out, in]
                tensor = tensor.T
            elif tensor.ndim == 4:  # Conv HWIO -> OIHW
                tensor = tensor.permute(3, 2, 0, 1)
        elif leaf == "embedding":
            parts[-1] = "weight"
        sd[".".join(parts)] = tensor.contiguous()
    return _drop_unused_v_layer(sd)
