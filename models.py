"""Dual encoders and their registries.

A model name is `<BASE>_<BACKBONE>_<NAME>`: BASE picks the model class and text family (CLIP with the
OpenAI text transformer and BPE tokens, CNCLIP with a Chinese BERT and wordpiece tokens), BACKBONE a
timm vision tower, NAME the objective. The three parts are registered with decorators and a name is
parsed by matching registered keys (never `split('_')`), so `list_models()` is the exact set of
valid names and a typo fails at parse time with a close-match suggestion.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# --------------------------------------------------------------------------- attention
try:  # xformers is an optional CUDA acceleration; CPU always uses PyTorch SDPA
    import xformers.ops as xops
except ImportError:  # pragma: no cover - depends on the install
    xops = None


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, N, Dh) tensors; returns (B, H, N, Dh).

    Uses xformers' memory-efficient kernel for half-precision CUDA tensors when xformers is
    importable, and `F.scaled_dot_product_attention` otherwise.
    """
    if xops is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        bias = xops.LowerTriangularMask() if causal else None
        # xformers layout is (B, N, H, Dh)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, p=dropout_p)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)


class TimmAttention(nn.Module):
    """Drop-in for timm's ViT `Attention` that routes through `multi_head_attention`.

    Keeps the `qkv`/`proj` submodule names so state_dict keys are unchanged.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.qkv, self.proj = attn.qkv, attn.proj

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = multi_head_attention(qkv[0], qkv[1], qkv[2], causal=is_causal)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


# --------------------------------------------------------------------------- vision backbones
@dataclass(frozen=True)
class TextPreset:
    """Default text tower of a backbone: the CLIP transformer size and the Chinese BERT name."""

    width: int
    heads: int
    layers: int
    bert: str


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[int], nn.Module]  # image_size -> module returning (B, width) features
    width: int
    image_size: int
    embed_dim: int
    text: TextPreset


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, *, width: int, image_size: int, embed_dim: int, text: TextPreset):
    """Decorator registering a vision-tower factory `fn(image_size) -> nn.Module` under `name`."""

    def wrap(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        BACKBONES[name] = BackboneSpec(name, fn, width, image_size, embed_dim, text)
        return fn

    return wrap


def _timm_vit(timm_name: str, image_size: int, **overrides) -> nn.Module:
    """A timm ViT without classifier (CLS-token features), attention routed through SDPA/xformers."""
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=image_size,
                              global_pool="token", **overrides)
    for block in model.blocks:
        block.attn = TimmAttention(block.attn)
    return model


_CLIP_VIT = dict(pre_norm=True, act_layer="quick_gelu")  # OpenAI-CLIP style ViT for the small sizes
TEXT_B = TextPreset(512, 8, 12, "RoBERTa-wwm-ext-base-chinese")


@register_backbone("VITT16", width=192, image_size=224, embed_dim=256,
                   text=TextPreset(192, 3, 4, "BERT-tiny-chinese"))
def vit_tiny16(image_size: int) -> nn.Module:
    return _timm_vit("vit_tiny_patch16_224", image_size, **_CLIP_VIT)


@register_backbone("VITS16", width=384, image_size=224, embed_dim=256, text=TEXT_B)
def vit_small16(image_size: int) -> nn.Module:
    return _timm_vit("vit_small_patch16_224", image_size, **_CLIP_VIT)


@register_backbone("VITS16MOCO", width=384, image_size=224, embed_dim=256, text=TEXT_B)
def vit_small16_moco(image_size: int) -> nn.Module:
    """MoCo-v3 ViT-S/16: 12 heads of width 32 instead of 6 of width 64."""
    return _timm_vit("vit_small_patch16_224", image_size, num_heads=12, **_CLIP_VIT)


@register_backbone("VITB16", width=768, image_size=224, embed_dim=512, text=TEXT_B)
def vit_base16(image_size: int) -> nn.Module:
    return _timm_vit("vit_base_patch16_clip_quickgelu_224", image_size)


@register_backbone("VITB32", width=768, image_size=224, embed_dim=512, text=TEXT_B)
def vit_base32(image_size: int) -> nn.Module:
    return _timm_vit("vit_base_patch32_clip_quickgelu_224", image_size)


@register_backbone("VITL14", width=1024, image_size=224, embed_dim=768,
                   text=TextPreset(768, 12, 12, "RoBERTa-wwm-ext-base-chinese"))
def vit_large14(image_size: int) -> nn.Module:
    return _timm_vit("vit_large_patch14_clip_quickgelu_224", image_size)


@register_backbone("VITL14336", width=1024, image_size=336, embed_dim=768,
                   text=TextPreset(768, 12, 12, "RoBERTa-wwm-ext-base-chinese"))
def vit_large14_336(image_size: int) -> nn.Module:
    return _timm_vit("vit_large_patch14_clip_quickgelu_336", image_size)


@register_backbone("VITH14", width=1280, image_size=224, embed_dim=1024,
                   text=TextPreset(1024, 16, 24, "RoBERTa-wwm-ext-large-chinese"))
def vit_huge14(image_size: int) -> nn.Module:
    return _timm_vit("vit_huge_patch14_clip_quickgelu_224", image_size)


@register_backbone("R50", width=2048, image_size=224, embed_dim=1024,
                   text=TextPreset(512, 8, 12, "RBT3-chinese"))
def resnet50(image_size: int) -> nn.Module:
    """timm ResNet-50 with global average pooling (clip-rocket's R50)."""
    return timm.create_model("resnet50", pretrained=False, num_classes=0)


# --------------------------------------------------------------------------- text towers
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    """Pre-LN causal transformer block with OpenAI CLIP's parameter names."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.ModuleDict({"in_proj": nn.Linear(width, 3 * width), "out_proj": nn.Linear(width, width)})
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.attn["in_proj"](x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = multi_head_attention(qkv[0], qkv[1], qkv[2], causal=True)  # (B, H, N, Dh)
        return self.attn["out_proj"](out.transpose(1, 2).reshape(B, N, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPTextTransformer(nn.Module):
    """OpenAI CLIP text encoder: token + learned position embeddings, causal pre-LN blocks, EOT pooling."""

    def __init__(self, width: int, heads: int, layers: int, vocab_size: int = 49408,
                 context_length: int = 77) -> None:
        super().__init__()
        self.width, self.context_length = width, context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList(TextBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.grad_checkpointing = False
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        """OpenAI CLIP init: attn std w^-0.5, projections w^-0.5 (2L)^-0.5, fc (2w)^-0.5."""
        w = self.width
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.resblocks:
            nn.init.normal_(block.attn["in_proj"].weight, std=w ** -0.5)
            nn.init.normal_(block.attn["out_proj"].weight, std=w ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=w ** -0.5 * (2 * layers) ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64 with EOT = the largest id -> (B, width) features at EOT."""
        eot = tokens.argmax(dim=-1)  # (B,)
        # causal attention: positions after the last EOT of the batch never influence it, so trimming is exact
        length = int(eot.max()) + 1
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]  # (B, L', W)
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


