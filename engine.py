"""The training loop: `train_one_epoch`, exact and naive gradient accumulation, non-finite handling and
progress logging (the layout of MAE's `engine_pretrain.py` beside its `main_pretrain.py`).

The loop gets typed inputs (`LoopConfig`, `RunState`, `EpochMeters`, `RunLog`) and never calls back into
the driver: it returns when the epoch ends, `--max-steps` is reached or a `--save-every-steps` checkpoint is
due (`Pause`), and main.py decides what to do (write the checkpoint, validate, continue the same epoch).
"""
from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import math
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import datasets
import experiment
import fsdp
import models
import utils

log = logging.getLogger("clip_lab")


# --------------------------------------------------------------------------- typed state
@dataclass
class RunState:
    """Everything about progress that a checkpoint must restore."""

    epoch: int = 0
    step: int = 0  # optimizer steps done in total
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    best_metric: float = -math.inf
    nonfinite: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # of the last validation that ran
    metrics_step: int | None = None  # the step `metrics` were measured at


@dataclass(frozen=True)
class StepConfig:
    """How one optimizer step runs its micro-batches (`forward_backward`)."""

    device: torch.device = torch.device("cpu")
    accum_mode: str = "exact"  # exact | naive (see forward_backward)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast dtype)
    compiled: bool = False  # the model runs under torch.compile (no sparse embedding gradients)
    text_bucket: int = 1  # token lengths are trimmed to a multiple of this (`to_device`)
    sharded: bool = False  # the model is sharded with FSDP2 (--fsdp: no sparse embedding gradients)

    @classmethod
    def from_args(cls, args, device: torch.device) -> StepConfig:
        compiled = bool(getattr(args, "compile", False))
        return cls(device, args.accum_mode, args.precision, compiled,
                   text_bucket(getattr(args, "text_bucket", None), compiled), bool(getattr(args, "fsdp", False)))


DEFAULT_COMPILE_TEXT_BUCKET = 16


def text_bucket(flag: int | None, compiled: bool) -> int:
    """The --text-bucket in force: the flag, else 16 under --compile (at most ceil(77 / 16) = 5 token lengths,
    one graph each) and 1 (the exact trimmed length) in eager mode."""
    if flag is not None:
        return flag
    return DEFAULT_COMPILE_TEXT_BUCKET if compiled else 1


def compile_model(model: nn.Module, bucket: int, context_length: int, backend: str = "inductor") -> int:
    """torch.compile `model`'s forward in place (nn.Module.compile: state_dict keys, hooks and checkpoints stay
    those of the eager module) with static shapes: one graph per token length, i.e. per --text-bucket (`to_device`
    trims to multiples of `bucket`), times 2 for the no-grad and grad forwards of exact accumulation. Dynamo's
    recompile limit (8 per frame by default, past which it silently runs eager) is raised to that bound;
    returns it."""
    graphs = 2 * -(-context_length // bucket)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
    model.compile(backend=backend, dynamic=False)
    return graphs


@dataclass(frozen=True)
class LoopConfig:
    """What `train_one_epoch` needs besides the model: the step, the schedule's shape and the cadences."""

    step: StepConfig
    update_freq: int  # micro-batches per optimizer step
    batch_size: int  # micro-batch size per rank
    global_batch: int  # samples per optimizer step over all ranks
    steps_per_epoch: int
    total_steps: int
    print_freq: int = 10
    flops: TrainFlops | None = None  # model FLOPs per sample (tflops_per_s in the log)
    peak_flops: float | None = None  # FLOP/s of one device at --precision (mfu in the log)
    save_every_steps: int = 0  # 0: checkpoints at epoch ends only
    max_steps: int | None = None
    max_nonfinite: int = 0
    dump_dir: str = "."  # where a non-finite step's batch is saved


class Pause(enum.Enum):
    """Why `train_one_epoch` returned."""

    EPOCH_END = "epoch_end"
    MAX_STEPS = "max_steps"  # --max-steps reached mid-epoch
    CHECKPOINT_DUE = "checkpoint_due"  # a --save-every-steps boundary: save, then call again to continue


@dataclass
class EpochMeters:
    """Running means of the loss dict over the epoch and the current logging window, and the window's
    timing (kept across `Pause.CHECKPOINT_DUE` returns)."""

    meters: dict[str, utils.SmoothedValue] = field(default_factory=dict)
    window_steps: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    data_time: float = 0.0
    window_flops: float = 0.0  # model FLOPs of this rank's micro-batches in the window

    def update(self, loss_dict: dict[str, torch.Tensor], n: int) -> None:
        for key, value in loss_dict.items():
            self.meters.setdefault(key, utils.SmoothedValue()).update(float(value.detach()), n)
        self.window_steps += 1

    def close_window(self) -> tuple[dict[str, float], int, float, float, float]:
        """(window means over the global batch, steps, elapsed s, data time s, TFLOP/s per rank) of the window,
        and a new window starts. A collective (every rank calls it): each rank's means (and its model FLOP/s)
        are averaged over ranks in one all-reduce, so the logged loss is that of the global batch whatever the
        number of ranks (the ranks' micro-batches have the same size)."""
        elapsed = time.perf_counter() - self.window_start
        window = utils.all_reduce_means({**{key: m.window_avg() for key, m in self.meters.items()},
                                         TFLOPS_KEY: self.window_flops / max(elapsed, 1e-9) / 1e12})
        out = (window, self.window_steps, elapsed, self.data_time, window.pop(TFLOPS_KEY))
        self.window_steps, self.window_start, self.data_time, self.window_flops = 0, time.perf_counter(), 0.0, 0.0
        return out

    def epoch_means(self) -> dict[str, float]:
        """Epoch means averaged over ranks (a collective: every rank calls it)."""
        return utils.all_reduce_means({key: m.global_avg for key, m in self.meters.items()})


TFLOPS_KEY = "\0tflops_per_s"  # the rank's model TFLOP/s in close_window's all-reduce (no loss key clashes)


class RunLog:
    """log.txt JSON lines (and wandb points) of rank 0; other ranks write nothing."""

    def __init__(self, path: str | None, wandb_run=None) -> None:
        self.path, self.wandb_run = path, wandb_run

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))})


