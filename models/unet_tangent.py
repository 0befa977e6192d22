"""SongUNet's output and its directional derivative in one pass, by hand (MeanFlow's jvp_mode="network").

`forward_and_tangent(net, ...)` walks the modules of a `SongUNet` in the order of its `forward`,
reading their weights and hyper-parameters, and carries every activation with its tangent as a
`Dual`. Forward AD (`torch.func.jvp`) of a convolution also convolves the input with the weights'
tangent, which is all zeros here; that product alone costs about a fifth of a training step. The
rules below propagate the input's tangent only.

Values come from the same functions and modules as `SongUNet.forward`, bit for bit (dropout masks
included: both draw them from the global RNG in the same order), with their autograd graph.
Tangents are computed under `torch.no_grad()`: MeanFlow's target detaches du/dt, so only the
value needs a graph. A change to models/unet.py's forward needs the same change here;
tests/test_unet.py compares the two, and both with `torch.func.jvp`.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from models import unet


class Dual(NamedTuple):
    """An activation and its tangent, of the same shape."""

    value: torch.Tensor
    tangent: torch.Tensor


def forward_and_tangent(net: unet.SongUNet, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                        x_t: torch.Tensor, t_t: torch.Tensor, h_t: torch.Tensor,
                        aug_cond: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, u_t): u = net(x, t, h, aug_cond, labels) and its derivative along (x_t, t_t, h_t).

    x_t is shaped like x; t_t and h_t like t and h ([B] or one value). u_t equals
    ``torch.func.jvp`` of ``net`` but has no autograd graph; u keeps forward's. aug_cond and
    labels carry no tangent.
    """
    if tuple(x_t.shape) != tuple(x.shape):
        raise ValueError(f"x_t must have the shape of x, {list(x.shape)}; got {list(x_t.shape)}")
    t_value, h_value = net._check_inputs(x, t, h, aug_cond, labels)
    batch = x.shape[0]
    x = Dual(x, x_t.to(x.dtype))
    t = Dual(t_value, unet.per_sample("t_t", t_t, batch).to(t_value.dtype))
    h = Dual(h_value, unet.per_sample("h_t", h_t, batch).to(h_value.dtype))

    # Mapping. The labels carry no tangent.
    emb = _cat(_embedding(net.map_noise, t), _embedding(net.map_noise, h))
    emb = Dual(net._add_labels(emb.value, aug_cond, labels), emb.tangent)
    emb = _silu(_linear(net.map_layer0, emb))
    emb = _silu(_linear(net.map_layer1, emb))

    # Encoder.
    skips = []
    aux = x
    for name, block in net.enc.items():
        if "aux_down" in name:
            aux = _conv(block, aux)
        elif "aux_skip" in name:
            x = skips[-1] = _add(x, _conv(block, aux))
        elif "aux_residual" in name:
            x = skips[-1] = aux = _add(x, _conv(block, aux), math.sqrt(0.5))
        else:
            x = unet_block(block, x, emb) if isinstance(block, unet.UNetBlock) else _conv(block, x)
            skips.append(x)

    # Decoder.
    aux = tmp = None
    for name, block in net.dec.items():
        if "aux_up" in name:
            aux = _conv(block, aux)
        elif "aux_norm" in name:
            tmp = _group_norm(block, x)
        elif "aux_conv" in name:
            tmp = _conv(block, _silu(tmp))
            aux = tmp if aux is None else _add(tmp, aux)
        else:
            if x.value.shape[1] != block.in_channels:
                x = _cat(x, skips.pop())
            x = unet_block(block, x, emb)
    return aux.value, aux.tangent


def unet_block(block: unet.UNetBlock, x: Dual, emb: Dual) -> Dual:
    """block(x, emb) and its tangent, step by step as `UNetBlock.forward`."""
    shortcut = x if block.skip is None else _conv(block.skip, x)
    x = _conv(block.conv0, _silu(_group_norm(block.norm0, x)))
    dtype = x.value.dtype
    params = _linear_map(lambda p: p[:, :, None, None].to(dtype), _linear(block.affine, emb))
    if block.adaptive_scale:
        normed = _group_norm(block.norm1, x)
        scale, shift = params.value.chunk(2, dim=1)
        with torch.no_grad():
            scale_t, shift_t = params.tangent.chunk(2, dim=1)
            tangent = torch.addcmul(shift_t, normed.tangent, scale + 1) + normed.value * scale_t
        x = _silu(Dual(torch.addcmul(shift, normed.value, scale + 1), tangent))
    else:
        x = _silu(_group_norm(block.norm1, _add(x, params)))
    if block.dropout and block.training:
        x = _dropout(x, block.dropout)
    x = _conv(block.conv1, x)
    x = _add(x, shortcut, block.skip_scale)
    if block.num_heads:
        qkv = _linear_map(lambda a: a.flatten(2), _conv(block.qkv, _group_norm(block.norm2, x)))
        shape = x.value.shape
        attn = _linear_map(lambda a: a.reshape(shape), _self_attention(qkv, block.num_heads))
        x = _add(_conv(block.proj, attn), x, block.skip_scale)
    return x


