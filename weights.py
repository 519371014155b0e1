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
- Ours: timm ViT keys under `visual.` (`patch_embed.proj`, `cls_token`, `pos_embed`, `norm_pre`,
  `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), `text.*`, and the projections as
  `nn.Linear` (`image_projection.weight` = OpenAI `visual.proj` transposed).

Every load is strict: a source that does not cover the towers it claims, or brings keys the model
does not have, raises with the missing and unexpected keys listed (Chinese-CLIP loads strict=False and
silently leaves layers random). Files are read with `torch.load(weights_only=True)`; a TorchScript
archive is read by unpickling only its tensors (no TorchScript code is loaded or run).

CLI: `python weights.py convert-openai IN.pt OUT.pt` (TorchScript -> plain OpenAI-layout state_dict),
`python weights.py export-cnclip CKPT OUT.pt` (ours -> Chinese-CLIP checkpoint),
`python weights.py convert PRETRAINED OUT.pt [--model NAME]` (anything -> our state_dict).
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import sys
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import registry
import utils

log = logging.getLogger("clip_lab")

# scalar attributes of OpenAI's TorchScript model and the causal mask buffer: not weights
IGNORED_SOURCE_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


class WeightsError(RuntimeError):
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


def read_state_dict(path: str) -> dict:
    """A checkpoint file or folder -> the object it holds (weights_only), TorchScript archives as state_dicts."""
    if os.path.isdir(path):  # a transformers folder
        for name in ("pytorch_model.bin", "model.safetensors"):
            if os.path.exists(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise WeightsError(f"{path}: folder without pytorch_model.bin or model.safetensors")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
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
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types
        raise WeightsError(f"cannot load {path!r} with weights_only=True: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- layouts
_VIT_BLOCK = [("ln_1", "norm1"), ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
              ("attn.out_proj", "attn.proj"), ("ln_2", "norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
_VIT_TOP = [("conv1.weight", "patch_embed.proj.weight"), ("ln_pre", "norm_pre"), ("ln_post", "norm")]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def openai_visual_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI/Chinese-CLIP `visual.*` keys (no prefix) -> ours (`visual.*` and `image_projection.weight`)."""
    out = {}
    if "attnpool.c_proj.weight" in sd:  # ModifiedResNet: our RN50 backbone is the same module
        return {f"visual.{k}": v for k, v in sd.items()}
    for key, value in sd.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if key == "class_embedding":
            out["visual.cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["visual.pos_embed"] = value.unsqueeze(0)
        elif key == "proj":
            out["image_projection.weight"] = value.t().contiguous()
        elif m and _rename(m.group(2), _VIT_BLOCK):
            out[f"visual.blocks.{m.group(1)}.{_rename(m.group(2), _VIT_BLOCK)}"] = value
        elif _rename(key, _VIT_TOP):
            out["visual." + _rename(key, _VIT_TOP)] = value
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
        m = re.match(r"blocks\.(\d+)\.(.+)", key)
        if resnet:
            out[key] = value
        elif key == "cls_token":
            out["class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["positional_embedding"] = value.squeeze(0)
        elif m and _rename(m.group(2), inv_block):
            out[f"transformer.resblocks.{m.group(1)}.{_rename(m.group(2), inv_block)}"] = value
        elif _rename(key, inv_top):
            out[_rename(key, inv_top)] = value
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
        elif key == "logit_scale":
            out["logit_scale"] = value.reshape(())
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


# --------------------------------------------------------------------------- recognising a source
def unwrap_checkpoint(obj: dict) -> tuple[str, dict]:
    """(layout, state_dict) of a loaded file: 'ours', 'cnclip', 'openai' or 'bert'."""
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
        if bert_text and unwrap_checkpoint(obj)[0] == "openai":
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

    The model is our checkpoint's (--resume) description, else the first --pretrained file's description or
    inferred architecture, else --model with its presets (`infer_config`: a description is stored since
    checkpoints carry one, rebuilt from the stored args before that); --model that contradicts it is an error.
    Returns (model, spec, info) with info = {"image_size", "context_length", "config" (the description)}.
    """
    ckpt = None
    if resume:
        ckpt = read_state_dict(resume)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
            raise WeightsError(f"{resume}: not a CLIP Lab checkpoint (no 'model'/'args'); use --pretrained")
        config = infer_config(ckpt, resume, model_name)
    elif pretrained:
        first = pretrained.split(",")[0]
        config = infer_config(read_state_dict(first), first, model_name)
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
            "config": config}
    return model, registry.parse_model_name(config["name"]), info


def load_weights_dict(model: nn.Module, state: dict, source: str) -> None:
    """Strict load_state_dict of our own state_dict with missing/unexpected keys listed."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"{source}: state_dict does not fit the model. missing keys ({len(result.missing_keys)}): "
                           f"{result.missing_keys[:20]}; unexpected keys ({len(result.unexpected_keys)}): "
                           f"{result.unexpected_keys[:20]}")


# --------------------------------------------------------------------------- exports
def export_cnclip(ckpt_path: str, out_path: str) -> dict:
    """Our checkpoint (or state_dict) of a CNCLIP model -> a Chinese-CLIP checkpoint file."""
    obj = read_state_dict(ckpt_path)
    layout, sd = unwrap_checkpoint(obj)
    if layout != "ours":
        raise WeightsError(f"{ckpt_path}: export-cnclip takes a CLIP Lab checkpoint, not a {layout} one")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    payload = {"epoch": int(obj.get("epoch", 0)), "step": int(obj.get("step", 0)),
               "name": str(obj.get("args", {}).get("name") or os.path.splitext(os.path.basename(ckpt_path))[0]),
               "state_dict": ours_to_cnclip(sd)}
    torch.save(payload, out_path)
    return payload


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser("weights", description="convert released CLIP weights")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert-openai", help="OpenAI TorchScript/state_dict -> plain OpenAI-layout state_dict")
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("export-cnclip", help="our CNCLIP checkpoint -> Chinese-CLIP checkpoint")
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
    elif args.command == "export-cnclip":
        export_cnclip(args.input, args.output)
    else:
        sd = to_ours(read_state_dict(args.input))
        bad = [k for k in sd if k.startswith("unexpected:")]
        if bad:
            raise SystemExit(f"{args.input}: keys without an equivalent in our models: {bad[:20]}")
        torch.save({"model": sd}, args.output)
    log.info("wrote %s", args.output)


if __name__ == "__main__":
    main(sys.argv[1:])