class NonFiniteLoss(RuntimeError):
    """A step whose loss is not finite on some rank; args[0] holds what to dump."""


class NonFiniteStop(experiment.RunStopped):
    """The run stops after more than --max-nonfinite non-finite losses (the message names the dump)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# --------------------------------------------------------------------------- FLOPs and MFU
# Dense peak TFLOP/s of one GPU per --precision (no 2:4 sparsity; fp32 = the CUDA cores, not TF32, which torch
# uses for float32 matmuls only when asked), keyed by a substring of torch.cuda.get_device_name(), the most
# specific first. Sources, the vendor's datasheets: NVIDIA H200 Tensor Core GPU datasheet (SXM / NVL), H100
# Tensor Core GPU datasheet (SXM / PCIe / NVL; the tables' bf16/fp16 figures are with sparsity: halved here),
# A100 Tensor Core GPU datasheet, V100 Tensor Core GPU datasheet (SXM2 / PCIe; no bf16 units), L40S datasheet,
# NVIDIA Ada GPU architecture whitepaper appendix (GeForce RTX 4090: fp16/bf16 tensor with fp32 accumulate, the
# mode torch uses). GPUs without a datasheet figure (the A10G of AWS g5 instances) are left out: pass
# --peak-tflops for them.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.0}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),  # SXM4 and PCIe alike
    ("V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # SXM2
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
)
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense peak TFLOP/s for a GPU name (torch.cuda.get_device_name) at fp32/bf16/fp16, or None
    for an unknown GPU or a precision it has no units for (V100 bf16)."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


@functools.cache
def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """Measured dense matmul peak: best FLOP/s of an n x n x n `torch.mm` (2 n^3 FLOPs) repeated for `seconds`
    on this machine (cached per process). Constant operands: the global RNG is not drawn from."""
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == math.inf:
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(FLOP/s of one device at `precision`, where the figure comes from): --peak-tflops when given, else the
    GPU table (`GPU_PEAK_TFLOPS`), else on CPU the measured matmul peak at the precision's dtype (1024^3 matmul,
    0.25 s); (None, why) for an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = gpu_peak_tflops(name, precision)
        if tflops is None:
            return None, f"no {precision} peak known for {name!r}: pass --peak-tflops for mfu"
        return tflops * 1e12, f"datasheet peak of {name}"
    return matmul_peak_flops(device, PRECISION_DTYPES[precision], 1024, 0.25), "measured CPU matmul peak"


def register_cpu_sdpa_flops() -> None:
    """Count CPU flash attention in FlopCounterMode (torch registers only the CUDA SDPA kernels)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or fwd in fc.flop_registry or fwd.default in fc.flop_registry:
        return

    @fc.register_flop_formula(fwd)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(bwd)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


