"""train.py: flags and presets, exact resume, world-size invariance, rank checks, bad input, outputs.

Runs the `tiny` preset on CPU, in this process where that is faster and in subprocesses where a
signal or torchrun is part of the test. Every run uses one thread, so repeated runs do the same
arithmetic in the same order.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port
import train
from training import stop as stop_lib
from training.build import build_method, build_trainer, load_network
from training.log import quiet_jit_deprecation
from training.precision import precision_settings
from training.resume import CHECKPOINT_FORMAT, LAST
from training.step import check_gradients, check_weights, lr_at, train_step
from utils import checkpoint as ckpt_io
from utils.errors import exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--not_compile", "--device", "cpu"]
# The release's scripts/cifar10_v1.sh after `torchrun ... train.py`, flag for flag.
RELEASE_V1_FLAGS = [
    "--output_dir=./tmp", "--dataset=cifar10", "--batch_size=128", "--lr=0.0006", "--eval_frequency=50",
    "--epochs=16000", "--compute_fid", "--log_per_step=100", "--tr_sampler=v1", "--P_mean_t", "-0.6",
    "--P_std_t", "1.6", "--P_mean_r", "-4.0", "--P_std_r", "1.6", "--warmup_epochs", "200", "--norm_p", "0.75",
    "--ratio", "0.75", "--dropout", "0.2", "--use_edm_aug",
]
RELEASE_V1_VALUES = dict(
    dataset="cifar10", batch_size=128, lr=0.0006, eval_frequency=50, epochs=16000, compute_fid=True,
    log_per_step=100, tr_sampler="v1", P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6,
    warmup_epochs=200, norm_p=0.75, ratio=0.75, dropout=0.2, use_edm_aug=True,
)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _train(*args: str) -> None:
    """train.main in this process; it must succeed."""
    assert train.main([*TINY, *args]) == 0


def _state(out: Path) -> dict:
    """Every tensor that must continue exactly: all networks, the EMA counter and Adam's moments."""
    ckpt = torch.load(out / LAST, weights_only=True)
    tensors = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for i, s in ckpt["optimizer"]["state"].items():
        tensors.update({f"adam.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    tensors["step"] = torch.tensor(ckpt["step"])
    return tensors


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """8 uninterrupted tiny steps with dropout: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    _train("--output_dir", str(out), "--dropout", "0.1")
    return out


# --------------------------------------------------------------------------- flags and presets


def test_release_launch_flags_parse():
    cfg = train.resolve_config(RELEASE_V1_FLAGS + ["--device", "cpu"]).flags()
    assert {k: cfg[k] for k in RELEASE_V1_VALUES} == RELEASE_V1_VALUES
    assert cfg["output_dir"] == "./tmp"
    # Every other flag of the release parses too, with its argument form.
    cfg = train.resolve_config([
        "--device", "cpu", "--optimizer_betas", "0.9", "0.95", "--start_epoch", "3", "--world_size", "8",
        "--local_rank", "0", "--dist_on_itp", "--dist_url", "env://", "--no_pin_mem", "--pin_mem",
        "--save_fid_samples", "--test_run", "--arch", "unet", "--not_compile", "--num_workers", "4", "--eval_only",
        "--fid_samples", "100", "--resume", "x.pth", "--ema_decay", "0.999", "--ema_decays", "0.99", "0.9",
        "--seed", "3", "--data_path", "d", "--dataset", "mnist", "--norm_eps", "0.01",
    ])
    assert cfg.adam_betas == [0.9, 0.95] and cfg.compile is False
    assert cfg.ema_decays == [0.99, 0.9] and cfg.test_run and cfg.eval_only and cfg.dataset == "mnist"
    assert "pin_mem" not in cfg.flags() and "num_workers" not in cfg.flags()  # accepted, and ignored


def test_defaults_are_the_release_defaults():
    cfg = train.resolve_config(["--device", "cpu"]).flags()
    release = dict(batch_size=64, epochs=4000, lr=0.0006, optimizer_betas=[0.9, 0.999], warmup_epochs=200,
                   dropout=0.2, ema_decay=0.9999, ema_decays=[0.99995, 0.9996], dataset="cifar10",
                   output_dir="./output_dir", fid_samples=50000, eval_frequency=50, compute_fid=False,
                   log_per_step=100, ratio=0.75, tr_sampler="v1", P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0,
                   P_std_r=1.6, norm_p=0.75, norm_eps=1e-3, use_edm_aug=False, seed=0)
    assert {k: cfg[k] for k in release} == release
    assert cfg["compile"] is False  # on CPU; cuda turns it on


def test_presets_resolve_and_flags_override():
    v1 = train.resolve_config(["--preset", "cifar10-v1", "--device", "cpu"]).flags()
    assert {k: v1[k] for k in RELEASE_V1_VALUES} == RELEASE_V1_VALUES
    v0 = train.resolve_config(["--preset", "cifar10-v0", "--device", "cpu"])
    assert (v0.tr_sampler, v0.P_mean_t, v0.P_std_t, v0.P_mean_r, v0.P_std_r) == ("v0", -2.0, 2.0, -2.0, 2.0)
    cfg = train.resolve_config(["--preset", "cifar10-v1", "--device", "cpu", "--lr", "0.001", "--no_compute_fid",
                                "--batch_size", "64", "--P_mean_t", "-0.6"])
    assert (cfg.lr, cfg.compute_fid, cfg.batch_per_process, cfg.P_mean_t) == (0.001, False, 64, -0.6)
    assert train.resolve_config(["--preset", "digits"]).dataset == "digits"


def test_config_names_carry_their_units_and_round_trip_through_flag_names():
    """Inside, each setting has one name with its unit; config.json and checkpoints keep the flag names,
    so the files of earlier versions read alike."""
    cfg = train.resolve_config(["--preset", "tiny", "--eval_frequency", "3", "--ckpt_every", "5"])
    assert (cfg.eval_every_epochs, cfg.ckpt_every_steps, cfg.log_every_steps) == (3, 5, 2)
    flags = cfg.flags()
    assert flags["eval_frequency"] == 3 and flags["label_dropout"] == cfg.class_dropout
    from training.config import TrainConfig
    assert TrainConfig.from_flags(flags) == cfg
    assert TrainConfig.from_flags(dict(flags, pin_mem=True, num_workers=10)) == cfg  # an older file's flags


@pytest.mark.slow
def test_bf16_precision_follows_the_float32_run():
    """--precision bf16 runs the network under bf16 autocast: the same steps, losses within bf16's
    rounding of the float32 run's, weights kept in float32."""
    from utils.distributed import init_distributed

    losses = {}
    for precision in ("tf32", "bf16"):
        cfg = train.resolve_config([*TINY, "--precision", precision, "--dropout", "0"])
        trainer = build_trainer(cfg, init_distributed("cpu"))
        assert trainer.method.autocast == (torch.bfloat16 if precision == "bf16" else None)
        losses[precision] = torch.stack([train_step(trainer, step)[0] for step in range(4)])
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert not torch.equal(losses["bf16"], losses["tf32"])
    torch.testing.assert_close(losses["bf16"], losses["tf32"], rtol=2e-2, atol=0)


def test_precision_settings_of_cuda_matmuls_and_convolutions():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    with precision_settings("fp32"):
        assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        for precision in ("tf32", "bf16"):
            with precision_settings(precision):
                assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
            assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    assert after == before


def test_lr_schedule_is_the_release_schedulers():
    lr, warmup = 0.0006, 5
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam(params, lr=lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-8 / lr, end_factor=1.0, total_iters=warmup)
    const = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=100)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, const], milestones=[warmup])
    for step in range(12):
        assert lr_at(step, lr=lr, warmup_steps=warmup) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()


