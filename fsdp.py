"""Fully sharded data parallel (`--fsdp`): the wrapping of a model with FSDP2 and its sharded checkpoints.

What belongs here and nothing else:
- `shard_model`: `torch.distributed.fsdp.fully_shard` per transformer block, per tower, then the root, with the
  mixed-precision policy of `--precision`;
- `gradient_sync`: the FSDP2 counterpart of DDP's `no_sync` for gradient accumulation;
- sharded checkpoints (a `torch.distributed.checkpoint` directory in place of `checkpoint.pt`): `save_sharded`
  (atomic: a complete directory renamed into place), `copy_sharded`, `load_sharded` (onto a sharded or a plain
  model, any world size), `read_checkpoint` (a plain dict without a process group, for evaluation and export) and
  `is_sharded_checkpoint`;
- the 0-dim parameters FSDP leaves whole: `replicated_params`, `reduce_replicated_grads`.

Upstream: torch/distributed/fsdp/_fully_shard/_fully_shard.py and torch/distributed/checkpoint/ (torch 2.14.1);
the per-block then per-tower then root order follows torchtitan's `apply_fsdp` (models/llama3/parallelize.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil

import torch
import torch.nn as nn

log = logging.getLogger("clip_lab")

# transformer blocks sharded one by one (own all-gather, freed after use): timm ViT, CLIP text, HF BERT
_BLOCKS = re.compile(r"(^|\.)(visual\.blocks|text\.resblocks|text\.bert\.encoder\.layer)\.\d+$")
_TOWERS = re.compile(r"(^|\.)(visual|text)$")  # also the BYOL target's copies (target.visual, target.text)
STATE_FILE = "state.pt"  # the non-tensor parts of a sharded checkpoint (torch.save, weights_only-safe)


def mixed_precision(precision: str):
    """FSDP2's policy for `--precision`: bf16 all-gathers the parameters (and runs the forward) in bf16 and
    reduce-scatters the gradients in fp32, the sharded master weights fp32. None (no policy: fp32 all-gathers) for
    fp32 and for fp16, whose forward runs under fp16 autocast as DDP's does: fp16 parameters throughout (layer norms,
    softmax) overflowed the loss scaler's first step where DDP's autocast did not, so fp16 FSDP would not be the
    same run as fp16 DDP. fp16's GradScaler needs nothing more: on DTensor gradients its overflow check is
    all-reduced over the mesh by DTensor's dispatch (torch/distributed/tensor/_dispatch.py
    `found_inf_reduce_handler`), so every rank skips an overflowed step together."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None


def shard_model(model: nn.Module, precision: str) -> nn.Module:
    """`fully_shard` every transformer block of both towers (timm ViT `visual.blocks[i]`, CLIP text
    `text.resblocks[i]`, BERT `text.bert.encoder.layer[i]`), then each tower (its embeddings, norms, a CNN
    backbone whole), then the root (projections, temperature, heads) over the default process group, in place;
    returns the model (its class is now also an `FSDPModule`). State-dict keys are unchanged; parameters become
    DTensors sharded on dim 0, so the optimizer must be built after this call.

    Raises RuntimeError without an initialised process group (launch with torchrun/srun, or world size 1 with
    `torch.distributed` initialised)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not dist.is_initialized():
        raise RuntimeError("--fsdp needs a process group (torchrun/srun, or main.py's init on one process)")
    policy = mixed_precision(precision)
    # fully_shard takes no 0-dim parameters (the temperature, SigLIP's bias): they stay whole on every rank, and
    # `reduce_replicated_grads` averages their gradients as DDP would
    kwargs = {"ignored_params": {p for p in model.parameters() if p.ndim == 0}}
    if policy is not None:
        kwargs["mp_policy"] = policy
    names = dict(model.named_modules())
    blocks = [n for n in names if _BLOCKS.search(n)]
    towers = [n for n in names if _TOWERS.search(n)]
    for name in blocks + sorted(towers, key=lambda n: -n.count(".")):  # children before their parents
        fully_shard(names[name], **kwargs)
    fully_shard(model, **kwargs)
    for method in ("encode_image", "encode_text"):  # evaluation calls these, not forward: they all-gather too
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    log.info("FSDP: %d blocks, %d towers and the root sharded over %d rank(s)%s", len(blocks), len(towers),
             dist.get_world_size(), f", {precision} parameters with fp32 reduction" if policy else "")
    return model


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of a sharded model that FSDP does not manage (0-dim ones: plain tensors)."""
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def reduce_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of `replicated_params` over ranks (one all-reduce; a missing gradient counts as 0),
    as DDP's reduction (and FSDP's reduce-scatter for the others) does. A collective: every rank calls it after
    the step's last backward."""
    import torch.distributed as dist

    params = replicated_params(model)
    if not params or dist.get_world_size() == 1:
        return
    flat = torch.stack([(p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(()) for p in params])
    dist.all_reduce(flat)  # (n,) sum over ranks
    flat /= dist.get_world_size()
    for p, g in zip(params, flat, strict=True):
        p.grad = g.to(p.dtype).reshape(p.shape).clone()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Within the block the backward of a sharded model accumulates unsharded gradients without the
    reduce-scatter (`enabled=False`, FSDP2's `set_requires_gradient_sync`; DDP's `no_sync`); the flag is read
    by the backward, so the backward must run inside the block. Restored to syncing at the end."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# --------------------------------------------------------------------------- sharded checkpoints
def is_sharded_checkpoint(path: str) -> bool:
    """True when `path` is a directory written by `save_sharded` (a DCP `.metadata` and our `state.pt`)."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata")) and \
        os.path.exists(os.path.join(path, STATE_FILE))


def _tensor_state(model: nn.Module, optimizer) -> tuple[dict, list]:
    """({"model": ..., "optimizer": {"state": ...}}, the optimizer's param_groups) of `get_state_dict` (keys are
    parameter names whatever the world size; DTensor shards on a sharded model). The param_groups (floats,
    names) go to state.pt, so the DCP files hold tensors only."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": {"state": optim_state["state"]}}, optim_state["param_groups"]