BERT_CONFIGS: dict[str, dict] = {
    # Chinese-CLIP text configs (reference/chinese_clip.md §2.2); vocab 21128, max positions 512
    "RBT3-chinese": dict(hidden_size=768, num_hidden_layers=3, num_attention_heads=12, intermediate_size=3072),
    "RoBERTa-wwm-ext-base-chinese": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         intermediate_size=3072),
    "RoBERTa-wwm-ext-large-chinese": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                          intermediate_size=4096),
    # tiny tower for CPU tests and the digits-zh demo (same vocab and tokenizer)
    "BERT-tiny-chinese": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}


class BertTextTower(nn.Module):
    """Chinese-CLIP text tower: transformers' BertModel, [CLS] pooling, attention mask = tokens != [PAD]."""

    def __init__(self, config_name: str) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=21128, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12,
                         initializer_range=0.02, **BERT_CONFIGS[config_name])
        cfg._attn_implementation = "sdpa"
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.width = cfg.hidden_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) with [PAD]=0 on the right -> (B, hidden) [CLS] features."""
        mask = tokens != 0
        length = int(mask.sum(dim=1).max())  # trailing all-pad columns are masked out: trimming is exact
        out = self.bert(input_ids=tokens[:, :length], attention_mask=mask[:, :length].long())
        return out.last_hidden_state[:, 0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.bert.gradient_checkpointing_disable()


# --------------------------------------------------------------------------- dual encoder
class CLIP(nn.Module):
    """Image tower + text tower + linear projectors + learnable temperature (Radford et al., 2021).

    forward(images (B,3,H,W), tokens (B,L)) -> {"image_embed" (B,D), "text_embed" (B,D) L2-normalised in
    fp32, "logit_scale" () = exp(learned log-scale)}.
    """

    def __init__(self, visual: nn.Module, vision_width: int, text: nn.Module, text_width: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.visual, self.text = visual, text
        self.image_projection = nn.Linear(vision_width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=vision_width ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # embedding heads evaluation can score: "z" is the CLIP projector; CL2L adds "h" (its MLP projector)
    embedding_heads: tuple[str, ...] = ("z",)

    def encode_image(self, images: torch.Tensor, head: str = "z") -> torch.Tensor:
        """(B,3,H,W) -> (B,D) unnormalised projected features of embedding head `head`."""
        assert head == "z", f"{type(self).__name__} has only the 'z' head"
        return self.image_projection(self.visual(images))

    def encode_text(self, tokens: torch.Tensor, head: str = "z") -> torch.Tensor:
        """(B,L) -> (B,D) unnormalised projected features of embedding head `head`."""
        assert head == "z", f"{type(self).__name__} has only the 'z' head"
        return self.text_projection(self.text(tokens))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_embed": F.normalize(self.encode_image(images).float(), dim=-1),
            "text_embed": F.normalize(self.encode_text(tokens).float(), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }

    @torch.no_grad()
    def clamp_logit_scale(self, max_log: float = math.log(100.0)) -> None:
        """Clamp the log temperature scale to [0, ln 100] (called after every optimizer step)."""
        self.logit_scale.clamp_(0, max_log)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


# --------------------------------------------------------------------------- bases and objectives
@dataclass(frozen=True)
class BaseSpec:
    name: str
    text_family: str  # "clip" (OpenAI transformer) or "bert"
    tokenizer: str  # "bpe" or "bert"
    context_length: int
    language: str  # "en" or "zh": picks captions, templates and text augmentation


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    loss: str  # key understood by main.build_criterion
    metric_names: tuple[str, ...]
    bases: tuple[str, ...]  # bases this objective is defined for
    num_views: int = 0  # strong image/text views beyond the global pair


BASES: dict[str, BaseSpec] = {}
OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_base(spec: BaseSpec) -> BaseSpec:
    BASES[spec.name] = spec
    return spec


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    OBJECTIVES[spec.name] = spec
    return spec


register_base(BaseSpec("CLIP", text_family="clip", tokenizer="bpe", context_length=77, language="en"))
register_base(BaseSpec("CNCLIP", text_family="bert", tokenizer="bert", context_length=52, language="zh"))
register_objective(ObjectiveSpec("CLIP", loss="clip", metric_names=("loss", "clip_loss", "clip_acc"),
                                 bases=("CLIP", "CNCLIP")))


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name and everything main.py needs to know about it."""

    name: str
    base: BaseSpec
    backbone: BackboneSpec
    objective: ObjectiveSpec
    extras: dict = field(default_factory=dict)