@dataclass(frozen=True)
class TrainFlops:
    """Model training FLOPs (forward + backward) per sample as a function of the token length L the batch was
    trimmed to: f(L) = sum_i coeffs[i] * L^i. Exact for transformer text towers, whose matmuls are linear in L and
    whose attention is quadratic; the image tower is the constant term."""

    coeffs: tuple[float, ...]

    def per_sample(self, length: int) -> float:
        return float(sum(c * length ** i for i, c in enumerate(self.coeffs)))

    def of_batch(self, batch: tuple[torch.Tensor, ...]) -> float:
        """FLOPs of one (micro-)batch: B x f(L), L = the last dimension of its token tensor."""
        length = next((t.shape[-1] for t in batch if is_tokens(t)), 0)
        return batch[0].shape[0] * self.per_sample(length)


def count_train_flops(model: nn.Module, sample: tuple[torch.Tensor, ...], context_length: int) -> TrainFlops:
    """`TrainFlops` of `model` (in training mode; frozen parameters get no weight gradient) from one composed
    sample (the dataset's tuple, no batch dimension): FlopCounterMode over forward + backward of a batch of 2
    copies (BatchNorm refuses 1 sample in training mode) at three token lengths (1, L/2, L; the tokens without
    padding, EOT last), the quadratic through them. The model is left as it was: every `.grad` is put back after
    the counting backward, BatchNorm statistics and the RNG are restored.
    Counted: matmuls, convolutions and attention, the FLOPs of MFU (Chowdhery et al., 2022, PaLM, appendix B);
    not counted: the loss (B x B logits: < 0.1 % of ViT-B/16 CLIP), elementwise work, exact accumulation's
    extra no-grad forwards; counted twice: the forward that --checkpoint-grad recomputes."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_sdpa_flops()
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    lengths, counts, rng = sorted({1, max(1, context_length // 2), context_length}), [], _rng_snapshot(device)
    was_training = model.training
    model.train()
    with frozen_batchnorm_stats(model):
        for length in lengths:
            inputs = tuple(_unpadded(t, length) if is_tokens(t[None]) else t.expand(2, *t.shape) for t in sample)
            saved = [p.grad for p in trainable]  # backward() rather than autograd.grad(): tensor hooks of some
            for p in trainable:  # models (SIGLIP's) refuse to run inside autograd.grad; the gradients are put back
                p.grad = None
            try:
                with FlopCounterMode(display=False) as counter:
                    out = model(*(t.to(device) for t in inputs))
                    sum(v.float().sum() for v in out.values() if v.requires_grad).backward()
            finally:
                for p, grad in zip(trainable, saved):
                    p.grad = grad
            counts.append(float(counter.get_total_flops()) / 2)
    model.train(was_training)
    _rng_restore(rng, device)
    coeffs = np.polynomial.polynomial.polyfit(lengths, counts, len(lengths) - 1)
    return TrainFlops(tuple(float(c) for c in coeffs))


def _unpadded(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """(2, ..., length) token ids without padding (the towers keep every column): id 1, the sample's largest id
    (EOT for CLIP BPE, [SEP] for BERT) last."""
    out = torch.ones(2, *tokens.shape[:-1], length, dtype=tokens.dtype)
    out[..., -1] = tokens.max()
    return out


# --------------------------------------------------------------------------- one optimizer step
def _rng_snapshot(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_restore(snapshot, device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)


def forward_backward(model, criterion, micro_batches, step: StepConfig, scaler) -> dict[str, torch.Tensor]:
    """Forward + backward over the k micro-batches of one optimizer step; returns the loss dict.

    k = 1: plain step. `naive`: each micro-batch is its own contrastive batch, loss / k.
    `exact` (Cui et al. 2021, ZeroVL; Pham et al. 2021, BASIC): a no-grad pass caches every
    micro-batch's per-sample outputs; then micro-batch j is recomputed with grad (same RNG state)
    and the loss is taken over the whole k*B batch with the cached outputs of the others, so the
    summed gradient equals the gradient of one k*B batch. The last micro-batch's grad forward is the
    end of the caching pass (its graph is kept and it goes first), so it is not recomputed. Scalar
    outputs (the temperature) keep their graph only in the last backward, the one DDP syncs, so their
    gradient is counted once and reaches DDP's reduction. A model sharded with FSDP2 (`--fsdp`) skips the
    reduce-scatter in the other backwards the same way (`no_sync_context`) and averages its unsharded 0-dim
    parameters' gradients after the last one (`fsdp.reduce_replicated_grads`).
    A non-finite loss raises NonFiniteLoss only after every backward ran and all ranks agreed, so no
    rank leaves a collective behind (the caller discards the step's gradients on every rank).
    """
    k = len(micro_batches)
    no_sync = no_sync_context(model)
    checks: list[tuple[torch.Tensor, dict]] = []  # (finite flag on the device, what to dump) per backward

    def backward(loss_dict: dict, batch, outputs, divisor: int = 1) -> None:
        # no host sync here: the flags are read once, after the last backward
        checks.append((torch.isfinite(loss_dict["loss"].detach()), {"batch": batch, "outputs": outputs,
                                                                     "loss": loss_dict}))
        scaler.scale(loss_dict["loss"] / divisor).backward()

    if k == 1 or step.accum_mode == "naive":
        for j, batch in enumerate(micro_batches):
            with (no_sync() if j < k - 1 else contextlib.nullcontext()), utils.autocast(step.precision, step.device):
                loss_dict = criterion(model(*batch))
                backward(loss_dict, batch, None, k)
    else:
        loss_dict = _exact_accumulation(model, criterion, micro_batches, step, no_sync, backward)
    if step.sharded:
        fsdp.reduce_replicated_grads(model)
    finite = torch.stack([flag for flag, _ in checks]).tolist()  # the step's one host sync
    bad = next((payload for ok, (_, payload) in zip(finite, checks) if not ok), None)
    if not utils.all_ranks_true(bad is None):
        raise NonFiniteLoss(bad or {"batch": micro_batches[-1], "outputs": None, "loss": loss_dict})
    return loss_dict


def no_sync_context(model):
    """A context factory under which a backward accumulates local gradients without the ranks' reduction: DDP's
    `no_sync`, FSDP2's `set_requires_gradient_sync(False)` (`fsdp.gradient_sync`), else a no-op."""
    if isinstance(model, DistributedDataParallel):
        return model.no_sync
    if fsdp.is_sharded(model):
        return functools.partial(fsdp.gradient_sync, model, False)
    return contextlib.nullcontext


@contextlib.contextmanager
def sparse_embedding_grads(model: nn.Module):
    """Within the block, every trainable `nn.Embedding` gives a sparse (rows-used-only) weight gradient that
    its backward adds in place into a dense `.grad` (zeros allocated here when the step starts without one).

    For exact accumulation: each of the k backwards then touches only the B*L rows its tokens used,
    instead of building a dense vocab x width gradient (49,408 x 512 = 101 MB for CLIP's BPE table) and
    adding it to `.grad`; `.grad` stays dense, so DDP, AdamW and clipping see what they always see. The
    flag is read at forward time, so a forward and its backward agree.
    """
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad
                  and not m.sparse]
    for m in embeddings:
        if m.weight.grad is None:
            m.weight.grad = torch.zeros_like(m.weight)
        m.sparse = True
    try:
        yield
    finally:
        for m in embeddings:
            m.sparse = False


