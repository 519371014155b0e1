"""Train a vision-language dual encoder: `python main.py [flags]` (no flags: the tiny digits demo).

`get_args_parser()` is shared with run_with_submitit.py; `main(argv)` is callable from tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import datasets
import engine
import eval_retrieval
import eval_zeroshot
import losses
import models
import readers
import text_augment
import utils
import weights

log = logging.getLogger("clip_lab")

# flags that may change between a run and its resume without making it another run
RESUME_NEUTRAL_ARGS = {"resume", "workers", "print_freq", "device", "wandb", "wandb_project", "max_steps",
                       "eval_freq", "save_every_steps", "output_dir", "evaluate", "data_root", "table", "tags",
                       "max_bad_samples"}
NO_VALIDATION = "none"  # --val-dataset none: train without per-epoch validation


# --------------------------------------------------------------------------- arguments
def get_args_parser() -> argparse.ArgumentParser:
    """All training flags, grouped; `add_help=False` so launchers can use it as a parent parser."""
    p = argparse.ArgumentParser("CLIP Lab training", add_help=False)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="digits",
                      help="training set: a key of dataset_catalog.json (digits, digits-zh, synthetic, ...), or "
                           "several comma-separated for a weighted mixture (see --dataset-weights)")
    data.add_argument("--dataset-weights", default=None,
                      help="sampling weights of a --dataset mixture, comma-separated, one per set (e.g. 1,2); "
                           "default: the sets' sizes (every sample equally likely)")
    data.add_argument("--samples-per-epoch", type=int, default=None,
                      help="samples per epoch of a stream run (wds shards, a mixture); default: the sum of the sets' "
                           "sizes. Set with --wds-resampled or to define epochs of a large mixture")
    data.add_argument("--wds-shuffle-buffer", type=int, default=1000,
                      help="raw records in the shuffle buffer of each wds shard (more: better mixing, more memory "
                           "per worker); 0 or 1: tar order")
    data.add_argument("--wds-resampled", action="store_true",
                      help="draw wds shards with replacement, seeded (open_clip's --dataset-resampled): an endless "
                           "stream cut into epochs of --samples-per-epoch")
    data.add_argument("--val-dataset", default=None,
                      help="per-epoch zero-shot/retrieval validation set (its test split); default: --dataset (the "
                           "first set of a mixture) when it has a test split, else its catalog 'val_dataset' "
                           "(imagenet for cc3m, cc12m, yfcc15m, merged-29m); 'none': no per-epoch validation")
    data.add_argument("--data-root", default=None,
                      help="root for catalog paths (else $CLIP_LAB_DATA_ROOT); change when data moves")
    data.add_argument("--image-size", type=int, default=None,
                      help="input resolution; default: the catalog entry's image_size, else the backbone's")
    data.add_argument("--weak-min-scale", type=float, default=0.5,
                      help="lower scale bound of the RandomResizedCrop of the training view")
    data.add_argument("--use-augment", action="store_true",
                      help="training view = Chinese-CLIP's --use-augment: RandomResizedCrop(0.9-1), flip, AutoAugment "
                           "'original' (timm); for fine-tuning released models")
    data.add_argument("--caption-sampling", default="single", choices=["single", "multi"],
                      help="images with several captions: single = one random caption for all text views, "
                           "multi = each text view draws its own (clip-rocket)")
    data.add_argument("--max-bad-samples", type=int, default=0,
                      help="corrupt samples per epoch to skip (replaced deterministically, logged) before stopping "
                           "with their ids; raise it for web-scale data")

    model = p.add_argument_group("model")
    model.add_argument("--model", default="CLIP_VITT16_CLIP",
                       help="<BASE>_<BACKBONE>_<NAME>; see --list-models")
    model.add_argument("--list-models", nargs="?", const="*", default=None, metavar="PATTERN",
                       help="print every valid model name (optionally matching a shell PATTERN) and exit")
    model.add_argument("--text-model", default=None,
                       help="text tower: 'transformer' for CLIP, a BERT name for CNCLIP (RBT3-chinese, ...)")
    model.add_argument("--embed-dim", type=int, default=None, help="joint embedding size; default: backbone preset")
    model.add_argument("--transformer-layers", type=int, default=None,
                       help="CLIP text transformer depth; default: backbone preset (12 for ViT-B)")
    model.add_argument("--text-width", type=int, default=None, help="CLIP text transformer width")
    model.add_argument("--text-heads", type=int, default=None, help="CLIP text transformer heads")
    model.add_argument("--context-length", type=int, default=None,
                       help="token context; default 77 (CLIP BPE) or 52 (Chinese BERT)")
    model.add_argument("--checkpoint-grad", action="store_true",
                       help="activation checkpointing in both towers: less memory, ~30%% more compute")
    model.add_argument("--pretrained", default=None,
                       help="initialise from released weights, comma-separated for several sources: OpenAI CLIP "
                            "(.pt TorchScript or state_dict), Chinese-CLIP .pt, a Chinese RoBERTa "
                            "pytorch_model.bin/folder (text tower), or our checkpoint; strict (see weights.py)")
    model.add_argument("--freeze-vision", action="store_true",
                       help="freeze the image tower and its projection (Chinese-CLIP's --freeze-vision; BatchNorm "
                            "statistics frozen too)")

    obj = p.add_argument_group("objective")
    obj.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the contrastive CE")
    obj.add_argument("--loss-avg-or-sum", default="avg", choices=["avg", "sum"],
                     help="average or sum the image->text and text->image terms (sum = 2x loss scale)")
    add_recipe_args(p)

    optim = p.add_argument_group("optim")
    optim.add_argument("--epochs", type=int, default=25, help="training epochs")
    optim.add_argument("--warmup-epochs", type=float, default=1, help="linear warm-up length in epochs")
    optim.add_argument("--warmup-steps", type=int, default=None,
                       help="linear warm-up length in optimizer steps (overrides --warmup-epochs; Chinese-CLIP: 100)")
    optim.add_argument("--batch-size", type=int, default=128, help="micro-batch size per rank")
    optim.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    optim.add_argument("--lr-start", type=float, default=1e-6, help="learning rate at the start of warm-up")
    optim.add_argument("--lr-end", type=float, default=1e-5, help="learning rate at the end of the cosine")
    optim.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (not on biases/norms/embeddings)")
    optim.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98), help="AdamW betas")
    optim.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    optim.add_argument("--update-freq", type=int, default=1,
                       help="micro-batches per optimizer step (global batch = ranks x batch-size x this)")
    optim.add_argument("--accum-mode", default="exact", choices=["exact", "naive"],
                       help="exact: negatives from all micro-batches (open_clip accum-freq); naive: loss/k")

    system = p.add_argument_group("system")
    system.add_argument("--output-dir", default="experiments", help="root folder of experiment folders")
    system.add_argument("--name", default=None, help="experiment name (folder and wandb id); default <model>_<dataset>")
    system.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation and init")
    system.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    system.add_argument("--eval-freq", type=int, default=1, help="evaluate and keep checkpoint_best every N epochs")
    system.add_argument("--evaluate", action="store_true", help="only evaluate the (resumed/pretrained) model")
    system.add_argument("--resume", default=None,
                        help="start from this checkpoint when the experiment folder has none (its own wins)")
    system.add_argument("--save-every-steps", type=int, default=0,
                        help="also write checkpoint.pt every N optimizer steps (0: at epoch ends only)")
    system.add_argument("--max-steps", type=int, default=None,
                        help="stop (with a checkpoint) after this many optimizer steps in total")
    system.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast dtype; fp16 uses a GradScaler; logits stay fp32")
    system.add_argument("--max-nonfinite", type=int, default=0,
                        help="non-finite losses to skip before stopping with a dump")
    system.add_argument("--device", default="auto", help="auto, cpu or cuda")
    system.add_argument("--compile", action="store_true",
                        help="torch.compile the model's forward (nn.Module.compile: checkpoint keys unchanged)")
    system.add_argument("--print-freq", type=int, default=10, help="log every N optimizer steps")
    system.add_argument("--wandb", action="store_true", help="log to wandb (offline without an API key)")
    system.add_argument("--wandb-project", default="clip-lab", help="wandb project")
    system.add_argument("--table", default=None,
                        help="ablation table this run belongs to (wandb group; report.py groups rows by it)")
    system.add_argument("--tags", nargs="*", default=[], help="extra wandb tags (model and dataset are added)")
    return p


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """Flags of CLIP🚀 (CL2L), the non-contrastive objectives, SigLIP and the image/text augmentations
    (reference/clip_rocket.md §2.1; defaults as clip-rocket's)."""
    g = p.add_argument_group("objective:cl2l")
    g.add_argument("--num-augs", type=int, default=None,
                   help="strong image views (= strong texts) per sample for the CL2L base (default 2); 0 = CLIP loss")
    g.add_argument("--separate-proj", action="store_true",
                   help="strong views get their own MLP projectors (head h) and temperature (init 1/0.1); paper: on")
    g.add_argument("--clip-proj-type", default="linear", choices=["linear", "mlp"],
                   help="projector of the weak global pair (head z)")
    g.add_argument("--clip-hidden-dim", type=int, default=4096, help="hidden width when --clip-proj-type mlp")
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
    g.add_argument("--momentum", action="store_true",
                   help="SIAMLIP with a BYOL momentum target network (= the BYOLIP objective)")
    g.add_argument("--momentum-tau", type=float, default=0.99, help="EMA coefficient of the target network")
    g.add_argument("--momentum-tau-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant tau (reference) or BYOL's cosine increase of tau to 1 over training")
    g = p.add_argument_group("objective:barlip")
    g.add_argument("--barlip-proj-dim", type=int, default=8192, help="BarLIP projector output width")
    g.add_argument("--barlip-hidden-dim", type=int, default=3000, help="BarLIP projector hidden width")
    g.add_argument("--barlip-lamb", type=float, default=5e-3, help="weight of the off-diagonal Barlow Twins terms")
    g.add_argument("--barlip-scale-loss", type=float, default=0.025, help="scale of the Barlow Twins loss")
    g = p.add_argument_group("objective:siamlip")
    g.add_argument("--siamlip-proj-dim", type=int, default=128, help="SiamLIP/BYOLIP projector output width")
    g.add_argument("--siamlip-hidden-dim", type=int, default=2048, help="SiamLIP projector/predictor hidden width")
    g.add_argument("--siamlip-no-last-bn", action="store_true", help="no BN (affine=False) after the projector")
    g = p.add_argument_group("objective:swalip")
    g.add_argument("--swalip-proj-dim", type=int, default=128, help="SWALIPV1 projector output width")
    g.add_argument("--swalip-hidden-dim", type=int, default=2048, help="SWALIPV1 projector hidden width")
    g.add_argument("--swalip-num-proto", type=int, default=3000, help="SWALIPV1 learned prototypes")
    g.add_argument("--swalip-temperature", type=float, default=0.1, help="SWALIPV1 softmax temperature")
    g.add_argument("--swalip-learn-temperature", action="store_true", help="SWALIPV1: learn the temperature")
    g.add_argument("--swalip-no-shared-proto", action="store_true", help="SWALIPV1: one prototype set per modality")
    g.add_argument("--swalip-freeze-proto-iters", type=int, default=100,
                   help="SWALIPV1: optimizer steps during which the prototypes do not move")
    g.add_argument("--sk-iters", type=int, default=3, help="Sinkhorn-Knopp iterations")
    g.add_argument("--target-epsilon", type=float, default=0.05, help="Sinkhorn-Knopp entropy epsilon")
    g.add_argument("--swalip-weight", type=float, default=0.2, help="weight of the swapped-prediction loss")
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


def num_augs(spec: models.ModelSpec, args: argparse.Namespace) -> int:
    """Strong views per sample: --num-augs, else the objective's registered default (0 for CLIP layouts)."""
    return spec.objective.num_views if args.num_augs is None else args.num_augs


# Flags of one objective family -> (does the parsed model use them?, who does). Set to a non-default value on a
# model that ignores them, they fail at parse time: an ablation row must never be silently the baseline.
_MULTI_VIEW = (lambda spec, args: spec.objective.num_views > 0, "the multi-view CL2L-base models")
FAMILY_FLAGS = {
    ("barlip_proj_dim", "barlip_hidden_dim", "barlip_lamb", "barlip_scale_loss"):
        (lambda spec, args: spec.objective.model == "BARLIP", "BARLIP"),
    ("siamlip_proj_dim", "siamlip_hidden_dim", "siamlip_no_last_bn"):
        (lambda spec, args: spec.objective.model in ("SIAMLIP", "BYOLIP"), "SIAMLIP and BYOLIP"),
    ("momentum_tau", "momentum_tau_schedule"):
        (lambda spec, args: spec.objective.model == "BYOLIP" or (spec.objective.model == "SIAMLIP" and args.momentum),
         "BYOLIP and SIAMLIP --momentum"),
    ("swalip_weight", "target_epsilon", "sk_iters"):
        (lambda spec, args: spec.objective.name in ("SWALIP", "SWALIPV1"), "SWALIP and SWALIPV1"),
    ("swalip_proj_dim", "swalip_hidden_dim", "swalip_num_proto", "swalip_temperature", "swalip_learn_temperature",
     "swalip_no_shared_proto", "swalip_freeze_proto_iters"):
        (lambda spec, args: spec.objective.name == "SWALIPV1", "SWALIPV1"),
    ("cl2l_img_proj_type", "cl2l_txt_proj_type", "cl2l_hidden_dim", "separate_proj", "detach_proj",
     "separate_proj_child", "text_dropout_prob", "text_drop_path_prob", "blur_prob", "solarize_prob",
     "grayscale_prob", "byol_augment", "randaugment", "multicrop_resize", "multicrop_max_scale"): _MULTI_VIEW,
}


def ignored_flag_errors(spec: models.ModelSpec, args: argparse.Namespace) -> list[str]:
    """`FAMILY_FLAGS` set away from their defaults on a model that would not read them."""
    defaults, errors = get_args_parser().parse_args([]), []
    for flags, (applies, users) in FAMILY_FLAGS.items():
        changed = [f for f in flags if getattr(args, f) != getattr(defaults, f)]
        if changed and not applies(spec, args):
            it = "it" if len(changed) == 1 else "them"
            errors.append(f"{', '.join('--' + f.replace('_', '-') for f in changed)}: used only by {users}; "
                          f"{args.model} would ignore {it}")
    return errors


def recipe_errors(spec: models.ModelSpec, args: argparse.Namespace) -> list[str]:
    """Flag combinations that make no sense for the parsed model (checked at parse time)."""
    errors, name = ignored_flag_errors(spec, args), spec.objective.name
    if spec.objective.num_views == 0 and args.num_augs:
        errors.append(f"--num-augs needs a multi-view (CL2L-base) objective; {args.model} trains on one view")
    if args.momentum and spec.objective.model not in ("SIAMLIP", "BYOLIP"):
        errors.append(f"--momentum is the BYOL target of SIAMLIP/BYOLIP, not of {name}")
    if name == "SWALIP" and num_augs(spec, args) < 2:
        errors.append("SWALIP swaps predictions between strong views: --num-augs must be >= 2")
    if args.byol_augment and num_augs(spec, args) != 2:
        errors.append("--byol-augment defines exactly 2 strong views: use --num-augs 2 with a CL2L-base model")
    if args.num_augs is not None and args.num_augs < 0:
        errors.append("--num-augs must be >= 0")
    probs = ("text_dropout_prob", "text_drop_path_prob", "blur_prob", "solarize_prob", "grayscale_prob",
             "remove_stopwords_prob", "no_text_augment_prob", "synonym_replacement_prob", "random_swap_prob",
             "random_deletion_prob", "label_smoothing", "momentum_tau", "multicrop_max_scale")
    errors += [f"--{k.replace('_', '-')} must be in [0, 1], got {getattr(args, k)}" for k in probs
               if not 0.0 <= getattr(args, k) <= 1.0]
    return errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate flags; the model name is checked here, so a typo fails before any work."""
    parser = argparse.ArgumentParser("CLIP Lab", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    if args.list_models is not None:
        return args
    try:
        spec = models.parse_model_name(args.model)
        if args.text_model is not None and args.text_model not in models.text_model_choices(spec.base):
            raise models.ModelNameError(f"--text-model {args.text_model!r} does not fit {args.model}; "
                                        f"choose from {models.text_model_choices(spec.base)}")
    except models.ModelNameError as exc:
        parser.error(str(exc))
    if args.update_freq < 1 or args.batch_size < 1:
        parser.error("--update-freq and --batch-size must be >= 1")
    names = {"dataset": dataset_names(args), "val_dataset": [args.val_dataset]}
    for key in ("dataset", "val_dataset"):  # a typo fails here, before an experiment folder is written
        try:
            for name in names[key]:
                if name not in (None, NO_VALIDATION):
                    readers.catalog_entry(name)
        except readers.DatasetError as exc:
            parser.error(f"--{key.replace('_', '-')}: {exc}")
    errors = stream_errors(args)
    if errors:
        parser.error("; ".join(errors))
    try:
        val_name = validation_dataset_name(args)
    except readers.DatasetError as exc:
        parser.error(f"--val-dataset: {exc}")
    if args.evaluate and val_name is None:
        parser.error("--evaluate with --val-dataset none has nothing to evaluate: name a --val-dataset")
    errors = recipe_errors(spec, args)
    if errors:
        parser.error("; ".join(errors))
    return args


def dataset_names(args: argparse.Namespace) -> list[str]:
    """The training sets of --dataset: one catalog key, or the comma-separated sets of a mixture."""
    return [name.strip() for name in args.dataset.split(",")]


def dataset_weights(args: argparse.Namespace) -> list[float] | None:
    """--dataset-weights as floats (None when not given); ValueError for a non-number."""
    return None if args.dataset_weights is None else [float(w) for w in args.dataset_weights.split(",")]


def is_stream_run(args: argparse.Namespace) -> bool:
    """Whether training reads a stream (datasets.StreamDataset): wds shards, a mixture, --samples-per-epoch or
    --wds-resampled; otherwise one map-style set through datasets.ResumableSampler."""
    names = dataset_names(args)
    return len(names) > 1 or args.samples_per_epoch is not None or args.wds_resampled or \
        any(readers.catalog_entry(name)["format"] == "wds" for name in names)


def stream_errors(args: argparse.Namespace) -> list[str]:
    """Bad mixture and stream flags (checked at parse time, after the names are known to the catalog)."""
    names, errors = dataset_names(args), []
    if len(set(names)) != len(names):
        errors.append(f"--dataset {args.dataset!r} names a set twice: give it a larger --dataset-weights instead")
    try:
        weights = dataset_weights(args)
    except ValueError:
        weights = None
        errors.append(f"--dataset-weights {args.dataset_weights!r}: expected comma-separated numbers")
    if weights is not None and (len(weights) != len(names) or not all(0 < w < math.inf for w in weights)):
        errors.append(f"--dataset-weights {args.dataset_weights!r}: need {len(names)} positive finite weight(s), one "
                      f"per set of --dataset {args.dataset!r}")
    if args.samples_per_epoch is not None and args.samples_per_epoch < 1:
        errors.append("--samples-per-epoch must be >= 1")
    if args.wds_shuffle_buffer < 0:
        errors.append("--wds-shuffle-buffer must be >= 0")
    if args.wds_resampled and not any(readers.catalog_entry(n)["format"] == "wds" for n in names):
        errors.append(f"--wds-resampled draws wds shards, and no set of --dataset {args.dataset!r} is in the wds "
                      "format")
    return errors


def has_test_split(name: str, catalog: dict | None = None) -> bool:
    """Whether catalog entry `name` has a logical "test" split (a merged entry: every one of its parts; wds shards
    never: they are streamed, not indexed, so they validate on their catalog 'val_dataset')."""
    entry = readers.catalog_entry(name, catalog)
    if entry["format"] == "merged":
        return all(has_test_split(part, catalog) for part in entry["datasets"])
    if entry["format"] == "wds":
        return False
    return "test" in entry.get("splits", {"test": "test"})  # no `splits` map: the format has train and test


def validation_dataset_name(args: argparse.Namespace) -> str | None:
    """The per-epoch validation set: --val-dataset; else --dataset (the first set of a mixture) when its catalog
    entry has a test split; else that entry's catalog default "val_dataset" (imagenet for the web-scale sets, as
    SLIP/clip-rocket validate); None for `--val-dataset none`. A set without a test split raises a DatasetError
    naming the fix."""
    if args.val_dataset == NO_VALIDATION:
        return None
    catalog, first = readers.load_catalog(), dataset_names(args)[0]
    if args.val_dataset is None and has_test_split(first, catalog):
        return first
    name = args.val_dataset or readers.catalog_entry(first, catalog).get("val_dataset")
    if name is None:
        raise readers.DatasetError(
            f"dataset {first!r} has no test split and its dataset_catalog.json entry no 'val_dataset' key: "
            "pass --val-dataset NAME (a catalog dataset with a test split) or --val-dataset none")
    source = "--val-dataset" if args.val_dataset else f"the 'val_dataset' of {first!r} in dataset_catalog.json"
    try:
        if not has_test_split(name, catalog):
            raise readers.DatasetError(f"dataset {name!r} has no test split")
    except readers.DatasetError as exc:
        raise readers.DatasetError(f"validation set {name!r} ({source}): {exc}") from None
    return name


def build_validation_reader(name: str | None, args: argparse.Namespace):
    """The test-split reader of validation set `name` (None: no validation), built at start so that a missing
    set fails before the first step, with datasets' message and how to choose another."""
    if name is None:
        return None
    try:
        return readers.build_reader(name, "test", data_root=args.data_root)
    except readers.DatasetError as exc:
        raise readers.DatasetError(
            f"validation set {name!r} of --dataset {args.dataset!r} cannot be read: {exc}. Choose another with "
            "--val-dataset NAME, or train without per-epoch validation with --val-dataset none") from None


