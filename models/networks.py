"""The table of networks: for each architecture, its class, how a run's options build its config,
and how its config is recovered from a state dict (for checkpoints without one, e.g. the authors').

The convention every network follows (what the training step and the samplers call):

    u = net(z, t, h, **cond)
        z      float [B, C, H, W]; t, h float [B] (h = t - r >= 0)
        cond   only the inputs in use:
               labels    LongTensor [B], class indices 0..num_classes-1; num_classes is the null class
               aug_cond  float [B, augment_dim], EDM's augmentation labels (SongUNet)
               omega, t_min, t_max   float [B], iMF's guidance scale and interval (ImfDiT)
        u      float [B, C, H, W]; a network with guidance inputs returns (u, v), v its
               instantaneous-velocity head (None when built without it)
    attributes: in_channels, img_resolution (H = W), num_classes (0: unconditional)
    optional:   forward_and_tangent(z, t, h, dz, dt, dh, **cond) -> (u, du), a hand-written tangent
                path (MeanFlow's jvp_mode "network")

Adding a network is one entry here and its tests (docs/extending.md).
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from models import dit_convert, imf_convert
from models.dit import DIT_CONFIGS, DiT
from models.imf_dit import IMF_CONFIGS, ImfDiT
from models.unet import CIFAR10_CONFIG, SongUNet


@dataclass(frozen=True)
class NetworkSpec:
    """One architecture of the table.

    options: the run settings (TrainConfig field names) that size the network.
    make_config(img_shape, num_classes, **options) -> the class's keyword arguments.
    check(img_shape, **options) -> None, or (option, why) for options that cannot build a network.
    infer_config(state_dict) -> keyword arguments that rebuild a network from its weights alone.
    owns(state_dict) -> whether a state dict (one network's, no prefix) is of this architecture, in
        our layout or in its authors'.
    import_state(state_dict) -> the state dict in our layout (the authors' layout renamed; ours unchanged).
    augments: whether the network takes EDM's augmentation labels (aug_cond).
    guidance_inputs: whether the network takes iMF's guidance inputs (omega, t_min, t_max) and returns
        (u, v): the networks iMF's objective trains.
    latent_norm: on VAE latents, the normalization its authors train it with, a name of
        utils.latents.NORMS: "sd-scale" (z * 0.18215, MeanFlow's DiT and LDM's U-Net) or "imf" (iMF's
        per-channel (z - mean) / std). The run applies it and records it in the checkpoint.
    """
    name: str
    cls: type[torch.nn.Module]
    options: tuple[str, ...]
    make_config: Callable[..., dict]
    check: Callable[..., tuple[str, str] | None]
    infer_config: Callable[[dict], dict]
    owns: Callable[[dict], bool]
    import_state: Callable[[dict], dict] = dict
    augments: bool = False
    guidance_inputs: bool = False
    latent_norm: str = "sd-scale"

    def build(self, config: dict) -> torch.nn.Module:
        return self.cls(**config)


# --------------------------------------------------------------------------- SongUNet


def unet_config(img_shape: Sequence[int], num_classes: int = 0, *, model_channels: int = 128,
                channel_mult: Sequence[int] = (2, 2, 2), num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                dropout: float = 0.2, use_edm_aug: bool = False) -> dict:
    """SongUNet kwargs: the release's CIFAR-10 network with this run's size, data shape and dropout."""
    channels, resolution, _ = img_shape
    return dict(CIFAR10_CONFIG, img_resolution=resolution, in_channels=channels, out_channels=channels,
                model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=num_blocks,
                attn_resolutions=list(attn_resolutions), dropout=dropout, augment_dim=6 if use_edm_aug else 0,
                label_dim=num_classes)


def check_unet(img_shape: Sequence[int], *, channel_mult: Sequence[int], attn_resolutions: Sequence[int],
               **_) -> tuple[str, str] | None:
    resolution = img_shape[1]
    if len(channel_mult) < 1 or min(channel_mult) < 1:
        return "channel_mult", "positive integers"
    levels = [resolution >> i for i in range(len(channel_mult))]
    if min(levels) < 1:
        return "channel_mult", f"{len(levels)} levels halve the {resolution}px image below 1px"
    if not all(r in levels for r in attn_resolutions):
        return "attn_resolutions", f"the network's resolutions are {levels}; attention can only go there"
    return None


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


def owns_unet(state_dict: dict) -> bool:
    return any(re.match(r"enc\.(\d+)x\1_conv\.weight$", k) for k in state_dict)


def infer_unet_config(net_state_dict: dict) -> dict:
    """SongUNet keyword arguments that rebuild a network from its state dict (keys without "net." prefix).

    Reads the structure from key names and shapes. Not recoverable from weights: dropout and
    label_dropout (set to 0, right for evaluation) and attention at resolutions the network lacks.
    """
    sd = net_state_dict
    keys = list(sd)
    enc_res = _resolutions(keys, "enc")
    if not enc_res or f"enc.{enc_res[0]}x{enc_res[0]}_conv.weight" not in sd:
        raise ValueError("not a SongUNet state dict: no enc.<R>x<R>_conv.weight key (pass one network's "
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


# --------------------------------------------------------------------------- transformers

# Sizes beside the papers' (the tables of models/dit.py and models/imf_dit.py): XS/2, a network small
# enough to train on the 8x8 digits on one CPU core in minutes. The DiT's is 64 wide (digits-dit, docs/dit.md:
# 0.35M parameters), which already classifies every sample as asked; at width 96 a step took 1.3x as long.
DIT_SIZES = {**DIT_CONFIGS, "XS/2": dict(depth=4, hidden_size=64, num_heads=4, patch_size=2)}
IMF_SIZES = {**IMF_CONFIGS, "XS/2": dict(depth=3, hidden_size=64, num_heads=4, patch_size=2, aux_head_depth=1,
                                          num_class_tokens=4, num_time_tokens=2, num_cfg_tokens=2,
                                          num_interval_tokens=1)}
_NET_SHAPE = ("img_resolution", "in_channels", "num_classes")


def _sized_config(sizes: dict) -> Callable[..., dict]:
    def make_config(img_shape: Sequence[int], num_classes: int = 0, *, model_size: str = "B/2") -> dict:
        channels, resolution, _ = img_shape
        size = {k: v for k, v in sizes[model_size].items() if k not in _NET_SHAPE}
        return dict(size, img_resolution=resolution, in_channels=channels, num_classes=num_classes)
    return make_config


def _sized_check(sizes: dict) -> Callable[..., tuple[str, str] | None]:
    def check(img_shape: Sequence[int], *, model_size: str, **_) -> tuple[str, str] | None:
        if model_size not in sizes:
            return "model_size", f"choose one of {', '.join(sizes)}"
        if img_shape[1] % sizes[model_size]["patch_size"]:
            return "model_size", f"its patch size does not divide the {img_shape[1]}px input"
        return None
    return check


def owns_dit(state_dict: dict) -> bool:
    return "x_embedder.proj.weight" in state_dict and any(k.startswith("blocks.0.adaLN") for k in state_dict)


def owns_imf_dit(state_dict: dict) -> bool:
    return any(k.startswith("shared_blocks.") for k in state_dict)


# --------------------------------------------------------------------------- the table

NETWORKS = {
    "unet": NetworkSpec(
        name="unet", cls=SongUNet,
        options=("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout", "use_edm_aug"),
        make_config=unet_config, check=check_unet, infer_config=infer_unet_config, owns=owns_unet, augments=True),
    "dit": NetworkSpec(
        name="dit", cls=DiT, options=("model_size",), make_config=_sized_config(DIT_SIZES),
        check=_sized_check(DIT_SIZES), infer_config=dit_convert.infer_config, owns=owns_dit),
    "imf_dit": NetworkSpec(
        name="imf_dit", cls=ImfDiT, options=("model_size",), make_config=_sized_config(IMF_SIZES),
        check=_sized_check(IMF_SIZES), infer_config=imf_convert.infer_config, owns=owns_imf_dit,
        import_state=imf_convert.import_state, guidance_inputs=True, latent_norm="imf"),
}


def network_spec(name: str) -> NetworkSpec:
    """The table entry of architecture `name`; ValueError naming the choices for an unknown one."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
    return NETWORKS[name]


def spec_of_state_dict(state_dict: dict) -> NetworkSpec:
    """The architecture whose weights these are (one network's state dict, no prefix)."""
    for spec in NETWORKS.values():
        if spec.owns(state_dict):
            return spec
    raise ValueError(f"the weights fit no network of the table ({', '.join(NETWORKS)}); "
                     f"first keys: {list(state_dict)[:3]}")
