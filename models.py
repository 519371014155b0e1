"""Dual encoders and their registries.

A model name is `<BASE>_<BACKBONE>_<NAME>`: BASE picks the model class and text family (CLIP with the
OpenAI text transformer and BPE tokens, CNCLIP with a Chinese BERT and wordpiece tokens), BACKBONE a
timm vision tower, NAME the objective. The three parts are registered with decorators and a name is
parsed by matching registered keys (never `split('_')`), so `list_models()` is the exact set of
valid names and a typo fails at parse time with a close-match suggestion.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

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


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the trailing token columns that are padding (id 0) in every row: (..., L) -> (..., L').

    Exact for both text towers: CLIP BPE pads with 0 after EOT and attends causally, BERT pads with
    0 and masks the padding. Call it on host (CPU) tensors before moving them to the GPU: on CUDA the
    towers skip their own trimming, whose data-dependent length would stall the GPU queue.
    """
    used = (tokens != 0).reshape(-1, tokens.shape[-1]).any(dim=0)  # (L,)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return tokens[..., :length]


def _trimmed_length(tokens: torch.Tensor, length_of) -> int:
    """Context kept by a text tower: `length_of()` (a host sync) on CPU; all of it on CUDA (the caller
    trimmed on the host with `trim_padding`) and under torch.compile (a data-dependent shape breaks the graph)."""
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
    projected: bool = False  # the tower ends in its own projection to embed_dim (OpenAI's attention pool)
    vit: bool = False  # a timm ViT: build(image_size, patch_dropout=p) drops patch tokens (FLIP)


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, *, width: int, image_size: int, embed_dim: int, text: TextPreset,
                      projected: bool = False, vit: bool = False):
    """Decorator registering a vision-tower factory `fn(image_size) -> nn.Module` under `name`; a ViT (`vit=True`)
    factory also takes `patch_dropout`."""

    def wrap(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        BACKBONES[name] = BackboneSpec(name, fn, width, image_size, embed_dim, text, projected, vit)
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
TEXT_B = TextPreset(512, 8, 12, "RoBERTa-wwm-ext-base-chinese")


@register_backbone("VITT16", width=192, image_size=224, embed_dim=256, vit=True,
                   text=TextPreset(192, 3, 4, "BERT-tiny-chinese"))
def vit_tiny16(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_tiny_patch16_224", image_size, patch_dropout, **_CLIP_VIT)


@register_backbone("VITS16", width=384, image_size=224, embed_dim=256, vit=True, text=TEXT_B)
def vit_small16(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_small_patch16_224", image_size, patch_dropout, **_CLIP_VIT)


@register_backbone("VITS16MOCO", width=384, image_size=224, embed_dim=256, vit=True, text=TEXT_B)
def vit_small16_moco(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    """MoCo-v3 ViT-S/16: 12 heads of width 32 instead of 6 of width 64."""
    return _timm_vit("vit_small_patch16_224", image_size, patch_dropout, num_heads=12, **_CLIP_VIT)


@register_backbone("VITB16", width=768, image_size=224, embed_dim=512, vit=True, text=TEXT_B)
def vit_base16(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_base_patch16_clip_quickgelu_224", image_size, patch_dropout)


@register_backbone("VITB32", width=768, image_size=224, embed_dim=512, vit=True, text=TEXT_B)
def vit_base32(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_base_patch32_clip_quickgelu_224", image_size, patch_dropout)


@register_backbone("VITL14", width=1024, image_size=224, embed_dim=768, vit=True,
                   text=TextPreset(768, 12, 12, "RoBERTa-wwm-ext-base-chinese"))
def vit_large14(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_large_patch14_clip_quickgelu_224", image_size, patch_dropout)


@register_backbone("VITL14336", width=1024, image_size=336, embed_dim=768, vit=True,
                   text=TextPreset(768, 12, 12, "RoBERTa-wwm-ext-base-chinese"))
def vit_large14_336(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_large_patch14_clip_quickgelu_336", image_size, patch_dropout)


@register_backbone("VITH14", width=1280, image_size=224, embed_dim=1024, vit=True,
                   text=TextPreset(1024, 16, 24, "RoBERTa-wwm-ext-large-chinese"))
def vit_huge14(image_size: int, patch_dropout: float = 0.0) -> nn.Module:
    return _timm_vit("vit_huge_patch14_clip_quickgelu_224", image_size, patch_dropout)


@register_backbone("R50", width=2048, image_size=224, embed_dim=1024,
                   text=TextPreset(512, 8, 12, "RBT3-chinese"))
def resnet50(image_size: int) -> nn.Module:
    """timm ResNet-50 with global average pooling (clip-rocket's R50)."""
    return timm.create_model("resnet50", pretrained=False, num_classes=0)


@register_backbone("RN50", width=1024, image_size=224, embed_dim=1024, projected=True,
                   text=TextPreset(512, 8, 12, "RBT3-chinese"))
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

    def before_optimizer_step(self, step: int) -> None:
        """Hook run on the gradients before optimizer step `step` (0-based); SWALIPV1 freezes prototypes."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook run after optimizer step `step` of `total_steps` (1-based count done); BYOLIP's EMA update."""

    def after_weights_loaded(self) -> None:
        """Hook run after --pretrained weights were copied in; BYOLIP re-copies its target network."""


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
    model: str = "CLIP"  # key of MODEL_CLASSES: the dual-encoder class this objective trains


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


# --------------------------------------------------------------------------- CLIP🚀 (CL2L) and its family
@dataclass(frozen=True)
class RecipeOptions:
    """Constructor options of the CL2L family, SWALIPV1 and SigLIP (main.model_kwargs fills it from flags).

    A frozen dataclass, so a misspelled option fails at construction. Fields mirror clip-rocket's flags.
    """

    clip_proj_type: str = "linear"  # projector of the global pair (head z): linear | mlp
    clip_hidden_dim: int = 4096
    separate_proj: bool = False  # own MLP projectors + own temperature (init 1/0.1) for the strong views
    cl2l_img_proj_type: str = "mlp"  # projector of the strong views (head h): mlp | linear
    cl2l_txt_proj_type: str = "mlp"
    cl2l_hidden_dim: int = 4096
    detach_proj: bool = False  # the global text projector sees detached text features
    separate_proj_child: bool = False  # non-contrastive heads: separate copies for the strong views
    text_dropout_prob: float = 0.0  # strong texts only
    text_drop_path_prob: float = 0.0  # strong texts only
    barlip_proj_dim: int = 8192
    barlip_hidden_dim: int = 3000
    siamlip_proj_dim: int = 128
    siamlip_hidden_dim: int = 2048
    siamlip_no_last_bn: bool = False
    momentum: bool = False  # BYOL target network (forced on by BYOLIP)
    momentum_tau: float = 0.99
    momentum_tau_schedule: str = "constant"  # constant | cosine (BYOL: tau -> 1)
    swalip_proj_dim: int = 128
    swalip_hidden_dim: int = 2048
    swalip_num_proto: int = 3000
    swalip_temperature: float = 0.1
    swalip_learn_temperature: bool = False
    swalip_no_shared_proto: bool = False
    swalip_freeze_proto_iters: int = 100


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


def _projector(kind: str, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """'linear' (bias-free, std in_dim^-0.5 as CLIP) or a 3-layer 'mlp' with BN."""
    if kind == "mlp":
        return build_mlp(in_dim, hidden_dim, out_dim, num_layers=3)
    if kind != "linear":
        raise ValueError(f"projector type must be 'linear' or 'mlp', got {kind!r}")
    layer = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.normal_(layer.weight, std=in_dim ** -0.5)
    return layer


MODEL_CLASSES: dict[str, type] = {"CLIP": CLIP}


def register_model_class(name: str):
    """Decorator: make a CLIP subclass available to ObjectiveSpec.model under `name`."""

    def wrap(cls: type) -> type:
        MODEL_CLASSES[name] = cls
        return cls

    return wrap


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


@register_model_class("CL2L")
class CL2L(CLIP):
    """CLIP🚀 (Fini et al., 2023): a weak global pair through the CLIP projector (head "z") plus A strong
    image views and A strong texts through the l2l projectors (head "h", MLP with BN when --separate-proj).

    forward(images (B,3,H,W) weak view, tokens (B,1+A,L) weak text then A strong texts, images_strong
    (B,A,3,H',W')) -> {"image_embed","text_embed" (B,D), "image_strong_embed","text_strong_embed" (B,A,D),
    all L2-normalised fp32, "logit_scale", "h_logit_scale"} plus the heads' outputs of subclasses.
    Every per-sample output is batch-first, so exact gradient accumulation can concatenate them.
    """

    embedding_heads = ("z", "h")

    def __init__(self, visual: nn.Module, vision_width: int, text: nn.Module, text_width: int, embed_dim: int,
                 opts: RecipeOptions) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim)
        self.opts = opts
        if opts.separate_proj:
            self.l2l_image_projection = _projector(opts.cl2l_img_proj_type, vision_width, opts.cl2l_hidden_dim,
                                                   embed_dim)
            self.l2l_text_projection = _projector(opts.cl2l_txt_proj_type, text_width, opts.cl2l_hidden_dim,
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


@register_model_class("BARLIP")
class BARLIP(CL2L):
    """CL2L + Barlow Twins heads: Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN (hidden 3000, out 8192), one per
    modality; separate strong-view copies with --separate-proj-child. Adds v_image, v_text (B,P),
    v_image_strong, v_text_strong (B,A,P)."""

    def __init__(self, visual, vision_width, text, text_width, embed_dim, opts: RecipeOptions) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim, opts)

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


@register_model_class("SIAMLIP")
class SIAMLIP(CL2L):
    """CL2L + cross-modal SimSiam heads (SiamLIP); with opts.momentum, a BYOL target network (BYOLIP).

    Adds v_image, v_text (B,P) and v_image_strong, v_text_strong (B,A,P) (projector outputs), p_* (the
    predictors: p_image = image->text predictor(v_image)), and with momentum v_*_momentum from the target."""

    def __init__(self, visual, vision_width, text, text_width, embed_dim, opts: RecipeOptions) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim, opts)
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


@register_model_class("BYOLIP")
class BYOLIP(SIAMLIP):
    """SiamLIP with the BYOL momentum target network always on (clip-rocket's `*_SIAMLIP --momentum`)."""

    def __init__(self, visual, vision_width, text, text_width, embed_dim, opts: RecipeOptions) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim, dataclasses.replace(opts, momentum=True))


@register_model_class("SWALIPV1")
class SWALIPV1(CLIP):
    """CLIP + SwAV heads with learned prototypes (clip-rocket's SWALIPV1): projector Linear-BN-ReLU-Linear
    (hidden 2048, out 128) per modality, K unit-norm prototypes (weight-normalised, g fixed at 1) shared
    between modalities unless swalip_no_shared_proto, temperature 1/exp(swalip_logit_scale) learnable only
    with swalip_learn_temperature. Adds p_image, p_text (B, K) cosine scores and swalip_logit_scale.
    Prototype gradients are dropped for the first swalip_freeze_proto_iters optimizer steps."""

    def __init__(self, visual, vision_width, text, text_width, embed_dim, opts: RecipeOptions) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim)
        self.opts = opts
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


@register_model_class("SIGLIP")
class SigLIP(CLIP):
    """CLIP towers trained with the sigmoid loss (Zhai et al., 2023): temperature t = exp(logit_scale)
    initialised at 10 and a learnable bias initialised at -10. Adds "logit_bias" to the outputs."""

    def __init__(self, visual, vision_width, text, text_width, embed_dim, opts: RecipeOptions) -> None:
        super().__init__(visual, vision_width, text, text_width, embed_dim)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(10.0))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**super().forward(images, tokens), "logit_bias": self.logit_bias}


CL2L_METRICS = ("loss", "clip_loss", "clip_loss_image", "clip_loss_text", "clip_loss_image_global",
                "clip_loss_text_global", "clip_loss_image_local", "clip_loss_text_local", "clip_acc",
                "clip_acc_text_global", "clip_acc_image_local", "clip_acc_text_local", "h_logit_scale")
register_base(BaseSpec("CL2L", text_family="clip", tokenizer="bpe", context_length=77, language="en"))
register_objective(ObjectiveSpec("CL2L", loss="cl2l", metric_names=CL2L_METRICS, bases=("CL2L",), num_views=2,
                                 model="CL2L"))
register_objective(ObjectiveSpec("BARLIP", loss="barlip", metric_names=CL2L_METRICS + ("barlip_loss",),
                                 bases=("CL2L",), num_views=2, model="BARLIP"))
register_objective(ObjectiveSpec("SIAMLIP", loss="siamlip", metric_names=CL2L_METRICS + ("siamlip_loss",),
                                 bases=("CL2L",), num_views=2, model="SIAMLIP"))
register_objective(ObjectiveSpec("BYOLIP", loss="siamlip", metric_names=CL2L_METRICS + ("siamlip_loss",),
                                 bases=("CL2L",), num_views=2, model="BYOLIP"))
register_objective(ObjectiveSpec("SWALIP", loss="swalip", metric_names=CL2L_METRICS + ("swalip_loss",),
                                 bases=("CL2L",), num_views=2, model="CL2L"))
register_objective(ObjectiveSpec("SWALIPV1", loss="swalipv1",
                                 metric_names=("loss", "clip_loss", "clip_acc", "swalip_loss", "swalip_logit_scale"),
                                 bases=("CLIP",), model="SWALIPV1"))
register_objective(ObjectiveSpec("SIGLIP", loss="siglip",
                                 metric_names=("loss", "siglip_loss", "clip_acc", "logit_bias"),
                                 bases=("CLIP", "CNCLIP"), model="SIGLIP"))


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
                checkpoint_grad: bool = False, recipe: RecipeOptions | None = None,
                patch_dropout: float = 0.0) -> nn.Module:
    """Instantiate the dual encoder named by `spec`; `None` means the registered preset.

    `recipe` carries the options of the CL2L family / SWALIPV1 / SigLIP (defaults when None); the class
    is the objective's registered model class. `patch_dropout` p in [0, 1): FLIP's random patch-token
    dropping in training mode (ViT backbones only, see `_timm_vit`); a ModelNameError otherwise."""
    recipe = recipe or RecipeOptions()
    size = image_size or spec.backbone.image_size
    if patch_dropout and not spec.backbone.vit:
        raise ModelNameError(f"patch dropout needs a ViT backbone; {spec.backbone.name} has no patch tokens")
    if not 0.0 <= patch_dropout < 1.0:
        raise ValueError(f"patch_dropout must be in [0, 1), got {patch_dropout}")
    visual = spec.backbone.build(size, patch_dropout=patch_dropout) if spec.backbone.vit else spec.backbone.build(size)
    text = build_text_tower(spec, text_model, text_width, text_heads, text_layers,
                            context_length or spec.base.context_length)
    if isinstance(text, CLIPTextTransformer) and (recipe.text_dropout_prob or recipe.text_drop_path_prob):
        for block in text.resblocks:  # strong-text regularisers (parameter-free)
            block.strong_dropout.p = recipe.text_dropout_prob
            if recipe.text_drop_path_prob:
                block.strong_drop_path = timm.layers.DropPath(recipe.text_drop_path_prob)
    embed_dim = embed_dim or spec.backbone.embed_dim
    cls = MODEL_CLASSES[spec.objective.model]
    if cls is CLIP:
        model = CLIP(visual, spec.backbone.width, text, text.width, embed_dim)
    else:
        model = cls(visual, spec.backbone.width, text, text.width, embed_dim, recipe)
    if recipe.clip_proj_type != "linear":  # head z as an MLP (clip-rocket's --clip-proj-type mlp)
        model.image_projection = _projector(recipe.clip_proj_type, spec.backbone.width, recipe.clip_hidden_dim,
                                            embed_dim)
        model.text_projection = _projector(recipe.clip_proj_type, text.width, recipe.clip_hidden_dim, embed_dim)
    if spec.backbone.projected:  # the tower projects itself (OpenAI RN50 attention pool)
        if embed_dim != spec.backbone.embed_dim:
            raise ModelNameError(f"{spec.backbone.name} projects to {spec.backbone.embed_dim} dims itself; "
                                 f"--embed-dim {embed_dim} is not possible")
        model.image_projection = nn.Identity()
    if checkpoint_grad:
        model.set_grad_checkpointing(True)
    return model
