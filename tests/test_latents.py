"""Latent ImageNet pieces: ADM's crop, prepare_latents.py (posterior moments of image and mirror, resume,
processes), the latent reader's keyed draws, LatentNorm, VAE decoding, ADM reference files, Inception Score.

Everything runs on a tiny randomly initialised AutoencoderKL and a fake ImageFolder made here.
"""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import prepare_latents
import utils.inception as inception
from conftest import free_port
from utils.adm_ref import describe_reference, load_reference
from utils.data import make_generator
from utils.errors import UserFileError, exit_on_user_error
from utils.imagefolder import center_crop_arr, list_image_folder, load_image
from utils.latents import IMF_NORM, SD_SCALE, LatentDataset, LatentNorm, shard_path
from utils.sampling import to_uint8
from utils.vae import decode, encode_moments, load_vae

RES = 16  # crop size; the tiny VAE halves it once: latents [4, 8, 8]
CLASSES = ["n01443537", "n01440764", "n01484850"]  # created out of order: the listing sorts them


def tiny_vae(seed: int = 0):
    """A randomly initialised AutoencoderKL with the SD VAE's structure at toy size (downsampling 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=RES).eval()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """30 images of varied sizes and aspect ratios in 3 classes, PNG and JPEG, plus a file to be skipped."""
    root = tmp_path_factory.mktemp("imagenet") / "train"
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(CLASSES):
        (root / wnid).mkdir(parents=True)
        for i in range(10):
            w, h = (int(v) for v in rng.integers(9, 70, 2))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            name = f"{wnid}_{i}.JPEG" if i % 4 == 0 else f"{wnid}_{i}.png"
            Image.fromarray(pixels).save(root / wnid / name, format="JPEG" if i % 4 == 0 else "PNG")
        (root / wnid / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_vae().save_pretrained(folder)
    return folder


def _argv(image_root, vae_dir, out, **flags) -> list[str]:
    settings = dict(resolution=RES, batch_size=3, shard_size=8, workers=0, device="cpu") | flags
    argv = ["--data_path", str(image_root), "--out", str(out), "--vae", str(vae_dir)]
    for k, v in settings.items():
        argv += [f"--{k}", str(v)]
    return argv


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def prepared(image_root, vae_dir, tmp_path_factory) -> Path:
    """The latents of the fake folder: 30 images in shards of 8, encoded 3 at a time, in one process."""
    out = tmp_path_factory.mktemp("latents") / "in16"
    prepare_latents.main(_argv(image_root, vae_dir, out))
    return out


# ---------------------------------------------------------------- crop and listing


def test_center_crop_matches_hand_computed_steps():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8))
    # 700 x 300 -> 64: BOX to 350 x 150, then 175 x 75 (75 < 128 stops), BICUBIC to round(175 * 64 / 75) = 149
    # x 64, crop columns (149 - 64) // 2 = 42 .. 105.
    steps = image.resize((350, 150), Image.Resampling.BOX).resize((175, 75), Image.Resampling.BOX)
    expected = np.asarray(steps.resize((149, 64), Image.Resampling.BICUBIC))[:, 42:106]
    np.testing.assert_array_equal(center_crop_arr(image, 64), expected)
    # Smaller than the crop: 50 x 40 is scaled up to 80 x 64, crop columns 8 .. 71.
    small = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    expected = np.asarray(small.resize((80, 64), Image.Resampling.BICUBIC))[:, 8:72]
    np.testing.assert_array_equal(center_crop_arr(small, 64), expected)
    for w, h in [(64, 64), (65, 300), (1000, 129), (127, 128)]:
        assert center_crop_arr(Image.new("RGB", (w, h)), 64).shape == (64, 64, 3)


def test_listing_is_imagefolder_order(image_root):
    from torchvision.datasets import ImageFolder

    classes, samples = list_image_folder(image_root)
    reference = ImageFolder(str(image_root))
    assert classes == reference.classes == sorted(CLASSES)
    assert samples == reference.samples and len(samples) == 30
    assert load_image(samples[0][0], RES).shape == (3, RES, RES)


# ---------------------------------------------------------------- what prepare_latents.py stores


def test_stored_moments_are_the_vae_posterior_of_image_and_encoded_mirror(prepared, image_root, vae_dir):
    ds = LatentDataset(prepared)
    _, samples = list_image_folder(image_root)
    assert len(ds) == 30 and ds.shape == (4, RES // 2, RES // 2)
    assert ds.labels.tolist() == [label for _, label in samples] and ds.labels.dtype == torch.long
    assert ds.description["classes"] == sorted(CLASSES) and ds.description["count"] == 30
    assert [s["count"] for s in ds.description["shards"]] == [8, 8, 8, 6]
    assert np.load(shard_path(prepared, 0, "std")).dtype == np.float16
    vae = load_vae(str(vae_dir))
    idx = torch.tensor([0, 9, 29, 17])
    images = torch.stack([load_image(samples[i][0], RES) for i in idx.tolist()])
    mean, std = encode_moments(vae, images)
    mirror_mean, mirror_std = encode_moments(vae, images.flip(-1))
    for view, (m, s) in enumerate([(mean, std), (mirror_mean, mirror_std)]):
        got_mean, got_std = ds.moments(idx, torch.full((4,), bool(view)))
        # Other batches than the encoder's (3 images) round differently in the last bits; std is float16.
        torch.testing.assert_close(got_mean, m, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_std, s, rtol=2 ** -10, atol=0)
    # The mirror is encoded, not the flipped latent: they differ by far more than rounding.
    assert (mirror_mean - mean.flip(-1)).abs().max() > 0.05


def _remove_progress(folder: Path, keep_shards: int) -> None:
    """Put a finished folder in the state of a run killed while writing shard `keep_shards`."""
    description = json.loads((folder / "dataset.json").read_text())
    pending = {k: v for k, v in description.items() if k != "shards"}
    (folder / "prepare.json").write_text(json.dumps(pending, indent=1) + "\n")
    (folder / "dataset.json").unlink()
    shard_path(folder, keep_shards, "mean").unlink()  # labels and std of that shard were written, mean was not
    for k in range(keep_shards + 1, len(description["shards"])):
        for array in ("labels", "std", "mean"):
            shard_path(folder, k, array).unlink()
    (folder / f".{shard_path(folder, keep_shards, 'mean').name}.4242.deadbeef.tmp").write_bytes(b"half a file")


def test_resume_after_an_interruption_gives_the_same_bytes(prepared, image_root, vae_dir, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(prepared, out)
    _remove_progress(out, keep_shards=1)
    prepare_latents.main(_argv(image_root, vae_dir, out))
    assert _files(out) == _files(prepared)
    prepare_latents.main(_argv(image_root, vae_dir, out))  # a finished folder is left as it is
    assert _files(out) == _files(prepared)


def _run_main(rank: int, argv: list[str], world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    prepare_latents.main(argv)


def test_two_processes_write_what_one_does(prepared, image_root, vae_dir, tmp_path):
    out = tmp_path / "two"
    # fork: the children start with the modules already imported (seconds each to import afresh). One
    # image-decoding worker each: the files do not depend on it either.
    mp.start_processes(_run_main, args=(_argv(image_root, vae_dir, out, workers=1), 2, free_port()), nprocs=2,
                       start_method="fork")
    assert _files(out) == _files(prepared)


def test_killed_run_resumes_to_the_same_bytes(image_root, vae_dir, tmp_path):
    argv = lambda out: _argv(image_root, vae_dir, out, shard_size=1, batch_size=1)  # noqa: E731
    prepare_latents.main(argv(tmp_path / "whole"))
    out = tmp_path / "killed"
    child = mp.get_context("fork").Process(target=_run_main, args=(0, argv(out), 1, free_port()))
    child.start()
    deadline = time.monotonic() + 60
    while not (out / "shard-00003.mean.npy").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert not (out / "dataset.json").exists() and not (out / "shard-00029.mean.npy").exists()
    prepare_latents.main(argv(out))
    assert _files(out) == _files(tmp_path / "whole")


# ---------------------------------------------------------------- the training-time draw


def test_batch_is_mean_plus_std_eps_with_keyed_draws_and_ranks_concatenate(prepared):
    ds = LatentDataset(prepared)
    idx = torch.tensor([29, 3, 3, 17, 8, 0])
    gen = lambda purpose: make_generator(7, 11, purpose)  # noqa: E731 - (seed, step, purpose)
    full = ds.batch(idx, generator=gen, rows=slice(0, 6), total=6, flip=True, device="cpu")
    mirror = (torch.rand(6, generator=gen("flip")) < 0.5).long()
    assert 0 < mirror.sum() < 6
    eps = torch.stack([torch.randn(ds.shape, generator=gen(f"latent/{row}")) for row in range(6)])
    # The moments read straight from the shard files: image i is row i - 8 k of shard k = i // 8.
    shard = [(i // 8, i % 8) for i in idx.tolist()]
    mean = torch.stack([torch.from_numpy(np.load(shard_path(prepared, k, "mean"))[r, v])
                        for (k, r), v in zip(shard, mirror.tolist())])
    std = torch.stack([torch.from_numpy(np.load(shard_path(prepared, k, "std"))[r, v].astype(np.float32))
                       for (k, r), v in zip(shard, mirror.tolist())])
    torch.testing.assert_close(full, mean + std * eps, rtol=1e-6, atol=1e-6)
    assert full.dtype == torch.float32 and full.shape == (6, *ds.shape)
    ranks = [ds.batch(idx[r:r + 2], generator=gen, rows=slice(r, r + 2), total=6, flip=True, device="cpu")
             for r in (0, 2, 4)]
    assert torch.equal(torch.cat(ranks), full)
    unflipped = ds.batch(idx, generator=gen, rows=slice(0, 6), total=6, flip=False, device="cpu")
    m0, s0 = ds.moments(idx, torch.zeros(6, dtype=torch.bool))
    torch.testing.assert_close(unflipped, m0 + s0 * eps, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous slice"):
        ds.batch(idx, generator=gen, rows=slice(0, 5), total=6, flip=True, device="cpu")


def test_latent_norm_round_trip_and_named_constants():
    z = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 5
    for norm in (SD_SCALE, IMF_NORM):
        torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z, rtol=1e-6, atol=1e-5)
        assert LatentNorm.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    torch.testing.assert_close(SD_SCALE.normalize(z), z * 0.18215)
    mean = torch.tensor([0.86488, -0.27787343, 0.21616915, 0.3738409]).view(4, 1, 1)
    std = torch.tensor([4.85503674, 5.31922414, 3.93725398, 3.9870003]).view(4, 1, 1)
    torch.testing.assert_close(IMF_NORM.normalize(z), (z - mean) / std, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="4, H, W"):
        SD_SCALE.normalize(torch.zeros(2, 3, 4, 4))


def test_decode_gives_uint8_images_rounded_like_samples():
    vae = tiny_vae()
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = decode(vae, z, batch_size=2)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, RES, RES)
    with torch.no_grad():
        expected = to_uint8(vae.decode(z[:2]).sample)
    assert (images[:2].int() - expected.int()).abs().max() <= 1  # the same up to a rounding boundary


# ---------------------------------------------------------------- evaluation pieces


def test_adm_reference_batch_uses_stored_statistics(tmp_path):
    rng = np.random.default_rng(0)
    mu, a = rng.standard_normal(6), rng.standard_normal((6, 6))
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=a @ a.T,
             mu_s=rng.standard_normal(3), sigma_s=np.eye(3))
    ref = load_reference(str(path))
    assert ref.kind == "adm-reference-batch" and np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, a @ a.T)
    assert "VIRTUAL_imagenet256_labeled.npz" in ref.description and "10 images" in ref.description
    assert describe_reference(str(path)) == ref.description
    np.savez(tmp_path / "jax.npz", ref_mu=mu, ref_sigma=np.eye(6))
    assert load_reference(str(tmp_path / "jax.npz")).kind == "jax-ref-stats"
    np.savez(tmp_path / "other.npz", features=mu)
    with pytest.raises(UserFileError, match="no reference statistics"):
        load_reference(str(tmp_path / "other.npz"))


def test_inception_score_known_answers():
    assert inception.inception_score(torch.zeros(100, 1008)) == pytest.approx((1.0, 0.0))
    k = 7
    one_hot = torch.eye(k).repeat(10, 1)  # 70 rows; every split of 7 uses each class once
    assert inception.inception_score(one_hot, splits=10, probabilities=True) == pytest.approx((k, 0.0))
    assert inception.inception_score(60.0 * one_hot, splits=10)[0] == pytest.approx(k, rel=1e-9)
    # Split 1 predicts class 0 only (IS 1), split 2 ten classes once each (IS 10).
    probs = torch.cat([torch.eye(10)[[0] * 10], torch.eye(10)])
    assert inception.inception_score(probs, splits=2, probabilities=True) == pytest.approx((5.5, 4.5))


@pytest.mark.slow
def test_features_and_logits_come_from_one_forward(tmp_path, monkeypatch):
    from test_fid import _random_inception_file

    path = tmp_path / inception.WEIGHTS_FILE
    _random_inception_file(path, monkeypatch)
    both = inception.InceptionFeaturesLogits(weights_path=str(path))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    features, logits = both.features_and_logits(images)
    assert torch.equal(features, inception.InceptionFeatures(weights_path=str(path))(images))
    assert torch.equal(both(images), features) and logits.shape == (2, 1008)
    torch.testing.assert_close(logits, features @ torch.load(path)["fc.weight"].T, rtol=1e-4, atol=1e-4)
    assert both.key == inception.InceptionFeatures(weights_path=str(path)).key


# ---------------------------------------------------------------- user errors


def _error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop, exit_on_user_error():
        prepare_latents.main(argv)
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_user_errors_are_one_line(image_root, vae_dir, prepared, tmp_path, capsys):
    assert "--data_path" in _error_line(_argv(tmp_path / "nowhere", vae_dir, tmp_path / "o1"), capsys)
    (tmp_path / "empty" / "n0").mkdir(parents=True)
    assert "no images under" in _error_line(_argv(tmp_path / "empty", vae_dir, tmp_path / "o2"), capsys)
    broken = tmp_path / "broken"
    shutil.copytree(image_root, broken)
    bad = sorted((broken / CLASSES[1]).glob("*.png"))[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert f"cannot read image {bad}" in _error_line(_argv(broken, vae_dir, tmp_path / "o3"), capsys)
    assert "other settings (" in _error_line(_argv(image_root, vae_dir, prepared, resolution=32), capsys)
    assert "--vae mse" in _error_line(_argv(image_root, "nonsense", tmp_path / "o4"), capsys)


def test_missing_vae_weights_name_the_repository_and_flag(monkeypatch):
    from diffusers import AutoencoderKL

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this model")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(UserFileError) as error:
        load_vae("mse")
    message = str(error.value)
    assert "stabilityai/sd-vae-ft-mse" in message and "--vae /path/to/folder" in message and "\n" not in message


def test_unfinished_folder_is_not_read(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "partial")
    _remove_progress(tmp_path / "partial", keep_shards=2)
    with pytest.raises(UserFileError, match="run the same prepare_latents.py command again"):
        LatentDataset(tmp_path / "partial")
