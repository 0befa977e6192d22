"""utils/fid.py and utils/inception.py: Frechet distance against closed forms, statistics sharding, reference
cache, Inception loading; evaluate.py."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed
import torch.multiprocessing as mp

from conftest import free_port
import training.sampling as sampling
import utils.checkpoint as ckpt_io
import utils.fid as fid
import utils.inception as inception
from utils.distributed import DistEnv, cleanup

ROOT = Path(__file__).resolve().parents[1]


class FakeExtractor:
    """12 features per image: the mean of each channel over a 2 x 2 grid of cells. Counts its calls."""

    def __init__(self, key: str = "fake-v1"):
        self.key = key
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 2).flatten(1)


class FakeExtractorLogits(FakeExtractor):
    """FakeExtractor's features, and 3 class logits from the same call: the features of each channel summed."""

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self(images)
        return features, features.view(-1, 3, 4).sum(-1) / 100


def toy_net(z, t, h, aug_cond=None):
    """A fixed smooth map standing in for a network: u depends on z and on t, h."""
    return 0.6 * z + 0.2 * torch.sin(3 * z) * (t + h).view(-1, 1, 1, 1)


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


# ---------------------------------------------------------------- Frechet distance


def test_frechet_matches_eigen_formula_on_random_spd():
    rng = np.random.default_rng(0)
    for d in (1, 3, 8):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        # tr((s1 s2)^(1/2)) = tr((s1^(1/2) s2 s1^(1/2))^(1/2)): square roots of a symmetric matrix's eigenvalues.
        w, v = np.linalg.eigh(s1)
        root1 = v @ np.diag(np.sqrt(w)) @ v.T
        tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_diagonal_closed_form_and_zero():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    s = random_spd(rng, 6)
    assert abs(fid.frechet_distance(mu1[:1].repeat(6), s, mu1[:1].repeat(6), s)) < 1e-8
    # Tensors are accepted too.
    assert fid.frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(s1)), mu2, np.diag(s2)) == pytest.approx(expected)


def _sqrtm_distance(mu1, s1, mu2, s2) -> float:
    """The TF FID code's formula, with scipy's general matrix square root."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.slow
@pytest.mark.parametrize("samples", [3000, 1000])  # full rank; rank 999 of 2048, as FID with few samples
def test_frechet_equals_sqrtm_formula_on_2048_d_covariances(samples):
    rng = np.random.default_rng(samples)
    stats = []
    for scale in (1.0, 1.2):
        features = scale * rng.standard_normal((samples, 2048)) + 0.1 * rng.standard_normal(2048)
        stats += [features.mean(0), np.cov(features, rowvar=False)]
    assert fid.frechet_distance(*stats) == pytest.approx(_sqrtm_distance(*stats), rel=1e-6)


def test_frechet_of_singular_covariances_is_finite_and_exact():
    # Rank-one covariances u u^T and v v^T: tr (s1 s2)^(1/2) = |u . v|, which needs no offset.
    u, v = np.array([1.0, 2.0, 0.0]), np.array([0.5, -1.0, 3.0])
    s1, s2 = np.outer(u, u), np.outer(v, v)
    expected = u @ u + v @ v - 2 * abs(u @ v)
    assert fid.frechet_distance(np.zeros(3), s1, np.zeros(3), s2) == pytest.approx(expected, rel=1e-9)
    assert abs(fid.frechet_distance(np.zeros(3), s1, np.zeros(3), s1)) < 1e-7


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------- statistics


def test_feature_stats_match_numpy_and_grey_images_become_rgb():
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (20, 1, 6, 6), generator=g, dtype=torch.uint8)
    ext = FakeExtractor()
    stats = fid.FeatureStats()
    for chunk in grey.split(7):
        stats.add_images(chunk, ext)
    mu, sigma = stats.mean_cov()
    feats = ext(grey.expand(-1, 3, -1, -1)).double().numpy()
    assert np.allclose(mu, feats.mean(0), rtol=1e-12) and np.allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-10)


class EvalCheckNet(torch.nn.Module):
    """A 1x1 convolution that fails if it is called in train mode."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, z, t, h, aug_cond=None):
        assert not self.training
        return self.conv(z)


def test_fid_does_not_depend_on_batch_size_and_restores_train_mode():
    ext = FakeExtractor()
    ref = fid.dataset_stats(torch.rand(40, 3, 4, 4) * 2 - 1, extractor=ext, progress=False)
    kw = dict(ref=ref, num_samples=30, img_shape=(3, 4, 4), seed=5, extractor=ext, progress=False)
    a = sampling.fid_of_network(toy_net, batch_size=7, **kw)
    b = sampling.fid_of_network(toy_net, batch_size=30, **kw)
    assert a == pytest.approx(b, rel=1e-10) and a > 0
    net = EvalCheckNet().train()
    sampling.fid_of_network(net, batch_size=16, **kw)
    assert net.training


