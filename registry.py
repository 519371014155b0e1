"""The model registry: what a `<BASE>_<BACKBONE>_<NAME>` model name means, importable without torch.

A model name is `<BASE>_<BACKBONE>_<NAME>`: BASE picks the model class and text family (CLIP with the
OpenAI text transformer and BPE tokens, CNCLIP with a Chinese BERT and wordpiece tokens, CL2L for the
multi-view CLIP🚀 family), BACKBONE a vision tower, NAME the objective. The three parts are registered here
as data, and a name is parsed by matching registered keys (never `split('_')`), so `list_models()` is the
exact set of valid names and a typo fails at parse time with a close-match suggestion (timm's
`@register_model` + `list_models()` pattern, timm/models/_registry.py).

This module holds no torch code, so `python main.py --help` and `--list-models` answer without importing
torch: models.py registers the constructor of each backbone (`models.backbone_builder`) and each model class
(`models.register_model_class`) under the names used here, and checks at import that every name has one.
The flags of a family (`add_recipe_args`: the `objective:*` and `augment:*` argument groups of main.py) are
declared here beside the bases and objectives that read them, and checked against the model at parse time
(`recipe_errors`).

A model description (`model_config`) is `{"name": ..., "kwargs": {...}}` of `models.build_model` with every
preset resolved and only JSON values (nanoGPT's `model_args`, karpathy/nanoGPT train.py): checkpoints
carry it, so a checkpoint rebuilds its own model without flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import readers


class ModelNameError(ValueError):
    """An unknown or invalid `<BASE>_<BACKBONE>_<NAME>` model name, or options that do not fit it."""


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
    """A vision tower: its output width, default input size and joint embedding size, its text preset.
    The constructor is `models.BACKBONE_BUILDERS[name]` (image_size -> module returning (B, width) features)."""

    name: str
    width: int
    image_size: int
    embed_dim: int
    text: TextPreset
    projected: bool = False  # the tower ends in its own projection to embed_dim (OpenAI's attention pool)
    vit: bool = False  # a timm ViT: its builder takes patch_dropout (FLIP's patch-token dropping)


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


TEXT_B = TextPreset(512, 8, 12, "RoBERTa-wwm-ext-base-chinese")
TEXT_L = TextPreset(768, 12, 12, "RoBERTa-wwm-ext-base-chinese")
TEXT_RN = TextPreset(512, 8, 12, "RBT3-chinese")
register_backbone(BackboneSpec("VITT16", vit=True, width=192, image_size=224, embed_dim=256,
                               text=TextPreset(192, 3, 4, "BERT-tiny-chinese")))
register_backbone(BackboneSpec("VITS16", vit=True, width=384, image_size=224, embed_dim=256, text=TEXT_B))
# MoCo-v3's ViT-S/16 has 12 heads instead of 6: exactly the weight shapes of VITS16
register_backbone(BackboneSpec("VITS16MOCO", vit=True, width=384, image_size=224, embed_dim=256, text=TEXT_B))
register_backbone(BackboneSpec("VITB16", vit=True, width=768, image_size=224, embed_dim=512, text=TEXT_B))
register_backbone(BackboneSpec("VITB32", vit=True, width=768, image_size=224, embed_dim=512, text=TEXT_B))
register_backbone(BackboneSpec("VITL14", vit=True, width=1024, image_size=224, embed_dim=768, text=TEXT_L))
register_backbone(BackboneSpec("VITL14336", vit=True, width=1024, image_size=336, embed_dim=768, text=TEXT_L))
register_backbone(BackboneSpec("VITH14", vit=True, width=1280, image_size=224, embed_dim=1024,
                               text=TextPreset(1024, 16, 24, "RoBERTa-wwm-ext-large-chinese")))
register_backbone(BackboneSpec("R50", width=2048, image_size=224, embed_dim=1024, text=TEXT_RN))
register_backbone(BackboneSpec("RN50", width=1024, image_size=224, embed_dim=1024, text=TEXT_RN, projected=True))

BERT_CONFIGS: dict[str, dict] = {
    # Chinese-CLIP's text configs (OFA-Sys/Chinese-CLIP cn_clip/clip/model_configs/RoBERTa-wwm-ext-*-chinese.json,
    # RBT3-chinese.json); vocab 21128, max positions 512
    "RBT3-chinese": dict(hidden_size=768, num_hidden_layers=3, num_attention_heads=12, intermediate_size=3072),
    "RoBERTa-wwm-ext-base-chinese": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         intermediate_size=3072),
    "RoBERTa-wwm-ext-large-chinese": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                          intermediate_size=4096),
    # tiny tower for CPU tests and the digits-zh demo (same vocab and tokenizer)
    "BERT-tiny-chinese": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}


# --------------------------------------------------------------------------- bases and objectives
@dataclass(frozen=True)
class BaseSpec:
    name: str
    text_family: str  # "clip" (OpenAI transformer) or "bert"
    tokenizer: str  # "bpe" or "bert"
    context_length: int
    language: str  # "en" or "zh": picks captions, templates and text augmentation
    flag_groups: tuple[str, ...] = ()  # main.py argument groups read only by models of this base


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    loss: str  # key understood by losses.build_criterion
    metric_names: tuple[str, ...]
    bases: tuple[str, ...]  # bases this objective is defined for
    num_augs: int = 0  # strong image/text views beyond the global pair (--num-augs's default)
    model: str = "CLIP"  # name of the model class (models.MODEL_CLASSES) this objective trains
    flag_groups: tuple[str, ...] = ()  # main.py argument groups only this objective (and others declaring them) reads
    # (group, switch): groups read only when the boolean flag `switch` is on (SIAMLIP reads the momentum
    # options only with --momentum)
    flag_groups_if: tuple[tuple[str, str], ...] = ()


BASES: dict[str, BaseSpec] = {}
OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_base(spec: BaseSpec) -> BaseSpec:
    BASES[spec.name] = spec
    return spec


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    OBJECTIVES[spec.name] = spec
    return spec


# the flags of the multi-view family: strong views, their projectors and text regularisers, their augmentations
MULTI_VIEW_GROUPS = ("objective:cl2l", "augment:image")
register_base(BaseSpec("CLIP", text_family="clip", tokenizer="bpe", context_length=77, language="en"))
register_base(BaseSpec("CNCLIP", text_family="bert", tokenizer="bert", context_length=52, language="zh"))
register_base(BaseSpec("CL2L", text_family="clip", tokenizer="bpe", context_length=77, language="en",
                       flag_groups=MULTI_VIEW_GROUPS))

CL2L_METRICS = ("loss", "clip_loss", "clip_loss_image", "clip_loss_text", "clip_loss_image_global",
                "clip_loss_text_global", "clip_loss_image_local", "clip_loss_text_local", "clip_acc",
                "clip_acc_text_global", "clip_acc_image_local", "clip_acc_text_local", "h_logit_scale")
register_objective(ObjectiveSpec("CLIP", loss="clip", metric_names=("loss", "clip_loss", "clip_acc"),
                                 bases=("CLIP", "CNCLIP")))
register_objective(ObjectiveSpec("CL2L", loss="cl2l", metric_names=CL2L_METRICS, bases=("CL2L",), num_augs=2,
                                 model="CL2L"))
register_objective(ObjectiveSpec("BARLIP", loss="barlip", metric_names=CL2L_METRICS + ("barlip_loss",),
                                 bases=("CL2L",), num_augs=2, model="BARLIP", flag_groups=("objective:barlip",)))
register_objective(ObjectiveSpec("SIAMLIP", loss="siamlip", metric_names=CL2L_METRICS + ("siamlip_loss",),
                                 bases=("CL2L",), num_augs=2, model="SIAMLIP", flag_groups=("objective:siamlip",),
                                 flag_groups_if=(("objective:byolip", "momentum"),)))
register_objective(ObjectiveSpec("BYOLIP", loss="siamlip", metric_names=CL2L_METRICS + ("siamlip_loss",),
                                 bases=("CL2L",), num_augs=2, model="BYOLIP",
                                 flag_groups=("objective:siamlip", "objective:byolip")))
register_objective(ObjectiveSpec("SWALIP", loss="swalip", metric_names=CL2L_METRICS + ("swalip_loss",),
                                 bases=("CL2L",), num_augs=2, model="CL2L", flag_groups=("objective:swalip",)))
register_objective(ObjectiveSpec("SWALIPV1", loss="swalipv1",
                                 metric_names=("loss", "clip_loss", "clip_acc", "swalip_loss", "swalip_logit_scale"),
                                 bases=("CLIP",), model="SWALIPV1",
                                 flag_groups=("objective:swalip", "objective:swalipv1")))
register_objective(ObjectiveSpec("SIGLIP", loss="siglip",
                                 metric_names=("loss", "siglip_loss", "clip_acc", "logit_bias"),
                                 bases=("CLIP", "CNCLIP"), model="SIGLIP", flag_groups=("objective:siglip",)))


# --------------------------------------------------------------------------- names
@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name and everything main.py needs to know about it."""

    name: str
    base: BaseSpec
    backbone: BackboneSpec
    objective: ObjectiveSpec


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


