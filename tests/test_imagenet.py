"""Latent ImageNet from the dataset table to evaluate.py: the imagenet256-latent entry, the training step's
latent draw and the network's normalization, exact resume and process-count independence of a latent run,
then prepare_latents.py -> train.py -> sample.py -> evaluate.py on the fake ImageFolder of test_latents.py.

The fake tree's crops are 64 pixels and the tiny VAE halves them once, so its latents have the shape of
ImageNet 256's in the SD VAE (4 x 32 x 32) and train on the real table entry; decoding gives 64x64 images.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import evaluate
import meanflow
import prepare_latents
import sample
import train
from conftest import free_port
from test_fid import FakeExtractorLogits
from test_latents import _argv, image_root, vae_dir  # noqa: F401 - fixtures
from training.build import build_trainer, load_network
from training.resume import checkpoint_state, load_state
from training.step import draw_batch, train_step
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.data import DATASETS, batch_indices, make_generator, open_dataset
from utils.distributed import cleanup, init_distributed
from utils.errors import UserFileError, exit_on_user_error
from utils.fid import FeatureStats
from utils.imagefolder import list_image_folder, load_image
from utils.latents import IMF_NORM, SD_SCALE, LatentDataset, LatentSpace, shard_path
from utils.sampling import sample_noise
from utils.vae import decode, load_vae

CROP = 64
# A tiny class-conditional DiT with the papers' guidance on the latents; lr high enough that the weights move.
RUN = ["--dataset", "imagenet256-latent", "--arch", "dit", "--model_size", "XS/2", "--class_cond", "--cfg_omega",
       "1.0", "--cfg_kappa", "0.5", "--lr", "0.001", "--warmup_epochs", "0", "--ema_decays", "0.5", "--device", "cpu",
       "--not_compile"]


@pytest.fixture(scope="module")
def latents(image_root, vae_dir, tmp_path_factory):  # noqa: F811 - fixtures
    """The fake tree's 30 images as 64-pixel crops and their mirrors, encoded: latents 4 x 32 x 32."""
    out = tmp_path_factory.mktemp("latents") / "in64"
    prepare_latents.main(_argv(image_root, vae_dir, out, resolution=CROP))
    return out


def _config(latents, *extra):
    return train.resolve_config([*RUN, "--data_path", str(latents), "--output_dir", "", *extra])


def test_latent_entries_open_folders_of_their_shape(latents, tmp_path):
    data = open_dataset("imagenet256-latent", latents)
    assert isinstance(data, LatentDataset) and data.shape == (4, 32, 32) and len(data) == 30
    assert data.to("cpu") is data  # the memory maps stay on the host
    assert not DATASETS["imagenet256-latent"].flip and DATASETS["cifar10"].flip
    with pytest.raises(UserFileError, match=r"holds latents \(4, 32, 32\).*imagenet512-latent trains on \(4, 64, 64\)"):
        open_dataset("imagenet512-latent", latents)
    with pytest.raises(FileNotFoundError, match="prepare_latents.py --data_path .* --resolution 256.*--data_path"):
        open_dataset("imagenet256-latent", tmp_path)


# iMF's objective and network; its (t, r) draws are one logit-normal's.
IMF = ["--objective", "imf", "--arch", "imf_dit", "--tr_sampler", "v0", "--P_mean_t", "-0.4", "--P_std_t", "1",
       "--P_mean_r", "-0.4", "--P_std_r", "1"]


