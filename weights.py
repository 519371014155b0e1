"""Pretrained weights: key-layout conversion between released checkpoints and our models, strict loading.

Layouts (openai/CLIP clip/model.py; OFA-Sys/Chinese-CLIP cn_clip/clip/model.py and utils.py, commit 31863c7):
- OpenAI CLIP: a TorchScript archive (`ViT-B-16.pt`) or a plain state_dict with `visual.*` (ViT: `conv1`,
  `class_embedding`, `positional_embedding`, `ln_pre`, `transformer.resblocks.i.{ln_1,attn.in_proj_weight,
  attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}`, `ln_post`, `proj`; RN50: OpenAI's ModifiedResNet), the text
  transformer at the top level (`token_embedding`, `positional_embedding`, `transformer.*`, `ln_final`,
  `text_projection`) and `logit_scale`. open_clip writes the same keys.
- Chinese-CLIP: `{"epoch", "step", "name", "state_dict": {"module." + OpenAI visual keys, "module.bert.*"
  (HF BertModel), "module.text_projection", "module.logit_scale"}}`.
- A Chinese RoBERTa checkpoint (`pytorch_model.bin` / a transformers folder): `bert.*` keys (or bare
  BertModel keys); the pooler and the MLM/NSP heads are not used.
- open_clip (open_clip_torch 3.3.0: factory.py, model.py, timm_model.py; a folder `<name>.json` /
  `open_clip_config.json` + `open_clip_model.safetensors`): the OpenAI keys for its native towers; a timm vision
  tower is `visual.trunk.*` (the timm model's own keys) + `visual.head.proj.weight`; SigLIP-style models add
  `logit_bias`.
- transformers (5.24.0: models/clip/modeling_clip.py, models/chinese_clip/modeling_chinese_clip.py; a folder
  `config.json` + `model.safetensors`, or sharded with `model.safetensors.index.json`): `vision_model.{embeddings.
  {class_embedding,patch_embedding,position_embedding},pre_layrnorm,encoder.layers.i.{layer_norm1,self_attn.
  {q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2},post_layernorm}`, `visual_projection.weight`, then for CLIPModel
  `text_model.{embeddings.{token,position}_embedding,encoder.layers.i.*,final_layer_norm}` and for ChineseCLIPModel
  `text_model.*` = the BertModel keys ([CLS] pooling, as Chinese-CLIP); `text_projection.weight`, `logit_scale`.
- Ours: timm ViT keys under `visual.` (`patch_embed.proj`, `cls_token`, `pos_embed`, `norm_pre`,
  `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), `text.*`, and the projections as
  `nn.Linear` (`image_projection.weight` = OpenAI `visual.proj` transposed).

Every load is strict: a source that does not cover the towers it claims, or brings keys the model
does not have, raises with the missing and unexpected keys listed (Chinese-CLIP loads strict=False and
silently leaves layers random). Files are read with `torch.load(weights_only=True)`; a TorchScript
archive is read by unpickling only its tensors (no TorchScript code is loaded or run). A NaN or infinite
weight is an error naming the tensor (`check_finite_weights`), never a plausible-looking evaluation.

CLI: `python weights.py convert-openai IN.pt OUT.pt` (TorchScript -> plain OpenAI-layout state_dict),
`python weights.py export CKPT --format openai|open_clip|hf|cnclip --out PATH [--head z|h] [--name NAME]` (our
checkpoint -> a released layout, with an export record; `export-cnclip CKPT OUT.pt` = `--format cnclip`),
`python weights.py convert PRETRAINED OUT.pt` (anything -> our state_dict).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fsdp
import models
import readers
import registry
import utils

log = logging.getLogger("clip_lab")

# scalar attributes of OpenAI's TorchScript model and the causal mask buffer: not weights
IGNORED_SOURCE_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


class WeightsError(utils.CheckpointError):
    """A checkpoint that cannot be read or does not fit the model."""


# --------------------------------------------------------------------------- reading files
class _ScriptObject:
    """Placeholder for a TorchScript module in data.pkl: it only keeps its attribute dict."""

    def __init__(self, *args) -> None:
        self.state: dict = {}

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {}


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None, *rest):
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


def _identity(value, *_type):
    return value


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl allowing only tensors, dicts and module placeholders."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch.jit._pickle" and (name.startswith("build_") or name == "restore_type_tag"):
            return _identity  # typed-list and type-tag wrappers of plain values
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"TorchScript archive references {module}.{name}, which a weights-only "
                                     "reader does not construct")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def read_torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (e.g. OpenAI's ViT-B-16.pt), without loading
    or running its code: data.pkl is unpickled with only tensor/dict constructors allowed."""
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise WeightsError(f"{path}: a zip file without <name>/data.pkl is not a TorchScript archive")
        prefix = pkl[0].split("/")[0]
        with archive.open(pkl[0]) as f:
            root = _TensorOnlyUnpickler(f, archive, prefix).load()
    out: dict[str, torch.Tensor] = {}

    def walk(obj: _ScriptObject, name: str) -> None:
        for key, value in obj.state.items():
            if isinstance(value, torch.Tensor):
                out[name + key] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{name}{key}.")

    if not isinstance(root, _ScriptObject):
        raise WeightsError(f"{path}: data.pkl does not hold a scripted module")
    walk(root, "")
    return out


