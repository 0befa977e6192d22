"""imfDiT: the DiT of improved MeanFlow (iMF; Geng et al. 2025, arXiv 2512.02012), written for training.

The network predicts the average velocity u(z, h) and, from a second head, the instantaneous
velocity v, conditioned on the class, the guidance scale omega and the guidance interval
[t_min, t_max]. It follows the authors' JAX `imfDiT` (and their PyTorch inference port) exactly:

* No adaLN. Conditioning is in context: learned tokens, each group shifted by an embedding of its
  condition, are put in front of the patch tokens, in this order
      class (8 tokens)  omega (4, embedding of 1 - 1/omega)  t_min (2)  t_max (2)  h (4)  patches
  The time t itself has no tokens: the network sees only h = t - r (as in the authors' code);
  `forward` takes t for the repository's network convention and ignores it.
* Blocks: pre-RMSNorm, multi-head attention with RMSNorm on queries and keys (QK-norm) and rotary
  position embedding (RoPE) over the whole sequence, then a SwiGLU MLP of hidden width
  int(hidden_size * 8/3); each residual branch is multiplied by a per-channel gate initialised to 0,
  so a fresh block is the identity.
* `depth` counts the blocks on u's path: depth - aux_head_depth shared blocks, then a u-head of
  aux_head_depth blocks. The v-head (another aux_head_depth blocks on the shared output) is only
  needed for training; `v_head=False` builds the network without it (the authors' `eval` mode).
* Output layers: RMSNorm then a zero-initialised linear map to patches.

Parameter names equal the authors' up to their Flax-style wrappers; models/imf_convert.py maps
their PyTorch checkpoints and their JAX parameters onto this network and back.

Every operation has a forward-mode AD rule and traces under torch.compile, because the iMF loss
differentiates u with torch.func.jvp and back-propagates through it:
* RoPE rotates pairs of real channels. The authors' PyTorch code views the channels as complex
  numbers (`x.view(torch.complex64)`), a view autograd treats as non-differentiable: gradients and
  tangents would not flow through queries and keys. The pairing (channels 2i, 2i+1) is theirs.
* Attention is plain matmul + softmax in (at least) float32: the fused SDPA kernels have no
  forward-mode AD on GPU (see models/unet.py).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import per_sample

# The authors' four configurations (patch size 2 on 32 x 32 x 4 ImageNet latents). `depth` counts
# shared + u-head blocks; the v-head adds aux_head_depth (8) more when v_head=True.
IMF_CONFIGS = {
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "M/2": dict(depth=24, hidden_size=768, num_heads=12, patch_size=2),
    "L/2": dict(depth=32, hidden_size=1024, num_heads=16, patch_size=2),
    "XL/2": dict(depth=48, hidden_size=1024, num_heads=16, patch_size=2),
}


def _linear(in_features: int, out_features: int, *, bias: bool, init_constant: float) -> nn.Linear:
    """nn.Linear with weights ~ N(0, (init_constant / sqrt(in_features))^2) and zero bias (theirs)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(layer.weight, std=init_constant / math.sqrt(in_features))
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension; statistics in float32 at least."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y * torch.rsqrt(y.square().mean(dim=-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


