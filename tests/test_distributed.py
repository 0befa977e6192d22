"""utils/distributed.py: two CPU processes over gloo, started like torchrun would start them."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import utils.distributed
from conftest import free_port
from utils.distributed import (GradSync, _fingerprint, all_reduce_mean, check_consistency, cleanup, cuda_index,
                               first_slurm_host, gloo_ifname_from_nccl, init_distributed, is_main, parse_slurm_env,
                               torch_older_than)

WORLD = 2


def _launch(scenario, world: int = WORLD) -> None:
    """Run scenario(env) in `world` processes with torchrun's environment variables; failures re-raise here."""
    mp.start_processes(_entry, args=(world, free_port(), scenario), nprocs=world, join=True, start_method="spawn")


def _entry(rank: int, world: int, port: int, scenario) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_SOCKET_IFNAME="lo")
    os.environ.pop("GLOO_SOCKET_IFNAME", None)  # derived from NCCL's: gloo then runs over loopback
    env = init_distributed(device="cpu", timeout_s=60)
    try:
        scenario(env)
    finally:
        cleanup()


def _params(rank: int) -> dict[str, torch.nn.Parameter]:
    """Parameters of several shapes and dtypes; gradients depend on the rank, all exactly representable."""
    shapes = {"a": ([3, 5], torch.float32), "b": ([7], torch.float64), "c": ([2, 2, 2], torch.float16),
              "d": ([4, 3], torch.float32), "e": ([6], torch.float32), "none_everywhere": ([2], torch.float32)}
    params = {}
    for i, (name, (shape, dtype)) in enumerate(shapes.items()):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        if name != "none_everywhere" and not (name == "e" and rank == 1):
            p.grad = (torch.arange(p.numel(), dtype=dtype).view(shape) + i) * (rank + 1)
        params[name] = p
    return params


def _scenario_env_and_gradsync(env) -> None:
    assert (env.rank, env.world_size, env.local_rank) == (int(os.environ["RANK"]), WORLD, env.rank)
    assert env.device == torch.device("cpu") and env.backend == "gloo"
    names = [name for _, name in socket.if_nameindex()]
    assert os.environ.get("GLOO_SOCKET_IFNAME") == ("lo" if "lo" in names else None)
    assert torch.distributed.get_world_size() == WORLD
    assert is_main() == (env.rank == 0)
    assert all_reduce_mean(torch.tensor([float(env.rank)])).item() == 0.5

    params = _params(env.rank)
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    sync = GradSync([*params.values(), frozen], bucket_cap_mb=64 / 2 ** 20)  # 64-byte buckets
    assert len(sync.buckets) >= 4
    sync()
    for i, (name, p) in enumerate(params.items()):
        base = torch.arange(p.numel(), dtype=p.dtype).view(p.shape) + i
        if name == "none_everywhere":
            assert p.grad is None
        elif name == "e":  # rank 1 had no gradient: it counts as zeros in the mean
            torch.testing.assert_close(p.grad, base * 1 / WORLD, rtol=0, atol=0)
        else:  # mean of 1x and 2x the base gradient
            torch.testing.assert_close(p.grad, base * 1.5, rtol=0, atol=0)
    assert frozen.grad is None


def _scenario_consistency(env) -> None:
    torch.manual_seed(0)  # same weights on both ranks
    weights = {name: torch.randn(shape) for name, shape in [("w", (4, 4)), ("b", (4,)), ("g", (3, 2))]}
    check_consistency(weights.items(), what="weight", step=7)
    grads = {name: w.clone() for name, w in weights.items()}
    if env.rank == 1:  # the smallest possible change of one element
        grads["b"][2] = torch.nextafter(grads["b"][2], torch.tensor(float("inf")))
    with pytest.raises(RuntimeError) as err:
        check_consistency(grads.items(), what="gradient", step=7)
    message = str(err.value)
    assert "rank 1" in message and "'b'" in message and "gradient" in message and "step 7" in message, message


def _scenario_all(env) -> None:
    _scenario_env_and_gradsync(env)
    _scenario_consistency(env)


@pytest.mark.slow
def test_two_ranks_env_gradsync_and_consistency():
    """One launch for all two-process checks: starting processes costs most of the time."""
    _launch(_scenario_all)


def test_single_process_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.local_rank, env.backend) == (0, 1, 0, None)
    assert is_main() and not torch.distributed.is_initialized()
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    GradSync([p])()
    assert p.grad.tolist() == [1.0, 2.0, 3.0]
    check_consistency([("p", p)], what="weight", step=0)
    assert all_reduce_mean(torch.tensor(2.0)).item() == 2.0


