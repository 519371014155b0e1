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
    sharded: bool = False  # the model is sharded with FSDP2 (--fsdp: no sparse embedding gradients)

    @classmethod
    def from_args(cls, args, device: torch.device) -> StepConfig:
        return cls(device, args.accum_mode, args.precision, bool(getattr(args, "compile", False)),
                   bool(getattr(args, "fsdp", False)))


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

    def update(self, loss_dict: dict[str, torch.Tensor], n: int) -> None:
        for key, value in loss_dict.items():
            self.meters.setdefault(key, utils.SmoothedValue()).update(float(value.detach()), n)
        self.window_steps += 1

    def close_window(self) -> tuple[dict[str, float], int, float, float]:
        """(window means over the global batch, steps, elapsed s, data time s) of the window, and a new window
        starts. A collective (every rank calls it): each rank's means are averaged over ranks in one all-reduce,
        so the logged loss is that of the global batch whatever the number of ranks (the ranks' micro-batches
        have the same size)."""
        window = utils.all_reduce_means({key: m.window_avg() for key, m in self.meters.items()})
        out = (window, self.window_steps, time.perf_counter() - self.window_start, self.data_time)
        self.window_steps, self.window_start, self.data_time = 0, time.perf_counter(), 0.0
        return out

    def epoch_means(self) -> dict[str, float]:
        """Epoch means averaged over ranks (a collective: every rank calls it)."""
        return utils.all_reduce_means({key: m.global_avg for key, m in self.meters.items()})


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
def to_device(batch, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A loader batch on the device; token tensors (int64, as both tokenizers return) lose their all-padding
    columns on the host first (`models.trim_padding`)."""
    return tuple((models.trim_padding(t) if t.dtype == torch.int64 and t.ndim >= 2 else t)
                 .to(device, non_blocking=True) for t in batch)


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
        micro.append(to_device(batch, cfg.step.device))
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
    window, steps, elapsed, data_time = meters.close_window()
    record = {"type": "train", "epoch": state.epoch, "global_step": state.step, "lr": optimizer.param_groups[0]["lr"],
              "logit_scale": float(unwrap(model).logit_scale.detach().exp()),
              "samples_per_s": steps * cfg.global_batch / max(elapsed, 1e-9),
              "data_time_s": data_time, "memory_mb": memory_mb(cfg.step.device), **window}
    log.info("epoch %d step %d/%d | %s | %.1f samples/s | data %.2fs | lr %.2e | scale %.2f | mem %.0f MB",
             state.epoch, state.step_in_epoch, cfg.steps_per_epoch,
             " ".join(f"{k} {v:.4f}" for k, v in window.items()), record["samples_per_s"], data_time,
             record["lr"], record["logit_scale"], record["memory_mb"])
    run_log.write(record)
