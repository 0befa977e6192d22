"""Exponential moving averages of a network's parameters at several decays.

`EMAModel` is the module that training saves: its state dict has the layout of the authors'
checkpoints (`net.*`, `net_ema.*`, `net_ema1.*`, ..., and the step counter `num_updates`),
so their files load into it and ours load into their code.
"""

import copy
from collections.abc import Sequence

import torch
from torch import nn


class EMAModel(nn.Module):
    """A trained network `net` plus frozen EMA copies of it, one per decay.

    The copies are named `net_ema` (decays[0]), `net_ema1` (decays[1]), `net_ema2`, ... They are
    updated only every `period` optimizer steps, with the decay raised to the power `period`,
    which averages almost like a per-step EMA at 1/period of the cost. The arithmetic is done in
    float64 and rounded back to the parameter dtype, as in the authors' release, so averages
    match theirs bit for bit. Only parameters are averaged; buffers (e.g. resampling filters)
    are taken to be constants and keep the values copied at construction.
    """

    # Elements per flat float64 scratch vector. On accelerators, 2**24 (128 MiB) makes an update
    # of a 56M-parameter network a few dozen kernels with modest scratch memory. On CPU, blocks
    # that large go back to the OS when freed and are page-faulted in again at every update
    # (5x slower than a per-tensor loop); 2**18 (2 MiB) blocks are reused from the heap.
    BUCKET_NUMEL = 1 << 24
    BUCKET_NUMEL_CPU = 1 << 18

    def __init__(self, net: nn.Module, decays: Sequence[float] = (0.9999, 0.99995, 0.9996), period: int = 16):
        super().__init__()
        decays = tuple(decays)
        if len(decays) == 0:
            raise ValueError("EMAModel needs at least one decay (the first one becomes net_ema); got decays=()")
        for i, decay in enumerate(decays):
            if not (isinstance(decay, (int, float)) and 0.0 <= float(decay) < 1.0):
                raise ValueError(f"EMA decay decays[{i}]={decay!r} is invalid: each decay must satisfy 0 <= decay < 1")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"EMA period={period!r} is invalid: pass a positive int (1 = update every step)")

        self.net = net
        names = ["net_ema"] + [f"net_ema{i}" for i in range(1, len(decays))]
        for name in names:
            ema = copy.deepcopy(net)
            ema.requires_grad_(False)
            ema.eval()
            self.add_module(name, ema)
        self.decays = {name: float(decay) for name, decay in zip(names, decays)}
        self.period = period
        # The buffer is what checkpoints carry; the Python int mirrors it so that deciding
        # whether this step is a period boundary never reads the device (no host sync).
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self._count = 0

    def forward(self, *args, **kwargs):
        """Calls the trained network."""
        return self.net(*args, **kwargs)

    def ema_names(self) -> list[str]:
        """["net_ema", "net_ema1", ...] in decay order."""
        return list(self.decays)

    def networks(self) -> dict[str, nn.Module]:
        """{"net": trained network, "net_ema": ..., "net_ema1": ..., ...}."""
        return {"net": self.net, **{name: getattr(self, name) for name in self.decays}}

    def train(self, mode: bool = True) -> "EMAModel":
        """Sets `net`'s mode; the EMA copies are only sampled from, so they always stay in eval mode."""
        super().train(mode)
        for name in self.decays:
            getattr(self, name).eval()
        return self

    @torch.no_grad()
    def update(self) -> None:
        """Counts one optimizer step; on every `period`-th step moves each copy towards `net`.

        p_ema <- p_ema + (1 - decay**period) * (p - p_ema), in float64. The tensors are
        concatenated into flat vectors (per device and dtype, of bounded size),
        so an update is a few large kernels rather than several small ones per parameter tensor.
        """
        self._count += 1
        self.num_updates.add_(1)
        if self._count % self.period != 0:
            return
        net_params = list(self.net.parameters())
        ema_params = {name: list(getattr(self, name).parameters()) for name in self.decays}
        on_cpu = all(p.device.type == "cpu" for p in net_params)
        for idx in self._buckets(net_params, self.BUCKET_NUMEL_CPU if on_cpu else self.BUCKET_NUMEL):
            src = [net_params[i] for i in idx]
            numels = [p.numel() for p in src]
            p64 = torch.cat([p.detach().reshape(-1) for p in src]).to(torch.float64)
            delta = torch.empty_like(p64)
            for name, decay in self.decays.items():
                dst = [ema_params[name][i] for i in idx]
                e64 = torch.cat([e.reshape(-1) for e in dst]).to(torch.float64)
                # Same operation order as the reference formula, so the rounding is identical.
                torch.sub(p64, e64, out=delta)
                delta.mul_(1.0 - decay**self.period)
                e64.add_(delta)
                new = e64.to(src[0].dtype)
                torch._foreach_copy_(dst, [v.view_as(e) for v, e in zip(new.split(numels), dst)])

    @staticmethod
    def _buckets(params: list[torch.Tensor], max_numel: int) -> list[list[int]]:
        """Indices of `params` grouped by (device, dtype) into runs of at most max_numel elements
        (a larger tensor gets a run of its own)."""
        buckets, open_bucket = [], {}
        for i, p in enumerate(params):
            key = (p.device, p.dtype)
            bucket, size = open_bucket.get(key, (None, 0))
            if bucket is None or size + p.numel() > max_numel:
                bucket, size = [], 0
                buckets.append(bucket)
            bucket.append(i)
            open_bucket[key] = (bucket, size + p.numel())
        return buckets

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # Resume the period phase exactly where the saved run left it.
        self._count = int(self.num_updates.item())
