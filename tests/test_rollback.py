"""training/rollback.py: a non-finite loss rolls back to checkpoint-last.pth and training goes on,
deterministically, on 1 and 2 processes; a persistent fault stops the run; a run without faults
is unchanged.

Runs the `tiny` preset on CPU with one thread, as tests/test_train.py does.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
import train
from training.build import build_trainer, initial_model_state
from training.resume import LAST
from training.rollback import SPIKE_MIN_HISTORY, RollbackGuard
from training.step import draw_batch, train_step
from utils import data as data_utils
from utils.distributed import init_distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--not_compile", "--device", "cpu"]
# The commands of the acceptance test, run from a scratch folder (they write ./output/tiny).
FAULT_9 = ["train.py", "--preset", "tiny", "--dataset", "digits", "--device", "cpu", "--max_steps", "12",
           "--ckpt_every", "4", "--log_per_step", "1", "--fault_nan_at", "9"]
FAULT_9_TEN_TIMES = [*FAULT_9[:-1], ",".join(["9"] * 10)]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _command(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _tensors(path: Path) -> dict:
    """Every tensor that must continue exactly: all networks and Adam's moments."""
    ckpt = torch.load(path, weights_only=True)
    tensors = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for i, s in ckpt["optimizer"]["state"].items():
        tensors.update({f"adam.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    return tensors


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _finite(tensors: dict) -> bool:
    return all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def fault_9(tmp_path_factory) -> Path:
    """The acceptance command with one fault at step 9, from a scratch folder; returns its output folder."""
    cwd = tmp_path_factory.mktemp("fault_9")
    done = _command(FAULT_9, cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return cwd / "output" / "tiny"


@pytest.mark.slow
def test_one_fault_rolls_back_once_and_finishes(fault_9):
    log = (fault_9 / "log.txt").read_text()
    assert "rollback 1: loss became non-finite (nan) between steps 8 and 9; restored checkpoint-last.pth at step 8" \
        in log, log
    assert "rollback 2" not in log and "step 12/12" in log and "done: 12 steps" in log
    ckpt = torch.load(fault_9 / LAST, weights_only=True)
    assert ckpt["step"] == 12 and ckpt["rollback"]["attempt"] == 1
    assert _finite(_tensors(fault_9 / LAST))


@pytest.mark.slow
def test_the_same_command_with_the_same_faults_gives_the_same_weights(fault_9, tmp_path):
    again = tmp_path / "again"
    assert train.main([*TINY, *FAULT_9[1:], "--output_dir", str(again)]) == 0
    assert _identical(_tensors(fault_9 / LAST), _tensors(again / LAST))


@pytest.mark.slow
def test_a_persistent_fault_stops_after_max_rollbacks(tmp_path):
    done = _command(FAULT_9_TEN_TIMES, tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loss became non-finite"), done.stderr
    assert "after 3 rollbacks to step 8 (--max_rollbacks 3)" in lines[0] and "(step 8) is left untouched" in lines[0]
    assert [line[:len("rollback 3:")] for line in done.stdout.splitlines() if line.startswith("rollback")] == \
        ["rollback 1:", "rollback 2:", "rollback 3:"]
    out = tmp_path / "output" / "tiny"
    ckpt = torch.load(out / LAST, weights_only=True)
    assert ckpt["step"] == 8 and ckpt["rollback"]["attempt"] == 0  # written before the faults, never since
    assert _finite(_tensors(out / LAST))


@pytest.mark.slow
def test_resume_after_a_rollback_equals_the_uninterrupted_run(tmp_path):
    """Faults at steps 9 and 13: stopped at 12 between them and rerun, or run straight to 16."""
    faults = ["--ckpt_every", "4", "--log_per_step", "1", "--fault_nan_at", "9,13"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main([*TINY, *faults, "--max_steps", "16", "--output_dir", str(straight)]) == 0
    assert train.main([*TINY, *faults, "--max_steps", "12", "--output_dir", str(resumed)]) == 0
    assert torch.load(resumed / LAST, weights_only=True)["rollback"]["attempt"] == 1
    assert train.main([*TINY, *faults, "--max_steps", "16", "--output_dir", str(resumed)]) == 0
    for out in (straight, resumed):
        assert "rollback 2: loss became non-finite (nan) between steps 12 and 13" in (out / "log.txt").read_text()
    assert _identical(_tensors(straight / LAST), _tensors(resumed / LAST))


@pytest.mark.slow
def test_two_processes_roll_back_together(fault_9, tmp_path):
    """Both ranks restore step 8 at step 9 (a rank left behind fails the weight check that follows the
    restore), and train what one process with the same global batch trains."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *FAULT_9, "--not_compile", "--batch_size", "4", "--output_dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "log.txt").read_text()
    assert "rollback 1: loss became non-finite (nan) between steps 8 and 9; restored checkpoint-last.pth at step 8" \
        in log and "rollback 2" not in log
    one, two = _tensors(fault_9 / LAST), _tensors(out / LAST)
    # Only the order of the gradient reduction differs (tests/test_train.py measures this margin).
    assert max((one[k].double() - two[k].double()).abs().max().item() for k in one) <= 1e-6


def test_attempt_zero_draws_with_the_keys_of_a_run_without_rollbacks():
    """By construction a run without faults draws, and so trains, what it did before rollbacks existed."""
    cfg = train.resolve_config([*TINY, "--dropout", "0"])
    trainer = build_trainer(cfg, init_distributed("cpu"))
    step, size = 5, trainer.global_batch
    batch = draw_batch(trainer, step)
    expected_noise = torch.randn((size, *trainer.img_shape),
                                 generator=data_utils.make_generator(cfg.seed, "train", step, "noise"))
    expected_t, expected_r = trainer.method.sample_t_r(
        size, generator=data_utils.make_generator(cfg.seed, "train", step, "t_r"))
    assert torch.equal(batch.noise, expected_noise) and torch.equal(batch.t, expected_t)
    assert torch.equal(batch.r, expected_r)
    trainer.attempt = 1
    assert not torch.equal(draw_batch(trainer, step).noise, expected_noise)


@pytest.mark.slow
def test_the_loop_without_faults_trains_what_the_bare_steps_train(tmp_path):
    """The guard's checks read the state and change nothing: the loop's weights equal those of
    train_step called 8 times, with the spike guard off (the default) and on."""
    cfg = train.resolve_config([*TINY, "--dropout", "0.1"])
    trainer = build_trainer(cfg, init_distributed("cpu"))
    for step in range(8):
        train_step(trainer, step)
    bare = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    for spike in ("0", "1000"):
        out = tmp_path / spike
        assert train.main([*TINY, "--dropout", "0.1", "--spike_factor", spike, "--output_dir", str(out)]) == 0
        looped = {k: v for k, v in _tensors(out / LAST).items() if k.startswith("model.")}
        assert _identical(bare, looped)
        assert "rollback 1:" not in (out / "log.txt").read_text()


def test_spike_guard_flags_a_gradient_norm_far_above_its_median():
    cfg = train.resolve_config([*TINY, "--output_dir", ""])
    trainer = build_trainer(cfg, init_distributed("cpu"))
    zero = torch.zeros(())
    start = dict(restore_point=(0, None), initial_state=dict, out=None, log=lambda msg: None)
    off = RollbackGuard(trainer=trainer, **start)
    assert off.check(zero, torch.tensor(1e6)) == (0.0, None)
    guard = RollbackGuard(trainer=trainer, **start, spike_factor=10)
    for _ in range(SPIKE_MIN_HISTORY):
        for norm in (1.0, 3.0):  # the largest norm since the last check counts
            guard.record(torch.tensor(norm))
        assert guard.check(zero, torch.tensor(3.0)) == (0.0, None)
    assert guard.state()["grad_norms"] == [3.0] * SPIKE_MIN_HISTORY
    guard.record(torch.tensor(29.0))
    assert guard.check(zero, torch.tensor(29.0)) == (0.0, None)
    guard.record(torch.tensor(31.0))
    loss, why = guard.check(zero, torch.tensor(31.0))
    assert "gradient norm 31 exceeded --spike_factor 10 x the median 3" in why
    guard.record(torch.tensor(math.inf))
    assert guard.check(zero, torch.tensor(math.inf))[1] == "gradient norm became non-finite (inf)"


@pytest.mark.slow
def test_a_numbered_snapshot_alone_is_rolled_back_to(tmp_path):
    """--ckpt_every 0 --snapshot_every 4: the fault at step 6 restores checkpoint-4.pth, the state on disk."""
    out = tmp_path / "snapshot"
    assert train.main([*TINY, "--ckpt_every", "0", "--snapshot_every", "4", "--log_per_step", "1",
                       "--fault_nan_at", "6", "--output_dir", str(out)]) == 0
    log = (out / "log.txt").read_text()
    assert "rollback 1: loss became non-finite (nan) between steps 5 and 6; restored checkpoint-4.pth at step 4" \
        in log and "done: 8 steps" in log
    assert torch.load(out / LAST, weights_only=True)["rollback"]["attempt"] == 1


@pytest.mark.slow
def test_the_newest_checkpoint_is_restored_and_named(tmp_path):
    """--ckpt_every 4 --snapshot_every 6: the fault at step 7 restores checkpoint-6.pth (step 6), not
    checkpoint-last.pth (step 4), and says so."""
    out = tmp_path / "newest"
    assert train.main([*TINY, "--ckpt_every", "4", "--snapshot_every", "6", "--log_per_step", "1",
                       "--fault_nan_at", "7", "--output_dir", str(out)]) == 0
    assert "between steps 6 and 7; restored checkpoint-6.pth at step 6 (1/3 to it)" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_a_fault_before_the_first_checkpoint_restores_the_initial_state(tmp_path):
    """The state at step 0 is a pure function of the seed: no file is needed to go back to it."""
    runs = [tmp_path / "early_a", tmp_path / "early_b"]
    for out in runs:
        assert train.main([*TINY, "--ckpt_every", "0", "--log_per_step", "1", "--fault_nan_at", "3",
                           "--output_dir", str(out)]) == 0
    log = (runs[0] / "log.txt").read_text()
    assert ("rollback 1: loss became non-finite (nan) between steps 2 and 3; restored the initial state (drawn "
            "from --seed) at step 0 (1/3 to it); steps after 0 now draw with attempt 1") in log
    assert "done: 8 steps" in log
    first, second = _tensors(runs[0] / LAST), _tensors(runs[1] / LAST)
    assert _finite(first) and _identical(first, second)
    # The restored state is the one a fresh run starts from: step 0's weights, no Adam moments, no EMA updates.
    cfg = train.resolve_config([*TINY, "--output_dir", ""])
    trainer = build_trainer(cfg, init_distributed("cpu"))
    fresh = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    train_step(trainer, 0)
    trainer.model.load_state_dict(initial_model_state(trainer, cfg.seed))
    assert all(torch.equal(v, fresh[k]) for k, v in trainer.model.state_dict().items())


@pytest.mark.slow
def test_a_rerun_after_the_rollbacks_ran_out_draws_anew(tmp_path):
    """The error line says what a rerun does, and rollback.json makes it draw with the next attempt."""
    done = _command(FAULT_9_TEN_TIMES, tmp_path)
    assert done.returncode == 1
    assert "Running the same command again continues from its last checkpoint with fresh draws (attempt 4)" \
        in done.stderr
    out = tmp_path / "output" / "tiny"
    again = _command(FAULT_9[:-2], tmp_path)  # the same run, its fault gone
    assert again.returncode == 0, again.stdout + again.stderr
    assert "its steps now draw with attempt 4" in (out / "log.txt").read_text()
    assert torch.load(out / LAST, weights_only=True)["rollback"]["attempt"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--fault_nan_at", "9,x"], "is not a comma-separated list of steps"),
    (["--fault_nan_at", "0"], "steps count from 1"),
    (["--spike_factor", "0.5"], "--spike_factor 0.5: must be 0 (off) or a number above 1"),
    (["--max_rollbacks", "-1"], "--max_rollbacks -1: must be >= 0"),
])
def test_bad_rollback_flags_fail_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--output_dir", "", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