# --------------------------------------------------------------------------- exact continuation


@pytest.mark.slow
def test_stop_and_rerun_continues_exactly(straight, tmp_path):
    _train("--output_dir", str(tmp_path), "--dropout", "0.1", "--max_steps", "4")
    assert torch.load(tmp_path / LAST, weights_only=True)["step"] == 4
    _train("--output_dir", str(tmp_path), "--dropout", "0.1")
    assert _max_diff(_state(straight), _state(tmp_path)) <= 1e-6  # in fact bit-identical


@pytest.mark.slow
def test_sigterm_then_rerun_continues_exactly(tmp_path):
    cmd = [sys.executable, "train.py", *TINY, "--output_dir", str(tmp_path), "--dropout", "0.1",
           "--max_steps", "24", "--log_per_step", "1", "--ckpt_every", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2/24"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    log = "".join(seen) + rest
    assert proc.returncode == 0, log
    assert "stopped by SIGTERM" in log, log
    stopped_at = torch.load(tmp_path / LAST, weights_only=True)["step"]
    assert 2 <= stopped_at < 24
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=180)
    straight = tmp_path / "straight"
    _train("--output_dir", str(straight), "--dropout", "0.1", "--max_steps", "24", "--ckpt_every", "0")
    assert _max_diff(_state(straight), _state(tmp_path)) <= 1e-6