def _fid_worker(rank: int, port: int, out_dir: str, ref: tuple) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        env = DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
        calls = []
        distance = sampling.frechet_distance
        sampling.frechet_distance = lambda *args, **kwargs: calls.append(1) or distance(*args, **kwargs)
        scores = sampling.scores_of_network(toy_net, ref=ref, num_samples=33, batch_size=4, img_shape=(3, 4, 4),
                                            seed=2, steps=2, extractor=FakeExtractorLogits(), env=env, progress=False)
        np.save(os.path.join(out_dir, f"fid{rank}.npy"), np.array([scores["fid"], scores["is"], len(calls)]))
    finally:
        cleanup()


@pytest.mark.slow
def test_fid_and_inception_score_two_gloo_processes_equal_one(tmp_path):
    ref = fid.dataset_stats(torch.rand(50, 3, 4, 4) * 2 - 1, extractor=FakeExtractor(), progress=False)
    kw = dict(ref=ref, num_samples=33, img_shape=(3, 4, 4), seed=2, steps=2, progress=False)
    single = sampling.scores_of_network(toy_net, batch_size=10, extractor=FakeExtractorLogits(), **kw)
    assert single["fid"] == sampling.fid_of_network(toy_net, batch_size=10, extractor=FakeExtractor(), **kw)
    # The Inception Score of the logits of the same images, in sample order, in 10 splits.
    images = sampling.sample_images(toy_net, num_samples=33, img_shape=(3, 4, 4), seed=2, steps=2)
    expected = inception.inception_score(FakeExtractorLogits().features_and_logits(images)[1], splits=10)
    assert (single["is"], single["is_std"]) == pytest.approx(expected, rel=1e-12) and single["is"] > 1
    mp.spawn(_fid_worker, args=(free_port(), str(tmp_path), ref), nprocs=2, join=True)
    values, scores, calls = zip(*(np.load(tmp_path / f"fid{r}.npy") for r in range(2)))
    assert values[0] == values[1] and scores[0] == scores[1]
    assert calls == (1, 0)  # the distance is taken on rank 0 only
    assert values[0] == pytest.approx(single["fid"], rel=1e-9) and scores[0] == pytest.approx(single["is"], rel=1e-9)


# ---------------------------------------------------------------- reference statistics cache


def test_reference_stats_cached_and_keyed(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = {"train": torch.randint(0, 256, (30, 1, 5, 5), generator=g, dtype=torch.uint8),
            "test": torch.randint(0, 256, (25, 1, 5, 5), generator=g, dtype=torch.uint8)}
    loads = []

    def fake_load(name, data_path="./data", train=True, download=True):
        loads.append((name, train))
        return data["train" if train else "test"]

    monkeypatch.setattr(fid, "load_dataset", fake_load)
    ext = FakeExtractor("fake-v1")
    kw = dict(data_path=str(tmp_path), cache_dir=str(tmp_path / "refs"), batch_size=8, progress=False)
    mu, sigma = fid.reference_stats("toy", extractor=ext, **kw)
    first_calls = ext.calls
    assert first_calls == 4 and len(loads) == 1
    path = fid.reference_path("toy", split="train", extractor=ext, cache_dir=str(tmp_path / "refs"))
    with np.load(path) as f:
        assert str(f["key"]) == "toy-train-fake-v1" and int(f["count"]) == 30 and set(f) >= {"mu", "sigma"}

    mu2, sigma2 = fid.reference_stats("toy", extractor=ext, **kw)
    assert ext.calls == first_calls and len(loads) == 1
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)

    # Another split or extractor has another key: recomputed, not reused.
    mu_test, _ = fid.reference_stats("toy", split="test", extractor=ext, **kw)
    assert ext.calls == first_calls + 4 and not np.allclose(mu_test, mu)
    other = FakeExtractor("fake-v2")
    fid.reference_stats("toy", extractor=other, **kw)
    assert other.calls == 4

    # A file whose stored key disagrees with its name (stale or renamed) is recomputed and replaced.
    fid.save_stats(path, mu + 1, sigma, key="something-else")
    mu3, _ = fid.reference_stats("toy", extractor=ext, **kw)
    assert np.allclose(mu3, mu) and ext.calls == first_calls + 8
    # A file without a key (EDM's format, put there by hand) is used as it is.
    np.savez(path, mu=mu + 1, sigma=sigma)
    mu4, _ = fid.reference_stats("toy", extractor=ext, **kw)
    assert np.allclose(mu4, mu + 1)


