"""SongUNet: the DDPM++ U-Net of EDM (Karras et al. 2022), conditioned on two times (t, h).

MeanFlow's network u(z, t, h) with h = t - r embeds t and h with the same sinusoidal
embedding and concatenates the two (so the mapping network sees 2 x noise_channels).
Module and parameter names follow EDM's `SongUNet`, so the state dicts of EDM-style
checkpoints (and of the MeanFlow authors' PyTorch release) load without renaming.

Every operation here has a forward-mode AD rule and traces under `torch.compile`,
because the MeanFlow loss differentiates the network with `torch.func.jvp` and then
back-propagates through that JVP. Two deliberate choices follow from this:

* Group normalisation is written out with `torch.var_mean` instead of `F.group_norm`:
  `F.group_norm` works under an eager JVP, but `torch.compile` of a JVP through it fails
  (internal assert in `_fw_primal`, pytorch/pytorch#152185; still so in torch 2.14). The
  explicit version is not slower (docs/benchmarks.md, "Layer choices under JVP").
* Attention is plain matmul + softmax in (at least) float32. The fused flash and
  memory-efficient SDPA kernels have no forward-mode AD (pytorch/pytorch#128971, #154226),
  and EDM's attention is a custom autograd.Function, which has none either. On CPU the
  alternatives cost the same (docs/benchmarks.md), so we take the version that cannot select a
  kernel without forward AD on any device.

MeanFlow's `jvp_mode="network"` computes u and its tangent with hand-written rules instead
(models/unet_tangent.py, offered as `SongUNet.forward_and_tangent`), walking these same modules.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The authors' CIFAR-10 network (their `cifar10_v1.sh`: EDM augmentation, dropout 0.2).
# Copy it before changing values: `SongUNet(**{**CIFAR10_CONFIG, "dropout": 0.0})`.
CIFAR10_CONFIG = {
    "img_resolution": 32,
    "in_channels": 3,
    "out_channels": 3,
    "channel_mult_noise": 2,
    "resample_filter": [1, 3, 3, 1],
    "channel_mult": [2, 2, 2],
    "encoder_type": "standard",
    "decoder_type": "standard",
    "dropout": 0.2,
    "augment_dim": 6,
}

_INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def init_tensor(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor of `shape` scaled for `mode` (EDM's four schemes).

    Uniform modes draw with `torch.rand`, normal modes with `torch.randn`, one call per
    tensor, so a model built after `torch.manual_seed(s)` starts from the same weights as
    EDM's code built after the same seed.
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (2 * torch.rand(*shape) - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (2 * torch.rand(*shape) - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}; expected one of {_INIT_MODES}")


class Linear(nn.Module):
    """Fully connected layer: [..., in_features] -> [..., out_features]."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(init_tensor([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(init_tensor([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def conv2d(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           resample_filter: torch.Tensor | None = None, *, up: bool = False, down: bool = False,
           fused_resample: bool = False) -> torch.Tensor:
    """EDM's convolution with optional 2x FIR resampling: x [B, Cin, H, W] -> [B, Cout, H', W'].

    weight [Cout, Cin, k, k] (None: resample only, Cout = Cin), bias [Cout] or None,
    resample_filter [1, 1, f, f] (used when up or down). `fused_resample` runs the
    down-sampling filter after the convolution (the up-sampling one before it) with merged padding.
    """
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    w_pad = 0 if w is None else w.shape[-1] // 2
    f_pad = 0 if resample_filter is None else (resample_filter.shape[-1] - 1) // 2

    def resample(y, padding):
        # Depthwise FIR filter with stride 2; up-sampling multiplies by 4 to keep the mean.
        f = resample_filter.to(y.dtype)
        channels = y.shape[1]
        if up:
            return F.conv_transpose2d(y, (4 * f).tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)
        return F.conv2d(y, f.tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)

    if w is not None and fused_resample and up:
        return F.conv2d(resample(x, max(f_pad - w_pad, 0)), w, b, padding=max(w_pad - f_pad, 0))
    if w is not None and fused_resample and down:
        x = resample(F.conv2d(x, w, padding=w_pad + f_pad), 0)
        return x if b is None else x + b.view(1, -1, 1, 1)
    if up or down:
        x = resample(x, f_pad)
    if w is not None:
        x = F.conv2d(x, w, b, padding=w_pad)
    return x