@pytest.mark.slow
def test_release_checkpoint_resumes_at_its_epoch(straight, tmp_path):
    ours = torch.load(straight / LAST, weights_only=True)
    theirs = {"model": ours["model"], "optimizer": ours["optimizer"], "lr_schedule": {}, "epoch": 0,
              "args": argparse.Namespace(lr=0.001)}
    path = tmp_path / "release.pth"
    torch.save(theirs, path)
    spe = ours["data_position"]["steps_per_epoch"]
    out = tmp_path / "out"
    _train("--resume", str(path), "--output_dir", str(out), "--max_steps", str(spe + 2))
    log = (out / "log.txt").read_text()
    assert f"resumed from {path} at step {spe}" in log
    assert torch.load(out / LAST, weights_only=True)["step"] == spe + 2


# --------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_batch(straight, tmp_path):
    one = tmp_path / "one"
    _train("--output_dir", str(one))  # dropout 0 (tiny preset), batch 8
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train.py", *TINY, "--batch_size", "4", "--output_dir", str(two)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    # The global batch, its augmentation, noise and (t, r) are identical; only the gradient
    # reduction order differs (two half-batch means averaged vs one mean). That float32 round-off
    # reaches the weights through Adam: measured 1.2e-7 after these 8 steps (one ulp of a weight
    # near 1). It grows with the run: attention key biases have a true gradient of 0, so Adam
    # normalises pure round-off into steps of size ~lr (1.7e-6 after 30 steps). 1e-6 leaves 8x margin.
    assert _max_diff(_state(one), _state(two)) <= 1e-6