# --------------------------------------------------------------------------- set-up
def model_kwargs(args: argparse.Namespace) -> dict:
    """The one place where flags become model constructor arguments."""
    return dict(image_size=args.image_size, embed_dim=args.embed_dim, text_model=args.text_model,
                text_width=args.text_width, text_heads=args.text_heads, text_layers=args.transformer_layers,
                context_length=args.context_length, checkpoint_grad=args.checkpoint_grad,
                recipe=models.RecipeOptions(
                    clip_proj_type=args.clip_proj_type, clip_hidden_dim=args.clip_hidden_dim,
                    separate_proj=args.separate_proj, cl2l_img_proj_type=args.cl2l_img_proj_type,
                    cl2l_txt_proj_type=args.cl2l_txt_proj_type, cl2l_hidden_dim=args.cl2l_hidden_dim,
                    detach_proj=args.detach_proj, separate_proj_child=args.separate_proj_child,
                    text_dropout_prob=args.text_dropout_prob, text_drop_path_prob=args.text_drop_path_prob,
                    barlip_proj_dim=args.barlip_proj_dim, barlip_hidden_dim=args.barlip_hidden_dim,
                    siamlip_proj_dim=args.siamlip_proj_dim, siamlip_hidden_dim=args.siamlip_hidden_dim,
                    siamlip_no_last_bn=args.siamlip_no_last_bn, momentum=args.momentum,
                    momentum_tau=args.momentum_tau, momentum_tau_schedule=args.momentum_tau_schedule,
                    swalip_proj_dim=args.swalip_proj_dim, swalip_hidden_dim=args.swalip_hidden_dim,
                    swalip_num_proto=args.swalip_num_proto, swalip_temperature=args.swalip_temperature,
                    swalip_learn_temperature=args.swalip_learn_temperature,
                    swalip_no_shared_proto=args.swalip_no_shared_proto,
                    swalip_freeze_proto_iters=args.swalip_freeze_proto_iters))