@pytest.mark.parametrize("network, norm", [(["--arch", "dit"], SD_SCALE), (IMF, IMF_NORM)])
def test_step_draws_the_networks_normalization_of_a_keyed_posterior_sample(latents, network, norm):
    """x of step 3 = norm((mean + std * eps) of the drawn view), from the shard files and the keyed draws."""
    cfg = train.resolve_config(["--dataset", "imagenet256-latent", "--data_path", str(latents), *network,
                                "--model_size", "XS/2", "--class_cond", "--flip", "--batch_size", "6",
                                "--output_dir", "", "--device", "cpu", "--not_compile"])
    trainer = build_trainer(cfg, init_distributed("cpu"))
    assert trainer.flip and trainer.latent.norm == norm and trainer.latent.resolution == CROP
    step, seed = 3, 0
    idx = batch_indices(seed, 0, 30, 6, step).tolist()
    key = lambda purpose: make_generator(seed, "train", step, purpose)  # noqa: E731
    mirror = (torch.rand(6, generator=key("flip")) < 0.5).long().tolist()
    assert 0 < sum(mirror) < 6
    eps = torch.stack([torch.randn(4, 32, 32, generator=key(f"latent/{row}")) for row in range(6)])
    read = lambda array, i, v: torch.from_numpy(  # noqa: E731 - image i is row i % 8 of shard i // 8
        np.load(shard_path(latents, i // 8, array))[i % 8, v].astype(np.float32))
    mean = torch.stack([read("mean", i, v) for i, v in zip(idx, mirror)])
    std = torch.stack([read("std", i, v) for i, v in zip(idx, mirror)])
    torch.testing.assert_close(draw_batch(trainer, step).x, norm.normalize(mean + std * eps), rtol=1e-6, atol=1e-6)


def _steps_worker(rank: int, argv: list[str], world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = init_distributed("cpu")
    try:
        trainer = build_trainer(train.resolve_config(argv), env)
        for step in range(3):
            train_step(trainer, step, check=True)
        if rank == 0:
            torch.save(trainer.model.state_dict(), out)
    finally:
        cleanup()


@pytest.mark.slow
def test_latent_run_resumes_exactly_and_two_processes_train_what_one_does(latents, tmp_path):
    cfg = _config(latents, "--flip", "--batch_size", "4")
    straight = build_trainer(cfg, init_distributed("cpu"))
    for step in range(3):
        train_step(straight, step)
    # Stopped after one step: the checkpoint records the latent space, and the rerun continues exactly.
    first = build_trainer(cfg, init_distributed("cpu"))
    train_step(first, 0)
    save_checkpoint(checkpoint_state(first, 1, config=cfg.flags(), rollback={}), tmp_path / "c.pth")
    ckpt = load_checkpoint(tmp_path / "c.pth")
    assert LatentSpace.of_checkpoint(ckpt) == first.latent and ckpt["latent"]["norm"]["scale"] == [0.18215] * 4
    resumed = build_trainer(cfg, init_distributed("cpu"))
    assert load_state(resumed, ckpt, "c.pth")[0] == 1
    for step in (1, 2):
        train_step(resumed, step)
    expected = straight.model.state_dict()
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in expected.items())
    # Two processes with half the batch each: the same draws, gradients averaged in another order.
    argv = [*RUN, "--data_path", str(latents), "--output_dir", "", "--flip", "--batch_size", "2"]
    mp.start_processes(_steps_worker, args=(argv, 2, free_port(), str(tmp_path / "two.pt")), nprocs=2,
                       start_method="fork")
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert max((v.double() - two[k].double()).abs().max().item() for k, v in expected.items()) <= 1e-6


def _adm_reference(path, root, extractor) -> None:
    """An ADM-format reference batch of the fake tree's crops: the images, and the statistics of their features."""
    _, samples = list_image_folder(root)
    images = torch.stack([load_image(p, CROP) for p, _ in samples])
    stats = FeatureStats()
    stats.add_images(images, extractor)
    mu, sigma = stats.mean_cov()
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=np.eye(3))


def _error_line(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop, exit_on_user_error():
        main(argv)
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1
    return lines[-1]


@pytest.mark.slow
def test_prepare_train_sample_evaluate_on_the_fake_tree(latents, image_root, vae_dir, tmp_path, monkeypatch,  # noqa: F811
                                                        capsys):
    # The authors' ImageNet recipe as the preset sets it, with a tiny DiT and batch.
    run = tmp_path / "run"
    assert train.main(["--preset", "imagenet256-b4", "--model_size", "XS/2", "--batch_size", "4", "--max_steps", "2",
                       "--data_path", str(latents), "--output_dir", str(run), "--device", "cpu", "--not_compile"]) == 0
    ckpt = run / "checkpoint-last.pth"
    assert list((run / "samples").glob("step00000002_net_ema.png"))  # grids of decoded samples

    # sample.py: images of the crops' size, balanced classes; sample i is the VAE's decoding of the
    # network's sample of (seed, i) with its normalization undone.
    sample.main(["--ckpt", str(ckpt), "--num_samples", "6", "--out", str(tmp_path / "s.npz"), "--grid",
                 str(tmp_path / "g.png"), "--device", "cpu"])
    with np.load(tmp_path / "s.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (6, CROP, CROP, 3) and images.dtype == np.uint8 and labels.tolist() == list(range(6))
    net = load_network(ckpt, ema="net_ema")
    z = meanflow.sample(net, sample_noise(0, torch.arange(6), (4, 32, 32)), labels=torch.arange(6))
    expected = decode(load_vae(str(vae_dir)), z / 0.18215).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - expected).max() <= 1  # a rounding boundary apart at most

    # evaluate.py: FID against an ADM-format reference batch of the fake tree, and IS from the same forward.
    extractor = FakeExtractorLogits()
    monkeypatch.setattr(evaluate, "InceptionFeaturesLogits", lambda *a, **k: extractor)
    _adm_reference(tmp_path / "ref.npz", image_root, extractor)
    common = ["--ckpt", str(ckpt), "--ema", "net_ema", "--fid_samples", "10", "--device", "cpu"]
    rows = evaluate.main([*common, "--ref", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "r.json")])
    assert [(r["ema"], r["steps"]) for r in rows] == [("net_ema", 1)] and rows[0]["fid"] > 0 and rows[0]["is"] >= 1
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["reference"].startswith("ADM reference batch ref.npz: its stored mu/sigma")
    assert result["vae"] == str(vae_dir.resolve())
    assert "samples decoded by the VAE" in capsys.readouterr().out

    # Without --ref, the line names ADM's file; a VAE that is not there names --vae.
    assert "VIRTUAL_imagenet256_labeled.npz" in _error_line(evaluate.main, common, capsys)
    line = _error_line(sample.main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "x.npz"), "--device", "cpu",
                                     "--vae", str(tmp_path / "no-vae")], capsys)
    assert "the samples are latents of the VAE" in line and "--vae" in line