# weight files of a transformers folder and of an open_clip folder (open_clip/constants.py), in the order tried
FOLDER_WEIGHTS = ("pytorch_model.bin", "model.safetensors", "open_clip_model.safetensors",
                  "open_clip_pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # transformers' sharded weights


def _read_shards(index_path: str) -> dict[str, torch.Tensor]:
    """A sharded transformers checkpoint: the index's `weight_map` names the file of every key."""
    with open(index_path, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{index_path}: not a shard index ({exc})") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index_path}: no 'weight_map' (key -> shard file)")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(read_state_dict(os.path.join(os.path.dirname(index_path), shard)))
    return out


def read_state_dict(path: str) -> dict:
    """A checkpoint file or folder -> the object it holds (weights_only), TorchScript archives as state_dicts.

    A folder is a transformers or open_clip one: the first of FOLDER_WEIGHTS, else a sharded SHARD_INDEXES; or an
    --fsdp run's checkpoint directory (`fsdp.read_checkpoint`: the checkpoint's keys, "model" gathered whole, no
    optimizer), read without a process group."""
    if fsdp.is_sharded_checkpoint(path):
        return fsdp.read_checkpoint(path)
    if os.path.isdir(path):
        for name in FOLDER_WEIGHTS:
            if os.path.exists(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        for name in SHARD_INDEXES:
            if os.path.exists(os.path.join(path, name)):
                return _read_shards(os.path.join(path, name))
        raise WeightsError(f"{path}: folder without any of {', '.join(FOLDER_WEIGHTS + SHARD_INDEXES)}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"cannot load {path!r}: {type(exc).__name__}: {exc}") from exc
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names):
            try:
                return read_torchscript_state_dict(path)
            except pickle.UnpicklingError as exc:
                raise WeightsError(
                    f"{path}: cannot read the TorchScript archive without running it ({exc}). If you trust the "
                    "file, convert it once with torch.jit.load(path).state_dict() and torch.save, then pass the "
                    "result") from exc
    try:
        return utils.load_checkpoint(path)
    except utils.CheckpointError as exc:
        raise WeightsError(str(exc)) from exc


# --------------------------------------------------------------------------- layouts
_VIT_BLOCK = [("ln_1", "norm1"), ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
              ("attn.out_proj", "attn.proj"), ("ln_2", "norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
_VIT_TOP = [("conv1.weight", "patch_embed.proj.weight"), ("ln_pre", "norm_pre"), ("ln_post", "norm")]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def _rename_blockwise(key: str, blocks: tuple[str, str], block_pairs: list[tuple[str, str]],
                      top_pairs: list[tuple[str, str]], top_prefix: str = "") -> str | None:
    """`key` in another layout: `{blocks[0]}.{i}.rest` -> `{blocks[1]}.{i}.` + rest renamed by `block_pairs`, else
    `top_prefix` + the key renamed by `top_pairs`; None when neither table names it (a block key whose rest no
    block pair names is tried against the top table)."""
    m = re.match(rf"{re.escape(blocks[0])}\.(\d+)\.(.+)", key)
    rest = _rename(m.group(2), block_pairs) if m else None
    if rest is not None:
        return f"{blocks[1]}.{m.group(1)}.{rest}"
    top = _rename(key, top_pairs)
    return None if top is None else top_prefix + top


def openai_visual_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI/Chinese-CLIP `visual.*` keys (no prefix) -> ours (`visual.*` and `image_projection.weight`)."""
    out = {}
    if "attnpool.c_proj.weight" in sd:  # ModifiedResNet: our RN50 backbone is the same module
        return {f"visual.{k}": v for k, v in sd.items()}
    if any(k.startswith("trunk.") for k in sd):  # open_clip's TimmModel: our timm backbone + a linear head
        return {("image_projection.weight" if k == "head.proj.weight" else
                 f"visual.{k.removeprefix('trunk.')}" if k.startswith("trunk.") else f"unexpected:visual.{k}"): v
                for k, v in sd.items()}
    for key, value in sd.items():
        if key == "class_embedding":
            out["visual.cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["visual.pos_embed"] = value.unsqueeze(0)
        elif key == "proj":
            out["image_projection.weight"] = value.t().contiguous()
        elif new := _rename_blockwise(key, ("transformer.resblocks", "visual.blocks"), _VIT_BLOCK, _VIT_TOP, "visual."):
            out[new] = value
        else:
            out["unexpected:visual." + key] = value
    return out


def ours_visual_to_openai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `openai_visual_to_ours`: our `visual.*` + `image_projection.weight` -> OpenAI keys (no prefix)."""
    out = {}
    inv_block = [(b, a) for a, b in _VIT_BLOCK]
    inv_top = [(b, a) for a, b in _VIT_TOP]
    resnet = any(k.startswith("visual.attnpool.") for k in sd)
    for key, value in sd.items():
        if key == "image_projection.weight":
            out["proj"] = value.t().contiguous()
            continue
        if not key.startswith("visual."):
            continue
        key = key[len("visual."):]
        if resnet:
            out[key] = value
        elif key == "cls_token":
            out["class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["positional_embedding"] = value.squeeze(0)
        elif new := _rename_blockwise(key, ("blocks", "transformer.resblocks"), inv_block, inv_top):
            out[new] = value
        else:
            raise WeightsError(f"our vision key visual.{key} has no OpenAI/Chinese-CLIP equivalent")
    return out


_TEXT_BLOCK = [("attn.in_proj_weight", "attn.in_proj.weight"), ("attn.in_proj_bias", "attn.in_proj.bias")]


def openai_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full OpenAI CLIP state_dict (or open_clip's) -> our CLIP keys; unknown keys are kept as `unexpected:`."""
    sd = {k: v for k, v in sd.items() if k.split(".")[-1] not in IGNORED_SOURCE_KEYS}
    out = openai_visual_to_ours({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})
    for key, value in sd.items():
        if key.startswith("visual."):
            continue
        if key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key in ("logit_scale", "logit_bias"):  # logit_bias: open_clip's SigLIP-style models
            out[key] = value.reshape(())
        elif key.startswith("transformer.resblocks."):
            rest = key[len("transformer."):]
            for src, dst in _TEXT_BLOCK:
                rest = rest.replace(src, dst)
            out["text." + rest] = value
        elif key.split(".")[0] in ("token_embedding", "positional_embedding", "ln_final"):
            out["text." + key] = value
        else:
            out["unexpected:" + key] = value
    return out


def ours_to_openai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIP state_dict (OpenAI text transformer) -> OpenAI/open_clip keys."""
    out = {f"visual.{k}": v for k, v in ours_visual_to_openai(sd).items()}
    for key, value in sd.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key == "logit_scale":
            out[key] = value
        elif key.startswith("text.resblocks."):
            rest = key[len("text."):]
            for src, dst in _TEXT_BLOCK:
                rest = rest.replace(dst, src)
            out["transformer." + rest] = value
        elif key.startswith("text."):
            out[key[len("text."):]] = value
    return out


def cnclip_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Chinese-CLIP state_dict (with or without `module.`) -> our CNCLIP keys; the BERT pooler is dropped."""
    sd = {k.removeprefix("module."): v for k, v in sd.items() if "bert.pooler" not in k}
    out = openai_visual_to_ours({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})
    for key, value in sd.items():
        if key.startswith("visual."):
            continue
        if key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "logit_scale":
            out["logit_scale"] = value.reshape(())
        elif key.startswith("bert."):
            out["text." + key] = value
        else:
            out["unexpected:" + key] = value
    return out


def ours_to_cnclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CNCLIP state_dict -> Chinese-CLIP's DDP state_dict (`module.` prefix)."""
    out = {f"module.visual.{k}": v for k, v in ours_visual_to_openai(sd).items()}
    for key, value in sd.items():
        if key == "text_projection.weight":
            out["module.text_projection"] = value.t().contiguous()
        elif key == "logit_scale":
            out["module.logit_scale"] = value
        elif key.startswith("text.bert."):
            out["module." + key[len("text."):]] = value
        elif key.startswith("text."):
            raise WeightsError(f"{key}: Chinese-CLIP's text tower is a BERT; this model's text tower is not")
    return out


def bert_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Chinese RoBERTa/BERT checkpoint (`bert.*` or bare BertModel keys) -> our `text.bert.*` keys.

    The pooler and the pre-training heads (`cls.*`) are not part of the tower and are dropped, as
    Chinese-CLIP does; `position_ids` buffers are dropped too."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key.startswith("cls.") or "pooler." in key or key.endswith("position_ids"):
            continue
        key = key if key.startswith("bert.") else "bert." + key
        # old TF-converted checkpoints name LayerNorm parameters gamma/beta
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        out["text." + key] = value
    return out


def ours_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIP state_dict -> open_clip's CLIP keys: the OpenAI layout, a timm vision tower (our R50) as open_clip's
    TimmModel (`visual.trunk.*` + `visual.head.proj.weight`), and `logit_bias` (SigLIP)."""
    if "visual.layer4.0.conv1.weight" not in sd or "visual.attnpool.c_proj.weight" in sd:  # not a timm ResNet
        out = ours_to_openai(sd)
    else:
        out = {f"visual.trunk.{k.removeprefix('visual.')}": v for k, v in sd.items() if k.startswith("visual.")}
        out["visual.head.proj.weight"] = sd["image_projection.weight"]
        out.update(ours_to_openai({k: v for k, v in sd.items() if not k.startswith(("visual.", "image_projection."))}))
    if "logit_bias" in sd:
        out["logit_bias"] = sd["logit_bias"]
    return out


# transformers' CLIP towers: OpenAI block names -> HF names; the fused attn.in_proj is split into q/k/v_proj
_HF_BLOCK = [("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
_HF_VISION = [("conv1.weight", "embeddings.patch_embedding.weight"), ("class_embedding", "embeddings.class_embedding"),
              ("positional_embedding", "embeddings.position_embedding.weight"), ("ln_pre", "pre_layrnorm"),
              ("ln_post", "post_layernorm")]
_HF_TEXT = [("token_embedding", "embeddings.token_embedding"),
            ("positional_embedding", "embeddings.position_embedding.weight"), ("ln_final", "final_layer_norm")]
_QKV = ("q_proj", "k_proj", "v_proj")
_HF_BUFFERS = ("position_ids", "token_type_ids")  # index buffers some transformers versions save; not weights


def _transformer_to_hf(sd: dict[str, torch.Tensor], top: list[tuple[str, str]], where: str) -> dict[str, torch.Tensor]:
    """One OpenAI-layout transformer tower (keys without `where`, its prefix) -> transformers' keys (no prefix)."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if m and m.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = m.group(2).rsplit("_", 1)[1]
            for name, part in zip(_QKV, value.chunk(3, dim=0)):  # in_proj rows are [q; k; v]
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}.{kind}"] = part.contiguous()
        elif new := _rename_blockwise(key, ("transformer.resblocks", "encoder.layers"), _HF_BLOCK, top):
            out[new] = value
        else:
            raise WeightsError(f"{where}{key} has no equivalent in transformers' CLIP towers")
    return out


def _transformer_from_hf(sd: dict[str, torch.Tensor], top: list[tuple[str, str]],
                         where: str) -> dict[str, torch.Tensor]:
    """Inverse of `_transformer_to_hf` (q/k/v_proj concatenated back); keys it does not know are returned under
    their full transformers name (`where` + key), for the caller to report as unexpected."""
    inv_block, inv_top = [(b, a) for a, b in _HF_BLOCK], [(b, a) for a, b in top]
    out, qkv = {}, {}
    for key, value in sd.items():
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)", key)
        q = re.fullmatch(r"self_attn\.([qkv]_proj)\.(weight|bias)", m.group(2)) if m else None
        if q:
            qkv.setdefault((m.group(1), q.group(2)), {})[q.group(1)] = value
        elif new := _rename_blockwise(key, ("encoder.layers", "transformer.resblocks"), inv_block, inv_top):
            out[new] = value
        elif not key.endswith(_HF_BUFFERS):
            out[where + key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise WeightsError(f"{where}encoder.layers.{layer}.self_attn: has {sorted(parts)} {kind}s, needs "
                               f"all of {list(_QKV)}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in _QKV])
    return out


def openai_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenAI-layout CLIP with a ViT (or a Chinese-CLIP state_dict without `module.`: `bert.*` text) ->
    transformers' CLIPModel (or ChineseCLIPModel) keys."""
    vision = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.") and k != "visual.proj"}
    out = {f"vision_model.{k}": v for k, v in _transformer_to_hf(vision, _HF_VISION, "visual.").items()}
    out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    text = {}
    for key, value in sd.items():
        if key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "logit_scale":
            out[key] = value
        elif key.startswith("bert."):
            out["text_model." + key.removeprefix("bert.")] = value
        elif not key.startswith("visual."):
            text[key] = value
    out.update({f"text_model.{k}": v for k, v in _transformer_to_hf(text, _HF_TEXT, "").items()})
    return out


def hf_to_openai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPModel keys -> the OpenAI layout; ChineseCLIPModel keys -> the Chinese-CLIP layout (`bert.*`
    text, no `module.`). Keys without an equivalent keep their name (the loaders report them as unexpected)."""
    bert = any(k.startswith("text_model.encoder.layer.") for k in sd)  # BertModel: `layer.i`; CLIP: `layers.i`
    vision = {k.removeprefix("vision_model."): v for k, v in sd.items() if k.startswith("vision_model.")}
    out = {(k if k.startswith("vision_model.") else f"visual.{k}"): v
           for k, v in _transformer_from_hf(vision, _HF_VISION, "vision_model.").items()}
    text = {k.removeprefix("text_model."): v for k, v in sd.items() if k.startswith("text_model.")}
    if bert:
        out.update({f"bert.{k}": v for k, v in text.items() if not k.endswith(_HF_BUFFERS)})
    else:
        out.update(_transformer_from_hf(text, _HF_TEXT, "text_model."))
    for key, value in sd.items():
        if key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif not key.startswith(("vision_model.", "text_model.")):
            out[key] = value  # logit_scale, or a key the caller reports
    return out


# --------------------------------------------------------------------------- recognising a source
def unwrap_checkpoint(obj: dict) -> tuple[str, dict]:
    """(layout, state_dict) of a loaded file: 'ours', 'cnclip', 'openai' (also open_clip's), 'hf' or 'bert'."""
    if not isinstance(obj, dict):
        raise WeightsError(f"expected a dict of tensors, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        return "ours", obj["model"]
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    keys = [k.removeprefix("module.") for k in sd]
    if any(k.startswith("bert.") for k in keys) and any(k.startswith("visual.") or k == "text_projection"
                                                        for k in keys):
        return "cnclip", sd
    if any(k.startswith("visual.") for k in keys) and any(k in ("text_projection", "token_embedding.weight")
                                                          for k in keys):
        return "openai", sd
    if any(k.startswith(("visual.blocks.", "visual.patch_embed", "image_projection", "text.")) for k in keys):
        return "ours", sd
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf", sd
    if any(k.startswith(("bert.encoder.", "encoder.layer.")) for k in keys):
        return "bert", sd
    if any(k.startswith("visual.") for k in keys):
        return "openai", sd  # an OpenAI vision tower alone
    raise WeightsError(f"unrecognised weight layout (first keys: {list(sd)[:5]})")


def to_ours(obj: dict) -> dict[str, torch.Tensor]:
    """Any supported checkpoint object -> a state_dict in our key layout (may cover only some towers)."""
    layout, sd = unwrap_checkpoint(obj)
    if layout == "ours":
        return {k.removeprefix("module."): v for k, v in sd.items()}
    if layout == "cnclip":
        return cnclip_to_ours(sd)
    if layout == "bert":
        return bert_to_ours(sd)
    if layout == "hf":
        sd = hf_to_openai(sd)
        return cnclip_to_ours(sd) if any(k.startswith("bert.") for k in sd) else openai_to_ours(sd)
    return openai_to_ours(sd)


# --------------------------------------------------------------------------- loading into a model
def resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(1, 1+g*g, C) ViT position embeddings -> (1, num_tokens, C): bicubic on the grid (align_corners, as
    Chinese-CLIP's resize_pos_embed), the class token kept."""
    old = int(round((pos.shape[1] - 1) ** 0.5))
    new = int(round((num_tokens - 1) ** 0.5))
    if old * old != pos.shape[1] - 1 or new * new != num_tokens - 1:
        raise WeightsError(f"cannot resize position embeddings of {pos.shape[1]} tokens to {num_tokens}")
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # (1, C, g, g)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=True)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)], dim=1)


CLIP_PARTS = {"vision", "text", "image_projection", "text_projection"}


def _tower(key: str) -> str:
    """The part of the model a key belongs to: vision, image_projection, text, text_projection, logit_scale."""
    if key.startswith("visual."):
        return "vision"
    if key.startswith("text."):
        return "text"
    return key.split(".")[0]


def load_weights(model: nn.Module, sources: list[str] | str) -> dict[str, list[str]]:
    """Initialise `model` from one or more weight files (comma-separated or a list), strictly.

    Each source may cover the whole model (a CLIP checkpoint) or some towers (RoBERTa -> text,
    an OpenAI vision tower -> vision). Within a tower a source covers, every key must be present;
    every key a source brings must exist in the model with the same shape (ViT position embeddings
    are resized). Returns {source: [towers loaded]}; raises WeightsError listing missing/unexpected keys.
    """
    sources = [s for s in sources.split(",") if s] if isinstance(sources, str) else list(sources)
    target = model.state_dict()
    loaded: dict[str, list[str]] = {}
    bert_text = any(k.startswith("text.bert.") for k in target)
    for path in sources:
        obj = read_state_dict(path)
        sd = to_ours(obj)
        if bert_text and unwrap_checkpoint(obj)[0] in ("openai", "hf") and not any(k.startswith("text.bert.")
                                                                                  for k in sd):
            # an OpenAI CLIP checkpoint into a Chinese-BERT model (the MUGE baseline's init): only the vision
            # tower, its projection and logit_scale, as Chinese-CLIP's restore_model takes them. The OpenAI text
            # tower (and unknown non-vision keys) is dropped, and said so; unknown vision keys stay unexpected.
            dropped = {k for k in sd if _tower(k) in ("text", "text_projection")
                       or (k.startswith("unexpected:") and not k.startswith("unexpected:visual."))}
            sd = {k: v for k, v in sd.items() if k not in dropped}
            text_side = sorted(k.removeprefix("unexpected:") for k in dropped)
            if text_side:
                log.info("%s: the model's text tower is a BERT; ignored %d text-side keys of this OpenAI "
                         "checkpoint (%s%s)", path, len(text_side), ", ".join(text_side[:5]),
                         ", ..." if len(text_side) > 5 else "")
        if "visual.pos_embed" in sd and "visual.pos_embed" in target and \
                sd["visual.pos_embed"].shape != target["visual.pos_embed"].shape:
            sd["visual.pos_embed"] = resize_pos_embed(sd["visual.pos_embed"], target["visual.pos_embed"].shape[1])
        towers = sorted({_tower(k) for k in sd if not k.startswith("unexpected:")})
        # a source with both towers is a whole CLIP: it must bring the projections as well
        required = set(towers) | (CLIP_PARTS if {"vision", "text"} <= set(towers) else set())
        unexpected = sorted(k.removeprefix("unexpected:") for k in sd if k.startswith("unexpected:") or k not in target)
        missing = sorted(k for k in target if _tower(k) in required and k not in sd and _tower(k) != "logit_scale")
        shapes = [f"{k}: {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in sd.items()
                  if k in target and v.shape != target[k].shape]
        if missing or unexpected or shapes:
            raise WeightsError(f"{path}: weights do not fit {type(model).__name__} (towers {towers}). "
                               f"missing keys ({len(missing)}): {missing[:20]}; unexpected keys ({len(unexpected)}): "
                               f"{unexpected[:20]}; shape mismatches ({len(shapes)}): {shapes[:10]}")
        check_finite_weights(sd, path)
        with torch.no_grad():
            for key, value in sd.items():
                target[key].copy_(value.to(target[key].dtype))
        loaded[path] = towers
        log.info("loaded %s into the %s tower(s)", path, ", ".join(towers))
    untouched = sorted({_tower(k) for k in target} - {t for ts in loaded.values() for t in ts} - {"logit_scale"})
    if untouched:
        log.warning("--pretrained left these parts at their random initialisation: %s", ", ".join(untouched))
    return loaded


# --------------------------------------------------------------------------- model from weights or checkpoints
def _bert_name(sd: dict[str, torch.Tensor]) -> str:
    hidden = sd["text.bert.embeddings.word_embeddings.weight"].shape[1]
    layers = len({k.split(".")[4] for k in sd if k.startswith("text.bert.encoder.layer.")})
    for name, cfg in registry.BERT_CONFIGS.items():
        if cfg["hidden_size"] == hidden and cfg["num_hidden_layers"] == layers:
            return name
    raise WeightsError(f"no registered BERT config has hidden size {hidden} and {layers} layers")


def _image_size(visual: dict[str, torch.Tensor]) -> int | None:
    """The input size a vision tower's position embeddings were made for (ViT: grid x patch; OpenAI RN50's
    attention pool: grid x 32); None for a tower without them (timm R50: global pooling, any size)."""
    if "pos_embed" in visual:
        grid = int(round((visual["pos_embed"].shape[1] - 1) ** 0.5))
        return grid * visual["patch_embed.proj.weight"].shape[-1]
    if "attnpool.positional_embedding" in visual:
        return int(round((visual["attnpool.positional_embedding"].shape[0] - 1) ** 0.5)) * 32
    return None


POSITION_KEYS = ("pos_embed", "attnpool.positional_embedding")  # their shapes follow the image size


def infer_backbone(sd: dict[str, torch.Tensor]) -> tuple[list[str], int | None]:
    """(registered backbones whose vision tower has exactly these keys and shapes, image size) of a state_dict in
    our layout. Shapes are compared with each registered tower built on the meta device
    (`models.vision_tower_shapes`), position embeddings aside; among several matches, those registered at the
    weights' image size are kept (VITL14336 vs VITL14). More than one left means the shapes cannot tell them
    apart (VITS16MOCO has the shapes of VITS16 with twice the heads)."""
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    shapes = {k: tuple(v.shape) for k, v in visual.items() if k not in POSITION_KEYS}
    dims = {d for shape in shapes.values() for d in shape}  # a tower's output width is one of its dimensions:
    # only those backbones are built (on meta, cached), the rest could not match anyway
    matches = [name for name, spec in registry.BACKBONES.items() if spec.width in dims and
               {k: v for k, v in models.vision_tower_shapes(name).items() if k not in POSITION_KEYS} == shapes]
    image_size = _image_size(visual)
    at_size = [name for name in matches if registry.BACKBONES[name].image_size == image_size]
    return (at_size if len(at_size) == 1 else matches), image_size


def infer_config(obj: dict, source: str = "weights", model_name: str | None = None) -> dict:
    """The model description `{"name", "kwargs"}` of a loaded weights file: the one it stores (our checkpoints
    since model descriptions; older ones' stored args), else inferred from the shapes of a full CLIP state_dict
    (released OpenAI / open_clip / Chinese-CLIP weights). `model_name` (--model) picks among backbones the shapes
    cannot tell apart and names the objective; a file that is not a whole CLIP (a RoBERTa, a vision tower) gives
    `model_name` with its presets. Raises WeightsError when the shapes fit several registered backbones and no
    `model_name` decides (naming them), or when `model_name` contradicts the file."""
    config = None
    if isinstance(obj.get("model_config"), dict):
        config = obj["model_config"]
    elif isinstance(obj.get("args"), dict) and "model" in obj["args"]:
        config = registry.config_from_flags(obj["args"])
    if config is not None:
        if model_name and model_name != config["name"]:
            raise WeightsError(f"{source} holds {config['name']}, not --model {model_name}")
        return config
    sd = to_ours(obj)
    spec = registry.parse_model_name(model_name) if model_name else None
    if "text_projection.weight" not in sd or not any(k.startswith("visual.") for k in sd):
        if spec is None:
            raise WeightsError(f"{source}: not a whole CLIP model (no vision tower or text projection); pass --model")
        return registry.model_config(spec)
    base = "CNCLIP" if "text.bert.embeddings.word_embeddings.weight" in sd else "CLIP"
    backbones, image_size = infer_backbone(sd)
    if spec is not None:
        if spec.backbone.name not in backbones:
            raise WeightsError(f"{source}: the vision tower does not have the shapes of --model {model_name}'s "
                               f"backbone {spec.backbone.name} (it fits {backbones or 'no registered backbone'})")
        backbones = [spec.backbone.name]
    if not backbones:
        raise WeightsError(f"{source}: the vision tower matches no registered backbone "
                           f"({sorted(registry.BACKBONES)}); cannot infer the model")
    if len(backbones) > 1:
        raise WeightsError(f"{source}: the vision tower's shapes fit several registered backbones "
                           f"({', '.join(backbones)}), which differ in what shapes do not show (attention heads); "
                           "pass --model with the right one: " + " or ".join(f"{base}_{b}_CLIP" for b in backbones))
    backbone = registry.BACKBONES[backbones[0]]
    spec = spec or registry.parse_model_name(f"{base}_{backbone.name}_CLIP")
    kwargs = {"image_size": image_size or backbone.image_size, "embed_dim": sd["text_projection.weight"].shape[0]}
    if spec.base.text_family != ("bert" if base == "CNCLIP" else "clip"):  # e.g. OpenAI weights into a CNCLIP
        return registry.model_config(spec, **kwargs)  # model: the vision side only, text tower from the presets
    if base == "CNCLIP":
        return registry.model_config(spec, **kwargs, text_model=_bert_name(sd))
    width = sd["text.token_embedding.weight"].shape[1]
    layers = len({k.split(".")[2] for k in sd if k.startswith("text.resblocks.")})
    # heads are not in the shapes: the backbone's preset when the width is the preset's, else OpenAI's width / 64
    heads = backbone.text.heads if width == backbone.text.width else width // 64
    return registry.model_config(spec, **kwargs, text_width=width, text_heads=heads, text_layers=layers,
                                 context_length=sd["text.positional_embedding"].shape[0])


def load_model_for_eval(resume: str | None = None, pretrained: str | None = None, model_name: str | None = None,
                        device: str = "auto") -> tuple[nn.Module, registry.ModelSpec, dict]:
    """An eval-mode model rebuilt from the description its checkpoint carries, and/or released weights.

    The model is our checkpoint's (--resume) description, else the first --pretrained file's: the one an export
    recorded next to the weights (`exported_config`), the one stored in it, or the architecture its shapes imply;
    else --model with its presets (`infer_config`: a description is stored since checkpoints carry one, rebuilt
    from the stored args before that); --model that contradicts it is an error. A NaN or infinite weight in
    either file is a readers.NonFiniteError. Returns (model, spec, info) with info = {"image_size",
    "context_length", "config" (the description), "args" (the checkpoint's stored flags, {} without one),
    "checkpoint": {"epoch", "step", "commit"} of --resume}.
    """
    ckpt = None
    if resume:
        ckpt = read_state_dict(resume)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise WeightsError(f"{resume}: not a CLIP Lab checkpoint (no 'model'); use --pretrained")
        config = infer_config(ckpt, resume, model_name)
    elif pretrained:
        first = pretrained.split(",")[0]
        config = exported_config(first, model_name) or infer_config(read_state_dict(first), first, model_name)
    elif model_name:
        config = registry.model_config(registry.parse_model_name(model_name))
    else:
        raise WeightsError("give a checkpoint (--resume), pretrained weights (--pretrained) or --model")
    model = models.build_from_config(config)
    if pretrained:
        load_weights(model, pretrained)
    if ckpt is not None:
        load_weights_dict(model, ckpt["model"], resume)
    model.to(utils.resolve_device(device)).eval()
    info = {"image_size": config["kwargs"]["image_size"], "context_length": config["kwargs"]["context_length"],
            "config": config, "args": dict(ckpt.get("args") or {}) if ckpt is not None else {},
            "checkpoint": {k: ckpt.get(k) for k in ("epoch", "step", "commit")} if ckpt is not None else {}}
    return model, registry.parse_model_name(config["name"]), info


def check_finite_weights(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise readers.NonFiniteError "<source>: N of M weight tensors are not finite (first: <key>)" when a floating
    tensor of `state` holds a NaN or an infinity: a checkpoint with one `inf` weight would otherwise give a plausible
    retrieval table."""
    keys = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    bad = [k for k in keys if not bool(torch.isfinite(state[k]).all())]
    if bad:
        raise readers.NonFiniteError(f"{source}: {len(bad)} of {len(keys)} weight tensors are not finite "
                                     f"(first: {bad[0]})")


def load_weights_dict(model: nn.Module, state: dict, source: str, assign: bool = False) -> None:
    """Strict load_state_dict of our own state_dict with missing/unexpected keys listed; non-finite weights are an
    error (`check_finite_weights`). assign=True makes the tensors the model's parameters (a model built on the meta
    device, never initialised)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    check_finite_weights(state, source)
    result = model.load_state_dict(state, strict=False, assign=assign)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"{source}: state_dict does not fit the model. missing keys ({len(result.missing_keys)}): "
                           f"{result.missing_keys[:20]}; unexpected keys ({len(result.unexpected_keys)}): "
                           f"{result.unexpected_keys[:20]}")


# --------------------------------------------------------------------------- exports
EXPORT_FORMATS = ("openai", "open_clip", "hf", "cnclip")
FORMAT_NAMES = {"openai": "an OpenAI CLIP state_dict", "open_clip": "an open_clip model",
                "hf": "a transformers CLIPModel/ChineseCLIPModel", "cnclip": "a Chinese-CLIP checkpoint"}
EXPORT_RECORD = "clip_lab_export.json"  # an exported folder's record; an exported file's is <file>.json


@dataclass(frozen=True)
class ExportPair:
    """The two towers an export writes, as a model of their own.

    state: our-layout state_dict (visual.*, text.*, image_projection.*, text_projection.weight, logit_scale, and
    logit_bias for SigLIP); name, kwargs: the `build_model` description that rebuilds the pair; vision: {"kind":
    vit | modified_resnet | timm_resnet | other, sizes}; text: {"kind": transformer | bert, sizes}; dropped:
    top-level modules of the source model left out; problems: how its ViT differs from CLIP's (empty if it does not).
    """

    state: dict
    name: str
    kwargs: dict
    vision: dict
    text: dict
    dropped: list
    problems: list


def _vit_mismatches(vit: nn.Module) -> list[str]:
    """How a timm VisionTransformer differs from OpenAI CLIP's ViT, the one layout OpenAI, open_clip, transformers
    (CLIPVisionModel: pre_layrnorm, hidden_act quick_gelu) and Chinese-CLIP read; empty when it is one."""
    import timm

    blocks = list(vit.blocks)
    norms = [vit.norm_pre, vit.norm] + [n for b in blocks for n in (b.norm1, b.norm2)]
    checks = [
        (isinstance(vit.norm_pre, nn.LayerNorm), "no LayerNorm before the blocks (CLIP's ln_pre)"),
        (vit.patch_embed.proj.bias is None, "a bias in the patch embedding (CLIP's conv1 has none)"),
        (len(set(vit.patch_embed.patch_size)) == 1, "non-square patches"),
        (vit.global_pool == "token" and isinstance(vit.fc_norm, nn.Identity),
         f"pooling {vit.global_pool!r} (CLIP takes the class token after ln_post)"),
        (vit.has_class_token and vit.num_prefix_tokens == 1 and not vit.no_embed_class,
         "not exactly one class token with its own position embedding"),
        (all(isinstance(n, nn.LayerNorm) and n.eps == 1e-5 for n in norms), "LayerNorms other than eps 1e-5"),
        (all(isinstance(b.mlp.act, timm.layers.QuickGELU) for b in blocks), "an MLP activation other than QuickGELU"),
        (all(isinstance(b.mlp.norm, nn.Identity) for b in blocks), "a norm inside the MLP"),
        (all(isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity) for b in blocks), "layer scale"),
        (all(isinstance(b.attn, models.TimmAttention) and b.attn.qkv.bias is not None for b in blocks),
         "attention other than plain multi-head attention with q/k/v biases"),
    ]
    return [f"its ViT has {reason}" for ok, reason in checks if not ok]


def _vision_description(visual: nn.Module, spec: models.ModelSpec, image_size: int) -> tuple[dict, list[str]]:
    """(sizes of the vision tower for the target configs, _vit_mismatches)."""
    import timm

    if spec.backbone.projected:  # OpenAI's ModifiedResNet (RN50)
        return {"kind": "modified_resnet", "image_size": image_size, "width": visual.conv1.out_channels * 2,
                "layers": [len(getattr(visual, f"layer{i}")) for i in range(1, 5)],
                "heads": visual.attnpool.num_heads}, []
    if isinstance(visual, timm.models.ResNet):
        return {"kind": "timm_resnet", "image_size": image_size,
                "timm_model_name": visual.pretrained_cfg["architecture"]}, []
    if isinstance(visual, timm.models.VisionTransformer):
        return {"kind": "vit", "image_size": image_size, "width": visual.embed_dim, "layers": len(visual.blocks),
                "heads": visual.blocks[0].attn.num_heads, "patch_size": visual.patch_embed.patch_size[0],
                "mlp_width": visual.blocks[0].mlp.fc1.out_features}, _vit_mismatches(visual)
    return {"kind": "other", "class": type(visual).__name__}, []


def export_pair(model: nn.Module, spec: models.ModelSpec, info: dict, head: str = "z") -> ExportPair:
    """The towers and projections of embedding head `head` of `model` (from `load_model_for_eval`) as an ExportPair.

    Head z is the CLIP projector pair (a CL2L model's global pair); head h of a CL2L model is its l2l projector pair
    with its own temperature (the z pair itself without separate projectors). Raises WeightsError for an unknown
    head and for a projector that is an MLP: every target holds one linear projection per tower."""
    heads = tuple(getattr(model, "embedding_heads", ("z",)))
    if head not in heads:
        raise WeightsError(f"{spec.name} has no embedding head {head!r} (its heads: {', '.join(heads)})")
    parts = ("image_projection", "text_projection", "logit_scale")
    if head == "h" and model.opts.separate_proj:
        parts = ("l2l_image_projection", "l2l_text_projection", "l2l_logit_scale")
    for part in parts[:2]:
        proj = getattr(model, part)
        if not isinstance(proj, (nn.Linear, nn.Identity)):
            layers = "-".join(type(m).__name__ for m in proj.children()) or type(proj).__name__
            raise WeightsError(f"head {head} of {spec.name}: {part} is an MLP ({layers}); OpenAI CLIP, open_clip, "
                               "transformers and Chinese-CLIP hold one linear projection per tower" +
                               (": export head z, the global pair" if head == "h" else ""))
    sd = model.state_dict()
    state = {k: v for k, v in sd.items() if k.startswith(("visual.", "text."))}
    for part, ours in zip(parts, ("image_projection", "text_projection")):
        state.update({f"{ours}.{k}": v for k, v in getattr(model, part).state_dict().items()})
    state["logit_scale"] = sd[parts[2]]
    if "logit_bias" in sd:
        state["logit_bias"] = sd["logit_bias"]
    vision, problems = _vision_description(model.visual, spec, info["image_size"])
    embed_dim = state["text_projection.weight"].shape[0]
    kwargs = {"image_size": info["image_size"], "embed_dim": embed_dim, "context_length": info["context_length"]}
    if isinstance(model.text, models.BertTextTower):
        text = {"kind": "bert", "config_name": _bert_name(state), "config": model.text.bert.config.to_dict()}
        kwargs["text_model"] = text["config_name"]
    else:
        t = model.text
        text = {"kind": "transformer", "width": t.width, "heads": t.resblocks[0].heads, "layers": len(t.resblocks),
                "mlp_width": t.resblocks[0].mlp.c_fc.out_features, "context_length": t.context_length,
                "vocab_size": t.token_embedding.num_embeddings}
        kwargs.update(text_width=t.width, text_heads=text["heads"], text_layers=text["layers"])
    name = f"{'CNCLIP' if text['kind'] == 'bert' else 'CLIP'}_{spec.backbone.name}_" \
           f"{'SIGLIP' if 'logit_bias' in state else 'CLIP'}"
    dropped = sorted({k.split(".")[0] for k in sd} - {"visual", "text", "logit_bias", *parts})
    return ExportPair(state, name, kwargs, vision, text, dropped, problems)


def export_refusals(pair: ExportPair, fmt: str) -> list[str]:
    """Why `pair` cannot be written as format `fmt`, one reason each (empty when it can)."""
    vision, bert = pair.vision["kind"], pair.text["kind"] == "bert"
    out = list(pair.problems)
    if vision == "other":
        out.append(f"its vision tower ({pair.vision['class']}) is neither a CLIP ViT nor a ResNet-50")
    if vision == "timm_resnet" and fmt != "open_clip":
        out.append("its vision tower R50 is timm's ResNet-50 with global average pooling and a linear projection "
                   "(clip-rocket's); OpenAI and Chinese-CLIP ResNets are ModifiedResNets with an attention pool (our "
                   "RN50) and transformers' CLIP vision towers are ViTs: use --format open_clip (a timm tower)")
    if vision == "modified_resnet" and fmt == "hf":
        out.append("its vision tower RN50 is OpenAI's ModifiedResNet; transformers' CLIPVisionModel and "
                   "ChineseCLIPVisionModel are ViTs: use --format " + ("cnclip" if bert else "openai or open_clip"))
    if bert and fmt == "openai":
        out.append("its text tower is a Chinese BERT; OpenAI CLIP's is the causal CLIP transformer: use --format hf "
                   "(ChineseCLIPModel) or cnclip")
    if bert and fmt == "open_clip":
        out.append("its text tower is a Chinese BERT; open_clip builds BERT towers from a Hugging Face hub name "
                   "(text_cfg.hf_model_name), so the folder would not hold the whole model: use --format hf "
                   "(ChineseCLIPModel) or cnclip")
    if not bert and fmt == "cnclip":
        out.append("Chinese-CLIP's text tower is a BERT; this model's is the CLIP transformer: use --format openai, "
                   "open_clip or hf")
    if "logit_bias" in pair.state and fmt != "open_clip":
        out.append(f"SigLIP's logit_bias has no place in {FORMAT_NAMES[fmt]} (transformers' SiglipModel has another "
                   "vision tower: no class token, an attention-pool head): use --format open_clip (init_logit_bias)")
    if fmt == "openai":  # OpenAI's build_model (clip.load; open_clip's build_model_from_openai_state_dict)
        for tower, sizes in (("vision", pair.vision), ("text", pair.text)):
            if sizes["kind"] in ("vit", "transformer") and sizes["heads"] != sizes["width"] // 64:
                out.append(f"its {tower} tower has {sizes['heads']} heads of width {sizes['width'] // sizes['heads']}"
                           f"; OpenAI's loader derives width // 64 = {sizes['width'] // 64} heads from the weights: "
                           "use --format open_clip or hf")
    return out


def open_clip_config(pair: ExportPair) -> dict:
    """open_clip's model config of `pair` (the `CLIP(**cfg)` kwargs a model_configs/*.json holds)."""
    v, t = pair.vision, pair.text
    if v["kind"] == "vit":
        vision = {"image_size": v["image_size"], "layers": v["layers"], "width": v["width"],
                  "head_width": v["width"] // v["heads"], "mlp_ratio": v["mlp_width"] / v["width"],
                  "patch_size": v["patch_size"]}
    elif v["kind"] == "modified_resnet":  # open_clip: heads = width * 32 // head_width
        vision = {"image_size": v["image_size"], "layers": v["layers"], "width": v["width"],
                  "head_width": v["width"] * 32 // v["heads"]}
    else:  # timm_resnet: open_clip's TimmModel, global average pool then a bias-free linear projection
        vision = {"image_size": v["image_size"], "timm_model_name": v["timm_model_name"],
                  "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False}
    cfg = {"embed_dim": pair.kwargs["embed_dim"], "quick_gelu": True, "vision_cfg": vision,
           "text_cfg": {"context_length": t["context_length"], "vocab_size": t["vocab_size"], "width": t["width"],
                        "heads": t["heads"], "layers": t["layers"], "mlp_ratio": t["mlp_width"] / t["width"]}}
    if "logit_bias" in pair.state:
        cfg["init_logit_bias"] = float(pair.state["logit_bias"])
    return cfg


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _write_openai(pair: ExportPair, out: str, record: dict) -> None:
    utils.save_atomic(ours_to_openai(pair.state), out)


def _write_cnclip(pair: ExportPair, out: str, record: dict) -> None:
    payload = {"epoch": int(record["epoch"] or 0), "step": int(record["step"] or 0), "name": record["name"],
               "state_dict": ours_to_cnclip(pair.state)}
    utils.save_atomic(payload, out)


def _write_open_clip(pair: ExportPair, out: str, record: dict) -> None:
    """`<name>.json` (for open_clip.add_model_config), open_clip_config.json (for `local-dir:` and the hub) and
    open_clip_model.safetensors, written from open_clip's own CLIP loaded strictly with the weights."""
    import open_clip
    from safetensors.torch import save_file

    import datasets

    cfg = open_clip_config(pair)
    with torch.device("meta"):  # no random initialisation: every weight is assigned
        model = open_clip.CLIP(**cfg)
    load_weights_dict(model, ours_to_open_clip(pair.state), f"open_clip CLIP({record['name']})", assign=True)
    save_file(model.state_dict(), os.path.join(out, "open_clip_model.safetensors"))
    _write_json(os.path.join(out, f"{record['name']}.json"), cfg)
    # our eval transform (datasets.val_transform): shortest side, bicubic, centre crop, OpenAI mean/std
    preprocess = {"mean": list(datasets.OPENAI_MEAN), "std": list(datasets.OPENAI_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    _write_json(os.path.join(out, "open_clip_config.json"), {"model_cfg": cfg, "preprocess_cfg": preprocess})


def _hf_clip_tokenizer(context_length: int):
    """transformers' CLIPTokenizer with the vocabulary and merges of our BPE tokenizer (open_clip's
    SimpleTokenizer), its special tokens under OpenAI's names."""
    from transformers import CLIPTokenizer

    import datasets

    bpe = datasets.BpeTokenizer(context_length).tokenizer
    vocab = {k: v for k, v in bpe.encoder.items() if v not in (bpe.sot_token_id, bpe.eot_token_id)}
    vocab.update({"<|startoftext|>": bpe.sot_token_id, "<|endoftext|>": bpe.eot_token_id})
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def _write_hf(pair: ExportPair, out: str, record: dict) -> None:
    """A transformers CLIPModel (CLIP text) or ChineseCLIPModel (BERT text) folder with its tokenizer and image
    processor (our eval transforms: CLIP resize + centre crop, Chinese-CLIP squash), via save_pretrained."""
    import transformers

    import datasets

    v, t, embed_dim = pair.vision, pair.text, pair.kwargs["embed_dim"]
    vision = dict(hidden_size=v["width"], intermediate_size=v["mlp_width"], num_hidden_layers=v["layers"],
                  num_attention_heads=v["heads"], image_size=v["image_size"], patch_size=v["patch_size"],
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=embed_dim)
    size, context = v["image_size"], pair.kwargs["context_length"]
    norm = dict(resample=3, image_mean=list(datasets.OPENAI_MEAN), image_std=list(datasets.OPENAI_STD))  # bicubic
    if t["kind"] == "bert":
        text = {k: t["config"][k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "max_position_embeddings", "type_vocab_size",
                                            "hidden_act", "layer_norm_eps", "pad_token_id", "hidden_dropout_prob",
                                            "attention_probs_dropout_prob", "initializer_range")}
        config_cls, model_cls = transformers.ChineseCLIPConfig, transformers.ChineseCLIPModel
        layout = {k.removeprefix("module."): v for k, v in ours_to_cnclip(pair.state).items()}
        tokenizer = datasets.BertTokenizer(context).tokenizer
        tokenizer.model_max_length = context
        processor = transformers.ChineseCLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                                           **norm)
    else:
        text = dict(vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=t["mlp_width"],
                    num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                    max_position_embeddings=t["context_length"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    projection_dim=embed_dim, bos_token_id=49406, eos_token_id=49407)
        config_cls, model_cls = transformers.CLIPConfig, transformers.CLIPModel
        layout = ours_to_openai(pair.state)
        tokenizer = _hf_clip_tokenizer(context)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                    crop_size={"height": size, "width": size}, **norm)
    config = config_cls(text_config=text, vision_config=vision, projection_dim=embed_dim,
                        logit_scale_init_value=float(pair.state["logit_scale"]))
    with torch.device("meta"):  # no random initialisation: every weight is assigned
        model = model_cls(config)
    load_weights_dict(model, openai_to_hf(layout), f"transformers {model_cls.__name__}", assign=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    if t["kind"] == "bert":  # the wordpiece vocabulary itself, for tools that read vocab.txt
        shutil.copyfile(datasets.CHINESE_VOCAB, os.path.join(out, "vocab.txt"))


_WRITERS = {"openai": _write_openai, "open_clip": _write_open_clip, "hf": _write_hf, "cnclip": _write_cnclip}


def export(ckpt_path: str, fmt: str, out: str, head: str = "z", name: str | None = None) -> dict:
    """Write embedding head `head` of our checkpoint `ckpt_path` in format `fmt` to `out`; returns the export record.

    openai / cnclip write a file (+ the record as `<out>.json`); open_clip / hf write a folder (built beside `out`,
    then renamed into place) holding the record as clip_lab_export.json. The model is rebuilt by
    `load_model_for_eval`. `name`: the open_clip config name (default: the checkpoint's model name), or the
    Chinese-CLIP checkpoint's name (default: the run's name). Raises WeightsError, naming every reason, when the
    architecture does not fit the format, and when `out` exists (nothing is overwritten).
    """
    import datetime

    if fmt not in EXPORT_FORMATS:
        raise WeightsError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    folder = fmt in ("open_clip", "hf")
    for target in [out] if folder else [out, out + ".json"]:
        if os.path.lexists(target) and not (folder and os.path.isdir(target) and not os.listdir(target)):
            raise WeightsError(f"{target} exists; an export never overwrites: remove it or choose another --out")
    model, spec, info = load_model_for_eval(resume=ckpt_path, device="cpu")
    try:
        pair = export_pair(model, spec, info, head)
    except WeightsError as exc:
        raise WeightsError(f"{ckpt_path}: {exc}") from None
    refusals = export_refusals(pair, fmt)
    if refusals:
        raise WeightsError(f"{ckpt_path}: {spec.name} cannot be exported as {FORMAT_NAMES[fmt]}: "
                           + "; ".join(refusals))
    if pair.dropped:
        log.warning("%s: not exported (the export holds the towers and head %s's projections only): %s", ckpt_path,
                    head, ", ".join(pair.dropped))
    default_name = spec.name if fmt == "open_clip" else \
        info["args"].get("name") or os.path.splitext(os.path.basename(ckpt_path))[0]
    record = {"format": fmt, "source": os.path.abspath(ckpt_path), "commit": info["checkpoint"].get("commit"),
              "epoch": info["checkpoint"].get("epoch"), "step": info["checkpoint"].get("step"),
              "source_model": spec.name, "head": head, "name": name or default_name,
              "model": {"name": pair.name, "kwargs": pair.kwargs}, "dropped": pair.dropped,
              "exported_with": {"tool": "weights.py export", "commit": utils.git_commit()},
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    if not folder:
        _WRITERS[fmt](pair, out, record)
        _write_json(out + ".json", record)
    else:
        partial = f"{out.rstrip(os.sep)}.partial-{os.getpid()}"
        os.makedirs(partial)
        try:
            _WRITERS[fmt](pair, partial, record)
            _write_json(os.path.join(partial, EXPORT_RECORD), record)
            os.replace(partial, out)
        finally:
            if os.path.isdir(partial):
                shutil.rmtree(partial)
    log.info("wrote %s (%s, %s)", out, FORMAT_NAMES[fmt], pair.name)
    return record


def exported_config(path: str, model_name: str | None = None) -> dict | None:
    """The description (registry.model_config) of the model `export` recorded next to the weights at `path` (a
    folder's clip_lab_export.json, a file's `<file>.json`), None without a record; an unreadable record, or --model
    `model_name` naming another model, is a WeightsError."""
    record_path = os.path.join(path, EXPORT_RECORD) if os.path.isdir(path) else path + ".json"
    if not os.path.isfile(record_path):
        return None
    with open(record_path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{record_path}: not an export record ({exc})") from exc
    model = record.get("model") if isinstance(record, dict) and record.get("format") in EXPORT_FORMATS else None
    if not (isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("kwargs"), dict)):
        return None
    if model_name and model_name != model["name"]:
        raise WeightsError(f"{path} holds {model['name']} (its export record), not --model {model_name}")
    return registry.model_config(registry.parse_model_name(model["name"]), **model["kwargs"])


def export_cnclip(ckpt_path: str, out_path: str) -> dict:
    """Our checkpoint of a CNCLIP model -> a Chinese-CLIP checkpoint file (`export(..., "cnclip", ...)`)."""
    return export(ckpt_path, "cnclip", out_path)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser("weights", description="convert released CLIP weights; export ours")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert-openai", help="OpenAI TorchScript/state_dict -> plain OpenAI-layout state_dict")
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("export", help="our checkpoint -> OpenAI CLIP, open_clip, transformers or Chinese-CLIP")
    p.add_argument("input", help="a CLIP Lab checkpoint (experiments/RUN/checkpoint.pt) or a `convert` output")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="openai: a state_dict file (clip.load, open_clip); open_clip: a folder with the config "
                        "JSON and weights; hf: a transformers CLIPModel/ChineseCLIPModel folder; cnclip: a "
                        "Chinese-CLIP .pt")
    p.add_argument("--out", required=True, help="file (openai, cnclip) or folder (open_clip, hf) to write; an "
                                                "existing one is never overwritten")
    p.add_argument("--head", default="z", choices=("z", "h"),
                   help="embedding head of a CL2L model: z, the global pair (default), or h, its l2l projectors "
                        "(when they are linear)")
    p.add_argument("--name", default=None, help="open_clip: the config name (default: the model name); cnclip: "
                                                "the checkpoint's name (default: the run's name)")
    p = sub.add_parser("export-cnclip", help="our CNCLIP checkpoint -> Chinese-CLIP checkpoint (= export "
                                             "--format cnclip)")
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("convert", help="any supported weights -> our state_dict ({'model': ...})")
    p.add_argument("input")
    p.add_argument("output")
    args = parser.parse_args(argv)
    if args.command == "convert-openai":
        sd = read_state_dict(args.input)
        layout, sd = unwrap_checkpoint(sd)
        if layout != "openai":
            raise SystemExit(f"{args.input}: not OpenAI CLIP weights (looks like {layout})")
        torch.save({k: v for k, v in sd.items() if k not in IGNORED_SOURCE_KEYS[:3]}, args.output)
    elif args.command in ("export", "export-cnclip"):
        try:
            if args.command == "export":
                export(args.input, args.format, args.out, head=args.head, name=args.name)
            else:
                export(args.input, "cnclip", args.output)
        except WeightsError as exc:
            raise SystemExit(f"weights.py {args.command}: {exc}") from None
        return
    else:
        sd = to_ours(read_state_dict(args.input))
        bad = [k for k in sd if k.startswith("unexpected:")]
        if bad:
            raise SystemExit(f"{args.input}: keys without an equivalent in our models: {bad[:20]}")
        torch.save({"model": sd}, args.output)
    log.info("wrote %s", args.output)


if __name__ == "__main__":
    main(sys.argv[1:])