class TimestepEmbedder(nn.Module):
    """A scalar per sample [B] -> [B, hidden_size]: 256 sinusoids (cos then sin), Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, *, frequency_size: int = 256, init_constant: float = 1.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            _linear(frequency_size, hidden_size, bias=True, init_constant=init_constant),
            nn.SiLU(),
            _linear(hidden_size, hidden_size, bias=True, init_constant=init_constant),
        )

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(s.dtype, torch.float32)
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) / half * torch.arange(half, dtype=dtype, device=s.device))
        args = s.to(dtype)[:, None] * freqs
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class index [B] in 0..num_classes (num_classes = the null class) -> [B, hidden_size]."""

    def __init__(self, num_classes: int, hidden_size: int, *, init_constant: float = 1.0):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        nn.init.normal_(self.embedding_table.weight, std=init_constant / math.sqrt(hidden_size))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class PatchEmbedder(nn.Module):
    """[B, C, R, R] -> [B, (R/p)^2, hidden_size], patches in row-major order."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # Xavier-uniform as for a Dense layer on flattened patches: fan_out is hidden_size, not
        # hidden_size * p^2 as nn.init.xavier_uniform_ would count for a convolution.
        limit = math.sqrt(6 / (patch_size * patch_size * in_channels + hidden_size))
        nn.init.uniform_(self.proj.weight, -limit, limit)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def rope_angles(head_dim: int, seq_len: int, theta: float = 10000.0) -> torch.Tensor:
    """[seq_len, head_dim / 2]: position * theta^(-2i / head_dim), the angle of channel pair i."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, L, heads, D] by the angles of cos, sin [L, D/2]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class RoPEAttention(nn.Module):
    """Multi-head self-attention with QK RMSNorm and RoPE, no biases: [B, L, D] -> [B, L, D]."""

    def __init__(self, hidden_size: int, num_heads: int, *, init_constant: float = 1.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        proj = dict(bias=False, init_constant=init_constant)
        self.q_proj = _linear(hidden_size, hidden_size, **proj)
        self.k_proj = _linear(hidden_size, hidden_size, **proj)
        self.v_proj = _linear(hidden_size, hidden_size, **proj)
        self.out_proj = _linear(hidden_size, hidden_size, **proj)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q = apply_rope(self.q_norm(self.q_proj(x).unflatten(-1, heads)), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_norm(self.k_proj(x).unflatten(-1, heads)), cos, sin).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, heads).transpose(1, 2)             # [B, heads, L, D/heads]
        logits = (q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)      # [B, heads, L, L]
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
        out = probs.to(v.dtype) @ v
        return self.out_proj(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases: [..., D] -> [..., D]."""

    def __init__(self, in_features: int, hidden_features: int, *, init_constant: float = 1.0):
        super().__init__()
        self.w1 = _linear(in_features, hidden_features, bias=False, init_constant=init_constant)
        self.w3 = _linear(in_features, hidden_features, bias=False, init_constant=init_constant)
        self.w2 = _linear(hidden_features, in_features, bias=False, init_constant=init_constant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """x + gate_a * attn(norm(x)), then + gate_m * mlp(norm(x)); the gates start at zero."""

    def __init__(self, hidden_size: int, num_heads: int, *, mlp_ratio: float = 8 / 3, init_constant: float = 1.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = RoPEAttention(hidden_size, num_heads, init_constant=init_constant)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, int(hidden_size * mlp_ratio), init_constant=init_constant)
        self.attn_scale = nn.Parameter(torch.zeros(hidden_size))
        self.mlp_scale = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin) * self.attn_scale
        return x + self.mlp(self.norm2(x)) * self.mlp_scale


class FinalLayer(nn.Module):
    """RMSNorm then a zero-initialised linear map: [B, L, D] -> [B, L, p * p * C]."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.linear = _linear(hidden_size, out_features, bias=True, init_constant=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class ImfDiT(nn.Module):
    """iMF's DiT: (z, h, class, omega, [t_min, t_max]) -> (u, v); see the module docstring.

    forward(z [B, C, R, R], t [B], h [B], labels [B] | None, omega [B] | None, t_min [B] | None,
    t_max [B] | None) -> (u [B, C, R, R], v [B, C, R, R] or None without the v-head).
    """

    takes_guidance = True  # forward takes omega, t_min, t_max

    def __init__(self,
                 img_resolution: int = 32,            # side R of z (latents of 256 x 256 images: 32)
                 in_channels: int = 4,                # channels of z, u and v
                 num_classes: int = 1000,             # labels 0..num_classes-1; num_classes is the null class
                 patch_size: int = 2,
                 hidden_size: int = 768,
                 depth: int = 12,                     # shared + u-head blocks
                 num_heads: int = 12,
                 mlp_ratio: float = 8 / 3,            # SwiGLU hidden width = int(hidden_size * mlp_ratio)
                 aux_head_depth: int = 8,             # blocks in the u-head, and in the v-head
                 v_head: bool = True,                 # False: no v-head (inference only); v is None
                 num_class_tokens: int = 8,
                 num_time_tokens: int = 4,            # tokens of h
                 num_cfg_tokens: int = 4,             # tokens of omega
                 num_interval_tokens: int = 2,        # tokens of t_min, and of t_max
                 token_init_constant: float = 1.0,    # tokens ~ N(0, (c / sqrt(hidden_size))^2)
                 embedding_init_constant: float = 1.0,  # the same c for embedders' weights (std c / sqrt(fan_in))
                 weight_init_constant: float = 0.32,  # the same c for the blocks' weights
                 ):
        super().__init__()
        if img_resolution % patch_size:
            raise ValueError(f"img_resolution={img_resolution} is not a multiple of patch_size={patch_size}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size={hidden_size} must split into num_heads={num_heads} heads "
                             "of even size (RoPE rotates channel pairs)")
        if not 0 <= aux_head_depth <= depth:
            raise ValueError(f"aux_head_depth={aux_head_depth} must be within 0..depth={depth}")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size

        self.x_embedder = PatchEmbedder(in_channels, hidden_size, patch_size)
        embed = dict(init_constant=embedding_init_constant)
        self.h_embedder = TimestepEmbedder(hidden_size, **embed)
        self.omega_embedder = TimestepEmbedder(hidden_size, **embed)
        self.cfg_t_start_embedder = TimestepEmbedder(hidden_size, **embed)
        self.cfg_t_end_embedder = TimestepEmbedder(hidden_size, **embed)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, **embed)

        def tokens(count: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(count, hidden_size) * (token_init_constant / math.sqrt(hidden_size)))

        self.time_tokens = tokens(num_time_tokens)  # h's tokens (named as theirs)
        self.class_tokens = tokens(num_class_tokens)
        self.omega_tokens = tokens(num_cfg_tokens)
        self.t_min_tokens = tokens(num_interval_tokens)
        self.t_max_tokens = tokens(num_interval_tokens)
        self.num_prefix_tokens = num_class_tokens + num_cfg_tokens + 2 * num_interval_tokens + num_time_tokens

        # RoPE positions run over the whole sequence, prefix tokens first. Not saved: a function of the config.
        angles = rope_angles(hidden_size // num_heads, self.num_prefix_tokens + (img_resolution // patch_size) ** 2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

        block = dict(hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     init_constant=weight_init_constant)
        self.shared_blocks = nn.ModuleList(TransformerBlock(**block) for _ in range(depth - aux_head_depth))
        self.u_heads = nn.ModuleList(TransformerBlock(**block) for _ in range(aux_head_depth))
        self.u_final_layer = FinalLayer(hidden_size, patch_size * patch_size * in_channels)
        if v_head:
            self.v_heads = nn.ModuleList(TransformerBlock(**block) for _ in range(aux_head_depth))
            self.v_final_layer = FinalLayer(hidden_size, patch_size * patch_size * in_channels)
        else:
            self.v_heads = self.v_final_layer = None

    @property
    def has_v_head(self) -> bool:
        return self.v_final_layer is not None

    def _sequence(self, z: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, omega: torch.Tensor,
                  t_min: torch.Tensor, t_max: torch.Tensor) -> torch.Tensor:
        """The token sequence [B, prefix + patches, D]: conditioning tokens in front of the patch tokens."""
        groups = [
            (self.class_tokens, self.y_embedder(labels)),
            (self.omega_tokens, self.omega_embedder(1 - 1 / omega)),
            (self.t_min_tokens, self.cfg_t_start_embedder(t_min)),
            (self.t_max_tokens, self.cfg_t_end_embedder(t_max)),
            (self.time_tokens, self.h_embedder(h)),
        ]
        patches = self.x_embedder(z)
        prefix = [(tokens + emb[:, None, :]).to(patches.dtype) for tokens, emb in groups]
        return torch.cat(prefix + [patches], dim=1)

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, (R/p)^2, p * p * C] with channels ordered (row in patch, column in patch, C) -> [B, C, R, R]."""
        p, c, n = self.patch_size, self.in_channels, self.img_resolution // self.patch_size
        x = tokens.reshape(tokens.shape[0], n, n, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], c, n * p, n * p)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None = None,
                omega: torch.Tensor | None = None, t_min: torch.Tensor | None = None,
                t_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if z.ndim != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"ImfDiT expects z of shape [B, {', '.join(map(str, expected))}] "
                             f"(in_channels, img_resolution); got {list(z.shape)}")
        batch = z.shape[0]
        del t  # the network conditions on h = t - r only, as the authors'
        h = per_sample("h", h, batch)

        def condition(name: str, value: torch.Tensor | None, default: float) -> torch.Tensor:
            return h.new_full((batch,), default) if value is None else per_sample(name, value, batch).to(h.dtype)

        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=z.device)
        seq = self._sequence(z, h, labels.reshape(batch), condition("omega", omega, 1.0),
                             condition("t_min", t_min, 0.0), condition("t_max", t_max, 1.0))

        cos, sin = self.rope_cos, self.rope_sin
        for block in self.shared_blocks:
            seq = block(seq, cos, sin)
        u_seq = seq
        for block in self.u_heads:
            u_seq = block(u_seq, cos, sin)
        u = self._unpatchify(self.u_final_layer(u_seq[:, self.num_prefix_tokens:]))
        if not self.has_v_head:
            return u, None
        v_seq = seq
        for block in self.v_heads:
            v_seq = block(v_seq, cos, sin)
        return u, self._unpatchify(self.v_final_layer(v_seq[:, self.num_prefix_tokens:]))
