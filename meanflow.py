"""MeanFlow (Geng et al., 2025): (t, r) sampling, the JVP training loss and the few-step sampler.

Notation follows the paper:
    z = (1 - t) x + t e        x data, e ~ N(0, I); t = 1 is pure noise, t = 0 is data
    v = e - x                  conditional velocity dz/dt (the loss uses it for the marginal v(z, t))
    u(z, t, h)                 average velocity over [r, t], with h = t - r >= 0
    MeanFlow identity          u = v - (t - r) du/dt,   du/dt = v . d_z u + d_t u
The network is any callable ``net(z, t, h, **cond) -> u`` with ``t``, ``h`` of shape [B] (the
convention of models/networks.py). ``cond`` holds only the inputs in use: ``labels``, class
indices [B] (LongTensor) for a class-conditional network, where the index ``num_classes`` is the
null class, "no label" (the unconditional model of classifier-free guidance); ``aug_cond`` for
a network trained with augmentation labels. Guidance (paper Sec. 4.2) is built into the training
target, so sampling stays one network evaluation per step; see docs/guidance.md.
``ImprovedMeanFlow`` is the objective of improved MeanFlow (iMF), for networks that take the
guidance scale and interval as inputs and return (u, v); see docs/imf.md.
"""

import math
from collections.abc import Callable

import torch

TR_SAMPLERS = ("v0", "v1")
JVP_MODES = ("joint", "split", "network")
AUTOCAST_DTYPES = (None, torch.bfloat16)


def _broadcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so that a per-sample scalar multiplies a [B, ...] tensor."""
    return s.reshape((s.shape[0],) + (1,) * (like.dim() - 1))


def conditions(labels: torch.Tensor | None = None, aug_cond: torch.Tensor | None = None, **guidance) -> dict:
    """The keyword inputs of a network call beside (z, t, h): only those given (guidance: omega, t_min,
    t_max of an iMF network)."""
    cond = {name: value for name, value in guidance.items() if value is not None}
    if labels is not None:
        cond["labels"] = labels
    if aug_cond is not None:
        cond["aug_cond"] = aug_cond
    return cond


def adaptive_weighted(err: torch.Tensor, norm_p: float, norm_eps: float) -> torch.Tensor:
    """err / stopgrad(err + norm_eps)^norm_p per sample: roughly ||.||^(2 - 2p) in place of the L2 loss."""
    return err / (err.detach() + norm_eps).pow(norm_p)


def _get_rng_state(device: torch.device) -> tuple:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


def u_and_dudt(
    net,
    z: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    v: torch.Tensor,
    cond: dict | None = None,
    *,
    jvp_mode: str = "joint",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network output u(z, t, t - r) and its total derivative along the path, du/dt.

    du/dt is the Jacobian-vector product of (z, t, r) -> u with tangent (v, 1, 0).
    z, v: [B, ...]; t, r: [B]. Returns (u, dudt), both [B, ...]. cond: the network's other
    inputs (``conditions``), which carry no tangent.

    jvp_mode "joint": one ``torch.func.jvp`` returns both; u carries the graph for backward.
        Fastest, and the mode to use under ``torch.compile``; run eagerly, its backward graph
        also holds the tangent activations (about 3x the memory of a plain training step).
    jvp_mode "split": dudt from a jvp under ``torch.no_grad()``, then a plain forward for u:
        the memory of a plain step, eagerly 1.0-1.3x the time of "joint". The global RNG
        (CPU and, on CUDA, that device's) is rewound between the two calls so dropout draws
        identical masks; both modes then give the same loss and gradients. This path always
        runs eagerly, also inside a compiled function. Layers that update state in forward
        (batch-norm statistics) would update twice.
    jvp_mode "network": the network's own ``net.forward_and_tangent(z, t, h, dz, dt, dh, **cond)``
        (SongUNet has one, models/unet_tangent.py). It propagates only the input tangent,
        skipping the products with the weights' (zero) tangent that forward AD of every
        convolution computes anyway; dudt comes without a graph, so gradients flow through u
        only (the loss detaches its target).
    """
    if jvp_mode not in JVP_MODES:
        raise ValueError(f"unknown jvp_mode {jvp_mode!r}: use one of {JVP_MODES}")
    cond = cond or {}

    def u_fn(z_, t_, r_):
        return net(z_, t_, t_ - r_, **cond)

    if jvp_mode == "network":
        if not hasattr(net, "forward_and_tangent"):
            raise ValueError(f"jvp_mode 'network' needs a network with a hand-written tangent path "
                             f"(forward_and_tangent), but {type(net).__name__} has none: use 'joint' or 'split'")
        # Tangents (v, 1, 0) of (z, t, r) give h = t - r the tangent 1.
        ones = torch.ones_like(t)
        return net.forward_and_tangent(z, t, t - r, v, ones, ones, **cond)

    primals = (z, t, r)
    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    if jvp_mode == "joint":
        return torch.func.jvp(u_fn, primals, tangents)
    if z.device.type not in ("cpu", "cuda"):
        raise ValueError(f"jvp_mode 'split' rewinds the CPU/CUDA RNG only, got device {z.device}: use 'joint'")
    return _split_u_and_dudt(u_fn, primals, tangents)


