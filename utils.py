"""Small shared helpers, kept under ~300 lines on purpose.

What belongs here and nothing else:
- the device and autocast rules (`resolve_device`, `autocast`);
- distributed set-up and queries (`init_distributed`, `init_process_group`, `get_rank`, `get_world_size`,
  `all_gather_with_grad`, `ring_shift_with_grad`, `all_reduce_means`, `all_ranks_true`);
- checkpoint I/O (`save_atomic`, `load_checkpoint`, RNG state capture/restore);
- meters (`SmoothedValue`) and the git commit lookup.
Model, loss, data and training code live in their own files.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import os
import random
import subprocess
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import experiment

log = logging.getLogger("clip_lab")


# --------------------------------------------------------------------------- distributed
@dataclass
class DistEnv:
    """Where this process sits in the job: global rank, world size, local rank, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _slurm_master_addr() -> str:
    """First host of the Slurm allocation, resolved with `scontrol show hostnames`."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "127.0.0.1"))
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        return out.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]


def detect_launch_env() -> tuple[int, int, int] | None:
    """Return (rank, world_size, local_rank) from torchrun or Slurm env vars, or None when single-process.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; `srun` (and submitit) set SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID. A Slurm job with one task is treated as single-process.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def resolve_device(device: str) -> torch.device:
    """The one device rule: "auto" -> cuda when available, else cpu; anything else as torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(precision: str, device: torch.device):
    """The one autocast rule: fp32 -> no autocast; bf16/fp16 -> torch.autocast on the device's type.
    Logits and losses that need fp32 cast inside the model/loss code."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision {precision!r}: use fp32, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def init_distributed(device: str = "auto") -> DistEnv:
    """Initialise torch.distributed when launched by torchrun/Slurm; gloo on CPU, nccl on CUDA.

    `device` is "auto" (CUDA when available), "cpu" or "cuda" (`resolve_device`). Each process binds to
    cuda:LOCAL_RANK, so one task per GPU.
    """
    use_cuda = resolve_device(device).type == "cuda"
    launch = detect_launch_env()
    rank, world, local = launch if launch else (0, 1, 0)
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if launch and world > 1 and not dist.is_initialized():
        init_process_group("nccl" if use_cuda else "gloo", init_method="env://", rank=rank, world_size=world,
                           timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world, local, dev)


# The torch.distributed modules this project uses. Imported for the first time after init_process_group (torch
# 2.14: torch.distributed.nn, .fsdp, .checkpoint), each keeps the default group alive past destroy_process_group;
# its gloo and store threads then run into interpreter exit, which can abort a finished rank (SIGABRT, "terminate
# called without an active exception": 6 of 20 two-rank runs of bench.py's SigLIP memory check).
DIST_MODULES = ("torch.distributed.nn.functional", "torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict")


def init_process_group(backend: str, **kwargs) -> None:
    """`torch.distributed.init_process_group(backend, **kwargs)` after importing `DIST_MODULES`, so that
    destroy_process_group ends the group (the one way this project starts one)."""
    for name in DIST_MODULES:
        importlib.import_module(name)
    dist.init_process_group(backend, **kwargs)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (B, ...) from every rank into (world*B, ...), keeping gradients.

    The backward of the gather sums each rank's gradient into the local slice, so a loss computed on
    gathered features gives the same gradient as one process holding the whole batch.
    """
    if get_world_size() == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return torch.cat([_ContiguousGrad.apply(t) for t in dist_fn.all_gather(tensor)], dim=0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. torch's all_gather backward on gloo
    (all_to_all into `empty_like(grad)`) scrambles a dense non-contiguous gradient, e.g. the permuted
    gradient an einsum sends back into gathered (B, A, D) views (tests/test_recipes.py gloo test)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _ring_exchange(tensor: torch.Tensor, step: int) -> torch.Tensor:
    """Send `tensor` to rank (rank + step) mod world and return the one received from (rank - step) mod world."""
    rank, world = get_rank(), get_world_size()
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), (rank + step) % world),
           dist.P2POp(dist.irecv, received, (rank - step) % world)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingShift(torch.autograd.Function):
    """Forward: the previous rank's tensor; backward: the gradient goes back to that rank (the next rank's
    gradient arrives here), so a block's gradient reaches its owner however far it travelled."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return _ring_exchange(tensor, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _ring_exchange(grad, -1)


