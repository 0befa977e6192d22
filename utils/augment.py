"""EDM's non-leaking geometric augmentation, as MeanFlow's CIFAR-10 runs configure it.

Karras et al. (2022) augment training images and give the network the augmentation parameters
as a conditioning vector (`aug_cond`); sampling uses aug_cond = 0, i.e. the distribution of
un-augmented images, so the augmentations do not leak into the samples. The authors' runs
enable four transforms out of EDM's pipeline, each with its own label columns:

    column 0     x-flip            1 if the image was mirrored, else 0
    column 1     isotropic scale   w, the image is scaled by 2**(scale_std * w)
    columns 2-3  anisotropic scale w*cos(r), w*sin(r): scale 2**(aniso_std * w) along angle r
    columns 4-5  translation       wx, wy: shift by (wx, wy) * translate_frac_std * (W, H) pixels

A transform that does not fire has label 0. The geometric transforms are composed into one
affine map per image and applied by EDM's alias-free resampling: reflect padding, 2x upsampling
with the sym6 wavelet low-pass filter, bilinear sampling, low-pass filtering and 2x downsampling.
For the same random draws the images equal EDM's, with one exception: when no image of the
batch is moved (only flips), the resampling is skipped and the input comes back exactly, where
EDM's filters would return it to within about 1e-5.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from utils.data import to_device

# Low-pass decomposition filter of the Symlet-6 wavelet (orthonormal: up- then down-sampling
# with it is the identity, so untransformed pixels come back unchanged).
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
NUM_LABELS = 6


def _mat3(rows, like: torch.Tensor) -> torch.Tensor:
    """A batch of 3x3 matrices [N, 3, 3] from 3x3 nested entries that are tensors [N] or floats."""
    n = like.shape[0]
    entries = [e if torch.is_tensor(e) else torch.full((n,), float(e), dtype=like.dtype, device=like.device)
               for row in rows for e in row]
    return torch.stack(entries, dim=-1).reshape(n, 3, 3)


def _scale(sx, sy, like):
    return _mat3([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], like)


def _rotate(theta, like):
    return _mat3([[theta.cos(), (-theta).sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1]], like)


def _translate(tx, ty, like):
    return _mat3([[1, 0, tx], [0, 1, ty], [0, 0, 1]], like)


def _const(rows, device) -> torch.Tensor:
    """A single float32 3x3 matrix [3, 3]."""
    return torch.tensor(rows, dtype=torch.float32, device=device)


@contextlib.contextmanager
def _cudnn_benchmark_off():
    """cuDNN benchmark mode off inside, the caller's setting restored after.

    The reflect padding depends on the batch's draws, so the filters see a new shape on most
    steps; benchmark mode would autotune each new shape synchronously. (Current torch runs fp32
    depthwise convolutions with its own kernel, but cuDNN takes them for channels_last, fp16
    or very large inputs.) Only this flag changes: `cudnn.flags()` would reset the others too.
    """
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


class AugmentPipe:
    """EDM augmentation with x-flip, isotropic and anisotropic scaling and fractional translation.

    Each transform fires for an image with probability min(1, multiplier * p); the default
    xflip=1e8 means "always draw a coin", i.e. half of the images are mirrored. Setting a
    multiplier to 0 turns the transform off while keeping its (zero) label columns, so the
    label vector always has NUM_LABELS = 6 entries. `yflip` and `rotate_frac` exist in EDM but
    are off in MeanFlow's runs; only 0 is accepted for them.
    """

    def __init__(self, *, p: float = 0.12, xflip: float = 1e8, yflip: float = 0, scale: float = 1,
                 rotate_frac: float = 0, aniso: float = 1, translate_frac: float = 1,
                 scale_std: float = 0.2, aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5,
                 translate_frac_std: float = 0.125):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"augmentation probability p={p!r} must lie in [0, 1]")
        for name, value in [("yflip", yflip), ("rotate_frac", rotate_frac)]:
            if float(value) != 0.0:
                raise ValueError(f"{name}={value!r} is not supported (MeanFlow's runs keep it off); pass {name}=0")
        for name, value in [("xflip", xflip), ("scale", scale), ("aniso", aniso), ("translate_frac", translate_frac),
                            ("scale_std", scale_std), ("aniso_std", aniso_std), ("translate_frac_std", translate_frac_std)]:
            if not float(value) >= 0.0:
                raise ValueError(f"{name}={value!r} must be >= 0")
        if not 0.0 <= float(aniso_rotate_prob) <= 1.0:
            raise ValueError(f"aniso_rotate_prob={aniso_rotate_prob!r} must lie in [0, 1]")
        self.p = float(p)
        self.xflip, self.scale, self.aniso, self.translate_frac = map(float, (xflip, scale, aniso, translate_frac))
        self.scale_std, self.aniso_std, self.translate_frac_std = map(float, (scale_std, aniso_std, translate_frac_std))
        self.aniso_rotate_prob = float(aniso_rotate_prob)

    def __repr__(self) -> str:
        return (f"AugmentPipe(p={self.p}, xflip={self.xflip}, scale={self.scale}, aniso={self.aniso}, "
                f"translate_frac={self.translate_frac})")

    def sample_params(self, total: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random draws for `total` images, on the generator's device, all float32 [total].

        The draws are made in EDM's order (flip, scale, aniso, translation) and are always made,
        whichever transforms are on, so each transform's randomness does not depend on the others.
        Returns xflip (0/1), scale_w, aniso_w, aniso_r (radians), tx_w, ty_w; 0 where not fired.
        """
        dev = generator.device
        kw = dict(generator=generator, device=dev)

        def fire(multiplier: float) -> torch.Tensor:
            return torch.rand([total], **kw) < multiplier * self.p

        flip = torch.randint(2, [total], **kw)
        flip = torch.where(fire(self.xflip), flip, 0).float()
        scale_w = torch.randn([total], **kw)
        scale_w = torch.where(fire(self.scale), scale_w, 0.0)
        aniso_w = torch.randn([total], **kw)
        aniso_r = (torch.rand([total], **kw) * 2 - 1) * math.pi
        aniso_w = torch.where(fire(self.aniso), aniso_w, 0.0)
        # Half of the anisotropic scalings are along the image axes, half along angle r.
        aniso_r = torch.where(torch.rand([total], **kw) < self.aniso_rotate_prob, aniso_r, 0.0)
        shift = torch.randn([2, total], **kw)
        shift = torch.where(fire(self.translate_frac)[None], shift, 0.0)
        return dict(xflip=flip, scale_w=scale_w, aniso_w=aniso_w, aniso_r=aniso_r, tx_w=shift[0], ty_w=shift[1])

    @staticmethod
    def labels(params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The conditioning vector [N, 6] of the draws (column layout in the module docstring)."""
        w, r = params["aniso_w"], params["aniso_r"]
        return torch.stack([params["xflip"], params["scale_w"], w * r.cos(), w * r.sin(),
                            params["tx_w"], params["ty_w"]], dim=1)

    def inverse_transforms(self, params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Per-image maps [N, 3, 3] from output pixel (x, y, 1), centred coordinates, to input pixel."""
        like = params["scale_w"]
        s = torch.pow(2.0, params["scale_w"] * self.scale_std)
        g = _scale(1 / s, 1 / s, like)
        a, r = torch.pow(2.0, params["aniso_w"] * self.aniso_std), params["aniso_r"]
        # Inverse of R(r) diag(a, 1/a) R(-r), multiplied on in the order EDM does.
        g = g @ _rotate(-r, like)
        g = g @ _scale(1 / a, 1 / (1 / a), like)
        g = g @ _rotate(r, like)
        tx = params["tx_w"] * (width * self.translate_frac_std)
        ty = params["ty_w"] * (height * self.translate_frac_std)
        return g @ _translate(-tx, -ty, like)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
                 offset: int = 0, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments images [B, C, H, W]; returns (images [B, C, H, W], labels [B, 6] float32).

        Draws are made for `total` images (default B) from `generator` and rows offset:offset+B
        are applied, so one process's slice of a global batch gets exactly what the
        single-process run gives those rows. A CPU generator keeps the draws and the padding
        decision on the host, and the few tensors the device needs are copied through pinned
        memory, so augmenting GPU images never waits for the GPU.
        """
        n = self._check_images(images)
        total = n if total is None else int(total)
        self._check_rows(n, offset, total)
        if self.p == 0 or (self.xflip == self.scale == self.aniso == self.translate_frac == 0):
            return images.contiguous(), torch.zeros([n, NUM_LABELS], dtype=torch.float32, device=images.device)
        if generator is None:
            raise ValueError("AugmentPipe draws its randomness only from an explicit torch.Generator; pass generator=")
        return self.apply(images, self.sample_params(total, generator), offset=offset)

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor], *,
              offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments images [B, C, H, W] with given draws (see `sample_params`, each [total]) for rows offset:offset+B.

        The images come back contiguous whether or not they were resampled: a compiled training
        step guards on its input's strides and would recompile the first time they change.
        """
        n = self._check_images(images)
        total = params["scale_w"].shape[0]
        self._check_rows(n, offset, total)
        h, w = images.shape[2:]
        g_inv = self.inverse_transforms(params, h, w)
        labels = to_device(self.labels(params)[offset:offset + n], images.device)

        flip = to_device(params["xflip"][offset:offset + n], images.device)
        images = torch.where(flip.view(n, 1, 1, 1) == 1, images.flip(3), images)
        # Padding is decided over all `total` images, as the full-batch run would, so the
        # result for a row does not depend on how the batch is split.
        moves = (params["scale_w"] != 0) | (params["aniso_w"] != 0) | (params["tx_w"] != 0) | (params["ty_w"] != 0)
        if not bool(moves.any()):
            return images.contiguous(), labels
        pad = self._margin(g_inv, h, w)
        with _cudnn_benchmark_off():
            images = self._resample(images, g_inv[offset:offset + n], pad)
        return images.contiguous(), labels

    @staticmethod
    def _check_images(images: torch.Tensor) -> int:
        if not torch.is_tensor(images) or images.dim() != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"AugmentPipe expects images [B, C, H, W]; got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"AugmentPipe expects floating-point images (e.g. in [-1, 1]); got dtype {images.dtype}")
        return images.shape[0]

    @staticmethod
    def _check_rows(n: int, offset: int, total: int) -> None:
        if offset < 0 or offset + n > total:
            raise ValueError(f"rows offset:offset+B = {offset}:{offset + n} do not fit in total={total}")

    @staticmethod
    def _margin(g_inv: torch.Tensor, height: int, width: int) -> list[int]:
        """Reflect padding [left, top, right, bottom] that covers every image's source region."""
        cx, cy = (width - 1) / 2, (height - 1) / 2
        corners = _const([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], g_inv.device)
        src = (g_inv @ corners.t())[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * 4]
        reach = torch.cat([-src, src]).max(dim=1).values  # furthest left, top, right, bottom
        filt_pad = len(SYM6) // 4
        reach = reach + _const([filt_pad * 2 - cx, filt_pad * 2 - cy] * 2, g_inv.device)
        reach = reach.max(_const([0, 0] * 2, g_inv.device)).min(_const([width - 1, height - 1] * 2, g_inv.device))
        return reach.ceil().to(torch.int32).tolist()

    @staticmethod
    def _resample(images: torch.Tensor, g_inv: torch.Tensor, pad: list[int]) -> torch.Tensor:
        """Applies g_inv [N, 3, 3] to images [N, C, H, W] alias-free (2x oversampled)."""
        n, c, h, w = images.shape
        out_dtype = images.dtype
        if images.dtype not in (torch.float32, torch.float64):
            images = images.float()
        dev, dt = images.device, images.dtype
        mx0, my0, mx1, my1 = pad
        filt_pad = len(SYM6) // 4
        images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
        g = _const([[1, 0, (mx0 - mx1) / 2], [0, 1, (my0 - my1) / 2], [0, 0, 1]], g_inv.device) @ g_inv

        # 2x upsampling: interleave zeros, then filter with the (time-reversed) sym6 low-pass.
        taps = to_device(torch.tensor(SYM6, dtype=torch.float32).to(dt), dev)
        up = taps.flip(0).view(1, 1, -1).repeat(c, 1, 1)
        hp, wp = images.shape[2:]
        wide = images.new_zeros([n, c, hp, 2 * wp - 1])
        wide[..., ::2] = images
        images = F.conv2d(wide, up.unsqueeze(2), groups=c, padding=[0, (len(SYM6) + 1) // 2])
        tall = images.new_zeros([n, c, 2 * hp - 1, images.shape[3]])
        tall[:, :, ::2, :] = images
        images = F.conv2d(tall, up.unsqueeze(3), groups=c, padding=[(len(SYM6) + 1) // 2, 0])
        g = _const([[2, 0, 0], [0, 2, 0], [0, 0, 1]], g.device) @ g @ _const([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 1]], g.device)
        g = _const([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]], g.device) @ g @ _const([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], g.device)

        # Bilinear resampling onto the 2x grid of the output (plus filt_pad border for the filter).
        out_h, out_w = (h + filt_pad * 2) * 2, (w + filt_pad * 2) * 2
        in_h, in_w = images.shape[2:]
        to_unit = _const([[2 / in_w, 0, 0], [0, 2 / in_h, 0], [0, 0, 1]], g.device)
        from_unit = _const([[1 / (2 / out_w), 0, 0], [0, 1 / (2 / out_h), 0], [0, 0, 1]], g.device)
        theta = to_device((to_unit @ g @ from_unit)[:, :2, :].to(dt), dev)
        grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        # Low-pass and 2x downsampling, then drop the filter border.
        down = taps.view(1, 1, -1).repeat(c, 1, 1)
        conv_pad = (len(SYM6) - 1) // 2
        images = F.conv2d(images, down.unsqueeze(2), groups=c, stride=[1, 2], padding=[0, conv_pad])
        images = images[:, :, :, filt_pad:-filt_pad]
        images = F.conv2d(images, down.unsqueeze(3), groups=c, stride=[2, 1], padding=[conv_pad, 0])
        images = images[:, :, filt_pad:-filt_pad, :]
        return images.to(out_dtype)