def save_sharded(path: str, model: nn.Module, optimizer, extra: dict) -> None:
    """Write the checkpoint directory `path` with torch.distributed.checkpoint: model and optimizer tensors as
    each rank's shards (`__<rank>_0.distcp` + `.metadata`), and `extra` (the checkpoint's other keys: progress,
    RNG states of every rank, args, model_config, optimizer param_groups; weights_only-safe) in `state.pt` by
    rank 0. Atomic: everything goes to a `.tmp_*` directory beside `path` that replaces `path` only once complete
    (`experiment.replace_dir`; the previous checkpoint stays whole until then). A collective: every rank calls it
    (the model may also be a plain, unsharded one)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import experiment
    import utils

    state, param_groups = _tensor_state(model, optimizer)
    tmp = experiment.temporary_dir(path) if utils.get_rank() == 0 else None
    tmp = utils.all_gather_object(tmp)[0]  # rank 0's directory, for every rank
    dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    if utils.get_rank() == 0:
        utils.save_atomic({**extra, "param_groups": param_groups}, os.path.join(tmp, STATE_FILE))
        experiment.replace_dir(tmp, path)
    if dist.is_initialized():
        dist.barrier()  # no rank goes on (to a next save, or the end) before the directory is in place


def copy_sharded(src: str, dst: str) -> None:
    """`dst` becomes a copy of the sharded checkpoint `src` (checkpoint_best.pt), atomically as `save_sharded`."""
    import experiment

    tmp = experiment.temporary_dir(dst)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    experiment.replace_dir(tmp, dst)


def _reader(path: str):
    """DCP's FileSystemReader whose `.metadata` (a pickle) is read with an unpickler admitting only DCP's own
    metadata classes, torch.Size and dtypes (torch's reader uses plain `pickle.load`)."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    import readers

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            where = os.path.join(path, ".metadata")
            with open(where, "rb") as f:
                data = f.read()
            try:
                metadata = readers.restricted_loads(data, where, _METADATA_GLOBALS)
            except (pickle.UnpicklingError, EOFError, ValueError) as exc:
                raise RuntimeError(f"cannot read sharded checkpoint metadata {where!r}: {exc}") from exc
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


# what DCP's `.metadata` pickle names (torch 2.14.1): its metadata dataclasses, torch.Size, dtypes, the layout lookup
# by name, and the checkpoint path it was saved to (a PurePath: data only)
_METADATA_GLOBALS = frozenset(
    {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    | {("torch", name) for name in ("Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16",
                                    "int8", "uint8", "bool", "complex64")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
       ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")})


def load_sharded(path: str, model: nn.Module, optimizer, param_groups: list[dict]) -> None:
    """Load the checkpoint directory `path` (`save_sharded`) into `model` and `optimizer`, sharded or plain, on
    any world size (DCP reshards by parameter name); `param_groups` are the optimizer's, from the checkpoint's
    state.pt, which the caller has read already (`read_checkpoint`, or utils.load_checkpoint of STATE_FILE). A
    collective when a process group is up. Tensors are read by DCP with torch.load(weights_only=True), `.metadata`
    by `_reader`'s restricted unpickler; nothing else is unpickled."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state, _ = _tensor_state(model, optimizer)
    dcp.load(state, storage_reader=_reader(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optimizer"]["state"], "param_groups": param_groups})


def read_checkpoint(path: str) -> dict:
    """A sharded checkpoint directory as one plain dict, without a process group or a model: state.pt's keys
    and "model", the full state_dict (CPU tensors, shapes and dtypes from `.metadata`). For evaluation and export
    (weights.read_state_dict); the optimizer's tensors are not read."""
    import torch.distributed.checkpoint as dcp

    import utils

    extra = utils.load_checkpoint(os.path.join(path, STATE_FILE))
    reader = _reader(path)
    model = {fqn.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for fqn, meta in reader.read_metadata().state_dict_metadata.items() if fqn.startswith("model.")}
    dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return {**extra, "model": model}
