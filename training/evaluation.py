"""Evaluation during training: sample grids of every network, then the dataset's quality figure (FID or the
digits figure, utils/data.py's table). A latent model's grids are decoded by its VAE; an iMF network samples
with the run's guidance."""

from pathlib import Path

import torch

import meanflow
from models.ema import EMAModel
from training.log import Log
from training.sampling import Guidance, fid_of_network, image_decoder
from utils import data as data_utils
from utils.distributed import DistEnv
from utils.latents import LatentSpace
from utils.sampling import class_indices

GRID_SIZE = 64  # samples per grid image
GRID_COLUMNS = 8  # a class-conditional grid has one row of GRID_COLUMNS samples per class
GRID_CLASSES = 10  # of its first classes (ImageNet's 1000 rows would be 8,000 samples to draw and decode)


class Evaluator:
    """evaluate(step) -> {network name: figure}: grids into OUTPUT_DIR/samples and TensorBoard, then the
    dataset's quality figure of every network in `model`, logged: the digits figure, or FID with compute_fid.

    img_shape: (C, H, W) of the samples (the latents' for a latent model). latent: a latent model's
    LatentSpace (its grids are decoded by the VAE it names, loaded at the first grid). fid_samples:
    generated images per FID, drawn in batches of batch_size. inception_weights: the FID weights file
    (None: found as utils.inception.resolve_inception_weights finds it). out: folder for the grids
    (None: none written). writer: a SummaryWriter or None. guidance: what a network with guidance inputs
    (iMF's) samples with (None: its defaults, no guidance).
    """

    def __init__(self, *, model: EMAModel, env: DistEnv, img_shape: tuple[int, int, int], dataset: str,
                 data_path: str, seed: int = 0, compute_fid: bool = False, fid_samples: int = 50000,
                 batch_size: int = 64, inception_weights: str | None = None, out: Path | None = None, writer=None,
                 log: Log, latent: LatentSpace | None = None, guidance: Guidance | None = None):
        self.model, self.env, self.img_shape, self.latent = model, env, img_shape, latent
        self.guidance = guidance
        self.inputs = {} if guidance is None else guidance.inputs()  # meanflow.sample's guidance arguments
        self.guided = "" if guidance is None else f" with {guidance}"  # the log's note of it
        self.dataset, self.data_path, self.seed = dataset, data_path, seed
        self.compute_fid, self.fid_samples, self.batch_size = compute_fid, fid_samples, batch_size
        self.inception_weights = inception_weights
        self.out, self.writer, self.log = out, writer, log
        self.main = env.rank == 0
        self.quality = data_utils.dataset_info(dataset).quality
        self.fid_setup = None  # (Inception extractor, reference statistics), made at the first FID
        self.digits = None     # DigitsQuality, made at the first digits evaluation
        self.decode = None     # image_decoder's function, made at the first grid

    def _labels(self, count: int, classes=None) -> torch.Tensor | None:
        """Class indices [count] of samples 0..count-1 (sample i: class i % num_classes, or classes[i % K]), or None."""
        labels = class_indices(self.model.net, torch.arange(count), classes)
        return None if labels is None else labels.to(self.env.device)

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        results = {}
        rows = min(getattr(self.model.net, "num_classes", 0), GRID_CLASSES)
        grid_size = rows * GRID_COLUMNS if rows else GRID_SIZE
        grid_noise = torch.randn((grid_size, *self.img_shape),
                                 generator=data_utils.make_generator(self.seed, "grid")).to(self.env.device)
        # Row k of the grid is class k: sample j of row k has index k + j * rows.
        grid_labels = self._labels(grid_size, classes=list(range(rows)) if rows else None)
        order = torch.arange(grid_size).reshape(GRID_COLUMNS, -1).T.reshape(-1) if rows else slice(None)
        if self.main and self.decode is None:
            self.decode = image_decoder(self.latent, device=self.env.device)
        was_training = self.model.net.training
        self.model.net.eval()
        try:
            for name, net in self.model.networks().items():
                if self.main:
                    grid = meanflow.sample(net, grid_noise, labels=grid_labels, **self.inputs)
                    self._grid(name, self.decode(grid)[order], step)
                if self.quality == "digits" and self.main:
                    results[name] = self._digits(name, net, step)
                if self.quality == "inception" and self.compute_fid:
                    results[name] = self._fid(name, net, step)
        finally:
            self.model.net.train(was_training)
        return results

    def _grid(self, name: str, images: torch.Tensor, step: int) -> None:
        """images: uint8 [n, C, H, W]."""
        import torchvision.utils as vutils
        grid = vutils.make_grid(images.cpu().float() / 255, nrow=GRID_COLUMNS, padding=1, pad_value=1.0)
        if images.shape[-1] < 16:  # 8x8 digits: enlarge, keeping the pixels sharp
            grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
        if self.out is not None:
            folder = self.out / "samples"
            folder.mkdir(exist_ok=True)
            vutils.save_image(grid, folder / f"step{step:08d}_{name}.png")
        if self.writer is not None:
            self.writer.add_image(f"samples/{name}", grid, step)

    def _digits(self, name: str, net, step: int) -> dict:
        from utils.digits_quality import DigitsQuality
        if self.digits is None:
            self.digits = DigitsQuality(seed=self.seed)
            real = self.digits.real_score()
            self.log(f"digits quality of {real['count']} held-out real digits: FD {real['fd']:.2f}, "
                     f"confidence {real['confidence']:.3f}, classes {real['classes']:.2f}/10")
        noise = torch.randn((self.digits.count, *self.img_shape),
                            generator=data_utils.make_generator(self.seed, "quality")).to(self.env.device)
        labels = self._labels(self.digits.count)
        requested = None if labels is None else labels.cpu()
        score = self.digits.score(meanflow.sample(net, noise, labels=labels, **self.inputs), labels=requested)
        self.log(f"digits quality of {name} at step {step}, 1-step samples{self.guided}: "
                 f"FD {score['fd']:.2f}, confidence {score['confidence']:.3f}, classes {score['classes']:.2f}/10"
                 + (f", classified as their requested label {score['label_accuracy']:.1%}" if labels is not None else ""))
        if self.writer is not None:
            for key in [k for k in ("fd", "confidence", "classes", "label_accuracy") if k in score]:
                self.writer.add_scalar(f"digits_{key}/{name}", score[key], step)
        return score

    def _fid(self, name: str, net, step: int) -> float:
        from utils import fid
        from utils.inception import InceptionFeatures
        env = self.env if self.env.world_size > 1 else None
        if self.fid_setup is None:
            extractor = InceptionFeatures(self.inception_weights, device=self.env.device)
            ref = fid.reference_stats(self.dataset, data_path=self.data_path, split="train",
                                      extractor=extractor, env=env, progress=self.main)
            self.fid_setup = extractor, ref
        extractor, ref = self.fid_setup
        value = fid_of_network(net, ref=ref, num_samples=self.fid_samples, batch_size=self.batch_size,
                                   img_shape=self.img_shape, seed=self.seed, steps=1, extractor=extractor,
                                   device=self.env.device, env=env, progress=self.main, guidance=self.guidance)
        self.log(f"FID of {name} at step {step} (1 step{self.guided}, {self.fid_samples} samples): {value:.3f}")
        if self.writer is not None:
            self.writer.add_scalar(f"fid/{name}", value, step)
        return value