def _exact_accumulation(model, criterion, micro_batches, step: StepConfig, no_sync, backward) -> dict:
    """The exact scheme of `forward_backward`: 2k-1 forwards + k backwards, 5/4 of one k*B step at k=4.

    Embedding gradients are accumulated sparsely (`sparse_embedding_grads`), except under torch.compile
    (inductor does not take sparse tensors) and FSDP (its reduce-scatter takes dense gradients)."""
    k = len(micro_batches)
    with contextlib.nullcontext() if step.compiled or step.sharded else sparse_embedding_grads(model):
        cached, rng, last, rng_end = _cache_pass(model, micro_batches, step, no_sync)
        for n, j in enumerate([k - 1] + list(range(k - 1))):  # the synced backward (n = k-1) comes last
            loss_dict = _recompute_backward(model, criterion, micro_batches, j, cached, rng, last, step, no_sync,
                                            backward, synced=n == k - 1)
    _rng_restore(rng_end, step.device)
    return loss_dict


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """BatchNorm running statistics and counters are put back as they were when the block ends.

    Exact accumulation runs micro-batches 0..k-2 twice in training mode (cached, then recomputed); without this
    each would move the running averages twice, and `num_batches_tracked` would count 2k-1 batches per step."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    saved = [[t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved, strict=True):
            for live, before in zip((m.running_mean, m.running_var, m.num_batches_tracked), buffers, strict=True):
                live.copy_(before)


def _cache_pass(model, micro_batches, step: StepConfig, no_sync):
    """No-grad forwards of micro-batches 0..k-2 (outputs cached, RNG states kept, BatchNorm statistics left
    for their recompute to update) + the last one with grad."""
    cached, rng = [], []
    with utils.autocast(step.precision, step.device):
        with torch.no_grad(), frozen_batchnorm_stats(model):
            for batch in micro_batches[:-1]:
                rng.append(_rng_snapshot(step.device))
                cached.append({key: v.detach() for key, v in model(*batch).items() if v.ndim > 0})
        with no_sync():
            last = model(*micro_batches[-1])
        cached.append({key: v.detach() for key, v in last.items() if v.ndim > 0})
    rng_end = _rng_snapshot(step.device)  # the step consumes the RNG of exactly one pass over the micro-batches
    return cached, rng, last, rng_end


def _recompute_backward(model, criterion, micro_batches, j, cached, rng, last, step: StepConfig, no_sync, backward,
                        synced: bool) -> dict:
    """Micro-batch j with grad (recomputed under its cached RNG state, or the kept last graph) against the
    cached outputs of the others, then its backward; only the synced one keeps the scalars' graph."""
    with (contextlib.nullcontext() if synced else no_sync()), utils.autocast(step.precision, step.device):
        if j == len(micro_batches) - 1:
            fresh = last
        else:
            _rng_restore(rng[j], step.device)
            fresh = model(*micro_batches[j])
        merged = {key: torch.cat([c[key] for c in cached[:j]] + [v] + [c[key] for c in cached[j + 1:]])
                  if key in cached[j] else (v if synced else v.detach()) for key, v in fresh.items()}
        loss_dict = criterion(merged)
        backward(loss_dict, micro_batches[j], merged)
    return loss_dict