# Compiled random ops draw from their own generator and ignore the rewind below, so dropout masks of
# the two calls would differ; the split path therefore always runs eagerly (use "joint" to compile).
@torch.compiler.disable
def _split_u_and_dudt(u_fn, primals: tuple, tangents: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    device = primals[0].device
    rng_state = _get_rng_state(device)
    with torch.no_grad():
        _, dudt = torch.func.jvp(u_fn, primals, tangents)
    _set_rng_state(rng_state, device)
    return u_fn(*primals), dudt


class MeanFlow:
    """The MeanFlow objective with its (t, r) sampler and adaptive loss weighting.

    tr_sampler: "v0" (the paper's: order the two draws, then tie r to t) or
        "v1" (the release's improved CIFAR-10 config: tie r to t, then clip r to <= t).
    P_mean_*, P_std_*: logit-normal marginals, t = sigmoid(N(0, 1) * P_std_t + P_mean_t), same for r.
    ratio: probability that r is drawn apart from t (exactly P(r != t) for v0; for v1 the clip
        r = min(t, r) also ties some of those, so P(r != t) = ratio * P(r_raw < t_raw)).
    norm_p, norm_eps: per-sample loss err / stopgrad(err + norm_eps) ** norm_p; norm_p = 0 is plain L2.
    jvp_mode: "joint", "split" or "network", see ``u_and_dudt``.
    autocast: None (the network runs in x's dtype) or torch.bfloat16:
        the network's forward and tangent then run under ``torch.autocast`` with it, and u and
        du/dt are cast back to float32 before the target, the error and the weighting.
    num_classes: classes of a class-conditional network (0: unconditional); labels are indices
        0..num_classes-1 and the index num_classes is the null class.
    cfg_omega, cfg_kappa: guidance of a class-conditional loss. Labelled samples train towards
        v_tilde = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) in place
        of v (both u without gradient, the network in eval mode); omega = 1, kappa = 0 is no guidance.
    cfg_t_start, cfg_t_end: guidance applies where cfg_t_start <= t <= cfg_t_end (else omega = 1, kappa = 0).
    label_dropout: the fraction of samples whose label is replaced by the null class; such samples,
        like any given with the null label, train the unconditional velocity (target v). As in the
        authors' code, only rows with r = t are dropped (each with probability label_dropout /
        P(r = t), ``p_tied``): the null class trains u(z, t, t | null), the velocity guidance uses.
        A label_dropout above P(r = t) is refused.
    """

    def __init__(
        self,
        *,
        tr_sampler: str = "v1",
        P_mean_t: float = -0.6,
        P_std_t: float = 1.6,
        P_mean_r: float = -4.0,
        P_std_r: float = 1.6,
        ratio: float = 0.75,
        norm_p: float = 0.75,
        norm_eps: float = 1e-3,
        jvp_mode: str = "joint",
        autocast: torch.dtype | None = None,
        num_classes: int = 0,
        cfg_omega: float = 1.0,
        cfg_kappa: float = 0.0,
        cfg_t_start: float = 0.0,
        cfg_t_end: float = 1.0,
        label_dropout: float = 0.0,
    ):
        if tr_sampler not in TR_SAMPLERS:
            raise ValueError(f"unknown tr_sampler {tr_sampler!r}: use one of {TR_SAMPLERS}")
        if jvp_mode not in JVP_MODES:
            raise ValueError(f"unknown jvp_mode {jvp_mode!r}: use one of {JVP_MODES}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio={ratio} is a probability: use a value in [0, 1]")
        if not norm_p >= 0.0:
            raise ValueError(f"norm_p={norm_p} must be >= 0 (0 disables the adaptive weighting)")
        if not norm_eps >= 0.0:
            raise ValueError(f"norm_eps={norm_eps} must be >= 0")
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={autocast!r}: use None (full precision) or one of "
                             f"{[d for d in AUTOCAST_DTYPES if d is not None]}")
        for name, std in (("P_std_t", P_std_t), ("P_std_r", P_std_r)):
            if not std >= 0.0:
                raise ValueError(f"{name}={std} is a standard deviation: use a value >= 0")
        for name, value in (("cfg_omega", cfg_omega), ("cfg_kappa", cfg_kappa)):
            if not math.isfinite(value):
                raise ValueError(f"{name}={value} must be a finite number")
        if not cfg_kappa >= 0.0:
            raise ValueError(f"cfg_kappa={cfg_kappa} must be >= 0")
        if not 0.0 <= cfg_t_start <= cfg_t_end <= 1.0:
            raise ValueError(f"guidance interval [{cfg_t_start}, {cfg_t_end}]: use 0 <= cfg_t_start <= cfg_t_end <= 1")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 0 (0: unconditional)")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout={label_dropout} is a probability: use a value in [0, 1)")
        if label_dropout > _p_tied(tr_sampler, P_mean_t, P_std_t, P_mean_r, P_std_r, ratio):
            raise ValueError(f"label_dropout={label_dropout} is above P(r = t) = "
                             f"{_p_tied(tr_sampler, P_mean_t, P_std_t, P_mean_r, P_std_r, ratio):.4g} of this (t, r) "
                             f"sampler, and labels are dropped only where r = t: lower label_dropout or ratio")
        if cfg_omega + cfg_kappa != 1.0 and label_dropout == 0.0:
            raise ValueError(f"guidance with cfg_omega={cfg_omega}, cfg_kappa={cfg_kappa} uses the unconditional "
                             f"velocity, which only label_dropout > 0 trains: set label_dropout (e.g. 0.1)")
        self.tr_sampler = tr_sampler
        self.P_mean_t, self.P_std_t = float(P_mean_t), float(P_std_t)
        self.P_mean_r, self.P_std_r = float(P_mean_r), float(P_std_r)
        self.ratio = float(ratio)
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)
        self.jvp_mode = jvp_mode
        self.autocast = autocast
        self.num_classes = num_classes
        self.cfg_omega, self.cfg_kappa = float(cfg_omega), float(cfg_kappa)
        self.cfg_t_start, self.cfg_t_end = float(cfg_t_start), float(cfg_t_end)
        self.label_dropout = float(label_dropout)

    @property
    def guided(self) -> bool:
        """Whether the target of labelled samples differs from v (extra network forwards)."""
        return self.cfg_omega != 1.0 or self.cfg_kappa != 0.0

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"MeanFlow({fields})"

    def sample_t_r(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (t, r), each [batch_size] float32 in [0, 1], with t >= r.

        Draw order from ``generator`` (or the global RNG): batch_size normals for t, batch_size
        normals for r, then batch_size uniforms deciding which r are tied to t.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        kw = dict(device=device, dtype=torch.float32, generator=generator)
        t = torch.sigmoid(torch.randn(batch_size, **kw) * self.P_std_t + self.P_mean_t)
        r = torch.sigmoid(torch.randn(batch_size, **kw) * self.P_std_r + self.P_mean_r)
        tie = torch.rand(batch_size, **kw) < 1.0 - self.ratio
        if self.tr_sampler == "v0":
            t, r = torch.maximum(t, r), torch.minimum(t, r)
            r = torch.where(tie, t, r)
        else:
            r = torch.minimum(t, torch.where(tie, t, r))
        return t, r

    @property
    def p_tied(self) -> float:
        """P(r = t) of the (t, r) sampler."""
        return _p_tied(self.tr_sampler, self.P_mean_t, self.P_std_t, self.P_mean_r, self.P_std_r, self.ratio)

    def sample_drop(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[batch_size] bool, each True with probability label_dropout / P(r = t): the candidates whose label
        the loss replaces by the null class, which it does for the rows with r = t among them, so that
        a fraction label_dropout of all rows is dropped.

        The JAX code ties a prefix of each batch (r = t) and drops a Binomial number of its leading
        rows; one uniform per sample instead gives the same rows whatever the number of processes
        sharing a batch.
        """
        p = self.label_dropout / self.p_tied if self.label_dropout else 0.0
        return torch.rand(batch_size, device=device, dtype=torch.float32, generator=generator) < p

    def sample_draws(self, batch_size: int, generator: Callable[[str], torch.Generator], *,
                     labels: bool) -> dict[str, torch.Tensor]:
        """The per-sample draws of a training batch besides the noise, each [batch_size] from the generator
        of its purpose: t and r ("t_r") and, with labels, the drop candidates ("label_drop"). ``loss``
        takes them by these names."""
        t, r = self.sample_t_r(batch_size, generator=generator("t_r"))
        draws = dict(t=t, r=r)
        if labels:
            draws["drop"] = self.sample_drop(batch_size, generator=generator("label_drop"))
        return draws

    def guided_velocity(self, net, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                        labels: torch.Tensor, aug_cond: torch.Tensor | None = None) -> torch.Tensor:
        """v_tilde = omega v + kappa u(z, t, 0 | c) + (1 - omega - kappa) u(z, t, 0 | null), [B, ...].

        u(., t, h = 0) is the instantaneous velocity; both network terms are evaluated without
        gradient and, for a torch module, in eval mode (no dropout), and only when their
        coefficient is not zero. Outside [cfg_t_start, cfg_t_end] omega = 1 and kappa = 0.
        Rows whose label is null are returned as they are computed here; ``loss`` uses v for them.
        """
        inside = _broadcast((t >= self.cfg_t_start) & (t <= self.cfg_t_end), v)
        # new_full fills on the device; new_tensor would copy from the host and make it wait (a sync).
        omega = torch.where(inside, v.new_full((), self.cfg_omega), 1.0)
        kappa = torch.where(inside, v.new_full((), self.cfg_kappa), 0.0)
        v_tilde = omega * v
        h = torch.zeros_like(t)
        was_training = isinstance(net, torch.nn.Module) and net.training
        try:
            if was_training:
                net.eval()
            with torch.no_grad():
                if self.cfg_kappa != 0.0:
                    u_cond = net(z, t, h, **conditions(labels, aug_cond))
                    v_tilde = v_tilde + kappa * u_cond.to(v.dtype)
                if self.cfg_omega + self.cfg_kappa != 1.0:
                    u_null = net(z, t, h, **conditions(torch.full_like(labels, self.num_classes), aug_cond))
                    v_tilde = v_tilde + (1 - omega - kappa) * u_null.to(v.dtype)
        finally:
            if was_training:
                net.train()
        return v_tilde

    def loss(
        self,
        net,
        x: torch.Tensor,
        aug_cond: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Batch-mean MeanFlow loss, a 0-dim tensor.

        x: [B, ...] data; aug_cond is passed to the network unchanged. noise ([B, ...]) and t, r
        ([B], t >= r, given together) are used as they are when given; otherwise noise and then
        (t, r) are drawn from ``generator`` (dropout inside ``net`` uses the global RNG).
        labels: class indices [B] in 0..num_classes (num_classes: the null class), or None for an
        unconditional network. drop ([B] bool): the candidates for the null class, of which the
        rows with r = t get it; when None and label_dropout > 0 it is drawn from ``generator``
        after the noise and (t, r) (``sample_drop``). Null-labelled samples train towards v, the
        others towards the guided velocity (``guided_velocity``).
        Computed in float32 (float64 if x is float64) with an outer autocast disabled: the
        target subtracts (t - r) du/dt from v, which half precision would swamp. Only the
        network's own arithmetic runs in low precision, and only when ``autocast`` is set.
        """
        x, noise, t, r = _data_noise_times(x, noise, t, r, self.sample_t_r, generator)
        dtype = x.dtype
        if labels is not None:
            labels = self._dropped_labels(labels, drop, t == r, generator)

        with torch.autocast(device_type=x.device.type, enabled=False):
            z = (1 - _broadcast(t, x)) * x + _broadcast(t, x) * noise
            v = noise - x
            # No cast cache: before torch 2.10 a weight cast under split mode's no_grad JVP was reused
            # by the forward that follows, which then had no path back to the weight (pytorch#65766).
            with torch.autocast(device_type=x.device.type, dtype=self.autocast, enabled=self.autocast is not None,
                                cache_enabled=False):
                if labels is not None and self.guided:
                    # Dropped (null) samples keep v: they train the unconditional velocity the guidance uses.
                    v_tilde = self.guided_velocity(net, z, t, v, labels, aug_cond)
                    v = torch.where(_broadcast(labels == self.num_classes, v), v, v_tilde)
                u, dudt = u_and_dudt(net, z, t, r, v, conditions(labels, aug_cond), jvp_mode=self.jvp_mode)
            u, dudt = u.to(dtype), dudt.to(dtype)
            u_tgt = (v - _broadcast(t - r, x) * dudt).detach()
            err = (u - u_tgt).square().reshape(x.shape[0], -1).sum(dim=1)
            return adaptive_weighted(err, self.norm_p, self.norm_eps).mean()

    def _dropped_labels(self, labels: torch.Tensor, drop: torch.Tensor | None, tied: torch.Tensor,
                        generator: torch.Generator | None) -> torch.Tensor:
        """labels [B] with the tied rows (r = t) of `drop` (drawn when None) set to the null class, num_classes."""
        batch = tied.shape[0]
        if self.num_classes == 0:
            raise ValueError("labels given to an unconditional MeanFlow (num_classes=0): pass num_classes")
        if labels.is_floating_point() or labels.dtype == torch.bool or tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must be class indices of shape [{batch}] (an integer tensor), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if drop is None:
            if self.label_dropout == 0.0:
                return labels
            drop = self.sample_drop(batch, device=labels.device, generator=generator)
        elif tuple(drop.shape) != (batch,):
            raise ValueError(f"drop must have shape [{batch}], got {tuple(drop.shape)}")
        return torch.where(drop.to(labels.device, torch.bool) & tied.to(labels.device), self.num_classes, labels)


def _p_tied(tr_sampler: str, P_mean_t: float, P_std_t: float, P_mean_r: float, P_std_r: float,
            ratio: float) -> float:
    """P(r = t) of a (t, r) sampler: the tied draws, 1 - ratio; for "v1" also the draws with r >= t, which
    the clip r = min(t, r) ties (the logit-normals compare as their normals)."""
    if tr_sampler == "v0":
        return 1.0 - ratio
    spread = math.hypot(P_std_t, P_std_r)
    r_above_t = 0.5 * math.erfc((P_mean_t - P_mean_r) / (spread * math.sqrt(2))) if spread else float(P_mean_r >= P_mean_t)
    return (1.0 - ratio) + ratio * r_above_t


def _data_noise_times(x: torch.Tensor, noise: torch.Tensor | None, t: torch.Tensor | None, r: torch.Tensor | None,
                      sample_t_r, generator: torch.Generator | None):
    """The start of either objective's loss: x in float32 at least, and its noise and (t, r) in that dtype on
    x's device, given ones checked, missing ones drawn (the noise first, then t and r by ``sample_t_r``)."""
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    batch = x.shape[0]
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, dtype=dtype, generator=generator)
    elif noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x shape {tuple(x.shape)}")
    if (t is None) != (r is None):
        raise ValueError("pass both t and r, or neither (they are drawn jointly so that t >= r)")
    if t is None:
        t, r = sample_t_r(batch, device=x.device, generator=generator)
    else:
        _check_given_times(t, r, batch)
    return x, noise.to(dtype), t.to(device=x.device, dtype=dtype), r.to(device=x.device, dtype=dtype)


def _check_given_times(t: torch.Tensor, r: torch.Tensor, batch: int) -> None:
    """Shape and ordering checks for caller-supplied t, r.

    Reading the values on the host would stall an accelerator at every training step, so off
    the CPU the check is an asynchronous device assert; while ``torch.compile`` traces, and on
    the meta device (FLOP counting), it is skipped. Drawn times need no check.
    """
    for name, s in (("t", t), ("r", r)):
        if tuple(s.shape) != (batch,):
            raise ValueError(f"{name} must have shape [{batch}], got {tuple(s.shape)}")
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return
    if t.device.type != "cpu":
        torch._assert_async(torch.all(t >= r), "MeanFlow.loss: t >= r is required for every sample")
        return
    bad = torch.nonzero(t < r).flatten()
    if bad.numel() > 0:
        i = int(bad[0])
        raise ValueError(
            f"t >= r is required, but t[{i}]={float(t[i]):.6g} < r[{i}]={float(r[i]):.6g} "
            f"({bad.numel()} such entries): swap them or draw them with MeanFlow.sample_t_r"
        )


class ImprovedMeanFlow:
    """The improved MeanFlow objective (iMF, arXiv 2512.02012), as the authors' JAX ``imf.py`` computes it.

    The network takes the guidance as inputs and has a second head for the instantaneous velocity:
    ``net(z, t, h, labels=, omega=, t_min=, t_max=) -> (u, v)`` (models/imf_dit.py). Per sample:

        t, r          logit-normal(P_mean, P_std) each, ordered; r = t with probability data_proportion
        omega         omega_max ** w, w ~ U[0, 1]         (their cfg_beta = 1 with s_max = 7)
        t_min, t_max  U[0, 0.5] and U[0.5, 1]; (0, 1) where r = t
        v_c, v_u      the v-head at h = 0 and interval (0, 1), with (label, omega) and (null, 1)
        v_g           v + (1 - 1/omega') (v_c' - v_u): omega' = omega where t_min <= t <= t_max, else 1,
                      and v_c' the v-head at omega'; where r = t, v + (1 - 1/omega) (v_c - v_u)
        dropped       among the r = t rows: null label and v_g = v (omega and interval kept)
        u, du/dt      JVP of (z, t, r) -> u(z, t, t - r | label, omega, interval) along (v_c', 1, 0),
                      v_c' computed with the label before dropping; v_head: the v output of that call
        loss          w(||u + (t - r) sg(du/dt) - sg(v_g)||^2) + w(||v_head - sg(v_g)||^2), each term
                      weighted on its own, w(e) = e / sg(e + eps)^p; mean over the batch

    The guidance forwards run without gradient; nothing flips the network's train/eval mode (imfDiT
    has no dropout). Draws are per sample, so they do not depend on how a batch is split:
    their code ties the first half of the batch (r = t) and drops a Binomial number of its leading
    rows; here each row is tied with probability data_proportion and each tied row dropped with
    probability class_dropout_prob / data_proportion, the same expected counts.

    class_dropout_prob: the expected fraction of the batch whose label is dropped (theirs, 0.1).
    autocast: None or torch.bfloat16, as for ``MeanFlow``: network calls run under it, the rest in float32.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        P_mean: float = -0.4,
        P_std: float = 1.0,
        data_proportion: float = 0.5,
        omega_max: float = 8.0,
        class_dropout_prob: float = 0.1,
        norm_p: float = 1.0,
        norm_eps: float = 0.01,
        autocast: torch.dtype | None = None,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r}: iMF is class-conditional, use an integer >= 1")
        if not 0.0 <= data_proportion <= 1.0:
            raise ValueError(f"data_proportion={data_proportion} is a probability: use a value in [0, 1]")
        if not 0.0 <= class_dropout_prob <= data_proportion:
            raise ValueError(f"class_dropout_prob={class_dropout_prob}: labels are dropped among the r = t rows, "
                             f"so use a value in [0, data_proportion={data_proportion}]")
        if not omega_max >= 1.0:
            raise ValueError(f"omega_max={omega_max}: guidance scales are >= 1, use omega_max >= 1")
        if not (norm_p >= 0.0 and norm_eps >= 0.0):
            raise ValueError(f"norm_p={norm_p}, norm_eps={norm_eps}: both must be >= 0")
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={autocast!r}: use one of {AUTOCAST_DTYPES}")
        self.num_classes = num_classes
        self.data_proportion = float(data_proportion)
        self.omega_max = float(omega_max)
        self.class_dropout_prob = float(class_dropout_prob)
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)
        self.autocast = autocast
        # MeanFlow's "v0" sampler is theirs: order the two logit-normal draws, then tie r to t.
        self._tr = MeanFlow(tr_sampler="v0", P_mean_t=P_mean, P_std_t=P_std, P_mean_r=P_mean, P_std_r=P_std,
                            ratio=1.0 - data_proportion)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"ImprovedMeanFlow(P_mean={self._tr.P_mean_t}, P_std={self._tr.P_std_t}, {fields})"

    def sample_t_r(self, batch_size: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), [batch_size] each, t >= r; drawn as ``MeanFlow.sample_t_r`` with tr_sampler "v0"."""
        return self._tr.sample_t_r(batch_size, device, generator)

    def sample_guidance(self, batch_size: int, device: torch.device | str = "cpu",
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """(omega, t_min, t_max), [batch_size] each: omega_max^U[0,1], U[0, 0.5], U[0.5, 1], drawn in that order.

        The loss sets the interval of the r = t rows to (0, 1).
        """
        w, lo, hi = torch.rand(3, batch_size, device=device, dtype=torch.float32, generator=generator)
        return self.omega_max ** w, 0.5 * lo, 0.5 + 0.5 * hi

    def sample_drop(self, batch_size: int, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """[batch_size] bool, P = class_dropout_prob / data_proportion; the loss drops only the r = t rows of it."""
        p = self.class_dropout_prob / self.data_proportion if self.data_proportion else 0.0
        return torch.rand(batch_size, device=device, dtype=torch.float32, generator=generator) < p

    def sample_draws(self, batch_size: int, generator: Callable[[str], torch.Generator], *,
                     labels: bool = True) -> dict[str, torch.Tensor]:
        """The per-sample draws of a training batch besides the noise, each [batch_size] from the generator
        of its purpose: t and r ("t_r"), omega, t_min and t_max ("guidance"), the drop candidates
        ("label_drop"). ``loss`` takes them by these names."""
        t, r = self.sample_t_r(batch_size, generator=generator("t_r"))
        omega, t_min, t_max = self.sample_guidance(batch_size, generator=generator("guidance"))
        return dict(t=t, r=r, omega=omega, t_min=t_min, t_max=t_max,
                    drop=self.sample_drop(batch_size, generator=generator("label_drop")))

    def _net_autocast(self, device: torch.device):
        return torch.autocast(device_type=device.type, dtype=self.autocast, enabled=self.autocast is not None,
                              cache_enabled=False)

    def loss_terms(self, net, x: torch.Tensor, *, labels: torch.Tensor, noise: torch.Tensor | None = None,
                   t: torch.Tensor | None = None, r: torch.Tensor | None = None, omega: torch.Tensor | None = None,
                   t_min: torch.Tensor | None = None, t_max: torch.Tensor | None = None,
                   drop: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{"loss": the batch-mean loss (with graph), "loss_u", "loss_v": mean squared errors of the two
        terms before weighting (detached; their logged values)}. Arguments as for ``loss``."""
        batch = x.shape[0]
        if labels.is_floating_point() or labels.dtype == torch.bool or tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must be class indices of shape [{batch}] (an integer tensor), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        x, noise, t, r = _data_noise_times(x, noise, t, r, self.sample_t_r, generator)
        dtype, kw = x.dtype, dict(device=x.device, generator=generator)
        given = (omega, t_min, t_max)
        if any(s is None for s in given) and not all(s is None for s in given):
            raise ValueError("pass omega, t_min and t_max together, or none of them")
        omega, t_min, t_max = self.sample_guidance(batch, **kw) if omega is None else given
        drop = self.sample_drop(batch, **kw) if drop is None else drop
        for name, s in (("omega", omega), ("t_min", t_min), ("t_max", t_max), ("drop", drop)):
            if tuple(s.shape) != (batch,):
                raise ValueError(f"{name} must have shape [{batch}], got {tuple(s.shape)}")
        omega, t_min, t_max = (s.to(device=x.device, dtype=dtype) for s in (omega, t_min, t_max))
        tied = t == r
        t_min, t_max = torch.where(tied, 0.0, t_min), torch.where(tied, 1.0, t_max)
        drop = drop.to(x.device, torch.bool) & tied

        def b(s: torch.Tensor) -> torch.Tensor:
            return _broadcast(s, x)

        with torch.autocast(device_type=x.device.type, enabled=False):
            z = (1 - b(t)) * x + b(t) * noise
            v = noise - x
            zeros, ones, null = torch.zeros_like(t), torch.ones_like(t), torch.full_like(labels, self.num_classes)
            with torch.no_grad(), self._net_autocast(x.device):
                # One double batch for the conditional and unconditional v-head at omega, interval (0, 1).
                _, v_both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([zeros, zeros]),
                                labels=torch.cat([labels, null]), omega=torch.cat([omega, ones]),
                                t_min=torch.cat([zeros, zeros]), t_max=torch.cat([ones, ones]))
                v_c, v_u = v_both.to(dtype).chunk(2)
                v_g_tied = v + b(1 - 1 / omega) * (v_c - v_u)
                omega_in = torch.where((t >= t_min) & (t <= t_max), omega, 1.0)
                _, v_c = net(z, t, zeros, labels=labels, omega=omega_in, t_min=zeros, t_max=ones)
                v_c = v_c.to(dtype)
                v_g = torch.where(b(tied), v_g_tied, v + b(1 - 1 / omega_in) * (v_c - v_u))
                v_g = torch.where(b(drop), v, v_g)
            labels = torch.where(drop, null, labels)

            def u_fn(z_, t_, r_):
                with self._net_autocast(x.device):
                    return net(z_, t_, t_ - r_, labels=labels, omega=omega, t_min=t_min, t_max=t_max)

            # v_c is the tangent of z (theirs: the guided path's conditional velocity, not v_g).
            u, dudt, v_head = torch.func.jvp(u_fn, (z, t, r), (v_c, ones, zeros), has_aux=True)
            u, dudt, v_head = u.to(dtype), dudt.to(dtype), v_head.to(dtype)
            V = u + b(t - r) * dudt.detach()
            err_u = (V - v_g).square().reshape(batch, -1).sum(dim=1)
            err_v = (v_head - v_g).square().reshape(batch, -1).sum(dim=1)
            loss = (adaptive_weighted(err_u, self.norm_p, self.norm_eps)
                    + adaptive_weighted(err_v, self.norm_p, self.norm_eps)).mean()
            numel = err_u.new_tensor(v.numel())
            return {"loss": loss, "loss_u": err_u.detach().sum() / numel, "loss_v": err_v.detach().sum() / numel}

    def loss(self, net, x: torch.Tensor, *, labels: torch.Tensor, noise: torch.Tensor | None = None,
             t: torch.Tensor | None = None, r: torch.Tensor | None = None, omega: torch.Tensor | None = None,
             t_min: torch.Tensor | None = None, t_max: torch.Tensor | None = None, drop: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Batch-mean iMF loss, a 0-dim tensor.

        x: [B, ...] data; labels: class indices [B] in 0..num_classes-1. The draws are used as they
        are when given, else drawn from ``generator`` in this order: noise, (t, r)
        (``sample_t_r``), (omega, t_min, t_max) (``sample_guidance``), drop (``sample_drop``).
        Rows with t == r are the tied rows: their interval is set to (0, 1), and only they are
        dropped (drop [B] bool marks candidates). Computed in float32 (float64 for float64 x).
        """
        return self.loss_terms(net, x, labels=labels, noise=noise, t=t, r=r, omega=omega, t_min=t_min,
                               t_max=t_max, drop=drop, generator=generator)["loss"]


@torch.no_grad()
def sample(net, noise: torch.Tensor, steps: int = 1, aug_cond: torch.Tensor | None = None,
           labels: torch.Tensor | None = None, *, omega: float | None = None, t_min: float | None = None,
           t_max: float | None = None) -> torch.Tensor:
    """Generate data from noise with ``steps`` average-velocity jumps; returns z at t = 0.

    noise: [B, ...] (e ~ N(0, I), i.e. z at t = 1). Walks the uniform grid 1 = t_0 > ... > t_N = 0
    with z_r = z_t - (t - r) u(z_t, t, t - r); steps = 1 is x = z_1 - u(z_1, 1, 1).
    labels: class indices [B] for a class-conditional network. MeanFlow's guidance, if it was
    trained with any, is in the network; an iMF network takes it as inputs: omega, t_min, t_max
    (one value for every sample), and is sampled by its u (its first output). Put ``net`` in eval
    mode first if it has dropout.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    if noise.dim() < 1:
        raise ValueError(f"noise must have a batch dimension, got shape {tuple(noise.shape)}")
    batch = noise.shape[0]

    def per_sample(value: float | None) -> torch.Tensor | None:
        return None if value is None else torch.full((batch,), float(value), device=noise.device, dtype=noise.dtype)

    cond = conditions(labels, aug_cond, omega=per_sample(omega), t_min=per_sample(t_min), t_max=per_sample(t_max))
    z = noise
    for i in range(steps):
        t = torch.full((batch,), 1.0 - i / steps, device=noise.device, dtype=noise.dtype)
        r = torch.full((batch,), 1.0 - (i + 1) / steps, device=noise.device, dtype=noise.dtype)
        h = t - r
        u = net(z, t, h, **cond)
        z = z - _broadcast(h, z) * (u[0] if isinstance(u, tuple) else u)
    return z