# --------------------------------------------------------------------------- flags read by one family
def flag_groups_read(spec: ModelSpec, flags: Mapping) -> set[str]:
    """The family argument groups (`objective:*`, `augment:image`) that the model `spec` reads, given the
    parsed `flags` (main.py's dest names; a conditional group counts when its switch flag is on)."""
    groups = set(spec.base.flag_groups) | set(spec.objective.flag_groups)
    return groups | {group for group, switch in spec.objective.flag_groups_if if flags.get(switch)}


def flag_group_readers(group: str) -> str:
    """Who reads the argument group `group`, for error messages: "BARLIP", "BYOLIP and SIAMLIP --momentum",
    "the multi-view CL2L-base models"."""
    names = [f"the multi-view {b.name}-base models" for b in BASES.values() if group in b.flag_groups]
    names += sorted(o.name for o in OBJECTIVES.values() if group in o.flag_groups)
    names += sorted(f"{o.name} --{switch.replace('_', '-')}" for o in OBJECTIVES.values()
                    for g, switch in o.flag_groups_if if g == group)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def family_flag_groups() -> set[str]:
    """Every argument group some base or objective declares as its own."""
    return {g for b in BASES.values() for g in b.flag_groups} | \
        {g for o in OBJECTIVES.values() for g in o.flag_groups + tuple(g for g, _ in o.flag_groups_if)}


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """Flags of CLIP🚀 (CL2L), the non-contrastive objectives and the image/text augmentations (defaults as
    clip-rocket's, facebookresearch/clip-rocket main.py). The groups `objective:*` and `augment:image` belong to
    the bases/objectives that declare them above; set on any other model they fail at parse time, and every model
    option is a `RecipeOptions` field of the same name."""
    g = p.add_argument_group("objective:cl2l")
    g.add_argument("--num-augs", type=int, default=None,
                   help="strong image views (= strong texts) per sample for the CL2L base (default 2); 0 = CLIP loss")
    g.add_argument("--separate-proj", action="store_true",
                   help="strong views get their own MLP projectors (head h) and temperature (init 1/0.1); paper: on")
    g.add_argument("--cl2l-img-proj-type", default="mlp", choices=["linear", "mlp"],
                   help="image projector of the strong views with --separate-proj")
    g.add_argument("--cl2l-txt-proj-type", default="mlp", choices=["linear", "mlp"],
                   help="text projector of the strong views with --separate-proj")
    g.add_argument("--cl2l-hidden-dim", type=int, default=4096, help="hidden width of the strong-view MLP projectors")
    g.add_argument("--detach-proj", action="store_true",
                   help="the global text projector sees detached text features (z trains only the projector)")
    g.add_argument("--separate-proj-child", action="store_true",
                   help="non-contrastive heads: separate copies for the strong views")
    g.add_argument("--text-dropout-prob", type=float, default=0.0,
                   help="dropout on every text block's input, strong texts only (paper: 0.2 CC3M, 0.05-0.1 CC12M)")
    g.add_argument("--text-drop-path-prob", type=float, default=0.0,
                   help="drop-path on the text blocks' residual branches, strong texts only")
    g = p.add_argument_group("objective:barlip")
    g.add_argument("--barlip-proj-dim", type=int, default=8192, help="BarLIP projector output width")
    g.add_argument("--barlip-hidden-dim", type=int, default=3000, help="BarLIP projector hidden width")
    g.add_argument("--barlip-lamb", type=float, default=5e-3, help="weight of the off-diagonal Barlow Twins terms")
    g.add_argument("--barlip-scale-loss", type=float, default=0.025, help="scale of the Barlow Twins loss")
    g = p.add_argument_group("objective:siamlip")
    g.add_argument("--siamlip-proj-dim", type=int, default=128, help="SiamLIP/BYOLIP projector output width")
    g.add_argument("--siamlip-hidden-dim", type=int, default=2048, help="SiamLIP projector/predictor hidden width")
    g.add_argument("--siamlip-no-last-bn", action="store_true", help="no BN (affine=False) after the projector")
    g.add_argument("--momentum", action="store_true",
                   help="SIAMLIP with a BYOL momentum target network (= the BYOLIP objective)")
    g = p.add_argument_group("objective:byolip")
    g.add_argument("--momentum-tau", type=float, default=0.99, help="EMA coefficient of the target network")
    g.add_argument("--momentum-tau-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant tau (reference) or BYOL's cosine increase of tau to 1 over training")
    g = p.add_argument_group("objective:siglip")
    g.add_argument("--siglip-chunked", action="store_true",
                   help="SIGLIP: pass the text blocks around the ring of ranks (B_local x B_local logits at a time) "
                        "instead of gathering all texts; same loss and gradients, far less memory at large batch")
    g = p.add_argument_group("objective:swalip")
    g.add_argument("--sk-iters", type=int, default=3, help="Sinkhorn-Knopp iterations")
    g.add_argument("--target-epsilon", type=float, default=0.05, help="Sinkhorn-Knopp entropy epsilon")
    g.add_argument("--swalip-weight", type=float, default=0.2, help="weight of the swapped-prediction loss")
    g = p.add_argument_group("objective:swalipv1")
    g.add_argument("--swalip-proj-dim", type=int, default=128, help="SWALIPV1 projector output width")
    g.add_argument("--swalip-hidden-dim", type=int, default=2048, help="SWALIPV1 projector hidden width")
    g.add_argument("--swalip-num-proto", type=int, default=3000, help="SWALIPV1 learned prototypes")
    g.add_argument("--swalip-temperature", type=float, default=0.1, help="SWALIPV1 softmax temperature")
    g.add_argument("--swalip-learn-temperature", action="store_true", help="SWALIPV1: learn the temperature")
    g.add_argument("--swalip-no-shared-proto", action="store_true", help="SWALIPV1: one prototype set per modality")
    g.add_argument("--swalip-freeze-proto-iters", type=int, default=100,
                   help="SWALIPV1: optimizer steps during which the prototypes do not move")
    g = p.add_argument_group("augment:image")
    g.add_argument("--multicrop-resize", type=int, default=None,
                   help="strong-view resolution (default: --image-size; ViT backbones need the same size)")
    g.add_argument("--multicrop-max-scale", type=float, default=1.0, help="upper crop scale of the strong views")
    g.add_argument("--blur-prob", type=float, default=0.5, help="Gaussian blur probability of a strong view")
    g.add_argument("--solarize-prob", type=float, default=0.0, help="solarization probability of a strong view")
    g.add_argument("--grayscale-prob", type=float, default=0.2, help="grayscale probability of a strong view")
    g.add_argument("--byol-augment", action="store_true",
                   help="BYOL's asymmetric pair of strong pipelines (needs --num-augs 2)")
    g.add_argument("--randaugment", nargs="?", const="rand-m9-mstd0.5", default=None, metavar="POLICY",
                   help="append timm RandAugment (POLICY, default rand-m9-mstd0.5) to the strong views")
    g = p.add_argument_group("augment:text")
    g.add_argument("--text-augment", action="store_true",
                   help="one EDA op per strong text (CL2L); CLIP-layout models get the weak text's stop-word removal")
    g.add_argument("--clean-before-augment", action="store_true",
                   help="ftfy + HTML unescape + whitespace + lower-case before augmenting (paper: YFCC15M)")
    g.add_argument("--remove-stopwords-prob", type=float, default=0.8, help="stop-word removal probability")
    g.add_argument("--no-text-augment-prob", type=float, default=0.0, help="EDA weight of leaving the text as is")
    g.add_argument("--synonym-replacement-prob", type=float, default=0.4,
                   help="EDA weight of WordNet synonym replacement (English; needs scripts/prepare_nltk_data.sh)")
    g.add_argument("--random-swap-prob", type=float, default=0.4, help="EDA weight of swapping two words")
    g.add_argument("--random-deletion-prob", type=float, default=0.2, help="EDA weight of deleting words (p=0.1)")


