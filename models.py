"""Dual encoders: vision and text towers, projectors, the model classes of every objective, `build_model`.

What a `<BASE>_<BACKBONE>_<NAME>` name means (bases, backbones, objectives, presets, recipe options) is data in
registry.py, importable without torch; this module registers the constructor of each backbone
(`backbone_builder`) and each model class (`register_model_class`) under the registry's names, and
`build_model` hands every setting to the constructors (open_clip's `_build_vision_tower`/`_build_text_tower`
pattern, mlfoundations/open_clip src/open_clip/model.py), so a model read from its class is the model that runs.
`list_models`, `parse_model_name`, `ModelSpec`, `ModelNameError` and `RecipeOptions` are the registry's, re-exported.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from registry import (  # noqa: F401 - list_models, model_config and text_model_choices are re-exported
    BACKBONES,
    BERT_CONFIGS,
    OBJECTIVES,
    ModelNameError,
    ModelSpec,
    RecipeOptions,
    list_models,
    model_config,
    parse_model_name,
    resolve_build_kwargs,
    text_model_choices,
)

# --------------------------------------------------------------------------- attention
try:  # xformers is an optional CUDA acceleration; CPU always uses PyTorch SDPA
    import xformers.ops as xops
except ImportError:  # pragma: no cover - depends on the install
    xops = None
_xformers_runs: bool | None = None  # probed at the first half-precision CUDA attention


def xformers_usable(device: torch.device) -> bool:
    """Whether xformers' attention runs on this CUDA device (probed once with a tiny call).

    A wheel built without CUDA kernels (PyPI's `xformers` next to a torch it was not built for) imports
    fine and fails only at the first call; then we warn once and use PyTorch SDPA instead of crashing.
    """
    global _xformers_runs
    if xops is None or device.type != "cuda":
        return False
    if _xformers_runs is None:
        probe = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16)  # (B, N, H, Dh)
        try:
            xops.memory_efficient_attention(probe, probe, probe)
            _xformers_runs = True
        except (NotImplementedError, RuntimeError) as err:
            logging.getLogger(__name__).warning("xformers is installed but cannot run on %s (%s); using PyTorch "
                                                "SDPA", device, str(err).splitlines()[0])
            _xformers_runs = False
    return _xformers_runs


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, N, Dh) tensors; returns (B, H, N, Dh).

    Uses xformers' memory-efficient kernel for half-precision CUDA tensors when xformers is
    installed and runs there (`xformers_usable`), and `F.scaled_dot_product_attention` otherwise.
    """
    if q.dtype in (torch.float16, torch.bfloat16) and xformers_usable(q.device):
        bias = xops.LowerTriangularMask() if causal else None
        # xformers layout is (B, N, H, Dh)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, p=dropout_p)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)


def trim_padding(tokens: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """Drop the trailing token columns that are padding (id 0) in every row, keeping the length a multiple of
    `multiple` (rounded up, at most the full context): (..., L) -> (..., L').

    Exact for both text towers: CLIP BPE pads with 0 after EOT and attends causally, BERT pads with
    0 and masks the padding; the columns kept by rounding up are padding too. Call it on host (CPU) tensors
    before moving them to the GPU: on CUDA the towers skip their own trimming, whose data-dependent length
    would stall the GPU queue. A `multiple` > 1 bounds the lengths a run sees (ceil(77 / 16) = 5 for CLIP BPE),
    so that torch.compile builds one graph per bucket (--text-bucket).
    """
    used = (tokens != 0).reshape(-1, tokens.shape[-1]).any(dim=0)  # (L,)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return tokens[..., :min(-(-length // multiple) * multiple, tokens.shape[-1])]


def _trimmed_length(tokens: torch.Tensor, length_of) -> int:
    """Context kept by a text tower: `length_of()` (a host sync) on CPU; all of it on CUDA (the caller
    trimmed on the host with `trim_padding`) and under torch.compile (the caller trimmed to a --text-bucket)."""
    if tokens.is_cuda or torch.compiler.is_compiling():
        return tokens.shape[-1]
    return length_of()


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
BACKBONE_BUILDERS: dict[str, Callable[[int], nn.Module]] = {}


def backbone_builder(name: str):
    """Decorator registering the constructor `fn(image_size) -> nn.Module` ((B,3,H,W) -> (B, width) features) of
    the registry's backbone `name`; a ViT's (`registry.BackboneSpec.vit`) also takes `patch_dropout`."""

    def wrap(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        BACKBONE_BUILDERS[name] = fn
        return fn

    return wrap


def _timm_vit(timm_name: str, image_size: int, patch_dropout: float = 0.0, **overrides) -> nn.Module:
    """A timm ViT without classifier (CLS-token features), attention routed through SDPA/xformers.

    patch_dropout p (FLIP, Li et al., 2023, "Scaling Language-Image Pre-training via Masking", CVPR): in training
    mode timm's `PatchDropout` keeps the class token and a random max(1, int(N * (1 - p))) of the N patch tokens
    per image (after the position embedding, before the blocks), drawn from the global torch RNG; in eval mode
    it is the identity. timm: layers/patch_dropout.py, VisionTransformer(patch_drop_rate=...)."""
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=image_size,
                              global_pool="token", patch_drop_rate=patch_dropout, **overrides)
    for block in model.blocks:
        block.attn = TimmAttention(block.attn)
    return model


# OpenAI-CLIP style ViT for the small sizes: ln_pre, QuickGELU, LayerNorm eps 1e-5 (timm's default is 1e-6)
_CLIP_VIT = dict(pre_norm=True, act_layer="quick_gelu", norm_layer=nn.LayerNorm)


@backbone_builder("VITT16")
def vit_tiny16(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_tiny_patch16_224", image_size, patch_dropout, **_CLIP_VIT)


@backbone_builder("VITS16")
def vit_small16(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_small_patch16_224", image_size, patch_dropout, **_CLIP_VIT)


@backbone_builder("VITS16MOCO")
def vit_small16_moco(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    """MoCo-v3 ViT-S/16: 12 heads of width 32 instead of 6 of width 64."""
    return _timm_vit("vit_small_patch16_224", image_size, patch_dropout, num_heads=12, **_CLIP_VIT)


@backbone_builder("VITB16")
def vit_base16(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_base_patch16_clip_quickgelu_224", image_size, patch_dropout)


@backbone_builder("VITB32")
def vit_base32(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_base_patch32_clip_quickgelu_224", image_size, patch_dropout)


@backbone_builder("VITL14")
def vit_large14(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_large_patch14_clip_quickgelu_224", image_size, patch_dropout)


@backbone_builder("VITL14336")
def vit_large14_336(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_large_patch14_clip_quickgelu_336", image_size, patch_dropout)


@backbone_builder("VITH14")
def vit_huge14(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_huge_patch14_clip_quickgelu_224", image_size, patch_dropout)


@backbone_builder("R50")
def resnet50(image_size: int) -> nn.Module:
    """timm ResNet-50 with global average pooling (clip-rocket's R50)."""
    return timm.create_model("resnet50", pretrained=False, num_classes=0)


@backbone_builder("RN50")
def openai_resnet50(image_size: int) -> nn.Module:
    """OpenAI's ModifiedResNet-50 (3-conv stem, anti-aliased strides, attention pool to 1024-d), as in
    OpenAI CLIP and Chinese-CLIP RN50; open_clip's implementation. Its attention pool is the image projection."""
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet(layers=[3, 4, 6, 3], output_dim=1024, heads=32, image_size=image_size, width=64)


# --------------------------------------------------------------------------- text towers
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    """Pre-LN causal transformer block with OpenAI CLIP's parameter names."""

    def __init__(self, width: int, heads: int, dropout_prob: float = 0.0, drop_path_prob: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        # regularisers of CL2L's strong texts only (forward(strong=True)); no parameters, no state_dict keys
        self.strong_dropout = nn.Dropout(dropout_prob)
        self.strong_drop_path = timm.layers.DropPath(drop_path_prob) if drop_path_prob > 0 else nn.Identity()
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

    def forward(self, x: torch.Tensor, strong: bool = False) -> torch.Tensor:
        if strong:  # clip-rocket's "local" mode: dropout on the block input, drop-path on both branches
            x = self.strong_dropout(x)
            x = x + self.strong_drop_path(self.attention(self.ln_1(x)))
            return x + self.strong_drop_path(self.mlp(self.ln_2(x)))
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPTextTransformer(nn.Module):
    """OpenAI CLIP text encoder: token + learned position embeddings, causal pre-LN blocks, EOT pooling."""

    def __init__(self, width: int, heads: int, layers: int, vocab_size: int = 49408,
                 context_length: int = 77, dropout_prob: float = 0.0, drop_path_prob: float = 0.0) -> None:
        super().__init__()
        self.width, self.context_length = width, context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList(TextBlock(width, heads, dropout_prob, drop_path_prob) for _ in range(layers))
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

    def forward(self, tokens: torch.Tensor, strong: bool = False) -> torch.Tensor:
        """tokens (B, L) int64 with EOT = the largest id -> (B, width) features at EOT.

        strong=True applies the strong-text dropout / drop-path of the blocks (CL2L's augmented texts)."""
        eot = tokens.argmax(dim=-1)  # (B,)
        # causal attention: positions after the last EOT of the batch never influence it, so trimming is exact
        length = _trimmed_length(tokens, lambda: int(eot.max()) + 1)
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]  # (B, L', W)
        for block in self.resblocks:
            x = checkpoint(block, x, strong, use_reentrant=False) if self.grad_checkpointing and self.training \
                else block(x, strong)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


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
        # trailing all-pad columns are masked out: trimming is exact
        length = _trimmed_length(tokens, lambda: int(mask.sum(dim=1).max()))
        out = self.bert(input_ids=tokens[:, :length], attention_mask=mask[:, :length].long())
        return out.last_hidden_state[:, 0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every BERT layer in the backward pass (non-reentrant torch.utils.checkpoint)."""
        if enable:
            self.bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.bert.activation_checkpointing_disable()


# --------------------------------------------------------------------------- dual encoder
class CLIP(nn.Module):
    """Image tower + text tower + linear projectors + learnable temperature (Radford et al., 2021).

    forward(images (B,3,H,W), tokens (B,L)) -> {"image_embed" (B,D), "text_embed" (B,D) L2-normalised in
    fp32, "logit_scale" () = exp(learned log-scale)}.
    """

    def __init__(self, visual: nn.Module, vision_width: int, text: nn.Module, text_width: int, embed_dim: int,
                 opts: RecipeOptions, vision_projected: bool = False) -> None:
        super().__init__()
        self.visual, self.text = visual, text
        # head z: linear (CLIP) or an MLP (clip-rocket's --clip-proj-type mlp); a tower that projects itself
        # (OpenAI RN50's attention pool) gets no image projection
        self.image_projection = nn.Identity() if vision_projected else \
            projector(opts.clip_proj_type, vision_width, opts.clip_hidden_dim, embed_dim)
        self.text_projection = projector(opts.clip_proj_type, text_width, opts.clip_hidden_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.opts = opts

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

    def before_optimizer_step(self, step: int) -> None:
        """Hook run on the gradients before optimizer step `step` (0-based); SWALIPV1 freezes prototypes."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook run after optimizer step `step` of `total_steps` (1-based count done); BYOLIP's EMA update."""

    def after_weights_loaded(self) -> None:
        """Hook run after --pretrained weights were copied in; BYOLIP re-copies its target network."""


# --------------------------------------------------------------------------- CLIP🚀 (CL2L) and its family
def build_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3, bias: bool = True,
              last_bn: str | None = None) -> nn.Sequential:
    """(num_layers - 1) x [Linear - BatchNorm1d - ReLU] then Linear; last_bn 'affine'/'plain' adds a final BN
    (with / without affine parameters). BN normalises over the (micro-)batch of each rank."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out, bias=bias), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], out_dim, bias=bias))
    if last_bn is not None:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn == "affine"))
    return nn.Sequential(*layers)


def projector(kind: str, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """'linear' (bias-free, std in_dim^-0.5 as CLIP) or a 3-layer 'mlp' with BN."""
    if kind == "mlp":
        return build_mlp(in_dim, hidden_dim, out_dim, num_layers=3)
    if kind != "linear":
        raise ValueError(f"projector type must be 'linear' or 'mlp', got {kind!r}")
    layer = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.normal_(layer.weight, std=in_dim ** -0.5)
    return layer


MODEL_CLASSES: dict[str, type] = {"CLIP": CLIP}


def register_model_class(cls: type) -> type:
    """Decorator: make a CLIP subclass available to the registry's ObjectiveSpec.model under its class name."""
    MODEL_CLASSES[cls.__name__] = cls
    return cls


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


@register_model_class
class CL2L(CLIP):
    """CLIP🚀 (Fini et al., 2023): a weak global pair through the CLIP projector (head "z") plus A strong
    image views and A strong texts through the l2l projectors (head "h", MLP with BN when --separate-proj);
    A = num_augs (--num-augs) is the shape letter of the strong-view axis here and in losses.py.

    forward(images (B,3,H,W) weak view, tokens (B,1+A,L) weak text then A strong texts, images_strong
    (B,A,3,H',W')) -> {"image_embed","text_embed" (B,D), "image_strong_embed","text_strong_embed" (B,A,D),
    all L2-normalised fp32, "logit_scale", "h_logit_scale"} plus the heads' outputs of subclasses.
    Every per-sample output is batch-first, so exact gradient accumulation can concatenate them.
    """

    embedding_heads = ("z", "h")

    def __init__(self, visual: nn.Module, vision_width: int, text: nn.Module, text_width: int, embed_dim: int,
                 opts: RecipeOptions, vision_projected: bool = False) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim, opts, vision_projected)
        if opts.separate_proj:
            self.l2l_image_projection = projector(opts.cl2l_img_proj_type, vision_width, opts.cl2l_hidden_dim,
                                                   embed_dim)
            self.l2l_text_projection = projector(opts.cl2l_txt_proj_type, text_width, opts.cl2l_hidden_dim,
                                                  embed_dim)
            self.l2l_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.1)))

    def project_h(self, feats: torch.Tensor, modality: str) -> torch.Tensor:
        """Head h: the l2l projector (the CLIP projector itself without --separate-proj)."""
        if self.opts.separate_proj:
            proj = self.l2l_image_projection if modality == "image" else self.l2l_text_projection
        else:
            proj = self.image_projection if modality == "image" else self.text_projection
        return proj(feats)

    def encode_image(self, images: torch.Tensor, head: str = "z") -> torch.Tensor:
        """(B,3,H,W) -> (B,D) unnormalised features of head "z" (CLIP projector) or "h" (l2l projector)."""
        assert head in self.embedding_heads, f"unknown head {head!r}"
        feats = self.visual(images)
        return self.image_projection(feats) if head == "z" else self.project_h(feats, "image")

    def encode_text(self, tokens: torch.Tensor, head: str = "z") -> torch.Tensor:
        """(B,L) -> (B,D) unnormalised features of head "z" or "h"."""
        assert head in self.embedding_heads, f"unknown head {head!r}"
        feats = self.text(tokens)
        return self.text_projection(feats) if head == "z" else self.project_h(feats, "text")

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                images_strong: torch.Tensor) -> dict[str, torch.Tensor]:
        B, A = images_strong.shape[:2]
        if tokens.shape[1] != 1 + A:
            raise ValueError(f"CL2L expects tokens (B, 1+A, L) with A = {A} strong views, got {tuple(tokens.shape)}")
        feats = {"image": self.visual(images), "text": self.text(tokens[:, 0])}  # (B, W)
        text_for_z = feats["text"].detach() if self.opts.detach_proj else feats["text"]
        out = {"image_embed": _norm(self.image_projection(feats["image"])),
               "text_embed": _norm(self.text_projection(text_for_z)),
               "logit_scale": self.logit_scale.exp()}
        if A > 0:  # all strong views in one pass: (B*A, ...) sample-major, viewed back as (B, A, ...)
            feats["image_strong"] = self.visual(images_strong.flatten(0, 1))  # (B*A, Wv)
            feats["text_strong"] = self.text(tokens[:, 1:].flatten(0, 1), strong=True)  # (B*A, Wt)
            out["image_strong_embed"] = _norm(self.project_h(feats["image_strong"], "image")).view(B, A, -1)
            out["text_strong_embed"] = _norm(self.project_h(feats["text_strong"], "text")).view(B, A, -1)
        else:
            empty = out["image_embed"].new_zeros(B, 0, out["image_embed"].shape[-1])
            out["image_strong_embed"], out["text_strong_embed"] = empty, empty
        scale = self.l2l_logit_scale if self.opts.separate_proj else self.logit_scale
        out["h_logit_scale"] = scale.exp()
        out.update(self.head_outputs(feats, (images, tokens, images_strong), B, A))
        return out

    def head_outputs(self, feats: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...], B: int,
                     A: int) -> dict[str, torch.Tensor]:
        """Extra outputs of a non-contrastive head from the backbone features `feats` (keys image, text,
        image_strong, text_strong) and the forward's inputs (none for plain CL2L)."""
        return {}

    @torch.no_grad()
    def clamp_logit_scale(self, max_log: float = math.log(100.0)) -> None:
        """Clamp logit_scale, and l2l_logit_scale when it exists (the reference clamps it unconditionally)."""
        super().clamp_logit_scale(max_log)
        if self.opts.separate_proj:
            self.l2l_logit_scale.clamp_(0, max_log)


def _apply(module_global: nn.Module, module_strong: nn.Module, feats: dict[str, torch.Tensor], modality: str,
           B: int, A: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(global (B,P), strong (B,A,P)) outputs of a head applied to the global and strong features."""
    out = module_global(feats[modality])
    if A == 0:
        return out, out.new_zeros(B, 0, out.shape[-1])
    return out, module_strong(feats[f"{modality}_strong"]).view(B, A, -1)


@register_model_class
class BARLIP(CL2L):
    """CL2L + Barlow Twins heads: Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN (hidden 3000, out 8192), one per
    modality; separate strong-view copies with --separate-proj-child. Adds v_image, v_text (B,P),
    v_image_strong, v_text_strong (B,A,P)."""

    def __init__(self, visual: nn.Module, vision_width: int, text: nn.Module, text_width: int, embed_dim: int,
                 opts: RecipeOptions, vision_projected: bool = False) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim, opts, vision_projected)

        def head(width: int) -> nn.Module:
            return build_mlp(width, opts.barlip_hidden_dim, opts.barlip_proj_dim, num_layers=3, last_bn="affine")

        self.barlip_image_head, self.barlip_text_head = head(vision_width), head(text_width)
        if opts.separate_proj_child:
            self.barlip_image_head_strong, self.barlip_text_head_strong = head(vision_width), head(text_width)

    def head_outputs(self, feats, inputs, B, A):
        child = self.opts.separate_proj_child
        v_i, v_is = _apply(self.barlip_image_head, self.barlip_image_head_strong if child else self.barlip_image_head,
                           feats, "image", B, A)
        v_t, v_ts = _apply(self.barlip_text_head, self.barlip_text_head_strong if child else self.barlip_text_head,
                           feats, "text", B, A)
        return {"v_image": v_i, "v_text": v_t, "v_image_strong": v_is, "v_text_strong": v_ts}


class _SiamHeads(nn.Module):
    """SimSiam projector Linear(no bias)-BN-ReLU-Linear(no bias) [+ BN(affine=False)] per modality, and the
    cross-modal predictors Linear(no bias)-BN-ReLU-Linear (image->text, text->image)."""

    def __init__(self, vision_width: int, text_width: int, opts: RecipeOptions) -> None:
        super().__init__()
        last = None if opts.siamlip_no_last_bn else "plain"
        dim, hidden = opts.siamlip_proj_dim, opts.siamlip_hidden_dim
        self.image_projector = build_mlp(vision_width, hidden, dim, num_layers=2, bias=False, last_bn=last)
        self.text_projector = build_mlp(text_width, hidden, dim, num_layers=2, bias=False, last_bn=last)
        self.image_text_predictor = _predictor(dim, hidden)
        self.text_image_predictor = _predictor(dim, hidden)


def _predictor(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


class MomentumTarget(nn.Module):
    """BYOL target network (Grill et al., 2020): copies of the towers and SimSiam projectors, no gradient,
    updated by EMA  theta_t <- tau * theta_t + (1 - tau) * theta  after every optimizer step. It runs in the
    online model's train/eval mode (BN with batch statistics in training, as the reference)."""

    def __init__(self, model: SIAMLIP) -> None:
        super().__init__()
        self.visual, self.text = copy.deepcopy(model.visual), copy.deepcopy(model.text)
        self.heads = copy.deepcopy(model.siam_heads)
        self.heads_strong = copy.deepcopy(model.siam_heads_strong) if model.opts.separate_proj_child else None
        for p in self.parameters():
            p.requires_grad_(False)

    def pairs(self, model: SIAMLIP) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(target, online) parameter pairs in a fixed order."""
        online = [model.visual, model.text, model.siam_heads] + \
            ([model.siam_heads_strong] if self.heads_strong is not None else [])
        target = [self.visual, self.text, self.heads] + ([self.heads_strong] if self.heads_strong is not None else [])
        return [pair for t, o in zip(target, online) for pair in zip(t.parameters(), o.parameters())]


def momentum_tau(base_tau: float, schedule: str, step: int, total_steps: int) -> float:
    """EMA coefficient after `step` of `total_steps`: constant, or BYOL's cosine
    tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2 (tau rises to 1)."""
    if schedule == "constant":
        return base_tau
    if schedule == "cosine":
        return 1 - (1 - base_tau) * (math.cos(math.pi * step / max(total_steps, 1)) + 1) / 2
    raise ValueError(f"momentum tau schedule must be 'constant' or 'cosine', got {schedule!r}")


@register_model_class
class SIAMLIP(CL2L):
    """CL2L + cross-modal SimSiam heads (SiamLIP); with opts.momentum, a BYOL target network (BYOLIP).

    Adds v_image, v_text (B,P) and v_image_strong, v_text_strong (B,A,P) (projector outputs), p_* (the
    predictors: p_image = image->text predictor(v_image)), and with momentum v_*_momentum from the target."""

    def __init__(self, visual: nn.Module, vision_width: int, text: nn.Module, text_width: int, embed_dim: int,
                 opts: RecipeOptions, vision_projected: bool = False) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim, opts, vision_projected)
        self.siam_heads = _SiamHeads(vision_width, text_width, opts)
        self.siam_heads_strong = _SiamHeads(vision_width, text_width, opts) if opts.separate_proj_child else None
        self.target = MomentumTarget(self) if opts.momentum else None

    def _siam(self, heads: nn.Module, heads_strong: nn.Module | None, feats, B, A) -> dict[str, torch.Tensor]:
        strong = heads_strong if heads_strong is not None else heads
        v_i, v_is = _apply(heads.image_projector, strong.image_projector, feats, "image", B, A)
        v_t, v_ts = _apply(heads.text_projector, strong.text_projector, feats, "text", B, A)
        return {"v_image": v_i, "v_text": v_t, "v_image_strong": v_is, "v_text_strong": v_ts}

    def head_outputs(self, feats, inputs, B, A):
        out = self._siam(self.siam_heads, self.siam_heads_strong, feats, B, A)
        strong = self.siam_heads_strong if self.siam_heads_strong is not None else self.siam_heads
        out["p_image"] = self.siam_heads.image_text_predictor(out["v_image"])
        out["p_text"] = self.siam_heads.text_image_predictor(out["v_text"])
        P = out["v_image"].shape[-1]
        out["p_image_strong"] = strong.image_text_predictor(out["v_image_strong"].reshape(B * A, P)).view(B, A, -1)
        out["p_text_strong"] = strong.text_image_predictor(out["v_text_strong"].reshape(B * A, P)).view(B, A, -1)
        if self.target is not None:
            out.update({f"{k}_momentum": v.detach() for k, v in self._target_outputs(inputs, B, A).items()})
        return out

    @torch.no_grad()
    def _target_outputs(self, inputs: tuple[torch.Tensor, ...], B: int, A: int) -> dict[str, torch.Tensor]:
        """The target network's v_* on the same inputs (same train/eval mode as the online model)."""
        t, (images, tokens, images_strong) = self.target, inputs
        target_feats = {"image": t.visual(images), "text": t.text(tokens[:, 0])}
        if A > 0:
            target_feats["image_strong"] = t.visual(images_strong.flatten(0, 1))
            target_feats["text_strong"] = t.text(tokens[:, 1:].flatten(0, 1), strong=True)
        return self._siam(t.heads, t.heads_strong, target_feats, B, A)

    @torch.no_grad()
    def after_weights_loaded(self) -> None:
        """--pretrained changed the online towers: the BYOL target starts again as their copy."""
        if self.target is not None:
            for p_t, p in self.target.pairs(self):
                p_t.copy_(p)

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """BYOL EMA of the target network (no-op without momentum)."""
        if self.target is None:
            return
        tau = momentum_tau(self.opts.momentum_tau, self.opts.momentum_tau_schedule, step, total_steps)
        for p_t, p in self.target.pairs(self):
            p_t.mul_(tau).add_(p.detach(), alpha=1 - tau)


@register_model_class
class BYOLIP(SIAMLIP):
    """SiamLIP with the BYOL momentum target network always on (clip-rocket's `*_SIAMLIP --momentum`)."""

    def __init__(self, visual: nn.Module, vision_width: int, text: nn.Module, text_width: int, embed_dim: int,
                 opts: RecipeOptions, vision_projected: bool = False) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim, dataclasses.replace(opts, momentum=True),
                         vision_projected)


@register_model_class
class SWALIPV1(CLIP):
    """CLIP + SwAV heads with learned prototypes (clip-rocket's SWALIPV1): projector Linear-BN-ReLU-Linear
    (hidden 2048, out 128) per modality, K unit-norm prototypes (weight-normalised, g fixed at 1) shared
    between modalities unless swalip_no_shared_proto, temperature 1/exp(swalip_logit_scale) learnable only
    with swalip_learn_temperature. Adds p_image, p_text (B, K) cosine scores and swalip_logit_scale.
    Prototype gradients are dropped for the first swalip_freeze_proto_iters optimizer steps."""

    def __init__(self, visual: nn.Module, vision_width: int, text: nn.Module, text_width: int, embed_dim: int,
                 opts: RecipeOptions, vision_projected: bool = False) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim, opts, vision_projected)
        dim, hidden = opts.swalip_proj_dim, opts.swalip_hidden_dim
        self.swalip_image_projector = build_mlp(vision_width, hidden, dim, num_layers=2)
        self.swalip_text_projector = build_mlp(text_width, hidden, dim, num_layers=2)
        self.prototypes = nn.Linear(dim, opts.swalip_num_proto, bias=False)
        self.text_prototypes = None if not opts.swalip_no_shared_proto else \
            nn.Linear(dim, opts.swalip_num_proto, bias=False)
        log_scale = torch.tensor(math.log(1 / opts.swalip_temperature))
        if opts.swalip_learn_temperature:
            self.swalip_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("swalip_logit_scale", log_scale)

    def _scores(self, h: torch.Tensor, prototypes: nn.Linear) -> torch.Tensor:
        return _norm(h) @ _norm(prototypes.weight).t()  # (B, K) cosine to each unit prototype

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        f_i, f_t = self.visual(images), self.text(tokens)  # (B, W)
        text_protos = self.text_prototypes if self.text_prototypes is not None else self.prototypes
        return {"image_embed": _norm(self.image_projection(f_i)), "text_embed": _norm(self.text_projection(f_t)),
                "logit_scale": self.logit_scale.exp(),
                "p_image": self._scores(self.swalip_image_projector(f_i), self.prototypes),
                "p_text": self._scores(self.swalip_text_projector(f_t), text_protos),
                "swalip_logit_scale": self.swalip_logit_scale.exp()}

    def before_optimizer_step(self, step: int) -> None:
        """Drop the prototypes' gradients (AdamW then skips them) while step < swalip_freeze_proto_iters."""
        if step < self.opts.swalip_freeze_proto_iters:
            for name, p in self.named_parameters():
                if "prototypes" in name:
                    p.grad = None

    @torch.no_grad()
    def clamp_logit_scale(self, max_log: float = math.log(100.0)) -> None:
        super().clamp_logit_scale(max_log)
        if self.opts.swalip_learn_temperature:
            self.swalip_logit_scale.clamp_(0, max_log)


@register_model_class
class SIGLIP(CLIP):
    """CLIP towers trained with the sigmoid loss (Zhai et al., 2023): temperature t = exp(logit_scale)
    initialised at 10 and a learnable bias initialised at -10. Adds "logit_bias" to the outputs."""

    def __init__(self, visual: nn.Module, vision_width: int, text: nn.Module, text_width: int, embed_dim: int,
                 opts: RecipeOptions, vision_projected: bool = False) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim, opts, vision_projected)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(10.0))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**super().forward(images, tokens), "logit_bias": self.logit_bias}