# ---------------------------------------------------------------- layer rules

def _linear_map(fn, *args: Dual) -> Dual:
    """fn of the values, and of the tangents: the rule of any map linear in its inputs (cat, reshape, sums)."""
    with torch.no_grad():
        tangent = fn(*(a.tangent for a in args))
    return Dual(fn(*(a.value for a in args)), tangent)


def _add(a: Dual, b: Dual, scale: float | None = None) -> Dual:
    """a + b, then times scale when one is given (the residual joins)."""
    if scale is None:
        return _linear_map(torch.add, a, b)
    return _linear_map(lambda x, y: (x + y) * scale, a, b)


def _cat(a: Dual, b: Dual) -> Dual:
    """a and b concatenated on channels (dim 1)."""
    return _linear_map(lambda x, y: torch.cat([x, y], dim=1), a, b)


def _linear(layer: unet.Linear, x: Dual) -> Dual:
    """The layer is affine in x: its tangent is W x_t (the weights carry none)."""
    with torch.no_grad():
        tangent = F.linear(x.tangent, layer.weight.to(x.tangent.dtype))
    return Dual(layer(x.value), tangent)


def _conv(layer: unet.Conv2d, x: Dual) -> Dual:
    """The layer is affine in x: its tangent is the same convolution and resampling without the bias."""
    with torch.no_grad():
        tangent = unet.conv2d(x.tangent, layer.weight, None, layer.resample_filter, up=layer.up, down=layer.down,
                              fused_resample=layer.fused_resample)
    return Dual(layer(x.value), tangent)


def _embedding(module: unet.PositionalEmbedding | unet.FourierEmbedding, x: Dual) -> Dual:
    """[sin | cos] of x times the frequencies; the tangent is [cos | -sin] times x_t times them."""
    y = module(x.value)
    with torch.no_grad():
        sin, cos = y.chunk(2, dim=1)
        angles_t = torch.outer(x.tangent, module.frequencies(x.value))
        tangent = torch.cat([cos * angles_t, -sin * angles_t], dim=1)
    return Dual(y, tangent)


def _silu(x: Dual) -> Dual:
    """silu'(x) = sig(x) (1 + x (1 - sig(x)))."""
    with torch.no_grad():
        sig = torch.sigmoid(x.value)
        tangent = x.tangent * (sig * (1 + x.value * (1 - sig)))
    return Dual(F.silu(x.value), tangent)


def _dropout(x: Dual, p: float) -> Dual:
    """Training-mode dropout with one mask for value and tangent.

    The mask is F.dropout of ones: it draws from the RNG exactly as F.dropout(x) would, and
    x * mask equals F.dropout(x).
    """
    mask = F.dropout(torch.ones_like(x.value), p=p, training=True)
    return _linear_map(lambda a: a * mask, x)


def _group_norm(norm: unet.GroupNorm, x: Dual) -> Dual:
    """y = g (x - m) / s + b per group gives y_t = g (x_t - mean(x_t) - xhat mean(xhat x_t)) / s."""
    weight = norm.weight.to(x.value.dtype)
    normed, rstd = unet.standardize_groups(x.value, norm.num_groups, norm.eps)
    with torch.no_grad():
        groups_t = x.tangent.reshape(x.tangent.shape[0], norm.num_groups, -1)
        xhat = normed.reshape(groups_t.shape)
        normed_t = (groups_t - groups_t.mean(dim=-1, keepdim=True)
                    - xhat * (xhat * groups_t).mean(dim=-1, keepdim=True)) * rstd
        affine_shape = (1, -1) + (1,) * (x.tangent.ndim - 2)
        # rstd is float32 at least: back to the tangent's dtype.
        tangent = (normed_t.reshape(x.tangent.shape) * weight.view(affine_shape)).to(x.tangent.dtype)
    return Dual(unet.channel_affine(normed, weight, norm.bias.to(x.value.dtype)), tangent)


def _self_attention(qkv: Dual, num_heads: int) -> Dual:
    """unet.self_attention and its tangent, sharing the attention weights.

    With p = softmax(l): p_t = p (l_t - sum(p l_t)); out = v p^T gives out_t = v_t p^T + v p_t^T.
    """
    batch, _, length = qkv.value.shape
    q, k, v = unet.attention_heads(qkv.value, num_heads)
    probs = unet.attention_probs(q, k)
    weights = probs.to(v.dtype)
    out = torch.matmul(v, weights.transpose(1, 2)).reshape(batch, -1, length)
    with torch.no_grad():
        q_t, k_t, v_t = unet.attention_heads(qkv.tangent, num_heads)
        scale = 1 / math.sqrt(q.shape[1])
        logits_t = (torch.matmul(q_t.transpose(1, 2), k) + torch.matmul(q.transpose(1, 2), k_t)) * scale
        logits_t = logits_t.to(probs.dtype)
        probs_t = probs * (logits_t - (probs * logits_t).sum(dim=-1, keepdim=True))
        out_t = torch.matmul(v_t, weights.transpose(1, 2)) + torch.matmul(v, probs_t.to(v.dtype).transpose(1, 2))
    return Dual(out, out_t.reshape(batch, -1, length))