class Conv2d(nn.Module):
    """Square convolution with optional 2x FIR up- or down-sampling: [B, Cin, H, W] -> [B, Cout, H', W'].

    kernel=0 gives a pure resampling layer (no weights, Cout = Cin). The separable filter
    outer(f, f) / sum(f)^2 is a persistent buffer `resample_filter` [1, 1, k, k], present
    only when resampling, as in EDM's checkpoints. See `conv2d` for `fused_resample`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[int] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up=True and down=True together; choose one")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.weight = self.bias = None
        if kernel:
            fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
                        fan_out=out_channels * kernel * kernel)
            self.weight = nn.Parameter(init_tensor([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if bias:
                self.bias = nn.Parameter(init_tensor([out_channels], **fans) * init_bias)
        # A None buffer stays out of the state dict, so only resampling layers carry the filter.
        filt = None
        if up or down:
            f = torch.as_tensor(resample_filter, dtype=torch.float32)
            filt = (torch.outer(f, f) / f.sum().square())[None, None]
        self.register_buffer("resample_filter", filt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.resample_filter, up=self.up, down=self.down,
                      fused_resample=self.fused_resample)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    """Group normalisation of x [B, C, ...] with per-channel affine weight, bias [C].

    Written out (see the module docstring) so it has a forward-AD rule that compiles.
    """
    normed, _ = standardize_groups(x, num_groups, eps)
    return channel_affine(normed, weight, bias)


def standardize_groups(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean) / std per group, shaped and typed like x, and 1 / std [B, num_groups, 1].

    The statistics are float32 at least: under bf16 autocast the convolutions hand over bf16
    activations, and a mean near 100 rounded to bf16's 8-bit mantissa is off by up to 0.25
    (F.group_norm is on autocast's float32 list for the same reason).
    """
    groups = x.reshape(x.shape[0], num_groups, -1)
    groups = groups.to(torch.promote_types(groups.dtype, torch.float32))
    var, mean = torch.var_mean(groups, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    return ((groups - mean) * rstd).to(x.dtype).reshape(x.shape), rstd


def channel_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [B, C, ...] * weight + bias, with weight and bias [C] per channel."""
    affine_shape = (1, -1) + (1,) * (x.ndim - 2)
    return torch.addcmul(bias.view(affine_shape), x, weight.view(affine_shape))


class GroupNorm(nn.Module):
    """EDM's group norm: min(num_groups, C // min_channels_per_group) groups; [B, C, H, W] -> same."""

    def __init__(self, num_channels: int, *, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: {num_channels} channels cannot be split into groups of >= "
                f"{min_channels_per_group} (got {self.num_groups} groups); use a channel count that is a "
                f"multiple of 4 and at least 4 (model_channels * channel_mult)")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def self_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over positions: qkv [B, 3 C, L] -> [B, C, L].

    The channel axis holds all queries, then all keys, then all values (each head's
    channels contiguous inside each), the layout the MeanFlow release trained with.
    """
    q, k, v = attention_heads(qkv, num_heads)
    weights = attention_probs(q, k).to(v.dtype)
    return torch.matmul(v, weights.transpose(1, 2)).reshape(qkv.shape[0], -1, qkv.shape[2])


def attention_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """qkv [B, 3 C, L] -> q, k, v, each [B * num_heads, C / num_heads, L]."""
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    return tuple(part.reshape(batch * num_heads, ch, length) for part in qkv.chunk(3, dim=1))


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) over keys: [B*heads, ch, L] each -> [B*heads, Lq, Lk].

    The softmax runs in float32 at least, so bf16 inputs keep their attention weights accurate.
    """
    logits = torch.matmul(q.transpose(1, 2), k) * (1 / math.sqrt(q.shape[1]))
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)