def test_fingerprint_sees_swapped_elements():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert not torch.equal(_fingerprint(x), _fingerprint(x.flip(0)))
    assert torch.equal(_fingerprint(x), _fingerprint(x.clone()))


def test_parse_slurm_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[003-004]",
           "SLURM_JOB_ID": "123456"}
    info = parse_slurm_env(env, resolve_host=lambda nodes: {"gpu[003-004]": "gpu003"}[nodes])
    assert info == dict(rank=5, world_size=8, local_rank=1, master_addr="gpu003", master_port=20000 + 123456 % 20000)
    given = parse_slurm_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}, resolve_host=None)
    assert (given["master_addr"], given["master_port"]) == ("10.0.0.1", 1234)


@pytest.mark.parametrize("nodelist, first", [("node7", "node7"), ("gpu[003-005,9]", "gpu003"),
                                             ("a01,b02", "a01"), ("n[10,2]", "n10")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


HOST_INTERFACES = ["lo", "eth0", "eth1", "ib0", "docker0"]


@pytest.mark.parametrize("nccl, gloo", [
    ("eth", "eth0"),                # a prefix: its first interface
    ("ib,eth", "ib0"),              # entries in order
    ("enp,eth1", "eth1"),           # an entry matching nothing is skipped
    ("=eth1", "eth1"),              # exact names
    ("=eth", None),                 # ... match no prefix
    ("=eth9, eth1", "eth1"),
    (" ib0 ", "ib0"),
    ("^docker,lo", None),           # exclusions name no interface to use
    ("^=docker0", None),
    ("wlan", None),
    ("", None),
])
def test_gloo_ifname_from_nccl(nccl, gloo):
    assert gloo_ifname_from_nccl(nccl, HOST_INTERFACES) == gloo


@pytest.mark.parametrize("version, older", [("2.14.1", False), ("2.8.0", False), ("2.10.0+cu128", False),
                                            ("2.7.1", True), ("2.7.0+cu126", True), ("2.8.0a0+gitabc123", True),
                                            ("2.8.0.dev20250601+cu128", True)])
def test_torch_older_than_compares_versions(version, older):
    assert torch_older_than("2.8", torch_version=version) is older


@pytest.mark.parametrize("local_rank, count, local_world, srun, index", [
    (3, 8, 8, False, 3), (0, 1, None, False, 0), (5, 1, None, True, 0), (5, 8, None, True, 5)])
def test_cuda_index(local_rank, count, local_world, srun, index):
    assert cuda_index(local_rank, count, local_world_size=local_world, srun=srun) == index


@pytest.mark.parametrize("local_rank, local_world, srun, words", [
    (0, 16, False, ["16 processes", "8 visible GPU(s)", "--nproc_per_node", "GPUS_PER_NODE"]),
    (9, None, False, ["at least 10 processes", "8 visible GPU(s)"]),
    (9, None, True, ["at least 10 processes", "--ntasks-per-node", "--gpus-per-task=1"])])
def test_cuda_index_rejects_more_processes_than_gpus(local_rank, local_world, srun, words):
    with pytest.raises(RuntimeError) as err:
        cuda_index(local_rank, 8, local_world_size=local_world, srun=srun)
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.fixture
def fake_cuda_job(monkeypatch):
    """A torchrun environment on 8 GPUs without CUDA or a process group: returns the recorded calls."""
    calls = {}
    monkeypatch.setattr(os, "environ", dict(RANK="3", WORLD_SIZE="16", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8",
                                             MASTER_ADDR="10.0.0.1", MASTER_PORT="29500"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.update(set_device=index))
    monkeypatch.setattr(utils.distributed.dist, "init_process_group", lambda **kw: calls.update(group=kw))
    monkeypatch.setattr(socket, "if_nameindex", lambda: list(enumerate(HOST_INTERFACES, start=1)))
    return calls


def test_init_distributed_on_cuda(fake_cuda_job):
    os.environ["NCCL_SOCKET_IFNAME"] = "=ib0"
    env = init_distributed("cuda")
    assert env.device == torch.device("cuda", 3) and fake_cuda_job["set_device"] == 3
    assert env.backend == "nccl" and fake_cuda_job["group"]["backend"] == "nccl"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib0"  # for the gloo groups created later


def test_init_distributed_keeps_a_given_gloo_ifname(fake_cuda_job):
    os.environ.update(NCCL_SOCKET_IFNAME="ib", GLOO_SOCKET_IFNAME="eth1")
    init_distributed("cuda")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth1"


def test_init_distributed_rejects_more_processes_than_gpus(fake_cuda_job, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(RuntimeError, match=r"8 processes on this node but 4 visible GPU\(s\).*--nproc_per_node"):
        init_distributed("cuda")
    assert fake_cuda_job == {}  # failed before touching a GPU or the network