def build_criterion(spec: models.ModelSpec, args: argparse.Namespace, env: utils.DistEnv) -> nn.Module:
    """The loss module registered for the model's objective."""
    gather = utils.all_gather_with_grad if env.distributed else losses.identity_gather
    if spec.objective.loss == "clip":
        return losses.ClipLoss(gather, env.rank, args.label_smoothing, args.loss_avg_or_sum)
    common = dict(gather=gather, rank=env.rank, label_smoothing=args.label_smoothing, avg_or_sum=args.loss_avg_or_sum)
    if spec.objective.loss == "cl2l":
        return losses.CL2LLoss(**common)
    if spec.objective.loss == "barlip":
        return losses.BarLIPLoss(**common, lamb=args.barlip_lamb, scale=args.barlip_scale_loss)
    if spec.objective.loss == "siamlip":
        return losses.SiamLIPLoss(**common)
    if spec.objective.loss == "swalip":
        return losses.SwALIPLoss(**common, epsilon=args.target_epsilon, sk_iters=args.sk_iters,
                                 weight=args.swalip_weight)
    if spec.objective.loss == "swalipv1":
        return losses.SwALIPV1Loss(**common, epsilon=args.target_epsilon, sk_iters=args.sk_iters,
                                   weight=args.swalip_weight)
    if spec.objective.loss == "siglip":
        return losses.SigLipLoss(gather, env.rank)
    raise ValueError(f"objective {spec.objective.name}: loss {spec.objective.loss!r} is not implemented")


