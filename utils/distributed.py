"""Multi-process set-up (torchrun, SLURM or a single process), gradient averaging and rank checks.

Everything here also works in a single process without a process group: collectives become no-ops,
so the training loop is written once.
"""
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion

from utils.data import to_device
from utils.errors import UserRunError


@dataclass
class DistEnv:
    """Where this process sits in the job."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group was created (single process)


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list without calling `scontrol`.

    "gpu[003-005,9]" -> "gpu003"; "a01,b02" -> "a01"; "node7" -> "node7".
    """
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]  # the first number keeps its zero padding


def _scontrol_first_host(nodelist: str) -> str:
    """Ask SLURM to expand the node list; fall back to our own parser where scontrol is missing."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return first_slurm_host(nodelist)


def parse_slurm_env(environ: Mapping[str, str],
                    resolve_host: Callable[[str], str] = _scontrol_first_host) -> dict:
    """Rank layout and rendezvous address of a SLURM task (one process per task, `srun`).

    Returns dict(rank, world_size, local_rank, master_addr, master_port). MASTER_ADDR/MASTER_PORT from
    the environment win; otherwise the first host of SLURM_NODELIST and a port derived from the job id
    (so that two jobs sharing a node do not collide).
    """
    rank = int(environ["SLURM_PROCID"])
    world_size = int(environ["SLURM_NTASKS"])
    local_rank = int(environ.get("SLURM_LOCALID", 0))
    master_addr = environ.get("MASTER_ADDR")
    if not master_addr:
        nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST")
                    or environ.get("SLURM_JOB_NODELIST"))
        if not nodelist:
            raise UserRunError("SLURM run without SLURM_NODELIST or MASTER_ADDR: set MASTER_ADDR to the first node")
        master_addr = resolve_host(nodelist)
    master_port = int(environ.get("MASTER_PORT") or 20000 + int(environ.get("SLURM_JOB_ID", 9500)) % 20000)
    return dict(rank=rank, world_size=world_size, local_rank=local_rank, master_addr=master_addr,
                master_port=master_port)


def gloo_ifname_from_nccl(nccl_ifname: str, interfaces: Iterable[str]) -> str | None:
    """The network interface for gloo that NCCL_SOCKET_IFNAME selects, or None.

    NCCL's syntax: comma-separated name prefixes ("eth,ib"), exact names after "=" ("=eth0,eth1"),
    or interfaces to exclude after "^" / "^=". GLOO_SOCKET_IFNAME takes exact names, and every
    process must give as many, so this returns one: entries are tried in order, and the first that
    matches one of this host's `interfaces` gives the first interface it matches. An exclusion list
    names no interface to use: None, and gloo keeps its default (the host name's address).
    """
    value = nccl_ifname.strip()
    if not value or value.startswith("^"):
        return None
    exact = value.startswith("=")
    names = list(interfaces)
    for entry in value.removeprefix("=").split(","):
        entry = entry.strip()
        for name in names:
            if entry and (name == entry if exact else name.startswith(entry)):
                return name
    return None


def _interface_names() -> list[str]:
    try:
        return [name for _, name in socket.if_nameindex()]
    except OSError:
        return []


def cuda_index(local_rank: int, device_count: int, *, local_world_size: int | None = None,
               srun: bool = False) -> int:
    """The GPU of this process: its local rank, one GPU per process.

    Raises where the node starts more processes than it has visible GPUs: two processes would
    share a GPU and NCCL would fail later with "Duplicate GPU detected". Under srun with per-task
    GPU binding each process sees one GPU (index 0) while its local rank counts up to the tasks
    per node.
    """
    if srun and device_count == 1:
        return 0
    count = max(local_world_size or 0, local_rank + 1)
    if count > device_count:
        processes = f"{count}" if local_world_size else f"at least {count}"
        fix = ("srun --ntasks-per-node, or give each task its own GPU with --gpus-per-task=1" if srun
               else "torchrun --nproc_per_node, i.e. GPUS_PER_NODE for launch.sh")
        raise UserRunError(f"{processes} processes on this node but {device_count} visible GPU(s): start at most "
                           f"{device_count} per node ({fix}) or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    return local_rank


def init_distributed(device: str | None = None, *, timeout_s: float = 1800.0) -> DistEnv:
    """Create the process group if the job has several processes; pick this process's device.

    Launch styles: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), `srun` under SLURM
    (SLURM_PROCID, SLURM_NTASKS, ...), or a plain `python train.py` (single process, no group).
    device: "cuda", "cpu" or None (cuda when available). NCCL on CUDA, gloo on CPU.
    timeout_s: how long a collective may wait; long enough for one rank writing a checkpoint.
    Where only NCCL_SOCKET_IFNAME is set, GLOO_SOCKET_IFNAME is derived from it (see
    `gloo_ifname_from_nccl`) for every gloo group of the job.
    """
    env = os.environ
    local_world_size, srun = None, False
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0))
        local_world_size = int(env["LOCAL_WORLD_SIZE"]) if env.get("LOCAL_WORLD_SIZE") else None
        init_method = "env://"
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        info = parse_slurm_env(env)
        rank, world_size, local_rank = info["rank"], info["world_size"], info["local_rank"]
        init_method = f"tcp://{info['master_addr']}:{info['master_port']}"
        srun = True
    else:
        rank, world_size, local_rank, init_method = 0, 1, 0, None

    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserRunError("device 'cuda' requested but CUDA is not available; pass --device cpu")
        index = cuda_index(local_rank, torch.cuda.device_count(), local_world_size=local_world_size, srun=srun)
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'cuda', 'cpu' or None, got {device!r}")

    backend = None
    if world_size > 1:
        # gloo (on CPU, and for small host-side groups beside NCCL) otherwise takes the address its
        # host name resolves to, which on some clusters is a loopback or unroutable one: a hang at start.
        if not env.get("GLOO_SOCKET_IFNAME") and env.get("NCCL_SOCKET_IFNAME"):
            name = gloo_ifname_from_nccl(env["NCCL_SOCKET_IFNAME"], _interface_names())
            if name is not None:
                env["GLOO_SOCKET_IFNAME"] = name
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return get_rank() == 0


def _comm_device() -> torch.device:
    """Device that collective buffers must live on for the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if _active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def torch_older_than(version: str, torch_version: str | None = None) -> bool:
    """Whether the installed torch (or `torch_version`) predates `version`, compared as versions:
    "2.14.1" is newer than "2.8", and pre-releases such as "2.8.0a0+git..." count as older."""
    return TorchVersion(torch_version or torch.__version__) < version


