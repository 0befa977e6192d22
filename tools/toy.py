"""Improved MeanFlow beside MeanFlow on a labelled 2-D toy: 1-step samples, equal steps, several seeds.

    python -m tools.toy --seeds 0 1 2 3          # about 45 s a seed on one CPU thread

The data are eight Gaussians (std 0.1) on a circle of radius 2, class k the one at angle 2 pi k / 8. One
small conditional MLP (ToyNet) is trained by each objective with its defaults (MeanFlow: label dropout
0.1; iMF: its ImageNet draws, guidance scales up to 8) for the same Adam steps, and sampled in one step
through an EMA, without guidance (iMF: omega 1). The figure is the sliced Wasserstein distance SW_2 of
2,000 samples (classes balanced) to as many fresh data points. Two more rows separate the causes of a
difference (docs/imf.md, "Against MeanFlow on a toy"): MeanFlow with iMF's (t, r) draws and loss weighting,
and iMF's objective with omega_max 1, which learns no guidance scales.
"""

import argparse
import copy
import math

import torch

import meanflow

NUM_CLASSES = 8


def ring(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Points [B, 2] of the classes `labels` [B]: class k is the Gaussian (std 0.1) at angle 2 pi k / 8, radius 2."""
    return centres(labels) + 0.1 * torch.randn(len(labels), 2, generator=generator)


def centres(labels: torch.Tensor) -> torch.Tensor:
    angle = labels.double() * (2 * math.pi / NUM_CLASSES)
    return (2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)).float()


class ToyNet(torch.nn.Module):
    """A class-conditional MLP for z [B, 2] in either convention: u(z, t, h, labels) (MeanFlow), or with
    guidance=True (u, v)(z, t, h, labels, omega, t_min, t_max) (iMF, the inputs and outputs of imfDiT).
    The conditions (one-hot label, zero for the null index; t; h; for iMF 1 - 1/omega, as imfDiT embeds it,
    t_min, t_max) go through an embedding MLP and enter every layer."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, guidance: bool, width: int = 64, depth: int = 3):
        super().__init__()
        self.num_classes, self.takes_guidance = num_classes, guidance
        conditions = num_classes + 2 + (3 if guidance else 0)
        self.embed = torch.nn.Sequential(torch.nn.Linear(conditions, width), torch.nn.SiLU(),
                                         torch.nn.Linear(width, width))
        self.layers = torch.nn.ModuleList(torch.nn.Linear((2 if i == 0 else width) + width, width)
                                          for i in range(depth))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(2 * width, 2) for _ in range(2 if guidance else 1))

    def forward(self, z, t, h, labels=None, omega=None, t_min=None, t_max=None):
        def given(value, default):
            return torch.full_like(t, default) if value is None else value
        labels = given(labels, self.num_classes).long()
        one_hot = torch.nn.functional.one_hot(labels, self.num_classes + 1)[:, :self.num_classes].to(z.dtype)
        conditions = [one_hot, t[:, None], h[:, None]]
        if self.takes_guidance:
            conditions.append(torch.stack([1 - 1 / given(omega, 1.0), given(t_min, 0.0), given(t_max, 1.0)], dim=1))
        c = self.embed(torch.cat(conditions, dim=1))
        x = z
        for layer in self.layers:
            x = torch.nn.functional.silu(layer(torch.cat([x, c], dim=1)))
        out = [head(torch.cat([x, c], dim=1)) for head in self.heads]
        return tuple(out) if self.takes_guidance else out[0]


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, directions: int = 256) -> float:
    """SW_2 of two point sets of equal size: W_2 of their projections on random unit directions, by sorting."""
    theta = torch.randn(directions, a.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    pa, pb = (torch.sort(x.double() @ theta.T, dim=0).values for x in (a, b))
    return (pa - pb).square().mean().sqrt().item()


def objectives() -> dict:
    """The rows of the comparison: name -> a method to train with."""
    return {"meanflow": lambda: meanflow.MeanFlow(num_classes=NUM_CLASSES, label_dropout=0.1),
            "meanflow, iMF's draws": lambda: meanflow.MeanFlow(
                num_classes=NUM_CLASSES, label_dropout=0.1, tr_sampler="v0", P_mean_t=-0.4, P_std_t=1.0,
                P_mean_r=-0.4, P_std_r=1.0, ratio=0.5, norm_p=1.0, norm_eps=0.01),
            "imf": lambda: meanflow.ImprovedMeanFlow(num_classes=NUM_CLASSES),
            "imf, omega_max 1": lambda: meanflow.ImprovedMeanFlow(num_classes=NUM_CLASSES, omega_max=1.0)}


def one_step_scores(name: str, seed: int, *, steps: int = 1000, batch: int = 256, samples: int = 2000) -> dict:
    """{"sw", "hit"} of 1-step samples of the objective `name` (objectives()) trained `steps` Adam steps (lr 2e-3,
    EMA 0.99) from `seed`: SW_2 to fresh data, and the fraction of samples nearest their own class's centre."""
    method = objectives()[name]()
    torch.manual_seed(seed)
    net = ToyNet(guidance=isinstance(method, meanflow.ImprovedMeanFlow))
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        loss = method.loss(net, ring(labels, g), labels=labels, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for p, q in zip(ema.parameters(), net.parameters()):
            p.lerp_(q, 0.01)
    g = torch.Generator().manual_seed(1000 + seed)
    labels = torch.arange(samples) % NUM_CLASSES
    x = meanflow.sample(ema, torch.randn(samples, 2, generator=g), labels=labels)
    nearest = torch.cdist(x, centres(torch.arange(NUM_CLASSES))).argmin(dim=1)
    return dict(sw=sliced_wasserstein(x, ring(labels, g), g), hit=(nearest == labels).float().mean().item())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the toy's matrices are too small to gain from more, and runs can go side by side
    names = list(objectives())
    print(f"1-step SW_2 to the data ({args.steps} steps of batch 256; ratio: to MeanFlow's at the same seed)")
    print(f"{'seed':>4} " + " ".join(f"{n:>22}" for n in names))
    for seed in args.seeds:
        sw = {n: one_step_scores(n, seed, steps=args.steps)["sw"] for n in names}
        print(f"{seed:>4} " + " ".join(f"{sw[n]:>12.4f} ({sw[n] / sw['meanflow']:>4.2f}x)" for n in names),
              flush=True)


if __name__ == "__main__":
    main()