def build_stream(args: argparse.Namespace, composer, train_readers: list, env: utils.DistEnv) -> datasets.StreamDataset:
    """The training stream of a wds / mixture run: one source per --dataset set, drawn by --dataset-weights
    (default: the sets' sizes), epochs of --samples-per-epoch (default: the sum of the sizes), R ranks x
    max(--workers, 1) streams (see datasets.StreamDataset)."""
    weights = dataset_weights(args)
    needs_sizes = (weights is None and len(train_readers) > 1) or args.samples_per_epoch is None
    sizes = [len(r) for r in train_readers] if needs_sizes else []  # a wds set without num_samples fails here
    sources = datasets.stream_sources(train_readers, composer, args.seed, args.wds_shuffle_buffer, args.wds_resampled)
    return datasets.StreamDataset(sources, weights or sizes or [1.0], args.batch_size,
                                  args.samples_per_epoch or sum(sizes), args.seed, env.rank, env.world_size,
                                  args.workers)


def build_train_dataset(spec: models.ModelSpec, args: argparse.Namespace, reader, image_size: int, tokenizer):
    """The training dataset: ImageTextDataset for one-view models without --text-augment; otherwise a
    MultiViewDataset with the weak view, num_augs strong views and the text augmenter of the base's language
    (a one-view model with --text-augment gets the weak text in the (view, tokens) layout)."""
    weak = datasets.autoaugment_transform(image_size) if getattr(args, "use_augment", False) \
        else datasets.train_transform(image_size, args.weak_min_scale)
    views = num_augs(spec, args)
    multi_view = spec.objective.num_views > 0
    if not multi_view and not args.text_augment:
        return datasets.ImageTextDataset(reader, weak, tokenizer, caption_sampling=args.caption_sampling,
                                         max_bad_samples=args.max_bad_samples)
    if multi_view and args.multicrop_resize not in (None, image_size) and spec.backbone.name.startswith("VIT"):
        raise SystemExit(f"--multicrop-resize {args.multicrop_resize} != image size {image_size}: the ViT backbone "
                         f"{spec.backbone.name} takes one input size (R50 takes any)")
    if args.text_augment and args.synonym_replacement_prob > 0 and spec.base.language == "en":
        if not text_augment.wordnet_available():
            raise SystemExit(text_augment.WORDNET_FIX)
        text_augment.wordnet_synonyms("photo")  # load WordNet (~10 s) once here, so forked workers share it
    augmenter = text_augment.build_text_augmenter(
        spec.base.language, remove_stopwords_prob=args.remove_stopwords_prob, text_augment=args.text_augment,
        synonym_replacement_prob=args.synonym_replacement_prob, random_swap_prob=args.random_swap_prob,
        random_deletion_prob=args.random_deletion_prob, no_text_augment_prob=args.no_text_augment_prob,
        clean_before_augment=args.clean_before_augment)
    strong = datasets.strong_view_transforms(
        views, args.multicrop_resize or image_size, args.multicrop_max_scale, args.blur_prob, args.solarize_prob,
        args.grayscale_prob, args.byol_augment, args.randaugment) if multi_view else []
    return datasets.MultiViewDataset(reader, weak, tokenizer, caption_sampling=args.caption_sampling,
                                     max_bad_samples=args.max_bad_samples, strong_transforms=strong,
                                     text_augmenter=augmenter, pair_layout=not multi_view)


