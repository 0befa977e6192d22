"""Latent ImageNet in training: the imagenet256-latent entry, the training step's latent draw and the network's
normalization, exact resume and process-count independence of a latent run, on the fake ImageFolder of
test_latents.py.

The fake tree's crops are 64 pixels and the tiny VAE halves them once, so its latents have the shape of
ImageNet 256's in the SD VAE (4 x 32 x 32) and train on the real table entry.
"""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import prepare_latents
import train
from conftest import free_port
from test_latents import _argv, image_root, vae_dir  # noqa: F401 - fixtures
from training.build import build_trainer
from training.resume import checkpoint_state, load_state
from training.step import draw_batch, train_step
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.data import DATASETS, batch_indices, make_generator, open_dataset
from utils.distributed import cleanup, init_distributed
from utils.errors import UserFileError
from utils.latents import IMF_NORM, SD_SCALE, LatentDataset, LatentSpace, shard_path

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


@pytest.mark.parametrize("arch, norm", [("dit", SD_SCALE), ("imf_dit", IMF_NORM)])
def test_step_draws_the_networks_normalization_of_a_keyed_posterior_sample(latents, arch, norm):
    """x of step 3 = norm((mean + std * eps) of the drawn view), from the shard files and the keyed draws."""
    trainer = build_trainer(_config(latents, "--arch", arch, "--flip", "--batch_size", "6"), init_distributed("cpu"))
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