def dump_nonfinite(dump_dir: str, step: int, payload: dict) -> str:
    """Save the offending batch, outputs and loss parts (tensors only) for post-mortem; returns the path."""
    rank = utils.get_rank()
    path = os.path.join(dump_dir, f"nonfinite_step{step}.pt" if rank == 0 else f"nonfinite_step{step}_rank{rank}.pt")
    batch = [t.detach().cpu() for t in payload["batch"]]
    outputs = {k: v.detach().cpu() for k, v in (payload["outputs"] or {}).items()}
    utils.save_atomic({"step": step, "batch": batch, "outputs": outputs,
                       "loss": {k: v.detach().cpu() for k, v in payload["loss"].items()}}, path)
    return path


# --------------------------------------------------------------------------- the loop
def to_device(batch, device: torch.device, bucket: int = 1) -> tuple[torch.Tensor, ...]:
    """A loader batch on the device; token tensors (int64, as both tokenizers return) lose their all-padding
    columns on the host first, to a multiple of `bucket` (`models.trim_padding`)."""
    return tuple((models.trim_padding(t, bucket) if is_tokens(t) else t).to(device, non_blocking=True)
                 for t in batch)


def is_tokens(t: torch.Tensor) -> bool:
    """Whether a batch tensor holds token ids ((B, L) or (B, V, L) int64, as both tokenizers return)."""
    return t.dtype == torch.int64 and t.ndim >= 2


def optimizer_step(model, optimizer, scaler, state: RunState, total_steps: int) -> None:
    """The end of a step: the objective's pre-step hook, the (scaled) update, logit-scale clamping and the
    objective's post-step hook (e.g. BYOLIP's EMA target)."""
    unwrap(model).before_optimizer_step(state.step)  # e.g. SWALIPV1's frozen prototypes
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    unwrap(model).clamp_logit_scale()
    unwrap(model).after_optimizer_step(state.step + 1, total_steps)