NO_DECAY_KEYS = ("logit_scale", "token_embedding", "positional_embedding", "pos_embed", "cls_token",
                 "word_embeddings", "position_embeddings", "token_type_embeddings", "class_embedding")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norm weights (ndim < 2), embeddings and logit_scale."""
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


def experiment_dir(args: argparse.Namespace) -> str:
    return os.path.join(args.output_dir, args.name or f"{args.model}_{'+'.join(dataset_names(args))}")


def args_dict(args: argparse.Namespace) -> dict:
    """Every flag, JSON-clean (tuples as lists), sorted by name."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(args).items())}


def config_of(args: argparse.Namespace) -> dict:
    """The flags that define a run (everything but RESUME_NEUTRAL_ARGS), JSON-clean."""
    return {k: v for k, v in args_dict(args).items() if k not in RESUME_NEUTRAL_ARGS}


def check_folder_owner(exp_dir: str, args: argparse.Namespace) -> None:
    """Refuse to reuse a folder written by a run with different flags (the same flags resume)."""
    path = os.path.join(exp_dir, "args.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        old = {k: v for k, v in json.load(f).items() if k not in RESUME_NEUTRAL_ARGS}
    new = config_of(args)
    diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
    if diff:
        raise SystemExit(f"{exp_dir} belongs to another run (flags differ: "
                         + ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
                         + "). Use another --name or --output-dir.")


def write_run_files(exp_dir: str, args: argparse.Namespace, commit: str) -> None:
    os.makedirs(exp_dir, exist_ok=True)
    with open(os.path.join(exp_dir, "args.json"), "w", encoding="utf-8") as f:
        json.dump(args_dict(args), f, indent=1)
    if not os.path.exists(os.path.join(exp_dir, "command.txt")):  # the command that created it (run.sh's, if so)
        with open(os.path.join(exp_dir, "command.txt"), "w", encoding="utf-8") as f:
            f.write(shlex.join([sys.executable] + sys.argv) + "\n")
    with open(os.path.join(exp_dir, "commit.txt"), "w", encoding="utf-8") as f:
        f.write(commit + "\n")


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


def setup_logging(exp_dir: str | None, main_process: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if exp_dir and main_process:
        handlers.append(logging.FileHandler(os.path.join(exp_dir, "train.log")))
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, force=True, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def init_wandb(args: argparse.Namespace, exp_dir: str, commit: str):
    """wandb run whose id is the experiment id (a resume continues it); offline without an API key."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run_id = os.path.basename(os.path.normpath(exp_dir))
    for ch in "/\\#?%:":
        run_id = run_id.replace(ch, "-")
    config = args_dict(args)
    config.update(commit=commit, slurm_job_id=os.environ.get("SLURM_JOB_ID"), world_size=utils.get_world_size())
    tags = list(dict.fromkeys([args.model, args.dataset, *getattr(args, "tags", [])]))
    run = wandb.init(project=args.wandb_project, id=run_id, name=run_id, resume="allow", dir=exp_dir, mode=mode,
                     group=getattr(args, "table", None), config=config, tags=tags)
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return run


# --------------------------------------------------------------------------- evaluation
# captions of these formats are bare class names: zero-shot classification already measures them, and caption
# retrieval would hold every image of the split (50,000 for ImageNet) in memory
CLASS_NAME_CAPTION_FORMATS = ("imagefolder", "filelist", "torchvision")


def evaluate(model, spec: models.ModelSpec, tokenizer, args, device, name: str, reader) -> dict[str, float]:
    """Validation on the test split of catalog dataset `name` (`reader`: its test-split reader): zero-shot
    metrics exactly as eval_zeroshot.py computes them (when it has class names), then image<->text recall over
    the split (unless its captions are bare class names)."""
    model = engine.unwrap(model)
    was_training = model.training
    model.eval()
    try:
        metrics = zero_shot_metrics(model, spec, tokenizer, args, device, name, reader)
        if readers.catalog_entry(name)["format"] not in CLASS_NAME_CAPTION_FORMATS:
            metrics.update(retrieval_metrics(model, tokenizer, reader, ctx_image_size(args, spec), device))
    finally:
        model.train(was_training)
    return metrics


def zero_shot_metrics(model, spec: models.ModelSpec, tokenizer, args, device, name: str,
                      reader) -> dict[str, float]:
    """eval_zeroshot.evaluate_dataset's float metrics (score_<head> = the dataset's anchor metric, acc1_<head>,
    acc5_<head>) on `reader` (the test split opened at start) with the prompts of the model's language; {} for a
    dataset without class names (MUGE...)."""
    try:
        result = eval_zeroshot.evaluate_dataset(model, tokenizer, name, spec.base.language, ctx_image_size(args, spec),
                                                device, args.data_root, batch_size=256, workers=args.workers,
                                                reader=reader)
    except readers.DatasetError as exc:  # no class names/templates (or names that do not fit the split): the
        # run goes on with the other metrics, so the epoch's checkpoint is still written
        log.warning("no zero-shot metrics on %s: %s", name, exc)
        return {}
    return {k: v for k, v in result.items() if isinstance(v, float)}


def retrieval_metrics(model, tokenizer, reader, image_size: int, device) -> dict[str, float]:
    """Image<->text recall over every distinct image and text of the split (the pool for pair datasets)."""
    pairs = eval_retrieval.reader_pairs(reader)
    if pairs is not None:  # MUGE-style pairs: recall over every distinct image and text of the split, with
        # Chinese-CLIP's squash transform, so that it equals `eval_retrieval.py run` on the same checkpoint
        return eval_retrieval.pool_retrieval(model, tokenizer, reader, pairs,
                                             datasets.squash_transform(image_size), device)
    transform = datasets.val_transform(image_size)
    images, captions = zip(*(reader.read(i) for i in range(len(reader))))
    pixel = torch.stack([transform(im) for im in images])
    return eval_retrieval.caption_retrieval(model, tokenizer, pixel, list(captions), device)


def selection_score(metrics: dict[str, float]) -> float:
    """The number checkpoint_best.pt maximises: the zero-shot anchor metric of head z (top-1 for most sets,
    mean per class for pets...), else the mean retrieval recall, else -inf (no validation)."""
    return metrics.get("score_z", metrics.get("acc1_z", metrics.get("mean_recall", -math.inf)))


def ctx_image_size(args: argparse.Namespace, spec: models.ModelSpec) -> int:
    """--image-size, else the dataset's catalog image_size, else the backbone preset."""
    return args.image_size or readers.catalog_entry(dataset_names(args)[0]).get("image_size") or \
        spec.backbone.image_size


# --------------------------------------------------------------------------- checkpoint
def checkpoint_payload(model, optimizer, scaler, state: engine.RunState, args, commit: str,
                       rng_states: list[dict], data: list[dict] | None = None) -> dict:
    """What checkpoint.pt holds; `rng` is the list of every rank's RNG states (`utils.gather_rng_states`), `data`
    every rank's stream positions (`datasets.StreamDataset.state`; None for a map-style run, whose position is
    step_in_epoch)."""
    return {"model": engine.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": state.epoch, "step": state.step, "step_in_epoch": state.step_in_epoch,
            "best_metric": state.best_metric, "nonfinite": state.nonfinite,
            "rng": rng_states, "data": data, "args": config_of(args), "commit": commit}


def restore_rng(saved: list[dict] | dict, rank: int, world_size: int, seed: int, step: int) -> None:
    """This rank's RNG states from a checkpoint: its own entry when the checkpoint has one per rank of this
    world size (an exact resume); otherwise (another world size, or an older single-state checkpoint) a fresh
    per-rank stream seeded by (seed, rank, step), with a warning that dropout masks will not repeat exactly."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == world_size:
        utils.restore_rng_state(states[rank])
        return
    log.warning("the checkpoint holds the RNG states of %d rank(s), this run has %d: random streams (dropout, "
                "drop-path) restart from a new seed, so the run is not a bitwise continuation", len(states),
                world_size)
    utils.seed_all(utils.rank_seed(seed, rank, step))


def restore(path: str, model, optimizer, scaler, state: engine.RunState, args, env: utils.DistEnv) -> list | None:
    """Training state from checkpoint `path` (weights strictly, optimizer, scaler, progress, this rank's RNG);
    returns its stream positions (`data`, None when it has none)."""
    ckpt = utils.load_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "epoch", "step", "step_in_epoch", "rng") if k not in ckpt]
    if missing:
        raise RuntimeError(f"checkpoint {path!r} lacks the keys {missing}: not a CLIP Lab training checkpoint "
                           "(use --pretrained for bare weights)")
    weights.load_weights_dict(engine.unwrap(model), ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.step, state.step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
    state.best_metric, state.nonfinite = ckpt["best_metric"], ckpt["nonfinite"]
    restore_rng(ckpt["rng"], env.rank, env.world_size, args.seed, state.step)
    return ckpt.get("data")


# --------------------------------------------------------------------------- main
def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Train (or evaluate) as the flags say; returns the summary dict also written to summary.json."""
    args = parse_args(args) if not isinstance(args, argparse.Namespace) else args
    if args.list_models is not None:
        print("\n".join(models.list_models(args.list_models)))
        return {}
    env = utils.init_distributed(args.device)
    spec = models.parse_model_name(args.model)
    exp_dir = experiment_dir(args)
    main_process = env.rank == 0
    commit = utils.git_commit()
    # the folder's own latest checkpoint wins over --resume: a restarted job must never go back in time
    latest = os.path.join(exp_dir, "checkpoint.pt")
    resume_path = latest if os.path.exists(latest) else args.resume
    if main_process:
        check_folder_owner(exp_dir, args)
        write_run_files(exp_dir, args, commit)
    setup_logging(exp_dir, main_process)
    utils.seed_all(args.seed)

    image_size = ctx_image_size(args, spec)
    kwargs = {**model_kwargs(args), "image_size": image_size}
    model = models.build_model(spec, **kwargs).to(env.device)
    if args.pretrained:
        weights.load_weights(model, args.pretrained)
        model.after_weights_loaded()
    if args.freeze_vision:
        freeze_vision(model)
    # the same initial weights on every rank (above), then each rank its own stream for dropout masks
    utils.seed_all(utils.rank_seed(args.seed, env.rank))
    tokenizer = datasets.build_tokenizer(spec.base.tokenizer, args.context_length or spec.base.context_length)
    train_readers = [readers.build_reader(name, "train", data_root=args.data_root) for name in dataset_names(args)]
    val_name = validation_dataset_name(args)
    val_reader = build_validation_reader(val_name, args)  # a missing validation set fails now, not after an epoch
    dataset = build_train_dataset(spec, args, train_readers[0], image_size, tokenizer)  # composes every sample
    # JPEGs decoded at reduced size when every view's crop allows it (None with 0.08-scale strong views at 1024 px)
    draft = datasets.draft_for(dataset.transform, *getattr(dataset, "strong_transforms", []))
    for reader in train_readers:
        reader.draft = draft
    stream = build_stream(args, dataset, train_readers, env) if is_stream_run(args) else None
    sampler = datasets.ResumableSampler(len(dataset), args.batch_size, env.rank, env.world_size, args.seed) \
        if stream is None else None
    # own generator: creating an iterator must not draw from the global RNG (its state is checkpointed, and a
    # resumed run creates one more iterator than the run it continues, which would shift every dropout mask)
    loader = DataLoader(dataset if stream is None else stream, batch_size=args.batch_size, sampler=sampler,
                        num_workers=args.workers, pin_memory=env.device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator().manual_seed(args.seed))
    order = sampler if stream is None else stream  # set_epoch(epoch, start_batch), batches_per_epoch
    batches_per_epoch = order.batches_per_epoch
    steps_per_epoch = batches_per_epoch // args.update_freq
    if steps_per_epoch == 0:
        raise SystemExit(f"--update-freq {args.update_freq} exceeds the {batches_per_epoch} micro-batches "
                         "of an epoch")
    total_steps = args.epochs * steps_per_epoch
    lr_schedule = cosine_schedule(args.lr, args.lr_start, args.lr_end, total_steps,
                                  args.warmup_steps if args.warmup_steps is not None
                                  else int(args.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=tuple(args.betas), eps=args.eps)
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.precision == "fp16")
    state = engine.RunState()
    if resume_path:
        data = restore(resume_path, model, optimizer, scaler, state, args, env)
        if stream is not None:
            stream.resume(data, state.epoch, state.step_in_epoch * args.update_freq)
        log.info("resumed from %s at epoch %d, step %d", resume_path, state.epoch, state.step)
    if env.distributed and env.device.type == "cuda":  # projector BN over the global batch (parameters kept)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:  # in place: state_dict keys, hooks and checkpoints stay those of the eager module
        model.compile()
    ddp_model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.distributed else model
    criterion = build_criterion(spec, args, env)

    wandb_run = init_wandb(args, exp_dir, commit) if args.wandb and main_process else None
    run_log = engine.RunLog(os.path.join(exp_dir, "log.txt") if main_process else None, wandb_run)

    def save(is_best: bool) -> None:  # called on every rank: the RNG states are gathered
        rng_states = utils.gather_rng_states()
        data = utils.all_gather_object(stream.state()) if stream is not None else None
        if main_process:
            payload = checkpoint_payload(model, optimizer, scaler, state, args, commit, rng_states, data)
            utils.save_atomic(payload, os.path.join(exp_dir, "checkpoint.pt"))
            if is_best:
                utils.save_atomic(payload, os.path.join(exp_dir, "checkpoint_best.pt"))

    loop = engine.LoopConfig(
        step=engine.StepConfig.from_args(args, env.device), update_freq=args.update_freq, batch_size=args.batch_size,
        global_batch=args.batch_size * env.world_size * args.update_freq, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, print_freq=args.print_freq, save_every_steps=args.save_every_steps,
        max_steps=args.max_steps, max_nonfinite=args.max_nonfinite, dump_dir=exp_dir)
    log.info("model %s (%.2fM params), %d steps/epoch, global batch %d, %d rank(s) on %s, validation on %s",
             args.model, sum(p.numel() for p in model.parameters()) / 1e6, steps_per_epoch, loop.global_batch,
             env.world_size, env.device, val_name or "nothing (--val-dataset none)")

    def validate() -> dict[str, float]:
        if not main_process or val_name is None:
            return {}
        return evaluate(model, spec, tokenizer, args, env.device, val_name, val_reader)

    metrics: dict[str, float] = {}
    t0 = time.time()
    if args.evaluate:
        metrics = validate()
    while not args.evaluate and state.epoch < args.epochs and not (args.max_steps and state.step >= args.max_steps):
        order.set_epoch(state.epoch, state.step_in_epoch * args.update_freq)
        dataset.bad_samples.reset(state.epoch)
        batches = iter(loader) if stream is None else stream.track(iter(loader))
        meters = engine.EpochMeters()
        try:
            while (pause := engine.train_one_epoch(ddp_model, criterion, batches, optimizer, scaler, lr_schedule,
                                                   state, loop, meters, run_log)) is engine.Pause.CHECKPOINT_DUE:
                save(is_best=False)
        except datasets.TooManyBadSamples as exc:
            raise SystemExit(f"stopping: {exc}") from None
        train_stats = meters.epoch_means()
        if dataset.bad_samples.count:
            log.warning("epoch %d: %d corrupt sample(s) replaced: %s", state.epoch, dataset.bad_samples.count,
                        dataset.bad_samples.offenders())
        if pause is engine.Pause.MAX_STEPS:  # stopped by --max-steps mid-epoch
            save(is_best=False)
            break
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        is_best = False
        if val_name is not None and (state.epoch % args.eval_freq == 0 or state.epoch == args.epochs):
            metrics = validate()
            score = selection_score(metrics)
            is_best = score > state.best_metric
            state.best_metric = max(state.best_metric, score)
            log.info("epoch %d eval on %s: %s", state.epoch, val_name,
                     " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        run_log.write({"type": "epoch", "epoch": state.epoch, "global_step": state.step,
                       **{f"train_{k}": v for k, v in train_stats.items()},
                       **{f"test_{k}": v for k, v in metrics.items()}})
        save(is_best)
    summary = {"model": args.model, "dataset": args.dataset, "val_dataset": val_name, "epoch": state.epoch,
               "step": state.step, "best_metric": state.best_metric if math.isfinite(state.best_metric) else None,
               "train_time_s": time.time() - t0, "commit": commit, **metrics}
    if main_process:
        with open(os.path.join(exp_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        log.info("summary: %s", json.dumps(summary))
    if wandb_run is not None:
        wandb_run.finish()
    if env.distributed:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