def _tamper_worker(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from utils.distributed import cleanup, init_distributed
    env = init_distributed("cpu")
    try:
        trainer = build_trainer(train.resolve_config([*TINY, "--output_dir", ""]), env)
        train_step(trainer, 0, check=True)  # synchronised: passes both checks
        name, param = list(trainer.model.net.named_parameters())[3]
        messages = []
        if rank == 1:
            param.grad.add_(1e-3)
        try:
            check_gradients(trainer.model.net, 0)
        except RuntimeError as e:
            messages.append(str(e))
        if rank == 1:
            with torch.no_grad():
                trainer.model.net_ema.enc["8x8_conv"].weight.mul_(1.5)
        try:
            check_weights(trainer.model, 1)
        except RuntimeError as e:
            messages.append(str(e))
        Path(result_dir, f"{rank}.txt").write_text(name + "\n" + "\n".join(messages))
    finally:
        cleanup()


@pytest.mark.slow
def test_consistency_check_names_rank_and_parameter(tmp_path):
    torch.multiprocessing.spawn(_tamper_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        name, grad_msg, weight_msg = (tmp_path / f"{rank}.txt").read_text().split("\n")
        assert "gradient" in grad_msg and f"'{name}'" in grad_msg and "rank 1" in grad_msg and "step 0" in grad_msg
        assert "weight" in weight_msg and "'net_ema.enc.8x8_conv.weight'" in weight_msg and "rank 1" in weight_msg


def _stop_worker(rank: int, port: int, out: str, signal_at: int) -> None:
    """train.main on rank `rank` of 2; rank 1 sends itself SIGTERM during step `signal_at`.
    Writes the steps each rank ran to OUT/steps{rank}.txt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import training.run
    ran, step_fn = [], training.run.train_step

    def step(trainer, index, **kwargs):
        ran.append(index)
        if rank == 1 and index == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_fn(trainer, index, **kwargs)

    training.run.train_step = step
    assert train.main([*TINY, "--batch_size", "4", "--output_dir", out, "--max_steps", "100", "--ckpt_every", "0",
                       "--log_per_step", "1000"]) == 0
    Path(out, f"steps{rank}.txt").write_text(" ".join(map(str, ran)))


@pytest.mark.slow
def test_signal_to_one_rank_stops_both_at_the_same_poll_step(tmp_path):
    torch.multiprocessing.spawn(_stop_worker, args=(free_port(), str(tmp_path), 3), nprocs=2)
    every = stop_lib.STOP_POLL_EVERY
    for rank in range(2):
        assert (tmp_path / f"steps{rank}.txt").read_text().split() == [str(i) for i in range(every)]
    assert torch.load(tmp_path / LAST, weights_only=True)["step"] == every
    assert "stopped by SIGTERM at step %d" % every in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("reaches_poll", [False, True])
def test_stop_timer_exits_only_when_no_step_boundary_is_reached(reaches_poll):
    code = ("import os, signal, sys, time, torch\n"
            "from training.stop import StopRequest\n"
            "from utils.distributed import DistEnv\n"
            "env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device('cpu'), backend=None)\n"
            "stop = StopRequest(env, grace_s=1.0)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            f"if {reaches_poll}:\n"
            "    assert stop.requested(5)\n"
            "time.sleep(4)  # a loop stuck in a collective, or one that went on to save\n"
            "stop.restore()\n"
            "print('ended normally')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    if reaches_poll:
        assert done.returncode == 0 and "ended normally" in done.stdout and not done.stderr, done.stderr
    else:
        assert done.returncode == 128 + signal.SIGTERM and "ended normally" not in done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: no step boundary reached 1 s after SIGTERM")


BLOCKED_RANK = """
import os, sys, time, torch, torch.distributed as dist
from training.stop import StopRequest
from utils.distributed import init_distributed
env = init_distributed("cpu")
stop = StopRequest(env, grace_s=2.0)
if env.rank == 0:
    print("blocking", flush=True)
    dist.all_reduce(torch.ones(1))  # rank 1 never joins: this waits in C code
    print("collective returned", flush=True)
else:
    time.sleep(float(sys.argv[1]))
"""


@pytest.mark.slow
def test_stop_timer_fires_while_the_rank_is_blocked_in_a_collective(tmp_path):
    """A SIGTERM to a rank waiting in a gloo all-reduce for a peer that never comes: the process exits on
    its own grace_s after the signal, not when the collective gives up (here: when the peer exits)."""
    port, peer_lifetime = free_port(), 45.0
    def start(rank: int) -> subprocess.Popen:
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank))
        return subprocess.Popen([sys.executable, "-c", BLOCKED_RANK, str(peer_lifetime)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    blocked, peer = start(0), start(1)
    try:
        assert blocked.stdout.readline().strip() == "blocking"
        time.sleep(1.0)  # inside the all-reduce by now
        tic = time.monotonic()
        blocked.send_signal(signal.SIGTERM)
        out, err = blocked.communicate(timeout=60)
        elapsed = time.monotonic() - tic
    finally:
        peer.kill()
        peer.wait()
    assert blocked.returncode == 128 + signal.SIGTERM and "collective returned" not in out
    assert 2.0 <= elapsed < 15.0, elapsed
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no step boundary reached 2 s after SIGTERM"), err


def _failing_write_worker(rank: int, port: int, out: str) -> None:
    """train.main on rank `rank` of 2; rank 0's second checkpoint write fails as a full disk would."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    writes = []

    def full_disk(state, path):
        writes.append(path)
        if len(writes) >= 2:
            raise OSError(28, "No space left on device")
        torch.save(state, path)

    ckpt_io.save_checkpoint = full_disk
    try:
        train.main([*TINY, "--batch_size", "4", "--output_dir", out, "--max_steps", "8", "--ckpt_every", "2"])
        outcome = "finished"
    except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
        outcome = f"{type(e).__name__}: {e}"
    Path(out, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.slow
def test_a_failed_checkpoint_write_stops_every_rank(tmp_path):
    context = torch.multiprocessing.spawn(_failing_write_worker, args=(free_port(), str(tmp_path)), nprocs=2,
                                          join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        assert time.monotonic() < deadline, "a rank is still waiting after rank 0's write failed"
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert outcomes[0] == "OSError: [Errno 28] No space left on device", outcomes  # a user error: one line
    assert outcomes[1].startswith("UserFileError: rank 0 could not write a checkpoint, so every process stops")
    assert "No space left on device" in outcomes[1]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--batch_size", "0"], "--batch_size 0: must be a positive integer"),
    (["--attn_resolutions", "16"], "--attn_resolutions [16]"),
    (["--compute_fid"], "--compute_fid True"),
])
def test_bad_flags_fail_with_a_clear_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--output_dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_offline_fails_fast(tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    tic = time.time()
    with pytest.raises(FileNotFoundError) as err:
        train.main(["--device", "cpu", "--not_compile", "--data_path", str(empty), "--output_dir", str(out)])
    assert time.time() - tic < 60
    assert "cifar-10-python.tar.gz" in str(err.value) and "--data_path" in str(err.value)
    assert not list(out.glob("*.pth"))


@pytest.mark.slow
def test_user_error_prints_one_line_and_exits_non_zero(tmp_path):
    """A missing dataset, from the command line: one `error:` line on stderr, no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "train.py", "--device", "cpu", "--not_compile", "--data_path", str(empty),
           "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CIFAR-10 not found under"), done.stderr
    assert "--data_path" in lines[0]


@pytest.mark.slow
def test_compute_fid_without_inception_weights_fails_at_start(tmp_path):
    """Missing weights offline fail before any data or step, not at the first evaluation hours later."""
    missing = tmp_path / "nowhere" / "inception.pth"
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "train.py", *TINY, "--dataset", "mnist", "--attn_resolutions", "16", "--compute_fid",
           "--data_path", str(empty), "--output_dir", str(tmp_path / "out")]
    env = dict(_env(), MEANFLOW_INCEPTION_WEIGHTS=str(missing))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compute_fid needs the Inception weights"), done.stderr
    assert str(missing) in lines[0] and "MEANFLOW_INCEPTION_WEIGHTS" in lines[0] and "--no_compute_fid" in lines[0]
    assert "training steps" not in done.stdout and not list((tmp_path / "out").glob("*.pth"))


def test_damaged_checkpoint_is_a_user_error(straight, tmp_path, capsys):
    data = (straight / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as stop, exit_on_user_error():
        train.main([*TINY, "--output_dir", str(tmp_path)])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint ") and "is truncated" in err[0]


def test_checkpoint_of_another_network_is_a_user_error(straight, tmp_path, capsys):
    argv = [*TINY, "--model_channels", "8", "--resume", str(straight / LAST), "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as stop, exit_on_user_error():
        train.main(argv)
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit this run's network" in err[0] and "size mismatch for net." in err[0]
    assert "more)" in err[0] and "pass the network flags" in err[0]


@pytest.mark.slow
def test_programming_error_keeps_its_traceback(tmp_path):
    """An exception that is not a user error leaves the command line with Python's traceback."""
    code = ("import runpy, sys, training.run\n"
            "def broken(*args, **kwargs):\n    raise ZeroDivisionError('a bug')\n"
            "training.run.build_trainer = broken\n"
            f"sys.argv = ['train.py', {', '.join(map(repr, TINY))}, '--output_dir', {str(tmp_path)!r}]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ZeroDivisionError: a bug" in done.stderr
    assert "error: a bug" not in done.stderr


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RuntimeError, match="cannot write to --output_dir"):
        train.main([*TINY, "--output_dir", str(blocker / "run")])


def test_truncated_last_checkpoint_is_reported_and_kept(straight, tmp_path):
    data = (straight / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="checkpoint-last.pth is truncated"):
        train.main([*TINY, "--output_dir", str(tmp_path)])
    assert (tmp_path / LAST).read_bytes() == data[: len(data) // 2]
    assert not (tmp_path / "config.json").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(straight, tmp_path):
    (tmp_path / LAST).write_bytes((straight / LAST).read_bytes())  # a good run at step 8
    before = (tmp_path / LAST).read_bytes()
    # Steps of size lr = 1e30 overflow the activations within a step or two.
    with pytest.raises(RuntimeError, match="non-finite.*stopping without saving.*step 8.*left untouched"):
        train.main([*TINY, "--output_dir", str(tmp_path), "--dropout", "0.1", "--lr", "1e30", "--max_steps", "16"])
    assert (tmp_path / LAST).read_bytes() == before


# --------------------------------------------------------------------------- outputs


def test_tiny_run_writes_logs_config_and_checkpoint(straight):
    assert list(straight.glob("events.out.tfevents.*"))
    cfg = (straight / "config.json").read_text()
    assert '"preset": "tiny"' in cfg and '"total_steps": 8' in cfg
    assert list((straight / "samples").glob("step00000008_net_ema*.png"))
    ckpt = ckpt_io.load_checkpoint(straight / LAST)
    prefixes = {k.split(".")[0] for k in ckpt["model"]}
    assert prefixes == {"num_updates", "net", "net_ema", "net_ema1", "net_ema2"}
    assert int(ckpt["model"]["num_updates"]) == ckpt["step"] == 8
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["config"]["preset"] == "tiny" and ckpt["network"] == "unet"
    net = load_network(ckpt, ema="net_ema1")
    assert net.state_dict().keys() == {k[len("net."):] for k in ckpt["model"] if k.startswith("net.")}
    log = (straight / "log.txt").read_text()
    assert "step 8/8" in log and "digits quality of net_ema" in log


@pytest.mark.slow
def test_digits_quality_separates_real_from_noise():
    from utils.data import load_dataset
    from utils.digits_quality import DigitsQuality
    quality = DigitsQuality()
    real = quality.real_score()
    assert quality.accuracy > 0.95 and real["count"] == 297
    assert real["fd"] < 2 and real["confidence"] > 0.9 and real["classes"] > 9.5
    noise = quality.score(torch.rand(297, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["fd"] > 20 * real["fd"] and noise["classes"] < 5
    assert quality.score(torch.full((297, 1, 8, 8), -1.0))["classes"] == 1.0  # blank images: one class
    train_digits = quality.score(load_dataset("digits", train=True)[:297])
    assert train_digits["fd"] < 2


@pytest.mark.slow
def test_eval_only_evaluates_the_resume_checkpoint_not_the_last(tmp_path):
    _train("--output_dir", str(tmp_path), "--snapshot_every", "4")
    snapshot = tmp_path / "checkpoint-4.pth"
    assert snapshot.exists() and (tmp_path / LAST).exists()
    _train("--output_dir", str(tmp_path), "--eval_only", "--resume", str(snapshot))
    log = (tmp_path / "log.txt").read_text()
    assert f"resumed from {snapshot} at step 4" in log
    assert list((tmp_path / "samples").glob("step00000004_net_ema.png"))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["cifar10_v0.sh", "cifar10_v1.sh"])
def test_launchers_start_train_py_under_torchrun(script):
    env = dict(_env(), GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    done = subprocess.run(["bash", str(ROOT / script), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: train.py" in done.stdout and "--preset" in done.stdout


def test_torch_jit_deprecation_is_hidden_whatever_its_category():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_jit_deprecation()
        for category in (DeprecationWarning, FutureWarning):  # torch 2.11, torch 2.14
            for name in ("script", "script_method"):
                warnings.warn(f"`torch.jit.{name}` is deprecated. Please switch to `torch.compile`.", category)
        warnings.warn("`torch.other` is deprecated.", FutureWarning)
    assert [str(w.message) for w in seen] == ["`torch.other` is deprecated."]


# --------------------------------------------------------------------------- class-conditional runs


COND = ["--class_cond", "--cfg_omega", "1.0", "--cfg_kappa", "0.5", "--label_dropout", "0.25"]


@pytest.mark.slow
def test_class_conditional_run_resumes_exactly_and_is_world_size_invariant(tmp_path):
    """Labels and their dropout are keyed draws: a stop and rerun continues exactly and two processes
    train the weights of one with twice the batch (the tolerance of the unconditional test)."""
    straight = tmp_path / "straight"
    _train("--output_dir", str(straight), *COND)
    ckpt = torch.load(straight / LAST, weights_only=True)
    assert ckpt["model_config"]["label_dim"] == 10
    resumed = tmp_path / "resumed"
    _train("--output_dir", str(resumed), *COND, "--max_steps", "4")
    _train("--output_dir", str(resumed), *COND)
    assert _max_diff(_state(straight), _state(resumed)) <= 1e-6
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train.py", *TINY, *COND, "--batch_size", "4", "--output_dir", str(two)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _max_diff(_state(straight), _state(two)) <= 1e-6


@pytest.mark.parametrize("flag, value", [("--cfg_omega", "2.0"), ("--cfg_omega", "1.0"), ("--cfg_kappa", "0.0"),
                                         ("--cfg_t_start", "0.2"), ("--cfg_t_end", "1.0"), ("--label_dropout", "0.1")])
def test_every_guidance_flag_given_without_class_cond_is_refused(flag, value, capsys):
    """What was given counts, not its value: label_dropout's default is 0.1, omega's 1.0."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--output_dir", "", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {flag} {float(value)!r}: guidance needs --class_cond") and "--help" in err[0]


def test_guidance_flags_need_class_cond():
    assert build_method(train.resolve_config(["--preset", "digits-cond"])).guided


# --------------------------------------------------------------------------- the iMF objective

IMF = ["--preset", "tiny", "--no_edm_aug", "--class_cond", "--arch", "imf_dit", "--model_size",
       "XS/2", "--objective", "imf", "--tr_sampler", "v0", "--P_mean_t", "-0.4", "--P_std_t", "1", "--P_mean_r",
       "-0.4", "--P_std_r", "1", "--ratio", "0.5", "--norm_p", "1", "--norm_eps", "0.01", "--device", "cpu",
       "--not_compile"]


def test_the_imf_objective_trains_through_the_same_step():
    """--objective imf: the step draws iMF's guidance inputs (keyed, for the global batch) and trains an imf_dit."""
    from training.step import draw_batch
    from utils.distributed import init_distributed

    cfg = train.resolve_config([*IMF, "--output_dir", ""])
    trainer = build_trainer(cfg, init_distributed("cpu"))
    assert type(trainer.method).__name__ == "ImprovedMeanFlow" and trainer.method.data_proportion == 0.5
    batch = draw_batch(trainer, 0)
    assert batch.omega.shape == batch.t_min.shape == (8,) and (batch.omega >= 1).all() and (batch.omega <= 8).all()
    assert torch.equal(draw_batch(trainer, 0).omega, batch.omega) and not torch.equal(draw_batch(trainer, 1).omega,
                                                                                       batch.omega)
    before = {k: v.clone() for k, v in trainer.model.net.state_dict().items()}
    losses = [train_step(trainer, step)[0] for step in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.net.state_dict().items())


@pytest.mark.parametrize("argv, message", [
    (["--arch", "unet"], "--objective imf with --arch unet"),
    (["--cfg_omega", "2"], "--cfg_omega 2.0: MeanFlow's guidance in the target"),
    (["--tr_sampler", "v1"], "use --tr_sampler v0"),
    (["--t_min", "0.7", "--t_max", "0.6"], "--t_min 0.7: at most --t_max 0.6"),
    (["--omega", "0.5"], "--omega 0.5: a guidance scale >= 1"),
])
def test_imf_settings_that_cannot_train_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.main([*IMF, "--output_dir", "", *argv])
    assert message in capsys.readouterr().err


def test_meanflow_refuses_a_network_with_guidance_inputs(capsys):
    with pytest.raises(SystemExit):
        train.main([*TINY, "--no_edm_aug", "--arch", "imf_dit", "--model_size", "XS/2", "--output_dir", ""])
    assert "--objective meanflow with --arch imf_dit" in capsys.readouterr().err
