"""FID and Inception Score of a MeanFlow checkpoint (ours or the authors'), and the reference-statistics tool.

    python evaluate.py --ckpt model.pth --steps 1 2 --ema all --out results.json
    torchrun --nproc_per_node 8 evaluate.py --ckpt model.pth --ema net_ema1
    torchrun --nproc_per_node 8 evaluate.py --ckpt imagenet.pth --ref VIRTUAL_imagenet256_labeled.npz
    torchrun --nproc_per_node 8 evaluate.py --ckpt iMF-B-2.pth --ema net --ref VIRTUAL_imagenet256_labeled.npz \
        --omega 6 7 8 --t_min 0.4 --t_max 0.65          # an iMF network: one row per guidance setting
    python evaluate.py ref --dataset cifar10 --data_path ./data

Protocol: ``--fid_samples`` samples (50,000 by default) per network and number of steps, each from
noise seeded by (seed, sample index) (and of class index % num_classes), quantised to uint8 by
rounding (a latent model's: decoded by its VAE first), against the Inception statistics of the
whole training set: computed once and cached, or given with --ref (ADM's reference batch for
ImageNet, whose stored statistics are used). The Inception Score comes from the same Inception
forward. A checkpoint of a dataset whose quality figure is not FID (the digits) is scored by that
figure instead. An iMF network samples with the guidance --omega, --t_min, --t_max (default: the checkpoint's,
or the authors' for their model sizes, their 2-step XL/2 setting first; several values: a row for each combination).
"""

import argparse
import json
import sys

import torch

from training.build import load_network, read_checkpoint, sampling_guidance
from training.sampling import image_decoder, sample_images, scores_of_network
from utils.adm_ref import load_reference
from utils.checkpoint import available_networks, checkpoint_dataset, ema_decays
from utils.cli import HelpFormatter, add_guidance_flags, parse_model_config
from utils.data import DATASETS, dataset_info
from utils.distributed import cleanup, init_distributed
from utils.errors import UserValueError, exit_on_user_error
from utils.fid import reference_key, reference_path, reference_stats, save_stats
from utils.inception import WEIGHTS_ENV, WEIGHTS_FILE, InceptionFeaturesLogits
from utils.latents import LatentSpace


def select_networks(ckpt: dict, requested: list[str]) -> list[str]:
    """Expand --ema: 'all' means every EMA copy (net_ema*), or the raw network if there is none."""
    available = available_networks(ckpt)
    if requested == ["all"]:
        emas = [n for n in available if n.startswith("net_ema")]
        return emas or available
    missing = [n for n in requested if n not in available]
    if missing:
        raise UserValueError(f"--ema {' '.join(missing)}: not in the checkpoint; available: {available} or 'all'")
    return requested


def format_table(rows: list[dict], figure: str = "fid") -> str:
    """Plain-text table of result rows (ema, decay, steps, the guidance where given, the figure, and the
    Inception Score where given)."""
    with_is = bool(rows) and "is" in rows[0]
    guided = bool(rows) and "omega" in rows[0]
    lines = [f"{'network':<10} {'decay':>8} {'steps':>5}"
             + (f" {'omega':>6} {'t_min':>6} {'t_max':>6}" if guided else "")
             + f" {figure.upper():>9}" + (f" {'IS':>8}" if with_is else "")]
    for r in rows:
        decay = "-" if r["decay"] is None else f"{r['decay']:g}"
        lines.append(f"{r['ema']:<10} {decay:>8} {r['steps']:>5}"
                     + (f" {r['omega']:>6g} {r['t_min']:>6g} {r['t_max']:>6g}" if guided else "")
                     + f" {r[figure]:>9.3f}" + (f" {r['is']:>8.2f}" if with_is else ""))
    return "\n".join(lines)


def guidance_settings(args: argparse.Namespace, ckpt: dict, net, steps: int) -> list:
    """The guidance settings of --omega, --t_min, --t_max for `net` at `steps` steps ([None]: no guidance inputs)."""
    return sampling_guidance(ckpt, net, steps, omega=args.omega, t_min=args.t_min, t_max=args.t_max)


def row(name: str, decay: float | None, steps: int, guidance, scores: dict) -> dict:
    """A result row: the network, its decay, steps, the guidance setting (if any) and the scores."""
    return dict(ema=name, decay=decay, steps=steps, **({} if guidance is None else guidance.inputs()), **scores)


def described(name: str, steps: int, guidance) -> str:
    """'net_ema 1-step', with the guidance setting if any."""
    return f"{name} {steps}-step" + ("" if guidance is None else f" ({guidance})")