def cleanup() -> None:
    if _active():
        if torch_older_than("2.8"):
            # torch 2.7's gloo process group joins its worker threads in its destructor while holding
            # the GIL. A worker still letting go of a finished collective's tensors needs the GIL for
            # that, and both wait forever (fixed in 2.8 by pytorch PR 154976). Sleeping releases the
            # GIL so that such workers finish first. Any gloo group counts, also one beside NCCL.
            time.sleep(0.2)
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (a new tensor on x's device); x itself when single process."""
    if not _active():
        return x
    y = x.detach().to(_comm_device(), copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return (y / get_world_size()).to(x.device)


class GradSync:
    """Average `.grad` of `params` over ranks with a few large all-reduces instead of one per tensor.

    Parameters are grouped in order into flat buckets of at most `bucket_cap_mb` (one dtype and device
    per bucket; a larger tensor gets a bucket of its own). Each bucket ends with one flag per parameter
    counting the ranks that had a gradient: a rank without a gradient contributes zeros, so all ranks
    always run the same collectives, and a parameter without a gradient on every rank keeps `.grad = None`.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], bucket_cap_mb: float = 25.0):
        self.params = [p for p in params if p.requires_grad]
        self.world_size = get_world_size()
        # (parameters, flat buffer, the buffer's slice for each parameter shaped like it)
        self.buckets: list[tuple[list[torch.nn.Parameter], torch.Tensor, list[torch.Tensor]]] = []
        if self.world_size == 1:
            return
        device = _comm_device()
        cap = bucket_cap_mb * 2 ** 20
        group: list[torch.nn.Parameter] = []
        for p in self.params:
            if group and (p.dtype != group[0].dtype
                          or (sum(q.numel() for q in group) + p.numel()) * p.element_size() > cap):
                self.buckets.append(self._make_bucket(group, device))
                group = []
            group.append(p)
        if group:
            self.buckets.append(self._make_bucket(group, device))

    @staticmethod
    def _make_bucket(group, device):
        flat = torch.zeros(sum(p.numel() for p in group) + len(group), dtype=group[0].dtype, device=device)
        views, offset = [], 0
        for p in group:
            views.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return group, flat, views

    @torch.no_grad()
    def __call__(self) -> None:
        if self.world_size == 1:
            return
        for group, flat, views in self.buckets:
            has = [p.grad is not None for p in group]
            flags = flat[-len(group):]
            if all(has):  # training: every parameter has a gradient, no host list to copy
                flags.fill_(1)
            else:  # flags from a host list, copied without waiting for the device
                flags.copy_(to_device(torch.tensor(has, dtype=flat.dtype), flags.device))
            present = [(v, p.grad) for v, p, h in zip(views, group, has) if h]
            if present:
                torch._foreach_copy_([v for v, _ in present], [g.reshape(v.shape) for v, g in present])
            for v, h in zip(views, has):
                if not h:
                    v.zero_()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            # Only a parameter without a local gradient needs to know whether another rank had one:
            # reading the flags is a device-to-host sync, so it happens only then (never in training,
            # where every rank has the same gradients present).
            others = (flags > 0).tolist() if not all(has) else has
            flat[:-len(group)].div_(self.world_size)
            if present:
                torch._foreach_copy_([g for _, g in present], [v.view_as(g) for v, g in present])
            for p, v, h, other in zip(group, views, has, others):
                if not h and other:
                    p.grad = v.to(p.device, copy=True)


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """[3] float64: sum, sum of squares and a position-weighted sum (catches swapped elements)."""
    x = x.detach().reshape(-1).double()
    weights = torch.arange(x.numel(), device=x.device, dtype=torch.float64).mul_(0.6180339887498949).frac_()
    return torch.stack([x.sum(), x.square().sum(), (x * weights).sum()])


def check_consistency(named_tensors: Iterable[tuple[str, torch.Tensor]], what: str, step: int) -> None:
    """Raise on every rank if any tensor differs from rank 0's copy (bit-exact fingerprints).

    named_tensors: e.g. `model.named_parameters()` or `((n, p.grad) for n, p in ...)`; a None tensor
    counts as empty. what: "weight", "gradient", ... used in the message. All ranks see all fingerprints,
    so they all raise the same error together instead of leaving some ranks waiting in a collective.
    """
    if not _active():
        return
    items = [(name, torch.zeros(0) if t is None else t) for name, t in named_tensors]
    device = _comm_device()
    world = get_world_size()
    prints = torch.stack([_fingerprint(t).to(device) for _, t in items]) if items \
        else torch.zeros(0, 3, dtype=torch.float64, device=device)

    # Ranks must agree on how many tensors they compare before gathering them.
    count = torch.tensor([len(items)], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    if len(set(counts)) > 1:
        raise RuntimeError(f"{what} check at step {step}: ranks hold different numbers of tensors {counts}")

    gathered = [torch.zeros_like(prints) for _ in range(world)]
    dist.all_gather(gathered, prints)
    # Compare bit patterns so that identical NaNs count as equal.
    bits = [g.cpu().view(torch.int64) for g in gathered]
    for rank in range(1, world):
        differs = (bits[rank] != bits[0]).any(dim=1).nonzero().flatten().tolist()
        if differs:
            name = items[differs[0]][0]
            raise RuntimeError(
                f"{what} of parameter '{name}' differs between rank {rank} and rank 0 at step {step} "
                f"({len(differs)} tensor(s) differ on rank {rank}); the ranks have diverged")
