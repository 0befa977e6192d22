"""DiT (Peebles & Xie, 2023) as the MeanFlow authors use it for ImageNet 256 latents.

The network of their JAX code (`models/models_dit.py` of Gsunshine/meanflow): patch embedding, a
fixed 2-D sin-cos position embedding, adaLN-Zero transformer blocks and a zero-initialised final
layer. MeanFlow conditions on two times: t and h = t - r get one timestep embedder each, and the
two embeddings are summed with the class embedding into the block condition c. The label table
has one extra row, index num_classes, the null class ("no label") of classifier-free guidance.
Label dropout is the loss's job, not the network's. Module and parameter names follow
facebookresearch/DiT (plus `h_embedder`), so `models/dit_convert.py` maps their Flax names 1:1.

Numerics follow theirs: LayerNorm without affine, eps 1e-6; GELU with the tanh approximation; q
scaled before q k^T; time embeddings [cos, sin] of t itself (t in [0, 1], not 1000 t).

Attention is plain matmul + softmax (softmax in float32 at least), not
`F.scaled_dot_product_attention`: MeanFlow's loss runs `torch.func.jvp` through the network,
and SDPA's fused flash / memory-efficient GPU kernels have no forward-mode AD
(pytorch/pytorch#128971). docs/dit.md gives the memory this costs at 256 tokens.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import per_sample

# depth x width x heads and patch size of the authors' configs; input 32 x 32 x 4 (ImageNet 256
# latents of the SD VAE, 1000 classes). Parameter counts (paper, Table 1/2): B/4 131.2 M,
# B/2 131.1 M, M/2 308.0 M, L/2 459.1 M, XL/2 676.4 M.
_IMAGENET = dict(img_resolution=32, in_channels=4, num_classes=1000)
DIT_CONFIGS: dict[str, dict] = {
    "B/4": dict(_IMAGENET, depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "B/2": dict(_IMAGENET, depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "M/2": dict(_IMAGENET, depth=16, hidden_size=1024, num_heads=16, patch_size=2),
    "L/2": dict(_IMAGENET, depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "XL/2": dict(_IMAGENET, depth=28, hidden_size=1152, num_heads=16, patch_size=2),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] * (1 + scale) + shift, with shift and scale [B, D] per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class LayerNorm(nn.Module):
    """LayerNorm over the last axis without affine parameters (their TorchLayerNorm), in float32 at least.

    Written out instead of `F.layer_norm`: that op's forward-mode derivative uses its saved mean and
    1/std as constants, so gradients *of a JVP tangent* (du/dt) with respect to anything before the
    norm come out wrong (torch 2.14, CPU; cf. pytorch/pytorch#196700); u and its gradient are right.
    Flax computes the variance as E[x^2] - E[x]^2, this the two-pass way: equal up to rounding.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + self.eps)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """[grid * grid, dim] fixed position embedding of MAE/DiT, in float64; tokens row-major.

    As in MAE's code the first half encodes the column (meshgrid puts w first), the second the row.
    """
    if dim % 4:
        raise ValueError(f"hidden_size={dim} must be a multiple of 4 for the 2-D sin-cos position embedding")
    pos = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, col.flatten()), _sincos_1d(dim // 2, row.flatten())], dim=1)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: [sin(pos w), cos(pos w)] with w = 10000^(-k / (dim / 2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def xavier_linear(in_features: int, out_features: int) -> nn.Linear:
    """nn.Linear with xavier-uniform weight and zero bias (their `DiTLinear`)."""
    linear = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """nn.Linear with zero weight and bias (adaLN modulation and the final projection)."""
    linear = nn.Linear(in_features, out_features)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class TimestepEmbedder(nn.Module):
    """[B] times -> [B, hidden]: sinusoidal features [cos, sin] then Linear-SiLU-Linear (weights N(0, 0.02))."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
        args = t[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=1)
        if self.frequency_embedding_size % 2:
            emb = F.pad(emb, (0, 1))
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention [B, T, D] -> [B, T, D]; qkv holds all q, then all k, then all v."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = xavier_linear(dim, 3 * dim)
        self.proj = xavier_linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # [B, heads, T, T]
        # float32 at least, so that bf16 autocast keeps the attention weights accurate.
        weights = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1).to(v.dtype)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """[B, T, D] -> [B, T, D]: Linear, GELU (tanh approximation), Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = xavier_linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = xavier_linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x [B, T, D], c [B, D] -> [B, T, D]; an identity at initialisation (zero gates)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = LayerNorm(eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """x [B, T, D], c [B, D] -> [B, T, p * p * C]: adaLN-modulated LayerNorm, then a zero-initialised Linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(eps=1e-6)
        self.linear = zero_linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """u(z, t, h, labels): z [B, C, R, R], t and h [B], labels [B] long -> u [B, C, R, R].

    labels are class indices 0..num_classes-1, or num_classes for the null class. With
    num_classes = 0 the network is unconditional: labels must be None, and every sample gets
    the (single, learned) null-class embedding, as their code would with all labels null.
    """

    def __init__(self, *, img_resolution: int = 32, in_channels: int = 4, patch_size: int = 2,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, frequency_embedding_size: int = 256):
        super().__init__()
        if img_resolution % patch_size:
            raise ValueError(f"img_resolution={img_resolution} is not a multiple of patch_size={patch_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 (0: unconditional)")
        self.img_resolution, self.in_channels, self.patch_size = img_resolution, in_channels, patch_size
        self.num_classes = num_classes

        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # xavier-uniform over the flattened kernel: fan_in = C p p, fan_out = hidden.
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(hidden_size, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        grid = img_resolution // patch_size
        # In the state dict (as in facebookresearch/DiT) so that a checkpoint tells the input size.
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, grid).float()[None])  # [1, T, D]

        self.t_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size)
        self.h_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size)
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        t, h, labels = self._check_inputs(z, t, h, labels)
        x = self.x_embedder.proj(z).flatten(2).transpose(1, 2) + self.pos_embed  # [B, T, D], row-major patches
        c = self.t_embedder(t) + self.h_embedder(h) + self.y_embedder.embedding_table(labels)  # [B, D]
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p * p * C] (p, p, C with C fastest) -> [B, C, R, R]."""
        p, c, grid = self.patch_size, self.in_channels, self.img_resolution // self.patch_size
        x = x.reshape(x.shape[0], grid, grid, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, grid * p, grid * p)

    def _check_inputs(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raise ValueError for inputs this network cannot take; return t, h [B] and labels [B] long.

        The times come back in float32 or wider (as in their code) even when z is bf16.
        """
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if z.ndim != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"DiT expects z of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] (NCHW; "
                             f"in_channels={self.in_channels}, img_resolution={self.img_resolution}); "
                             f"got {list(z.shape)}")
        batch = z.shape[0]
        if labels is None:
            if self.num_classes:
                raise ValueError(f"this DiT is class-conditional (num_classes={self.num_classes}): pass labels [B] "
                                 f"with class indices, {self.num_classes} for the null class")
            labels = torch.zeros(batch, dtype=torch.long, device=z.device)
        elif labels.dtype.is_floating_point or tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must be integer class indices of shape [{batch}]; got {labels.dtype} "
                             f"{list(labels.shape)} (one-hot rows? use labels.argmax(1))")
        t, h = per_sample("t", t, batch), per_sample("h", h, batch)
        return (t.to(torch.promote_types(t.dtype, torch.float32)),
                h.to(torch.promote_types(h.dtype, torch.float32)), labels.long())