def ring_shift_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Pass `tensor` (B, ...) one step around the ring of ranks: rank r returns rank r-1's tensor (same shape on
    every rank), keeping gradients (losses.chunked_sigmoid_loss). Point-to-point sends, so every rank must call it
    the same number of times. The identity in one process."""
    if get_world_size() == 1:
        return tensor
    return _RingShift.apply(tensor)


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_means(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks, in one all-reduce (every rank passes the same keys)."""
    if get_world_size() == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    reduced = dict(zip(keys, (t / get_world_size()).tolist()))
    return {k: reduced[k] for k in values}  # the caller's order


def all_ranks_true(flag: bool) -> bool:
    """True when `flag` is true on every rank (one MIN all-reduce), so all ranks take the same branch."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# --------------------------------------------------------------------------- checkpoint I/O
def save_atomic(obj: dict, path: str) -> None:
    """torch.save through `experiment.atomic_file` (temporary file + `os.replace`, never a half file; a full disk
    raises "No space left on device while writing <path>"), through a Python file object so that torch's write
    error keeps the file's errno."""
    with experiment.atomic_file(path) as f:
        torch.save(obj, f)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read with weights_only=True: missing, corrupt, truncated, or holding
    objects other than tensors and plain containers."""


def load_checkpoint(path: str):
    """torch.load(path) with `weights_only=True` on the CPU: the one way this project reads a torch.save file
    (nothing in it is unpickled into code). Raises CheckpointError "cannot load checkpoint 'path': <torch's
    reason, its advice to retry with weights_only=False left out>. The file is corrupt, ..."."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (RuntimeError, UnpicklingError, EOFError, KeyError)
        raise CheckpointError(f"cannot load checkpoint {path!r}: {type(exc).__name__}: {_load_failure(exc)}. The "
                              "file is corrupt, truncated or holds objects other than tensors and plain containers "
                              "(checkpoints are read with weights_only=True only, so that nothing in them runs)"
                              ) from exc


def _load_failure(exc: Exception) -> str:
    """The first line of torch.load's error that is not its advice to retry with weights_only=False: a corrupt file
    would fail again, and an untrusted one could run code."""
    paragraphs = [p.strip() for p in str(exc).split("\n\n") if p.strip()]
    reasons = [p for p in paragraphs if "weights_only" not in p] or paragraphs or [repr(exc)]
    return reasons[0].splitlines()[0].rstrip(".")


def capture_rng_state() -> dict:
    """Python, NumPy and torch RNG states as weights_only-safe values (tensors, ints, lists)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_seed(seed: int, rank: int, step: int | None = None) -> int:
    """The seed of rank `rank`'s own random stream (dropout, drop-path masks): distinct per run seed and rank
    (and per `step`, for a stream restarted mid-run)."""
    entropy = [seed, rank] + ([step] if step is not None else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_gather_object(obj) -> list:
    """`obj` of every rank, in rank order (pickled between this job's own processes only). A collective: every
    rank must call it."""
    if get_world_size() == 1:
        return [obj]
    objects: list = [None] * get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def gather_rng_states() -> list[dict]:
    """`capture_rng_state()` of every rank, in rank order. A collective: every rank must call it."""
    return all_gather_object(capture_rng_state())


def git_commit(folder: str | None = None) -> str:
    """The HEAD commit of the repository holding this file (or `folder`), or 'unknown'.

    run.sh snapshots code with `git archive`, which has no .git: it exports CLIP_LAB_COMMIT.
    """
    if os.environ.get("CLIP_LAB_COMMIT"):
        return os.environ["CLIP_LAB_COMMIT"]
    folder = folder or os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------- meters
class SmoothedValue:
    """Running average of a scalar over a logging window and over the epoch."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.window_total = 0.0
        self.window_count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.total += value * n
        self.count += n
        self.window_total += value * n
        self.window_count += n

    def window_avg(self) -> float:
        avg = self.window_total / max(self.window_count, 1)
        self.window_total, self.window_count = 0.0, 0
        return avg

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


def restore_rng(saved: list[dict] | dict, rank: int, world_size: int, seed: int, step: int) -> None:
    """This rank's RNG states from a checkpoint: its own entry when the checkpoint has one per rank of this
    world size (an exact resume); otherwise (another world size, or an older single-state checkpoint) a fresh
    per-rank stream seeded by (seed, rank, step), with a warning that dropout masks will not repeat exactly."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == world_size:
        restore_rng_state(states[rank])
        return
    log.warning("the checkpoint holds the RNG states of %d rank(s), this run has %d: random streams (dropout, "
                "drop-path) restart from a new seed, so the run is not a bitwise continuation", len(states),
                world_size)
    seed_all(rank_seed(seed, rank, step))
