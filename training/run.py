"""A training run, top to bottom: output folder and log, resume, build, evaluator, the loop, the end.

train.py turns the command line into a TrainConfig and calls run(). One step is training/step.py's
train_step; what a checkpoint holds is training/resume.py's; rolling back is training/rollback.py's.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from training.build import build_trainer, initial_model_state, network_guidance
from training.config import TrainConfig
from training.evaluation import Evaluator
from training.log import Log, memory_gib
from training.precision import apply_precision
from training.resume import LAST, checkpoint_state, find_start, load_state
from training.rollback import RollbackGuard, attempt_for_rerun, with_faults
from training.sampling import Guidance
from training.step import Trainer, check_weights, lr_at, train_step
from training.stop import StopRequest
from utils import checkpoint as ckpt_io
from utils import fid
from utils.distributed import DistEnv, barrier, check_consistency
from utils.errors import UserError, UserFileError, UserValueError


def run(cfg: TrainConfig, env: DistEnv) -> int:
    """Train (or only evaluate, cfg.eval_only) as `cfg` says, on this process's share; returns the exit code."""
    # ------------------------------------------------------------------ output folder, log, device settings
    main_rank = env.rank == 0
    out = Path(cfg.output_dir) if cfg.output_dir else None
    if out is not None and main_rank:
        check_output_dir(out)
    log = Log(main_rank, out / "log.txt" if out is not None and main_rank else None)
    log("config:\n" + json.dumps(cfg.flags(), indent=2, sort_keys=True))
    if cfg.device == "cuda":
        torch.backends.cudnn.benchmark = True
        apply_precision(cfg.precision)
    # FID's Inception weights: fetched now by rank 0 (or found missing), not at the first evaluation.
    inception_weights = resolve_fid_weights(env) if cfg.compute_fid else None

    # ------------------------------------------------------------------ where to start
    ckpt, source = find_start(out=out, resume=cfg.resume, eval_only=cfg.eval_only)
    if cfg.eval_only and ckpt is None:
        raise UserValueError("--eval_only needs a checkpoint: pass --resume PATH or an --output_dir "
                             "that holds checkpoint-last.pth")

    # ------------------------------------------------------------------ build: data, network, method, optimizer
    trainer = build_trainer(cfg, env)
    step, rollback_state = 0, None
    if ckpt is not None:
        step, notes = load_state(trainer, ckpt, source)
        rollback_state = ckpt.get("rollback")
        del ckpt
        for note in notes:
            log(f"note: {note}")
        log(f"resumed from {source} at step {step}")
        if cfg.resume and source != cfg.resume:
            log(f"note: --resume {cfg.resume} not used: {source} continues this run")
    rerun_attempt = attempt_for_rerun(out, step)
    if rerun_attempt is not None and rerun_attempt > trainer.attempt:
        trainer.attempt = rerun_attempt
        log(f"note: the rollbacks of an earlier run of this command ran out after step {step}: its steps now draw "
            f"with attempt {rerun_attempt}")
    # Every rank reads its own copy of the checkpoint: they must all have found the same one.
    check_consistency([("starting step (is OUTPUT_DIR on a shared filesystem?)", torch.tensor(step))],
                      "resume point", step)
    spe = trainer.steps_per_epoch
    total_steps = cfg.max_steps or cfg.epochs * spe
    if cfg.test_run:  # one step, evaluated, nothing saved
        total_steps = step + 1
    derived = dict(world_size=env.world_size, global_batch=trainer.global_batch, steps_per_epoch=spe,
                   total_steps=total_steps, warmup_steps=trainer.warmup_steps, network=trainer.network,
                   model_config=trainer.model_config, parameters=sum(p.numel() for p in trainer.model.net.parameters()))
    log("run: " + json.dumps(derived))

    # ------------------------------------------------------------------ outputs and evaluator
    writer = None
    if out is not None and main_rank:
        (out / "config.json").write_text(json.dumps(dict(cfg.flags(), derived=derived), indent=2, sort_keys=True)
                                         + "\n")
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(out))
    fid_samples = min(cfg.fid_samples, max(2, trainer.global_batch)) if cfg.test_run else cfg.fid_samples
    evaluate = Evaluator(model=trainer.model, env=env, img_shape=trainer.img_shape, dataset=cfg.dataset,
                         data_path=cfg.data_path, seed=cfg.seed, compute_fid=cfg.compute_fid, fid_samples=fid_samples,
                         batch_size=cfg.batch_per_process, inception_weights=inception_weights, out=out,
                         writer=writer, log=log, latent=trainer.latent, guidance=evaluation_guidance(cfg, trainer))
    if cfg.eval_only:
        evaluate(step)
        _close(writer)
        return 0
    if step >= total_steps:
        log(f"already trained {step} of {total_steps} steps; nothing to do (raise --max_steps or --epochs to continue)")
        _close(writer)
        return 0

    # ------------------------------------------------------------------ the loop
    save = not cfg.test_run and out is not None
    last_saved = step if out is not None and (out / LAST).exists() else None  # the step of checkpoint-last.pth
    restore_point = (step, Path(source) if source else None)  # the state a rollback returns to, until a save
    loss_sum = torch.zeros((), device=trainer.device)  # losses since the last log, read only when logging
    window, window_start, window_tic = 0, step, time.perf_counter()
    stop = StopRequest(env)
    saver = ckpt_io.BackgroundSaver()
    guard = RollbackGuard(trainer=trainer, restore_point=restore_point,
                          initial_state=lambda: initial_model_state(trainer, cfg.seed), out=out if save else None,
                          log=log, writer=writer, max_rollbacks=cfg.max_rollbacks, spike_factor=cfg.spike_factor,
                          saver=saver, state=rollback_state)
    step_fn = with_faults(train_step, cfg.fault_nan_at, step) if cfg.fault_nan_at else train_step

    def settle_writes() -> None:
        """Every rank: stop with the error of rank 0's last background write, if it failed (rank 0 alone
        writes; the others would otherwise wait for it in their next collective until the launcher's timeout)."""
        error, message = None, ""
        if main_rank:
            try:
                saver.wait()
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                error, message = e, " ".join(str(e).split())
        if env.world_size > 1:
            shared = [message]
            dist.broadcast_object_list(shared, src=0)
            message = shared[0]
        if error is not None:
            raise error
        if message:
            raise UserFileError(f"rank 0 could not write a checkpoint, so every process stops: {message}")

    def save_checkpoints(names: list[str]) -> None:
        """The checkpoint of `step` under each name (rank 0, in the background), once all ranks hold the same weights."""
        settle_writes()
        check_weights(trainer.model, step)
        if main_rank:
            state = checkpoint_state(trainer, step, config=cfg.flags(), rollback=guard.state())
            saver.save(state, [out / name for name in names])
        guard.saved(step, out / names[0])
        log(f"saved {', '.join(names)} at step {step}")

    bar = tqdm(total=total_steps, initial=step, disable=None if main_rank else True, dynamic_ncols=True,
               desc="train", unit="step", file=sys.stderr)
    log(f"training steps {step}..{total_steps} ({total_steps / spe:.1f} epochs of {spe} steps, global batch "
        f"{trainer.global_batch} = {trainer.batch} x {env.world_size} processes)"
        + (" ; compiling the training step first, this takes a while" if cfg.compile else ""))
    start_step = step
    try:
        while step < total_steps and not stop.requested(step):
            # One step; the ranks' gradients and weights are compared on the first two and every check_every.
            logging_now = (step + 1) % cfg.log_every_steps == 0 or step + 1 == total_steps
            checking = step - start_step < 2 or (cfg.check_every_steps and (step + 1) % cfg.check_every_steps == 0)
            loss, grad_norm = step_fn(trainer, step, check=checking, grad_norm=logging_now or guard.every_grad_norm)
            guard.record(grad_norm)
            step += 1
            loss_sum += loss
            window += 1
            bar.update(1)

            # The checkpoints due; at an evaluation epoch, like the release, save what is evaluated.
            names = [LAST] if cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0 else []
            if cfg.snapshot_every_steps and step % cfg.snapshot_every_steps == 0:
                names.append(f"checkpoint-{step}.pth")
            evaluating = (step % spe == 0 and step < total_steps and cfg.eval_every_epochs > 0
                          and (step // spe) % cfg.eval_every_epochs == 0)
            if evaluating:
                names = list(dict.fromkeys([LAST, *names]))

            # At log lines and before saves (this waits for the device), a non-finite loss, gradient
            # norm or weight, or a gradient spike, sends every rank back to checkpoint-last.pth.
            if logging_now or (names and save):
                loss_total, why = guard.check(loss_sum, grad_norm if logging_now else None)
                if why is not None:
                    step = guard.roll_back(why, first=window_start, last=step)
                    loss_sum.zero_()
                    window, window_start, window_tic = 0, step, time.perf_counter()
                    bar.n = step
                    continue

            # Log the mean loss since the last log.
            if logging_now:
                mean_loss = loss_total / (window * env.world_size)
                sec = (time.perf_counter() - window_tic) / window
                stats = dict(loss=mean_loss, lr=lr_at(step - 1, lr=trainer.lr, warmup_steps=trainer.warmup_steps),
                             sec_per_iter=sec, images_per_sec=trainer.global_batch / sec,
                             grad_norm=grad_norm.item(), epoch=step / spe, memory_gib=memory_gib(trainer.device))
                log(f"step {step}/{total_steps} | epoch {stats['epoch']:.2f} | loss {mean_loss:.5f} | "
                    f"lr {stats['lr']:.3g} | {sec:.3f} s/it | {stats['images_per_sec']:.0f} img/s | "
                    f"grad {stats['grad_norm']:.3g} | mem {stats['memory_gib']:.2f} GiB")
                if writer is not None:
                    for key, value in stats.items():
                        writer.add_scalar(f"train/{key}", value, step)
                loss_sum.zero_()
                window, window_start, window_tic = 0, step, time.perf_counter()

            # Save and evaluate.
            tic = time.perf_counter()
            if names and save:
                save_checkpoints(names)
                last_saved = step if LAST in names else last_saved
            if evaluating:
                evaluate(step)
            window_tic += time.perf_counter() - tic  # s/it counts training only

        # -------------------------------------------------------------- the end
        # Stopped by a signal or done: checkpoint-last.pth holds this step; the end of training is evaluated.
        # The last step is a log step: only a stop leaves steps unchecked here.
        stopped = step < total_steps
        if save and (stopped or last_saved != step):
            why = guard.check(loss_sum, None)[1]
            if why is not None:  # saved again below: with the new attempt, the rerun draws anew
                step = guard.roll_back(why, first=window_start, last=step)
            save_checkpoints([LAST])
        settle_writes()
        if stopped:
            log(f"stopped by {signal.Signals(stop.signum).name} at step {step}"
                + (f"; {LAST} saved: run the same command to continue" if save else ""))
            return 0
        evaluate(step)
        log(f"done: {step} steps" + (f"; outputs in {out}" if out is not None else ""))
        barrier()
        return 0
    finally:
        bar.close()
        stop.restore()
        saver.wait()  # the last checkpoint is on disk before the run ends, or its write error is raised
        _close(writer)


def evaluation_guidance(cfg: TrainConfig, trainer: Trainer) -> Guidance | None:
    """What a network with guidance inputs (iMF's) samples with during training: --omega, --t_min, --t_max, or
    their defaults (training.build.network_guidance: the authors' for their sizes, else none)."""
    if not getattr(trainer.model.net, "takes_guidance", False):
        return None
    try:
        return network_guidance(trainer.model.net, 1, omega=cfg.omega, t_min=cfg.t_min, t_max=cfg.t_max)
    except ValueError as e:  # one flag given, the other the size's default: --t_min 0.7 against B/2's 0.65
        raise UserValueError(f"--omega, --t_min, --t_max: {e}") from e


def check_output_dir(out: Path) -> None:
    """Create the folder and prove it is writable before any work."""
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserFileError(f"cannot write to --output_dir {out} ({type(e).__name__}: {e}); "
                            f"choose a writable folder") from e


def resolve_fid_weights(env: DistEnv) -> str:
    """The Inception weights file for --compute_fid on every rank (rank 0 downloads it if missing and online)."""
    try:
        return fid.inception_weights(env=env if env.world_size > 1 else None)
    except (OSError, UserError) as e:
        raise UserFileError(f"--compute_fid needs the Inception weights: {e}; or pass --no_compute_fid") from e


def _close(writer) -> None:
    if writer is not None:
        writer.close()