def test_load_stats_names_files_that_are_not_statistics(tmp_path):
    from utils.errors import UserFileError

    (tmp_path / "text.npz").write_text("not numpy")
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    for name, message in [("text.npz", "not a statistics file"), ("one.npy", "one array"), ("other.npz", "'mu'")]:
        with pytest.raises(UserFileError, match=message):
            fid.load_stats(str(tmp_path / name))


def test_reference_stats_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        fid.reference_stats("toy", split="val", extractor=FakeExtractor(), cache_dir="unused")


# ---------------------------------------------------------------- Inception weights


def _random_inception_file(path, monkeypatch) -> None:
    """Save torch-fidelity's own inception-v3-compat state dict (1008 classes) filled with random values."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with monkeypatch.context() as m:
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        model = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            value = torch.rand(value.shape, generator=g) * 0.1 + (0.5 if name.endswith("running_var") else 0.0)
        state[name] = value
    assert state["fc.weight"].shape == (1008, 2048)
    torch.save(state, path)


def _two_node_worker(rank: int, port: int, root: str) -> None:
    """Rank r is the only process of node r, with a torch.hub cache of its own and no Inception weights."""
    os.environ["TORCH_HOME"] = os.path.join(root, f"node{rank}")
    os.environ.pop(inception.WEIGHTS_ENV, None)
    inception._download = lambda url, dst: Path(dst).write_bytes(f"fetched on node {rank}".encode())
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        env = DistEnv(rank=rank, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
        path = fid.inception_weights(env=env)
        Path(root, f"rank{rank}.txt").write_text(path + "\n" + Path(path).read_text())
    finally:
        cleanup()


@pytest.mark.slow
def test_each_node_fetches_the_inception_weights_into_its_own_cache(tmp_path):
    """Several nodes without a shared cache: the first process of every node downloads, not only rank 0."""
    mp.spawn(_two_node_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        path, content = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert path.startswith(str(tmp_path / f"node{rank}")) and content == f"fetched on node {rank}"


def test_inception_loads_weights_file_and_gives_2048_features(tmp_path, monkeypatch):
    path = tmp_path / inception.WEIGHTS_FILE
    _random_inception_file(path, monkeypatch)
    ext = inception.InceptionFeatures(weights_path=str(path))
    assert ext.key == f"inception-v3-compat-{inception.file_digest(str(path))}"
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    feats = ext(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and not torch.equal(feats[0], feats[1])
    with pytest.raises(ValueError, match="uint8"):
        ext(images.float())


def test_inception_weights_found_via_env_and_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    local = tmp_path / "w.pth"
    local.write_bytes(b"x")
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(local))
    assert inception.resolve_inception_weights(download=False) == str(local)
    monkeypatch.delenv(inception.WEIGHTS_ENV)

    fetched = []

    def fake_download(url, dst):
        fetched.append(url)
        with open(dst, "wb") as f:
            f.write(b"y")

    monkeypatch.setattr(inception, "_download", fake_download)
    path = inception.resolve_inception_weights()
    assert path == inception.default_weights_path() and path.startswith(str(tmp_path))
    assert fetched == [inception.WEIGHTS_URL]
    assert inception.resolve_inception_weights(download=False) == path and len(fetched) == 1


def test_inception_offline_error_names_file_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)

    def offline(url, dst):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(inception, "_download", offline)
    missing = str(tmp_path / "none.pth")
    for call, error in [(lambda: inception.InceptionFeatures(), RuntimeError),
                        (lambda: inception.InceptionFeatures(download=False), FileNotFoundError),
                        (lambda: inception.InceptionFeatures(weights_path=missing), FileNotFoundError)]:
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        assert inception.WEIGHTS_FILE in message and "--inception_weights" in message
        assert inception.WEIGHTS_ENV in message


# ---------------------------------------------------------------- evaluate.py


def test_evaluate_cli_table_json_and_ref_tool(fixtures_dir, tmp_path, monkeypatch, capsys):
    import argparse
    import json

    import evaluate

    monkeypatch.setattr(evaluate, "InceptionFeaturesLogits", lambda *a, **k: FakeExtractorLogits())
    real = torch.randint(0, 256, (20, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    monkeypatch.setattr(fid, "load_dataset", lambda *a, **k: real)
    common = ["--data_path", str(tmp_path), "--device", "cpu", "--batch_size", "4"]

    evaluate.main(["ref", "--dataset", "mnist", "--out", str(tmp_path / "copy.npz")] + common)
    cached = tmp_path / "fid_refs" / "mnist-train-fake-v1.npz"
    assert cached.is_file() and np.allclose(np.load(tmp_path / "copy.npz")["mu"], np.load(cached)["mu"])

    out = tmp_path / "results.json"
    rows = evaluate.main(["--ckpt", str(fixtures_dir / "official_unet_small.pt"), "--fid_samples", "6",
                          "--steps", "1", "2", "--ema", "all", "--dataset", "mnist", "--out", str(out)] + common)
    assert [(r["ema"], r["steps"]) for r in rows] == [(n, s) for n in ("net_ema", "net_ema1", "net_ema2") for s in (1, 2)]
    assert json.loads(out.read_text())["results"] == rows and all(r["is"] >= 1 for r in rows)
    assert json.loads(out.read_text())["reference"] == f"statistics of the mnist training set, cached in {cached}"
    printed = capsys.readouterr().out
    assert "net_ema1" in printed and "reference: statistics of the mnist training set" in printed

    # --ref takes a file in EDM's layout as it is; selected networks only.
    np.savez(tmp_path / "edm.npz", mu=np.zeros(12), sigma=np.eye(12))
    rows = evaluate.main(["--ckpt", str(fixtures_dir / "official_unet_small.pt"), "--fid_samples", "6",
                          "--ema", "net", "--ref", str(tmp_path / "edm.npz")] + common)
    assert [r["ema"] for r in rows] == ["net"] and rows[0]["fid"] > 0
    with pytest.raises(ValueError, match="available"):
        evaluate.select_networks({"model": torch.load(fixtures_dir / "official_unet_small.pt")["model"]}, ["net_ema7"])
    authors = {"args": argparse.Namespace(dataset="cifar10", ema_decay=0.9999, ema_decays=[0.99995, 0.9996])}
    assert ckpt_io.checkpoint_dataset(authors) == "cifar10"
    assert ckpt_io.ema_decays(authors) == {"net_ema": 0.9999, "net_ema1": 0.99995, "net_ema2": 0.9996}


@pytest.mark.slow
def test_evaluate_cli_user_error_is_one_line(fixtures_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_HOME=str(tmp_path / "torch"),
               MEANFLOW_INCEPTION_WEIGHTS=str(tmp_path / "missing.pth"))
    run = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(fixtures_dir / "official_unet_small.pt"),
                          "--dataset", "mnist", "--no_download", "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and inception.WEIGHTS_FILE in lines[0], run.stderr
    assert "--inception_weights" in lines[0]


def test_evaluate_cli_unknown_ema_and_programming_error(fixtures_dir, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "edm.npz", mu=np.zeros(12), sigma=np.eye(12))
    monkeypatch.setattr(inception, "InceptionFeaturesLogits", lambda *a, **k: FakeExtractorLogits())
    argv = ["evaluate.py", "--ckpt", str(fixtures_dir / "official_unet_small.pt"), "--fid_samples", "4",
            "--ref", str(tmp_path / "edm.npz"), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv + ["--ema", "net_ema7"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and err.startswith("error: --ema net_ema7"), err

    def broken(*args, **kwargs):
        raise TypeError("a bug, not a user error")

    monkeypatch.setattr(sampling, "scores_of_network", broken)
    monkeypatch.setattr(sys, "argv", argv + ["--ema", "net"])
    with pytest.raises(TypeError, match="a bug"):  # propagates: Python prints its traceback
        runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
    assert "error:" not in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_scores_a_digits_checkpoint_by_the_digits_figure_without_inception(tmp_path, capsys):
    """The dataset table says which figure applies: a digits checkpoint needs no Inception weights."""
    import evaluate
    import train

    out = tmp_path / "run"
    assert train.main(["--preset", "tiny", "--device", "cpu", "--not_compile", "--max_steps", "2",
                       "--output_dir", str(out)]) == 0
    missing = tmp_path / "missing.pth"
    os.environ["MEANFLOW_INCEPTION_WEIGHTS"] = str(missing)
    try:
        rows = evaluate.main(["--ckpt", str(out / "checkpoint-last.pth"), "--ema", "net_ema", "--device", "cpu",
                              "--out", str(tmp_path / "r.json")])
    finally:
        del os.environ["MEANFLOW_INCEPTION_WEIGHTS"]
    assert [(r["ema"], r["steps"]) for r in rows] == [("net_ema", 1)]
    assert rows[0]["fd"] > 0 and 0 < rows[0]["confidence"] <= 1 and rows[0]["count"] == 297
    assert "net_ema 1-step digits quality: FD" in capsys.readouterr().out