def train_one_epoch(model, criterion, batches: Iterator, optimizer, scaler, lr_schedule: np.ndarray,
                    state: RunState, cfg: LoopConfig, meters: EpochMeters, run_log: RunLog) -> Pause:
    """Optimizer steps of `cfg.update_freq` micro-batches from `batches` (the epoch's loader iterator) until the
    epoch ends, `cfg.max_steps` is reached or a `cfg.save_every_steps` checkpoint is due; returns which.

    `state` advances in place; `meters` accumulate the epoch's loss means; a progress record goes to `run_log`
    every `cfg.print_freq` steps and at the epoch's last step. A non-finite loss skips the step (consuming its
    batches, so the LR schedule and the resume position stay aligned) up to `cfg.max_nonfinite` times, then
    stops the run with the batch dumped."""
    model.train()
    micro, t_last = [], time.perf_counter()
    for batch in batches:  # a tuple of tensors, passed to model(*batch); layout set by the dataset
        micro.append(to_device(batch, cfg.step.device, cfg.step.text_bucket))
        if cfg.flops is not None:
            meters.window_flops += cfg.flops.of_batch(micro[-1])
        if len(micro) < cfg.update_freq:
            continue
        meters.data_time += time.perf_counter() - t_last
        for group in optimizer.param_groups:
            group["lr"] = float(lr_schedule[state.step])
        loss_dict = _guarded_step(model, criterion, micro, optimizer, scaler, state, cfg)
        if loss_dict:
            optimizer_step(model, optimizer, scaler, state, cfg.total_steps)
        micro = []
        state.step += 1
        state.step_in_epoch += 1
        meters.update(loss_dict, cfg.batch_size)
        if state.step % cfg.print_freq == 0 or state.step_in_epoch == cfg.steps_per_epoch:
            log_progress(model, optimizer, state, cfg, meters, run_log)
        if state.step_in_epoch >= cfg.steps_per_epoch:
            return Pause.EPOCH_END
        if cfg.max_steps and state.step >= cfg.max_steps:
            return Pause.MAX_STEPS
        if cfg.save_every_steps and state.step % cfg.save_every_steps == 0:
            return Pause.CHECKPOINT_DUE
        t_last = time.perf_counter()
    return Pause.EPOCH_END


def _guarded_step(model, criterion, micro, optimizer, scaler, state: RunState, cfg: LoopConfig) -> dict:
    """forward_backward, or {} for a skipped non-finite step; past cfg.max_nonfinite skips, SystemExit."""
    try:
        return forward_backward(model, criterion, micro, cfg.step, scaler)
    except NonFiniteLoss as exc:
        optimizer.zero_grad(set_to_none=True)
        state.nonfinite += 1
        if state.nonfinite > cfg.max_nonfinite:
            path = dump_nonfinite(cfg.dump_dir, state.step, exc.args[0])
            raise NonFiniteStop(f"non-finite loss at step {state.step} (epoch {state.epoch}); batch, features "
                             f"and loss parts saved to {path}. Lower --lr, use --precision fp32/bf16, or "
                             f"allow skips with --max-nonfinite N.") from None
        log.warning("non-finite loss at step %d skipped (%d/%d)", state.step, state.nonfinite, cfg.max_nonfinite)
        return {}  # the step consumes its batches without an update, like a GradScaler-skipped step


def memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, else the process's peak RSS (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def log_progress(model, optimizer, state: RunState, cfg: LoopConfig, meters: EpochMeters, run_log: RunLog) -> None:
    """Console line + log.txt JSON line + wandb point for the logging window that ends now."""
    window, steps, elapsed, data_time, tflops = meters.close_window()
    record = {"type": "train", "epoch": state.epoch, "global_step": state.step, "lr": optimizer.param_groups[0]["lr"],
              "logit_scale": float(unwrap(model).logit_scale.detach().exp()),
              "samples_per_s": steps * cfg.global_batch / max(elapsed, 1e-9),
              "data_time_s": data_time, "memory_mb": memory_mb(cfg.step.device), **window}
    speed = ""
    if cfg.flops is not None:
        record["tflops_per_s"] = tflops
        speed = f" | {tflops:.3g} TFLOP/s"
        if cfg.peak_flops:
            record["mfu"] = tflops * 1e12 / cfg.peak_flops
            speed += f" | MFU {100 * record['mfu']:.1f}%"
    log.info("epoch %d step %d/%d | %s | %.1f samples/s%s | data %.2fs | lr %.2e | scale %.2f | mem %.0f MB",
             state.epoch, state.step_in_epoch, cfg.steps_per_epoch,
             " ".join(f"{k} {v:.4f}" for k, v in window.items()), record["samples_per_s"], speed, data_time,
             record["lr"], record["logit_scale"], record["memory_mb"])
    run_log.write(record)


