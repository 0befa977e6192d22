"""Samples of a network, indexed (utils/sampling.py): generated in batches, decoded to images, gathered over
processes, and their FID and Inception Score.

Sample i comes from noise seeded by (seed, i) and, for a class-conditional network, asks for class
i % num_classes (or the i-th of given classes), so a set of samples does not depend on batch size
or process count. A latent model's samples are decoded by its VAE (image_decoder). ``env`` below is
the process environment (a utils.distributed.DistEnv; every rank calls the function) or None for a
single process.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed

import meanflow
from training.config import IMF_EVAL_GUIDANCE
from utils.errors import UserError
from utils.fid import FeatureStats, frechet_distance, from_rank0, is_rank0, on_every_rank, progress_bar
from utils.inception import Extractor, inception_score
from utils.latents import LatentSpace
from utils.sampling import class_indices, sample_noise, shard, to_uint8
from utils.vae import decode, load_vae

Decoder = Callable[[torch.Tensor], torch.Tensor]
IS_SPLITS = 10  # ADM's: 50,000 samples in splits of 5,000


@dataclass(frozen=True)
class Guidance:
    """iMF's guidance at sampling time, inputs of a network that takes them (``takes_guidance``, models/imf_dit.py):
    the scale omega (1: none; above the training range of 1..8 is allowed, the authors sample with 10.5), in
    effect while t is in [t_min, t_max]. ValueError for values the network was not trained on."""
    omega: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self):
        if not self.omega >= 1.0:
            raise ValueError(f"omega {self.omega:g}: a guidance scale is >= 1 (1: no guidance)")
        if not 0.0 <= self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"interval [{self.t_min:g}, {self.t_max:g}]: need 0 <= t_min <= t_max <= 1")

    def inputs(self) -> dict[str, float]:
        """meanflow.sample's keyword arguments."""
        return dict(omega=self.omega, t_min=self.t_min, t_max=self.t_max)

    def __str__(self) -> str:
        return f"omega {self.omega:g}, interval [{self.t_min:g}, {self.t_max:g}]"


def default_guidance(steps: int, *, size: str | None = None, omega: float | None = None,
                     t_min: float | None = None, t_max: float | None = None) -> Guidance:
    """The guidance an iMF network of model size `size` samples with in `steps` steps unless told otherwise.

    omega, t_min, t_max: the settings its run recorded (None: not recorded), the 1-step guidance. Each value is
    the first there is of: the authors' setting for this size and number of steps where they give one beyond
    1 step (IMF_EVAL_GUIDANCE: XL/2 at 2 steps); the recorded one; the authors' 1-step setting for this size;
    no guidance (omega 1, interval [0, 1]).
    """
    recorded = (omega, t_min, t_max)
    fallback = IMF_EVAL_GUIDANCE.get((size, 1), (1.0, 0.0, 1.0))
    if steps != 1 and (size, steps) in IMF_EVAL_GUIDANCE:
        return Guidance(*IMF_EVAL_GUIDANCE[(size, steps)])
    return Guidance(*(value if value is not None else default for value, default in zip(recorded, fallback)))


def image_decoder(latent: LatentSpace | None, *, vae: str | None = None, device: str | torch.device = "cpu",
                  batch_size: int = 32) -> Decoder:
    """How a network's samples (float [B, C, H, W]) become uint8 images [B, 3 | C, H', W'].

    A model of images: to_uint8. A latent model (latent: its LatentSpace, LatentSpace.of_checkpoint(ckpt)):
    the network's normalization undone, then the VAE's decoder on `device`, `batch_size` latents at a
    time, quantised as to_uint8 quantises (utils.vae.decode). vae: "mse", "ema" or a local folder to
    use instead of the VAE the checkpoint names (a machine without it). A VAE that cannot be loaded is
    a UserError naming --vae.
    """
    if latent is None:
        return to_uint8
    name = vae or latent.vae_name
    try:
        model = load_vae(name, device=device)
    except UserError as e:
        raise type(e)(f"the samples are latents of the VAE {name}, which decodes them: {e}") from e
    return lambda x: decode(model, latent.norm.denormalize(x), batch_size=batch_size)