def run_fid(args: argparse.Namespace) -> list[dict]:
    env = init_distributed(args.device)
    main = env.rank == 0
    try:
        config = parse_model_config(args.model_config)
        ckpt = read_checkpoint(args.ckpt, config)
        names = select_networks(ckpt, args.ema)
        dataset = args.dataset or checkpoint_dataset(ckpt)
        if dataset is not None and not args.ref and dataset_info(dataset).quality == "digits":
            return digits_rows(args, ckpt, names, config, env)
        if dataset is not None and not args.ref and dataset_info(dataset).reference:
            # Statistics of our own crops of the training set would be another reference than the papers'.
            raise UserValueError(f"{dataset} is scored against {dataset_info(dataset).reference}: download it and "
                                 f"pass --ref FILE.npz")
        latent = LatentSpace.of_checkpoint(ckpt)
        decode = image_decoder(latent, vae=args.vae, device=env.device)
        extractor = InceptionFeaturesLogits(args.inception_weights, device=env.device, download=not args.no_download)
        if args.ref:
            reference = load_reference(args.ref)
            ref, ref_name, about_ref = (reference.mu, reference.sigma), args.ref, reference.description
        else:
            if not dataset:
                raise UserValueError(f"{args.ckpt} does not record its dataset: pass --dataset or --ref FILE.npz")
            ref = reference_stats(dataset, data_path=args.data_path, split="train", extractor=extractor,
                                  cache_dir=args.cache_dir, env=env, batch_size=args.batch_size,
                                  download=not args.no_download)
            ref_name = reference_path(dataset, split="train", extractor=extractor, cache_dir=args.cache_dir,
                                      data_path=args.data_path)
            about_ref = f"statistics of the {dataset} training set, cached in {ref_name}"
        about = dict(ref=ref_name, reference=about_ref, extractor=extractor.key)
        if latent is not None:
            about["vae"] = args.vae or latent.vae_name
        if main:
            print(f"reference: {about_ref}" + (f"; samples decoded by the VAE {about['vae']}" if latent else ""),
                  flush=True)
        decays = ema_decays(ckpt)
        rows = []
        for name in names:
            net = load_network(ckpt, ema=name, model_config=config, device=env.device)
            for steps in args.steps:
                for guidance in guidance_settings(args, ckpt, net, steps):
                    scores = scores_of_network(net, ref=ref, num_samples=args.fid_samples, batch_size=args.batch_size,
                                               img_shape=image_shape(net), seed=args.seed, steps=steps,
                                               extractor=extractor, device=env.device, env=env, progress=main,
                                               decode=decode, guidance=guidance)
                    rows.append(row(name, decays.get(name), steps, guidance, scores))
                    if main:
                        print(f"{described(name, steps, guidance)} FID {scores['fid']:.3f}, Inception Score "
                              f"{scores['is']:.2f}", flush=True)
        if main:
            print(format_table(rows))
            write_results(args, about, rows, env)
        return rows
    finally:
        cleanup()


def digits_rows(args: argparse.Namespace, ckpt: dict, names: list[str], config: dict | None, env) -> list[dict]:
    """The digits quality figure (utils/digits_quality.py) of each network and number of steps: its samples
    0..296 (one per held-out digit) against the training digits; rank 0 scores, every rank samples."""
    from utils.digits_quality import DigitsQuality
    quality = DigitsQuality(seed=args.seed) if env.rank == 0 else None
    count = 297  # the held-out digits: the figure's sample size
    decays, rows = ema_decays(ckpt), []
    for name in names:
        net = load_network(ckpt, ema=name, model_config=config, device=env.device)
        for steps, guidance in [(k, g) for k in args.steps for g in guidance_settings(args, ckpt, net, k)]:
            images = sample_images(net, num_samples=count, img_shape=image_shape(net), seed=args.seed, steps=steps,
                                   batch_size=args.batch_size, device=env.device, env=env, guidance=guidance)
            if env.rank == 0:
                labels = None
                if getattr(net, "num_classes", 0):
                    labels = torch.arange(count) % net.num_classes
                score = quality.score(images, labels=labels)
                rows.append(row(name, decays.get(name), steps, guidance, score))
                print(f"{described(name, steps, guidance)} digits quality: FD {score['fd']:.3f}, confidence "
                      f"{score['confidence']:.3f}, classes {score['classes']:.2f}/10"
                      + (f", classified as their requested label {score['label_accuracy']:.1%}"
                         if labels is not None else ""), flush=True)
    if env.rank == 0:
        print(format_table(rows, figure="fd"))
        write_results(args, dict(figure="digits quality (FD of a digit classifier's features)"), rows, env)
    return rows


def image_shape(net) -> tuple[int, int, int]:
    """(C, H, W) of a network's samples (the network convention's attributes)."""
    return (net.in_channels, net.img_resolution, net.img_resolution)


