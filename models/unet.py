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
  explicit version is not slower eagerly (CPU, one thread, x [8, 256, 16, 16], 32 groups,
  jvp + backward, min of 7: 21 ms against 23 ms for F.group_norm) and inductor fuses it (1.6 ms).
* Attention is plain matmul + softmax in (at least) float32. The fused flash and
  memory-efficient SDPA kernels have no forward-mode AD (pytorch/pytorch#128971, #154226),
  and EDM's attention is a custom autograd.Function, which has none either. On CPU (qkv
  [4, 768, 256], jvp + backward, min of 7) matmul took 67 ms eager / 61 ms compiled, einsum
  81 / 58 ms, SDPA 70 / 60 ms and SDPA forced to its math backend 70 / 57 ms: no real
  difference, so we take the version that cannot select a kernel without forward AD on any device.

`SongUNet.forward_and_tangent` returns u together with its directional derivative written out by
hand (MeanFlow's `jvp_mode="network"`): forward AD of a convolution also convolves the input with
the weights' tangent, which is all zeros here, and that product alone costs about a fifth of a
training step. Each layer below shares its primal code between `forward` and that path.
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


# ---------------------------------------------------------------- tangent helpers
# The hand-written tangent path pairs every activation x with its tangent x_t. Tangents are built
# under torch.no_grad(): MeanFlow's target detaches du/dt, so only the primal needs a graph. On the
# primal-only path (plain `forward`) every tangent is None and these helpers add no work.

def _tangent(fn, *tangents):
    """fn(*tangents) without autograd, or None when the tangents are absent (None)."""
    if any(x_t is None for x_t in tangents):
        return None
    with torch.no_grad():
        return fn(*tangents)


def _layer(module: nn.Module, x: torch.Tensor, x_t: torch.Tensor | None):
    """(module(x), its tangent) for a layer that is affine in its input (Linear, Conv2d)."""
    return module(x), _tangent(module.tangent, x_t)


def _silu(x: torch.Tensor, x_t: torch.Tensor | None):
    """SiLU and its tangent: silu'(x) = sig(x) (1 + x (1 - sig(x)))."""
    def tangent(x_t):
        sig = torch.sigmoid(x)
        return x_t * (sig * (1 + x * (1 - sig)))
    return F.silu(x), _tangent(tangent, x_t)


def _dropout(x: torch.Tensor, x_t: torch.Tensor | None, p: float, training: bool):
    """Dropout with one mask for the primal and its tangent.

    On the tangent path the mask is F.dropout of ones: it draws from the RNG exactly as
    F.dropout(x) would, and x * mask equals F.dropout(x).
    """
    if x_t is None:
        return F.dropout(x, p=p, training=training), None
    if not training or p == 0:
        return x, x_t
    mask = F.dropout(torch.ones_like(x), p=p, training=training)
    return x * mask, _tangent(lambda a: a * mask, x_t)


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

    def tangent(self, x_t: torch.Tensor) -> torch.Tensor:
        """Directional derivative along an input tangent x_t (the weights carry none): W x_t."""
        return F.linear(x_t, self.weight.to(x_t.dtype))


class Conv2d(nn.Module):
    """Square convolution with optional 2x FIR up- or down-sampling: [B, Cin, H, W] -> [B, Cout, H', W'].

    kernel=0 gives a pure resampling layer (no weights, Cout = Cin). The separable filter
    outer(f, f) / sum(f)^2 is a persistent buffer `resample_filter` [1, 1, k, k], present
    only when resampling, as in EDM's checkpoints. With `fused_resample` the down-sampling
    filter runs after the convolution (and the up-sampling one before it) with merged padding.
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

    def _resample(self, x: torch.Tensor, channels: int, padding: int) -> torch.Tensor:
        # Depthwise FIR filter with stride 2; up-sampling multiplies by 4 to keep the mean.
        f = self.resample_filter.to(x.dtype)
        if self.up:
            return F.conv_transpose2d(x, (4 * f).tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)
        return F.conv2d(x, f.tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_to(x, self.bias)

    def tangent(self, x_t: torch.Tensor) -> torch.Tensor:
        """Directional derivative along an input tangent x_t: the same layer without its bias.

        Forward AD of F.conv2d would add a second convolution of the input with the weights'
        tangent, all zeros here; this is the convolution of x_t alone.
        """
        return self._apply_to(x_t, None)

    def _apply_to(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if bias is None else bias.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if self.resample_filter is None else (self.resample_filter.shape[-1] - 1) // 2
        if w is not None and self.fused_resample and self.up:
            x = self._resample(x, self.in_channels, max(f_pad - w_pad, 0))
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        if w is not None and self.fused_resample and self.down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = self._resample(x, self.out_channels, 0)
            return x if b is None else x + b.view(1, -1, 1, 1)
        if self.up or self.down:
            x = self._resample(x, self.in_channels, f_pad)
        if w is not None:
            x = F.conv2d(x, w, b, padding=w_pad)
        return x


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    """Group normalisation of x [B, C, ...] with per-channel affine weight, bias [C].

    Written out (see the module docstring) so it has a forward-AD rule that compiles.
    """
    normed, _ = _normalize(x, num_groups, eps)
    return _scale_shift(normed, weight, bias)


def _normalize(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def _scale_shift(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    affine_shape = (1, -1) + (1,) * (normed.ndim - 2)
    return torch.addcmul(bias.view(affine_shape), normed, weight.view(affine_shape))


def _group_norm_tangent(x_t: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                        weight: torch.Tensor) -> torch.Tensor:
    """Tangent of group_norm along x_t, from the primal's normalised x and 1 / std.

    y = g (x - m) / s + b gives y_t = g (x_t - mean(x_t) - xhat mean(xhat x_t)) / s per group.
    """
    groups_t = x_t.reshape(x_t.shape[0], num_groups, -1)
    xhat = normed.reshape(groups_t.shape)
    normed_t = (groups_t - groups_t.mean(dim=-1, keepdim=True)
                - xhat * (xhat * groups_t).mean(dim=-1, keepdim=True)) * rstd
    affine_shape = (1, -1) + (1,) * (x_t.ndim - 2)
    return (normed_t.reshape(x_t.shape) * weight.view(affine_shape)).to(x_t.dtype)  # rstd is float32 at least


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

    def forward_and_tangent(self, x: torch.Tensor, x_t: torch.Tensor | None):
        """(self(x), its tangent along x_t); the tangent is None when x_t is."""
        if x_t is None:
            return self(x), None
        weight = self.weight.to(x.dtype)
        normed, rstd = _normalize(x, self.num_groups, self.eps)
        y_t = _tangent(lambda a: _group_norm_tangent(a, normed, rstd, self.num_groups, weight), x_t)
        return _scale_shift(normed, weight, self.bias.to(x.dtype)), y_t


def self_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over positions: qkv [B, 3 C, L] -> [B, C, L].

    The channel axis holds all queries, then all keys, then all values (each head's
    channels contiguous inside each), the layout the MeanFlow release trained with.
    """
    return _self_attention(qkv, None, num_heads)[0]


def _self_attention(qkv: torch.Tensor, qkv_t: torch.Tensor | None, num_heads: int):
    """self_attention(qkv) and its tangent along qkv_t (None when qkv_t is None)."""
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)

    def heads(y):
        return (part.reshape(batch * num_heads, ch, length) for part in y.chunk(3, dim=1))

    q, k, v = heads(qkv)
    scale = 1 / math.sqrt(ch)
    logits = torch.matmul(q.transpose(1, 2), k) * scale                      # [B*heads, Lq, Lk]
    # Softmax in float32 at least, so bf16 inputs keep their attention weights accurate.
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    weights = probs.to(v.dtype)
    out = torch.matmul(v, weights.transpose(1, 2)).reshape(batch, -1, length)

    def tangent(qkv_t):
        q_t, k_t, v_t = heads(qkv_t)
        logits_t = (torch.matmul(q_t.transpose(1, 2), k) + torch.matmul(q.transpose(1, 2), k_t)) * scale
        logits_t = logits_t.to(probs.dtype)
        probs_t = probs * (logits_t - (probs * logits_t).sum(dim=-1, keepdim=True))
        out_t = torch.matmul(v_t, weights.transpose(1, 2)) + torch.matmul(v, probs_t.to(v.dtype).transpose(1, 2))
        return out_t.reshape(batch, -1, length)

    return out, _tangent(tangent, qkv_t)


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
        return self._forward(x, emb)[0]

    def forward_and_tangent(self, x: torch.Tensor, emb: torch.Tensor, x_t: torch.Tensor,
                            emb_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x, emb), its directional derivative along (x_t, emb_t)); see SongUNet.forward_and_tangent."""
        return self._forward(x, emb, x_t, emb_t)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, x_t: torch.Tensor | None = None,
                 emb_t: torch.Tensor | None = None):
        # Every *_t is None on the plain forward; then only the primal lines do any work.
        shortcut, shortcut_t = (x, x_t) if self.skip is None else _layer(self.skip, x, x_t)
        x, x_t = _layer(self.conv0, *_silu(*self.norm0.forward_and_tangent(x, x_t)))
        params, params_t = _layer(self.affine, emb, emb_t)
        params = params[:, :, None, None].to(x.dtype)
        params_t = _tangent(lambda a: a[:, :, None, None].to(x.dtype), params_t)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            normed, normed_t = self.norm1.forward_and_tangent(x, x_t)

            def modulated_t(n_t, p_t):
                scale_t, shift_t = p_t.chunk(2, dim=1)
                return torch.addcmul(shift_t, n_t, scale + 1) + normed * scale_t

            y_t = _tangent(modulated_t, normed_t, params_t)
            x, x_t = _silu(torch.addcmul(shift, normed, scale + 1), y_t)
        else:
            x, x_t = _silu(*self.norm1.forward_and_tangent(x + params, _tangent(torch.add, x_t, params_t)))
        if self.dropout:
            x, x_t = _dropout(x, x_t, self.dropout, self.training)
        out, out_t = _layer(self.conv1, x, x_t)
        x = (out + shortcut) * self.skip_scale
        x_t = _tangent(lambda a, b: (a + b) * self.skip_scale, out_t, shortcut_t)
        if self.num_heads:
            qkv, qkv_t = _layer(self.qkv, *self.norm2.forward_and_tangent(x, x_t))
            attn, attn_t = _self_attention(qkv.flatten(2), _tangent(lambda a: a.flatten(2), qkv_t), self.num_heads)
            proj, proj_t = _layer(self.proj, attn.reshape(x.shape), _tangent(lambda a: a.reshape(x.shape), attn_t))
            x, x_t = (proj + x) * self.skip_scale, _tangent(lambda a, b: (a + b) * self.skip_scale, proj_t, x_t)
        return x, x_t


class _SinusoidalEmbedding(nn.Module):
    """[B] -> [B, 2 F] as [sin | cos] of x times F frequencies, with the tangent along x_t [B]."""

    def _frequencies(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_tangent(x, None)[0]

    def forward_and_tangent(self, x: torch.Tensor, x_t: torch.Tensor | None):
        freqs = self._frequencies(x)
        angles = torch.outer(x, freqs)
        sin, cos = angles.sin(), angles.cos()

        def tangent(x_t):
            angles_t = torch.outer(x_t, freqs)
            return torch.cat([cos * angles_t, -sin * angles_t], dim=1)

        return torch.cat([sin, cos], dim=1), _tangent(tangent, x_t)


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

    def _frequencies(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        return (1 / self.max_positions) ** exponents.to(x.dtype)


class FourierEmbedding(_SinusoidalEmbedding):
    """Random Fourier features (NCSN++): [B] -> [B, num_channels] as [sin | cos]; `freqs` is a buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def _frequencies(self, x: torch.Tensor) -> torch.Tensor:
        return (2 * math.pi * self.freqs).to(x.dtype)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net of EDM predicting the average velocity u(z, t, h).

    forward(x [B, in_channels, R, R], t [B], h [B], aug_cond [B, augment_dim] | None,
    class_labels [B, label_dim] | None) -> u [B, out_channels, R, R].
    Keyword names and defaults are EDM's. `aug_cond` is ignored when augment_dim == 0
    (as in EDM, so a training loop may always pass augmentation labels).
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

        # Encoder. `_enc_roles` / `_dec_roles` say how forward() routes each named module.
        self.enc = nn.ModuleDict()
        enc_roles = []
        skip_channels = []
        cout = aux_channels = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, kernel=3, **init)
                cout = model_channels
                enc_roles.append("main")
                skip_channels.append(cout)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                enc_roles.append("block")
                skip_channels.append(cout)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(aux_channels, aux_channels, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(aux_channels, cout, kernel=1, **init)
                    enc_roles += ["aux_down", "aux_skip"]
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        aux_channels, cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    aux_channels = cout
                    enc_roles.append("aux_residual")
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs)
                enc_roles.append("block")
                skip_channels.append(cout)

        # Decoder: each `block{idx}` takes the matching encoder output, concatenated on channels.
        self.dec = nn.ModuleDict()
        dec_roles = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
                dec_roles += ["block", "block"]
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
                dec_roles.append("block")
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block_kwargs)
                dec_roles.append("block_cat")
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                    dec_roles.append("aux_up")
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)
                dec_roles += ["aux_norm", "aux_conv"]
        self._enc_roles = tuple(enc_roles)
        self._dec_roles = tuple(dec_roles)

    def _embed(self, t: torch.Tensor, h: torch.Tensor, aug_cond: torch.Tensor | None,
               class_labels: torch.Tensor | None, t_t: torch.Tensor | None = None,
               h_t: torch.Tensor | None = None):
        """Conditioning vector [B, emb_channels] from t, h [B] and the optional labels, and its
        tangent along (t_t, h_t) (None without them; the labels carry no tangent)."""
        (emb_th, emb_th_t), (emb_h, emb_h_t) = (self.map_noise.forward_and_tangent(t, t_t),
                                                self.map_noise.forward_and_tangent(h, h_t))
        emb = torch.cat([emb_th, emb_h], dim=1)
        emb_t = _tangent(lambda a, b: torch.cat([a, b], dim=1), emb_th_t, emb_h_t)
        if self.map_label is not None:
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and aug_cond is not None:
            emb = emb + self.map_augment(aug_cond.to(emb.dtype))
        return _silu(*_layer(self.map_layer1, *_silu(*_layer(self.map_layer0, emb, emb_t))))

    def forward(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, aug_cond: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """u(x, t, h): x [B, C, R, R], t and h [B] (or 0-dim, shared by the batch) -> [B, out_channels, R, R]."""
        return self._forward(x, t, h, aug_cond, class_labels)[0]

    def forward_and_tangent(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, x_t: torch.Tensor,
                            t_t: torch.Tensor, h_t: torch.Tensor, aug_cond: torch.Tensor | None = None,
                            class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, u_t): u = forward(x, t, h, ...) and its directional derivative along (x_t, t_t, h_t).

        The same numbers as ``torch.func.jvp`` of ``forward`` (dropout masks included: both
        draw them from the global RNG in the same order), without its cost: forward AD of each
        convolution and linear layer also multiplies the input by the weights' tangent, which
        is zero, and here only the input tangent is propagated. u keeps its autograd graph,
        the same as forward's; u_t is computed under torch.no_grad() and has none, so use it
        where its gradient is not needed (MeanFlow's target detaches du/dt). aug_cond and
        class_labels carry no tangent. x_t is shaped like x; t_t and h_t like t and h.
        """
        if tuple(x_t.shape) != tuple(x.shape):
            raise ValueError(f"x_t must have the shape of x, {list(x.shape)}; got {list(x_t.shape)}")
        return self._forward(x, t, h, aug_cond, class_labels, (x_t, t_t, h_t))

    def _forward(self, x, t, h, aug_cond, class_labels, tangents=None):
        """(u, u_t); u_t and every *_t below are None when tangents is None (plain forward)."""
        batch = self._check_inputs(x, aug_cond, class_labels)
        # Times stay in float32 or wider even when x is bf16: the embedding needs the precision.
        t = _per_sample("t", t, batch)
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        h = _per_sample("h", h, batch)
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        x_t = t_t = h_t = None
        if tangents is not None:
            x_t = tangents[0].to(x.dtype)
            t_t = _per_sample("t_t", tangents[1], batch).to(t.dtype)
            h_t = _per_sample("h_t", tangents[2], batch).to(h.dtype)
        emb, emb_t = self._embed(t, h, aug_cond, class_labels, t_t, h_t)

        def add(a, b, scale=None):
            return a + b if scale is None else (a + b) * scale

        skips = []
        aux, aux_t = x, x_t
        for role, module in zip(self._enc_roles, self.enc.values()):
            if role == "main":
                x, x_t = _layer(module, x, x_t)
                skips.append((x, x_t))
            elif role == "block":
                x, x_t = module._forward(x, emb, x_t, emb_t)
                skips.append((x, x_t))
            elif role == "aux_down":
                aux, aux_t = _layer(module, aux, aux_t)
            elif role == "aux_skip":
                y, y_t = _layer(module, aux, aux_t)
                x, x_t = add(x, y), _tangent(add, x_t, y_t)
                skips[-1] = (x, x_t)
            else:  # aux_residual: the running image-resolution path joins the main path
                y, y_t = _layer(module, aux, aux_t)
                x, x_t = add(x, y, math.sqrt(0.5)), _tangent(lambda a, b: add(a, b, math.sqrt(0.5)), x_t, y_t)
                skips[-1] = (x, x_t)
                aux, aux_t = x, x_t

        out = out_t = None
        normed = normed_t = None
        for role, module in zip(self._dec_roles, self.dec.values()):
            if role == "block":
                x, x_t = module._forward(x, emb, x_t, emb_t)
            elif role == "block_cat":
                skip, skip_t = skips.pop()
                cat_t = _tangent(lambda a, b: torch.cat([a, b], dim=1), x_t, skip_t)
                x, x_t = module._forward(torch.cat([x, skip], dim=1), emb, cat_t, emb_t)
            elif role == "aux_up":
                out, out_t = _layer(module, out, out_t)
            elif role == "aux_norm":
                normed, normed_t = module.forward_and_tangent(x, x_t)
            else:  # aux_conv: output head at this resolution, summed over resolutions for 'skip'
                head, head_t = _layer(module, *_silu(normed, normed_t))
                if out is None:
                    out, out_t = head, head_t
                else:
                    out, out_t = out + head, _tangent(add, out_t, head_t)
        return out, out_t

    def _check_inputs(self, x: torch.Tensor, aug_cond: torch.Tensor | None,
                      class_labels: torch.Tensor | None) -> int:
        """Raise ValueError for inputs this network cannot take; return the batch size."""
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"SongUNet expects x of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(in_channels={self.in_channels}, img_resolution={self.img_resolution}); got {list(x.shape)}")
        batch = x.shape[0]
        if self.map_augment is not None and aug_cond is not None and tuple(aug_cond.shape) != (batch, self.augment_dim):
            raise ValueError(f"aug_cond must have shape [{batch}, {self.augment_dim}]; got {list(aug_cond.shape)}")
        if self.map_label is not None:
            if class_labels is None or tuple(class_labels.shape) != (batch, self.label_dim):
                got = None if class_labels is None else list(class_labels.shape)
                raise ValueError(f"this network is class-conditional (label_dim={self.label_dim}): "
                                 f"pass class_labels of shape [{batch}, {self.label_dim}]; got {got}")
        elif class_labels is not None:
            raise ValueError("class_labels given but the network was built with label_dim=0")
        return batch


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}")


def _per_sample(name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
    """A time as a [B] tensor: accepts shape [B], [B, 1, ...] or a single value."""
    if value.numel() == 1:
        return value.reshape(1).expand(batch)
    if value.numel() != batch:
        raise ValueError(f"{name} must hold one value per sample (shape [{batch}]); got shape {list(value.shape)}")
    return value.reshape(batch)