def num_augs(spec: ModelSpec, args: argparse.Namespace) -> int:
    """Strong views per sample: --num-augs, else the objective's registered default (0 for CLIP layouts)."""
    return spec.objective.num_augs if args.num_augs is None else args.num_augs


def parser_flag_groups(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """{argument group title: its flags' dest names}, in parser order (argparse keeps the groups in
    `_action_groups`, the list its own help formatter walks)."""
    return {group.title: [a.dest for a in group._group_actions] for group in parser._action_groups}


def ignored_flag_errors(spec: ModelSpec, args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Flags of a family group (`objective:*`, `augment:image` of `parser`, main.get_args_parser(); the bases and
    objectives above say who reads each) set away from the parser's defaults on a model that would not read them:
    an ablation row must never be silently the baseline."""
    defaults, errors = parser.parse_args([]), []
    read, owned = flag_groups_read(spec, vars(args)), family_flag_groups()
    for group, dests in parser_flag_groups(parser).items():
        changed = [d for d in dests if getattr(args, d) != getattr(defaults, d)]
        if changed and group in owned and group not in read:
            it = "it" if len(changed) == 1 else "them"
            errors.append(f"{', '.join('--' + d.replace('_', '-') for d in changed)}: used only by "
                          f"{flag_group_readers(group)}; {args.model} would ignore {it}")
    return errors


def recipe_errors(spec: ModelSpec, args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Flag combinations of `parser`'s parsed `args` that make no sense for the model `spec` (main.py checks them
    at parse time)."""
    errors, name = ignored_flag_errors(spec, args, parser), spec.objective.name
    if name == "SWALIP" and num_augs(spec, args) < 2:
        errors.append("SWALIP swaps predictions between strong views: --num-augs must be >= 2")
    if args.byol_augment and num_augs(spec, args) != 2:
        errors.append("--byol-augment defines exactly 2 strong views: use --num-augs 2 with a CL2L-base model")
    if args.num_augs is not None and args.num_augs < 0:
        errors.append("--num-augs must be >= 0")
    if args.patch_dropout and not spec.backbone.vit:
        vits = ", ".join(name for name, backbone in BACKBONES.items() if backbone.vit)
        errors.append(f"--patch-dropout drops ViT patch tokens; backbone {spec.backbone.name} of {args.model} has none "
                      f"(ViT backbones: {vits})")
    if not 0.0 <= args.patch_dropout < 1.0:
        errors.append(f"--patch-dropout must be in [0, 1), got {args.patch_dropout}")
    probs = ("text_dropout_prob", "text_drop_path_prob", "blur_prob", "solarize_prob", "grayscale_prob",
             "remove_stopwords_prob", "no_text_augment_prob", "synonym_replacement_prob", "random_swap_prob",
             "random_deletion_prob", "label_smoothing", "momentum_tau", "multicrop_max_scale")
    errors += [f"--{k.replace('_', '-')} must be in [0, 1], got {getattr(args, k)}" for k in probs
               if not 0.0 <= getattr(args, k) <= 1.0]
    return errors


# --------------------------------------------------------------------------- model descriptions
@dataclass(frozen=True)
class RecipeOptions:
    """Constructor options of the CL2L family, SWALIPV1 and SigLIP; every field is a main.py flag of the same
    name (`recipe_from_flags` fills it by field name, so a new option is one parser line and one field).

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


def recipe_from_flags(flags: Mapping) -> RecipeOptions:
    """RecipeOptions from parsed flags (a dict of main.py's dest names) by field name; absent or None values
    keep the field's default (a checkpoint written before the field existed)."""
    return RecipeOptions(**{f.name: flags[f.name] for f in dataclasses.fields(RecipeOptions)
                            if flags.get(f.name) is not None})


def as_recipe(recipe: RecipeOptions | Mapping | None) -> RecipeOptions:
    """RecipeOptions from itself, its dict form (a stored model description) or None (the defaults)."""
    if recipe is None or isinstance(recipe, RecipeOptions):
        return recipe or RecipeOptions()
    unknown = sorted(set(recipe) - {f.name for f in dataclasses.fields(RecipeOptions)})
    if unknown:
        raise ModelNameError(f"recipe options {unknown} do not exist in this version's RecipeOptions")
    return RecipeOptions(**recipe)


def resolve_build_kwargs(spec: ModelSpec, *, image_size: int | None = None, embed_dim: int | None = None,
                         text_model: str | None = None, text_width: int | None = None, text_heads: int | None = None,
                         text_layers: int | None = None, context_length: int | None = None,
                         recipe: RecipeOptions | Mapping | None = None) -> dict:
    """`models.build_model` kwargs with every None replaced by the registered preset; the recipe as a dict, so
    the result is JSON and `torch.load(weights_only=True)`-safe. A text model the base lacks: ModelNameError."""
    preset, clip_text = spec.backbone.text, spec.base.text_family == "clip"
    text_model = text_model or ("transformer" if clip_text else preset.bert)
    if text_model not in text_model_choices(spec.base):
        raise ModelNameError(f"--text-model {text_model!r} is not available for base {spec.base.name}; "
                             f"choose from {text_model_choices(spec.base)}")
    return dict(image_size=image_size or spec.backbone.image_size, embed_dim=embed_dim or spec.backbone.embed_dim,
                text_model=text_model, text_width=(text_width or preset.width) if clip_text else None,
                text_heads=(text_heads or preset.heads) if clip_text else None,
                text_layers=(text_layers or preset.layers) if clip_text else None,
                context_length=context_length or spec.base.context_length,
                recipe=dataclasses.asdict(as_recipe(recipe)))


def model_config(spec: ModelSpec, **kwargs) -> dict:
    """The description checkpoints carry: {"name": spec.name, "kwargs": resolved build_model kwargs}."""
    return {"name": spec.name, "kwargs": resolve_build_kwargs(spec, **kwargs)}


def image_size_for(flags: Mapping, spec: ModelSpec) -> int:
    """The input resolution of a run: --image-size, else the dataset's catalog image_size, else the backbone's."""
    size = flags.get("image_size")
    if size is None:
        try:
            size = readers.catalog_entry((flags.get("dataset") or "").split(",")[0].strip()).get("image_size")
        except readers.DatasetError:  # a dataset this catalog no longer has (an old checkpoint's)
            size = None
    return size or spec.backbone.image_size


# main.py's model flags -> build_model keyword (the one place where flags become model kwargs)
MODEL_FLAGS = {"embed_dim": "embed_dim", "text_model": "text_model", "text_width": "text_width",
               "text_heads": "text_heads", "transformer_layers": "text_layers", "context_length": "context_length"}


def config_from_flags(flags: Mapping) -> dict:
    """The model description of a run from its flags (main.py's parsed args, or the `args` an older checkpoint
    stored without a description)."""
    spec = parse_model_name(flags["model"])
    return model_config(spec, image_size=image_size_for(flags, spec), recipe=recipe_from_flags(flags),
                        **{kwarg: flags.get(flag) for flag, kwarg in MODEL_FLAGS.items()})