# every registered backbone and objective model has its constructor here (and nothing unregistered is built)
_unbuilt = sorted(set(BACKBONES) ^ set(BACKBONE_BUILDERS)) + \
    sorted({o.model for o in OBJECTIVES.values()} - set(MODEL_CLASSES))
if _unbuilt:
    raise ImportError(f"registry.py and models.py disagree on {_unbuilt}: register a builder for each registry name")


def build_text_tower(spec: ModelSpec, text_model: str, width: int | None, heads: int | None, layers: int | None,
                     context_length: int, dropout_prob: float = 0.0, drop_path_prob: float = 0.0) -> nn.Module:
    """The text tower of `spec`: a Chinese BERT named `text_model` (CNCLIP), or the CLIP transformer with the
    strong-text regularisers dropout_prob / drop_path_prob (CL2L's augmented texts only)."""
    if spec.base.text_family == "bert":
        return BertTextTower(text_model)
    return CLIPTextTransformer(width, heads, layers, context_length=context_length, dropout_prob=dropout_prob,
                               drop_path_prob=drop_path_prob)


def build_model(spec: ModelSpec, *, image_size: int | None = None, embed_dim: int | None = None,
                text_model: str | None = None, text_width: int | None = None, text_heads: int | None = None,
                text_layers: int | None = None, context_length: int | None = None,
                checkpoint_grad: bool = False, recipe: RecipeOptions | Mapping | None = None,
                patch_dropout: float = 0.0) -> nn.Module:
    """Instantiate the dual encoder named by `spec`; `None` means the registered preset
    (`registry.resolve_build_kwargs`, the same resolution `model_config` stores in checkpoints).

    `recipe` (RecipeOptions or its dict form) carries the options of the CL2L family / SWALIPV1 / SigLIP and of
    the projectors (defaults when None); the class is the objective's registered model class. `patch_dropout`
    p in [0, 1): FLIP's random patch-token dropping in training mode (ViT backbones only, see `_timm_vit`); a
    training setting, not part of the description. Raises ModelNameError for a text model the base lacks, an
    embedding size a self-projecting tower cannot give, or patch dropout on a backbone without patch tokens."""
    kw = resolve_build_kwargs(spec, image_size=image_size, embed_dim=embed_dim, text_model=text_model,
                              text_width=text_width, text_heads=text_heads, text_layers=text_layers,
                              context_length=context_length, recipe=recipe)
    opts = RecipeOptions(**kw["recipe"])
    if spec.backbone.projected and kw["embed_dim"] != spec.backbone.embed_dim:
        raise ModelNameError(f"{spec.backbone.name} projects to {spec.backbone.embed_dim} dims itself; "
                             f"--embed-dim {kw['embed_dim']} is not possible")
    if patch_dropout and not spec.backbone.vit:
        raise ModelNameError(f"patch dropout needs a ViT backbone; {spec.backbone.name} has no patch tokens")
    if not 0.0 <= patch_dropout < 1.0:
        raise ValueError(f"patch_dropout must be in [0, 1), got {patch_dropout}")
    build = BACKBONE_BUILDERS[spec.backbone.name]
    visual = build(kw["image_size"], patch_dropout=patch_dropout) if spec.backbone.vit else build(kw["image_size"])
    text = build_text_tower(spec, kw["text_model"], kw["text_width"], kw["text_heads"], kw["text_layers"],
                            kw["context_length"], opts.text_dropout_prob, opts.text_drop_path_prob)
    model = MODEL_CLASSES[spec.objective.model](visual, spec.backbone.width, text, text.width, kw["embed_dim"], opts,
                                                vision_projected=spec.backbone.projected)
    if checkpoint_grad:
        model.set_grad_checkpointing(True)
    return model


def build_from_config(config: Mapping, checkpoint_grad: bool = False, patch_dropout: float = 0.0) -> nn.Module:
    """The model a description `{"name", "kwargs"}` (`model_config`, as checkpoints store it) names, with the
    training settings `checkpoint_grad` and `patch_dropout` (not part of a description); a keyword this version's
    build_model does not take is a ModelNameError naming it."""
    described = set(inspect.signature(build_model).parameters) - {"spec", "checkpoint_grad", "patch_dropout"}
    unknown = sorted(set(config["kwargs"]) - described)
    if unknown:
        raise ModelNameError(f"model description of {config['name']}: build_model takes no {unknown}")
    return build_model(parse_model_name(config["name"]), checkpoint_grad=checkpoint_grad, patch_dropout=patch_dropout,
                       **config["kwargs"])


@functools.cache
def vision_tower_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """{state_dict key: shape} of backbone `backbone`'s vision tower at its registered image size, built on the
    meta device (no memory, no init cost); what `weights.infer_config` compares released weights with."""
    with torch.device("meta"):
        tower = BACKBONE_BUILDERS[backbone](BACKBONES[backbone].image_size)
    return {k: tuple(v.shape) for k, v in tower.state_dict().items()}