@torch.no_grad()
def generate(
    net,
    indices: torch.Tensor,
    *,
    seed: int,
    img_shape: tuple[int, int, int],
    steps: int = 1,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    classes=None,
    decode: Decoder = to_uint8,
    guidance: Guidance | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (batch indices [b], uint8 images [b, C, H, W]) of the samples ``indices``.

    Sample i is ``decode(meanflow.sample(net, sample_noise(seed, [i]), steps))``; for a class-conditional
    net with the class ``class_indices(net, [i], classes)``. img_shape: the network's (C, H, W), the
    latents' for a latent model; decode: image_decoder's function (default: to_uint8, for images).
    guidance: the inputs omega, t_min, t_max of a network that takes them (None: the network's defaults, no
    guidance); ValueError for a network that does not. ``net`` should be in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if guidance is not None and not getattr(net, "takes_guidance", False):
        raise ValueError(f"guidance ({guidance}) given for a network without guidance inputs")
    inputs = {} if guidance is None else guidance.inputs()
    for batch in torch.as_tensor(indices).split(batch_size):
        noise = sample_noise(seed, batch, img_shape, device)
        labels = class_indices(net, batch, classes)
        if labels is not None:
            labels = labels.to(device)
        yield batch, decode(meanflow.sample(net, noise, steps=steps, labels=labels, **inputs))


def _gather(local: torch.Tensor, env) -> torch.Tensor:
    """Rank 0: every rank's rows concatenated in rank order, which is sample order (shards are contiguous);
    the other ranks: their own rows."""
    if env is None or env.world_size <= 1:
        return local
    gathered = [None] * env.world_size if env.rank == 0 else None
    torch.distributed.gather_object(local.numpy(), gathered, dst=0)
    if env.rank != 0:
        return local
    return torch.from_numpy(np.concatenate([part for part in gathered if len(part)]))


def sample_images(
    net,
    *,
    num_samples: int,
    img_shape: tuple[int, int, int],
    seed: int = 0,
    steps: int = 1,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    env=None,
    progress: bool = False,
    classes=None,
    decode: Decoder = to_uint8,
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """uint8 [N, C, H, W] samples 0..N-1 of ``net``, decoded by ``decode``, with ``guidance`` (see generate);
    with ``env`` (a DistEnv) each rank draws its share and rank 0 returns all of them (the other ranks return
    their own share). classes: see ``utils.sampling.class_indices`` (sample i of a class-conditional net
    takes classes[i % K])."""
    from tqdm.auto import tqdm

    indices = shard(num_samples, env)
    parts = []
    with tqdm(total=len(indices), desc=f"{steps}-step samples", unit="img", disable=not progress) as bar:
        for batch, images in generate(
            net, indices, seed=seed, img_shape=img_shape, steps=steps, batch_size=batch_size, device=device,
            classes=classes, decode=decode, guidance=guidance,
        ):
            parts.append(images.cpu())
            bar.update(len(batch))
    local = torch.cat(parts) if parts else decode(torch.empty((0, *img_shape), device=device)).cpu()
    return _gather(local, env)


def scores_of_network(
    net,
    *,
    ref: tuple[np.ndarray, np.ndarray],
    num_samples: int,
    batch_size: int = 250,
    img_shape: tuple[int, int, int],
    seed: int = 0,
    steps: int = 1,
    extractor: Extractor,
    device: str | torch.device = "cpu",
    env=None,
    progress: bool = True,
    decode: Decoder = to_uint8,
    guidance: Guidance | None = None,
) -> dict:
    """FID of ``num_samples`` samples of ``net`` (``steps``-step MeanFlow sampler with ``guidance``, see generate,
    ``decode``d to images)
    against ``ref`` = (mu, sigma), and their Inception Score when the extractor also gives class logits
    from the same forward (``features_and_logits``, utils.inception.InceptionFeaturesLogits):
    {"fid": float} or {"fid", "is", "is_std"}. IS is taken over IS_SPLITS splits of consecutive samples
    (fewer when there are fewer samples), as ADM's evaluator takes it.

    With ``env`` (a DistEnv, every rank calls this) the samples are split over the ranks;
    ``batch_size`` is per rank. Noise is seeded per sample, so the values do not depend on
    batch size or world size (up to floating-point differences between kernels). The network
    is put in eval mode for the call. Every rank returns the same values, computed on rank 0 on
    ``device``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples} must be >= 2")
    features_and_logits = getattr(extractor, "features_and_logits", None)
    was_training = getattr(net, "training", False)
    if was_training:
        net.eval()
    stats, logits = FeatureStats(), []
    world = 1 if env is None else env.world_size
    try:
        with progress_bar(num_samples, f"FID {steps}-step", progress and is_rank0(env)) as bar:
            batches = generate(
                net, shard(num_samples, env), seed=seed, img_shape=img_shape, steps=steps,
                batch_size=batch_size, device=device, decode=decode, guidance=guidance,
            )
            for batch, images in batches:
                if features_and_logits is None:
                    stats.add_images(images, extractor)
                else:
                    features, scores = features_and_logits(images.expand(-1, 3, -1, -1).contiguous())
                    stats.add(features)
                    logits.append(scores.float().cpu())
                bar.update(len(batch) * world)
    finally:
        if was_training:
            net.train()
    stats.all_reduce(env)
    # Rank 0 alone takes the distance (two 2048-d eigendecompositions); the others receive it.
    value = on_every_rank(lambda: frechet_distance(*stats.mean_cov(), *ref, device=device)
                          if is_rank0(env) else 0.0, env)
    result = {"fid": from_rank0(value, env)}
    if features_and_logits is not None:
        every = _gather(torch.cat(logits) if logits else torch.empty((0, 0)), env)
        mean, std = on_every_rank(lambda: inception_score(every, splits=min(IS_SPLITS, num_samples))
                                  if is_rank0(env) else (0.0, 0.0), env)
        result.update({"is": from_rank0(mean, env), "is_std": from_rank0(std, env)})
    return result


def fid_of_network(net, *, ref: tuple[np.ndarray, np.ndarray], num_samples: int, **kwargs) -> float:
    """FID of ``num_samples`` samples of ``net`` against ``ref``: scores_of_network's, with its arguments."""
    return scores_of_network(net, ref=ref, num_samples=num_samples, **kwargs)["fid"]