def write_results(args: argparse.Namespace, about: dict, rows: list[dict], env) -> None:
    if args.out:
        result = dict(ckpt=args.ckpt, **about, fid_samples=args.fid_samples, seed=args.seed,
                      world_size=env.world_size, results=rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


def run_ref(args: argparse.Namespace) -> None:
    env = init_distributed(args.device)
    try:
        extractor = InceptionFeaturesLogits(args.inception_weights, device=env.device, download=not args.no_download)
        mu, sigma = reference_stats(args.dataset, data_path=args.data_path, split=args.split, extractor=extractor,
                                    cache_dir=args.cache_dir, env=env, batch_size=args.batch_size,
                                    download=not args.no_download)
        if env.rank == 0:
            cached = reference_path(args.dataset, split=args.split, extractor=extractor, cache_dir=args.cache_dir,
                                    data_path=args.data_path)
            print(f"reference statistics ({mu.shape[0]}-d features) cached at {cached}")
            if args.out:
                save_stats(args.out, mu, sigma, key=reference_key(args.dataset, args.split, extractor))
                print(f"wrote {args.out}")
    finally:
        cleanup()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_path", default="./data", help="dataset folder")
    p.add_argument("--cache_dir", default=None, help="reference-statistics cache (default: <data_path>/fid_refs)")
    p.add_argument("--inception_weights", default=None,
                   help=f"local copy of {WEIGHTS_FILE} (else ${WEIGHTS_ENV}, the torch.hub cache, or a download)")
    p.add_argument("--no_download", action="store_true", help="never fetch the Inception weights or the dataset")
    p.add_argument("--batch_size", type=int, default=250, help="images per batch and process")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")


def fid_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="FID of MeanFlow samples for each chosen network and number of steps; prints a table "
        "and writes it as JSON. Run with torchrun to split the samples over processes.",
        epilog="Reference statistics: `python evaluate.py ref --help`.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="checkpoint (ours or the authors' CIFAR-10 .pth), or the "
                   "authors' JAX DiT checkpoint folder (needs jax, flax, orbax-checkpoint)")
    p.add_argument("--steps", type=int, nargs="+", default=[1], help="numbers of sampling steps to evaluate")
    p.add_argument("--ema", nargs="+", default=["all"], help="networks: 'all' (every EMA copy) or names "
                   "such as net_ema net_ema1 net")
    p.add_argument("--fid_samples", type=int, default=50000, help="generated images per FID")
    p.add_argument("--seed", type=int, default=0, help="sample i uses noise seeded by (seed, i)")
    p.add_argument("--ref", default=None, help="reference statistics: ADM's reference batch (its stored mu, sigma; "
                   "VIRTUAL_imagenet256_labeled.npz for ImageNet 256, required there), the MeanFlow JAX code's "
                   "ref_mu/ref_sigma, or mu, sigma (e.g. EDM's cifar10-32x32.npz); default: the cached statistics "
                   "of the checkpoint's training set")
    p.add_argument("--dataset", default=None, choices=list(DATASETS),
                   help="dataset of the reference statistics (default: the checkpoint's)")
    p.add_argument("--vae", default=None, help="latent checkpoints: the VAE that decodes the samples, mse, ema or "
                   "a local folder, instead of the one the checkpoint names (default: that one)")
    p.add_argument("--model_config", default=None, help="SongUNet kwargs as JSON for checkpoints without a config")
    add_guidance_flags(p, each="a row each")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    _add_common(p)
    return p


def ref_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py ref",
        description="Compute the Inception statistics (mu, sigma) of a dataset split once and cache them as "
        "<cache_dir>/<dataset>-<split>-<extractor>.npz.",
        formatter_class=HelpFormatter,
    )
    # Latent datasets are scored against published statistics (evaluate.py --ref), not against our own.
    p.add_argument("--dataset", required=True, choices=[n for n, d in DATASETS.items() if not d.latent],
                   help="dataset")
    p.add_argument("--split", default="train", choices=["train", "test"], help="split (FID uses train)")
    p.add_argument("--out", default=None, help="also write the statistics to this .npz")
    _add_common(p)
    return p


def main(argv: list[str] | None = None):
    """`evaluate.py [fid] ...` returns the FID rows; `evaluate.py ref ...` computes reference statistics."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "ref":
        parser = ref_parser()
        args = parser.parse_args(argv[1:])
        if args.batch_size < 1:
            parser.error("--batch_size must be >= 1")
        return run_ref(args)
    if argv and argv[0] == "fid":
        argv = argv[1:]
    parser = fid_parser()
    args = parser.parse_args(argv)
    if args.fid_samples < 2 or min(args.steps) < 1 or args.batch_size < 1:
        parser.error("--fid_samples must be >= 2, --steps and --batch_size >= 1")
    return run_fid(args)


if __name__ == "__main__":
    with exit_on_user_error():
        main()