NO_DECAY_KEYS = ("logit_scale", "token_embedding", "positional_embedding", "pos_embed", "cls_token",
                 "word_embeddings", "position_embeddings", "token_type_embeddings", "class_embedding")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norm weights (ndim < 2), embeddings and logit_scale. The decayed matrices
    come first: under --fsdp --precision fp16, GradScaler's overflow check reads the placements of the first gradient
    of its list, which must be a sharded one (a replicated 0-dim temperature first fails in DTensor's dispatch)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(base: float, start: float, end: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Per-step LR: linear from `start` to `base` over warm-up, then cosine from `base` to `end`."""
    warmup = np.linspace(start, base, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps) / max(total_steps - warmup_steps, 1)
    return np.concatenate([warmup, end + 0.5 * (base - end) * (1 + np.cos(np.pi * t))])


def freeze_vision(model: nn.Module) -> None:
    """No gradients for the image tower and its projection; its BatchNorms stay in eval mode."""
    for module in (model.visual, model.image_projection):
        module.requires_grad_(False)

    def norms_in_eval(visual: nn.Module, _inputs) -> None:
        # looked up at every forward: model.train() re-enables batch statistics, SyncBN conversion swaps modules
        for m in visual.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    model.visual.register_forward_pre_hook(norms_in_eval)


def run_epochs(args, state: RunState, total_steps: int, val_name: str | None, dataset, loader, order,
               stream, train_epoch, save, validate, run_log: RunLog) -> None:
    """Epochs from `state` until the schedule's end or --max-steps. `order` (the sampler, or the stream of a wds /
    mixture run) sets each epoch's start, `stream` (None for a sampler) tracks the positions delivered;
    `train_epoch(batches, meters)` runs train_one_epoch, `save(is_best)` writes the checkpoint(s),
    `validate()` evaluates (True: best so far).

    Validation runs every --eval-freq epochs, at the last epoch and at a --max-steps stop (with --eval-freq 0:
    only at the last epoch), before the checkpoint is written, so the checkpoint holds its metrics."""
    while state.epoch < args.epochs and not (args.max_steps and state.step >= args.max_steps):
        order.set_epoch(state.epoch, state.step_in_epoch * args.update_freq)
        dataset.bad_samples.reset(state.epoch)
        batches = iter(loader) if stream is None else stream.track(iter(loader))
        meters = EpochMeters()
        try:
            while (pause := train_epoch(batches, meters)) is Pause.CHECKPOINT_DUE:
                save(is_best=False)
        except datasets.TooManyBadSamples as exc:
            raise SystemExit(f"stopping: {exc}") from None
        train_stats = meters.epoch_means()
        if dataset.bad_samples.count:
            log.warning("epoch %d: %d corrupt sample(s) replaced: %s", state.epoch, dataset.bad_samples.count,
                        dataset.bad_samples.offenders())
        stop = bool(args.max_steps and state.step >= args.max_steps)
        if pause is Pause.EPOCH_END:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        evaluated = val_name is not None and (
            state.epoch == args.epochs or (args.eval_freq > 0 and (stop or (
                pause is Pause.EPOCH_END and state.epoch % args.eval_freq == 0))))
        is_best = validate() if evaluated else False
        tests = {f"test_{k}": v for k, v in state.metrics.items()} if evaluated else {}
        if pause is Pause.EPOCH_END:
            run_log.write({"type": "epoch", "epoch": state.epoch, "global_step": state.step,
                           **{f"train_{k}": v for k, v in train_stats.items()}, **tests})
        elif tests:  # a --max-steps stop mid-epoch
            run_log.write({"type": "eval", "epoch": state.epoch, "global_step": state.step, **tests})
        save(is_best)
    if state.step >= total_steps and val_name is not None and state.metrics_step != state.step:
        save(validate())  # resumed at the schedule's end from a checkpoint whose validation never ran