class UNetBlock(nn.Module):
    """Residual block with optional 2x up/down-sampling and self-attention.

    (x [B, Cin, H, W], emb [B, emb_channels]) -> [B, Cout, H', W'], H' = 2H, H/2 or H.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter: Sequence[int] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict | None = None, init_zero: dict | None = None,
                 init_attn: dict | None = None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        init_attn = init_attn if init_attn is not None else init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else (num_heads or out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        # Registration order fixes the state-dict order, which matches EDM's.
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            # kernel 0 = resample only; a 1x1 projection when channels change or when asked for.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        if self.dropout:
            x = F.dropout(x, p=self.dropout, training=self.training)
        x = self.conv1(x)
        x = (x + shortcut) * self.skip_scale
        if self.num_heads:
            attn = self_attention(self.qkv(self.norm2(x)).flatten(2), self.num_heads)
            x = (self.proj(attn.reshape(x.shape)) + x) * self.skip_scale
        return x


class _SinusoidalEmbedding(nn.Module):
    """[B] -> [B, 2 F] as [sin | cos] of x times F frequencies."""

    def frequencies(self, x: torch.Tensor) -> torch.Tensor:
        """The F frequencies, [F] in x's dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x, self.frequencies(x))
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class PositionalEmbedding(_SinusoidalEmbedding):
    """Sinusoidal embedding of a scalar per sample: [B] -> [B, num_channels] as [sin | cos].

    Frequencies run geometrically from 1 to 1/max_positions (inclusive when `endpoint`).
    EDM concatenates [cos | sin]; the MeanFlow network swaps the halves, so sin comes first.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def frequencies(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        return (1 / self.max_positions) ** exponents.to(x.dtype)


class FourierEmbedding(_SinusoidalEmbedding):
    """Random Fourier features (NCSN++): [B] -> [B, num_channels] as [sin | cos]; `freqs` is a buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def frequencies(self, x: torch.Tensor) -> torch.Tensor:
        return (2 * math.pi * self.freqs).to(x.dtype)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net of EDM predicting the average velocity u(z, t, h).

    forward(x [B, in_channels, R, R], t [B], h [B], aug_cond [B, augment_dim] | None,
    labels [B] | None) -> u [B, out_channels, R, R].
    Keyword names and defaults of the constructor are EDM's. `aug_cond` is ignored when
    augment_dim == 0 (as in EDM, so a training loop may always pass augmentation labels).
    `labels` are class indices 0..label_dim-1, label_dim being the null class ("no label");
    EDM's label layer sees them as one-hot rows, the null class as the all-zero row.
    """

    def __init__(self,
                 img_resolution: int,                       # image side R at input and output
                 in_channels: int,                          # channels of x
                 out_channels: int,                         # channels of u
                 label_dim: int = 0,                        # class-label size, 0 = unconditional
                 augment_dim: int = 0,                      # augmentation-label size, 0 = none
                 model_channels: int = 128,                 # base channel count
                 channel_mult: Sequence[int] = (1, 2, 2, 2),  # channel multiplier per resolution
                 channel_mult_emb: int = 4,                 # embedding width = model_channels * this
                 num_blocks: int = 4,                       # residual blocks per resolution
                 attn_resolutions: Sequence[int] = (16,),   # resolutions with self-attention
                 dropout: float = 0.10,                     # dropout inside residual blocks
                 label_dropout: float = 0.0,                # class-label dropout (classifier-free guidance)
                 embedding_type: str = "positional",        # 'positional' (DDPM++) or 'fourier' (NCSN++)
                 channel_mult_noise: int = 1,               # time-embedding width = model_channels * this
                 encoder_type: str = "standard",            # 'standard', 'skip' or 'residual'
                 decoder_type: str = "standard",            # 'standard' or 'skip'
                 resample_filter: Sequence[int] = (1, 1),   # FIR filter: (1,1) DDPM++, (1,3,3,1) NCSN++
                 ):
        super().__init__()
        _check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        if not channel_mult:
            raise ValueError("channel_mult is empty; give one multiplier per resolution, e.g. [2, 2, 2]")
        factor = 2 ** (len(channel_mult) - 1)
        if img_resolution <= 0 or img_resolution % factor:
            raise ValueError(
                f"img_resolution={img_resolution} is not divisible by 2**(len(channel_mult)-1)={factor} "
                f"(channel_mult={list(channel_mult)}); use a resolution that is a multiple of {factor} "
                f"or fewer levels")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: embeddings of t and of h, concatenated -> 2 * noise_channels.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        # EDM's label layer outputs noise_channels; here it must match the concatenated (t, h) width.
        self.map_label = Linear(label_dim, 2 * noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, 2 * noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(2 * noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. forward() tells the roles of its modules apart by their names, as EDM's does.
        self.enc = nn.ModuleDict()
        skip_channels = []
        cout = aux_channels = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, kernel=3, **init)
                cout = model_channels
                skip_channels.append(cout)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                skip_channels.append(cout)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(aux_channels, aux_channels, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(aux_channels, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        aux_channels, cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    aux_channels = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs)
                skip_channels.append(cout)

        # Decoder: each `block{idx}` takes the matching encoder output, concatenated on channels.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional network (the network convention's name for label_dim)."""
        return self.label_dim

    def forward(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, aug_cond: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """u(x, t, h): x [B, C, R, R], t and h [B] (or 0-dim, shared by the batch) -> [B, out_channels, R, R]."""
        t, h = self._check_inputs(x, t, h, aug_cond, labels)

        # Mapping.
        emb = torch.cat([self.map_noise(t), self.map_noise(h)], dim=1)
        emb = self._add_labels(emb, aug_cond, labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) * math.sqrt(0.5)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder: output heads summed over resolutions ('skip') or only at the last one.
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

    def forward_and_tangent(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, x_t: torch.Tensor,
                            t_t: torch.Tensor, h_t: torch.Tensor, aug_cond: torch.Tensor | None = None,
                            labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, du) by hand-written tangent rules (models/unet_tangent.py): MeanFlow's jvp_mode "network"."""
        from models.unet_tangent import forward_and_tangent  # that module imports this one
        return forward_and_tangent(self, x, t, h, x_t, t_t, h_t, aug_cond=aug_cond, labels=labels)

    def _add_labels(self, emb: torch.Tensor, aug_cond: torch.Tensor | None,
                    labels: torch.Tensor | None) -> torch.Tensor:
        """emb [B, 2 noise_channels] plus the projections of the class and augmentation labels."""
        if self.map_label is not None:
            # One-hot rows; the null class (index label_dim) is the zero row. A comparison rather than
            # F.one_hot, whose range check reads the labels on the host (a device sync on CUDA).
            classes = torch.arange(self.label_dim, device=labels.device)
            rows = (labels[:, None] == classes).to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand([rows.shape[0], 1], device=rows.device) >= self.label_dropout
                rows = rows * keep.to(rows.dtype)
            emb = emb + self.map_label(rows * math.sqrt(self.label_dim))
        if self.map_augment is not None and aug_cond is not None:
            emb = emb + self.map_augment(aug_cond.to(emb.dtype))
        return emb

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, aug_cond: torch.Tensor | None,
                      labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raise ValueError for inputs this network cannot take; return t and h as [B] tensors.

        The times come back in float32 or wider even when x is bf16: the embedding needs the precision.
        """
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"SongUNet expects x of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(in_channels={self.in_channels}, img_resolution={self.img_resolution}); got {list(x.shape)}")
        batch = x.shape[0]
        if self.map_augment is not None and aug_cond is not None and tuple(aug_cond.shape) != (batch, self.augment_dim):
            raise ValueError(f"aug_cond must have shape [{batch}, {self.augment_dim}]; got {list(aug_cond.shape)}")
        if self.map_label is not None:
            if labels is None or tuple(labels.shape) != (batch,) or labels.is_floating_point():
                got = None if labels is None else f"{labels.dtype} {list(labels.shape)}"
                raise ValueError(f"this network is class-conditional (label_dim={self.label_dim}): pass labels, "
                                 f"class indices of shape [{batch}] in 0..{self.label_dim} ({self.label_dim}: "
                                 f"no label); got {got}")
        elif labels is not None:
            raise ValueError("labels given but the network was built with label_dim=0")
        t, h = per_sample("t", t, batch), per_sample("h", h, batch)
        return t.to(torch.promote_types(t.dtype, torch.float32)), h.to(torch.promote_types(h.dtype, torch.float32))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}")


def per_sample(name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
    """A time as a [B] tensor: accepts shape [B], [B, 1, ...] or a single value."""
    if value.numel() == 1:
        return value.reshape(1).expand(batch)
    if value.numel() != batch:
        raise ValueError(f"{name} must hold one value per sample (shape [{batch}]); got shape {list(value.shape)}")
    return value.reshape(batch)