class ModelNameError(ValueError):
    """An unknown or invalid `<BASE>_<BACKBONE>_<NAME>` model name."""


def list_models(pattern: str = "*") -> list[str]:
    """Every valid model name matching the shell-style `pattern` (case-insensitive), sorted."""
    names = [f"{b}_{bb}_{o}" for b in BASES for bb in BACKBONES for o, spec in OBJECTIVES.items()
             if b in spec.bases]
    return sorted(n for n in names if fnmatch.fnmatch(n.upper(), pattern.upper()))


def parse_model_name(name: str) -> ModelSpec:
    """Split `name` into registered (base, backbone, objective) by key matching; raise ModelNameError."""
    for base in sorted(BASES, key=len, reverse=True):
        if not name.startswith(base + "_"):
            continue
        for objective in sorted(OBJECTIVES, key=len, reverse=True):
            middle = name[len(base) + 1:-(len(objective) + 1)]
            if name.endswith("_" + objective) and middle in BACKBONES:
                obj = OBJECTIVES[objective]
                if base not in obj.bases:
                    raise ModelNameError(f"model {name!r}: objective {objective} is not defined for base {base} "
                                         f"(it needs one of {', '.join(obj.bases)})")
                return ModelSpec(name, BASES[base], BACKBONES[middle], obj)
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelNameError(f"unknown model {name!r}: names are <BASE>_<BACKBONE>_<NAME> with BASE in "
                         f"{sorted(BASES)}, BACKBONE in {sorted(BACKBONES)}, NAME in {sorted(OBJECTIVES)}."
                         f"{hint} Run `python main.py --list-models` for every valid name.")


def text_model_choices(base: BaseSpec) -> list[str]:
    """Text towers a base accepts for --text-model."""
    return ["transformer"] if base.text_family == "clip" else sorted(BERT_CONFIGS)


def build_text_tower(spec: ModelSpec, text_model: str | None, width: int | None, heads: int | None,
                     layers: int | None, context_length: int) -> nn.Module:
    """The text tower of `spec`, with the backbone's preset unless overridden."""
    preset = spec.backbone.text
    choices = text_model_choices(spec.base)
    text_model = text_model or ("transformer" if spec.base.text_family == "clip" else preset.bert)
    if text_model not in choices:
        raise ModelNameError(f"--text-model {text_model!r} is not available for base {spec.base.name}; "
                             f"choose from {choices}")
    if spec.base.text_family == "bert":
        return BertTextTower(text_model)
    return CLIPTextTransformer(width or preset.width, heads or preset.heads, layers or preset.layers,
                               context_length=context_length)


def build_model(spec: ModelSpec, *, image_size: int | None = None, embed_dim: int | None = None,
                text_model: str | None = None, text_width: int | None = None, text_heads: int | None = None,
                text_layers: int | None = None, context_length: int | None = None,
                checkpoint_grad: bool = False) -> nn.Module:
    """Instantiate the dual encoder named by `spec`; `None` means the registered preset."""
    visual = spec.backbone.build(image_size or spec.backbone.image_size)
    text = build_text_tower(spec, text_model, text_width, text_heads, text_layers,
                            context_length or spec.base.context_length)
    model = CLIP(visual, spec.backbone.width, text, text.width, embed_dim or spec.backbone.embed_dim)
    if checkpoint_grad:
        model.set_grad_checkpointing(True)
    return model
