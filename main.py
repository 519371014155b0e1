"""Train a vision-language dual encoder: `python main.py [flags]` (no flags: the tiny digits demo).

`get_args_parser()` is shared with run_with_submitit.py; `main(argv)` is callable from tests.
Parsing needs only the torch-free registry.py and readers.py: torch, timm, transformers and the modules built on
them are imported inside the functions that run after it, so `--help` and `--list-models` answer at once.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING

import experiment
import readers
import registry

if TYPE_CHECKING:  # annotations only; imported where they run, after parsing

    import engine
    import utils

log = logging.getLogger("clip_lab")

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
    data.add_argument("--max-image-pixels", type=readers.max_pixels_arg, default=readers.DEFAULT_MAX_IMAGE_PIXELS,
                      help="an image with more pixels, after a JPEG's draft reduction, is a bad sample (counted under "
                           "--max-bad-samples; validation stops); raise it for valid huge images")

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
    model.add_argument("--patch-dropout", type=float, default=0.0,
                       help="FLIP: drop this fraction of the image patch tokens at random in training (class token "
                            "kept; none at evaluation); ViT backbones only; 0.5 halves the image tower's work")
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
    obj.add_argument("--clip-proj-type", default="linear", choices=["linear", "mlp"],
                     help="projector of the weak global pair (head z)")
    obj.add_argument("--clip-hidden-dim", type=int, default=4096, help="hidden width when --clip-proj-type mlp")
    registry.add_recipe_args(p)

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
    system.add_argument("--name", default=None,
                        help="experiment name: one folder name inside --output-dir (wandb display name); "
                             "default <model>_<dataset>")
    system.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation and init")
    system.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    system.add_argument("--eval-freq", type=int, default=1,
                        help="evaluate and keep checkpoint_best every N epochs and at a --max-steps stop; 0: only at "
                             "the end of the schedule")
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
                        help="torch.compile the model's forward (nn.Module.compile: checkpoint keys unchanged), one "
                             "static graph per --text-bucket length")
    system.add_argument("--text-bucket", type=int, default=None,
                        help="trim each batch's token padding to a multiple of N columns (exact: padding is masked); "
                             "default 16 with --compile (one graph per bucket, at most ceil(context / N)), 1 (the "
                             "exact length) otherwise; raise to cut recompiles, lower to cut padding")
    system.add_argument("--fsdp", action="store_true",
                        help="shard parameters, gradients and optimizer state over the ranks (FSDP2: per block, per "
                             "tower, root) instead of DDP, for towers whose AdamW state does not fit one device; "
                             "needs >= 2 ranks; checkpoint.pt becomes a torch.distributed.checkpoint directory")
    system.add_argument("--print-freq", type=int, default=10,
                        help="log every N optimizer steps (loss, samples/s, tflops_per_s, mfu)")
    system.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of one device for the logged mfu; default: the datasheet peak of a known "
                             "GPU at --precision, the measured matmul peak on CPU; set it for other GPUs")
    system.add_argument("--wandb", action="store_true", help="log to wandb (offline without an API key)")
    system.add_argument("--wandb-project", default="clip-lab", help="wandb project")
    system.add_argument("--table", default=None,
                        help="ablation table this run belongs to (wandb group; report.py groups rows by it)")
    system.add_argument("--tags", nargs="*", default=[], help="extra wandb tags (model and dataset are added)")
    return p


def dataset_defaults(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The flag defaults the --dataset's catalog entry sets ("defaults": the digits demo trains in-process with 0
    workers and validates at the end), for `parser.set_defaults` before the real parse (flags given still win;
    timm's train.py applies its --config file the same way). Unknown names fail, naming the entry."""
    known, _ = parser.parse_known_args(argv)
    try:
        defaults = readers.catalog_entry(known.dataset).get("defaults", {})
    except readers.DatasetError:  # reported with the other checks of parse_args
        return {}
    unknown = sorted(set(defaults) - {a.dest for a in parser._actions})
    if unknown:
        parser.error(f"dataset_catalog.json entry {known.dataset!r}: 'defaults' names no flag: {unknown}")
    return defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate flags; the model name is checked here, so a typo fails before any work."""
    parser = argparse.ArgumentParser("CLIP Lab", parents=[get_args_parser()])
    parser.set_defaults(**dataset_defaults(parser, argv))
    args = parser.parse_args(argv)
    if args.list_models is not None:
        return args
    try:
        spec = registry.parse_model_name(args.model)
        if args.text_model is not None and args.text_model not in registry.text_model_choices(spec.base):
            raise registry.ModelNameError(f"--text-model {args.text_model!r} does not fit {args.model}; "
                                          f"choose from {registry.text_model_choices(spec.base)}")
    except registry.ModelNameError as exc:
        parser.error(str(exc))
    if args.update_freq < 1 or args.batch_size < 1:
        parser.error("--update-freq and --batch-size must be >= 1")
    if (args.text_bucket is not None and args.text_bucket < 1) or (args.peak_tflops is not None
                                                                  and not args.peak_tflops > 0):
        parser.error("--text-bucket must be >= 1 and --peak-tflops > 0")
    if args.eval_freq < 0:
        parser.error("--eval-freq must be >= 0 (0: evaluate only at the end of the schedule)")
    bad_path = (experiment.name_error(args.name) if args.name is not None else None) or \
        experiment.control_character_error("--output-dir", args.output_dir)
    if bad_path:  # one line, no usage: the value would leave --output-dir or reach an sbatch script
        raise SystemExit(bad_path)
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
    errors = registry.recipe_errors(spec, args, get_args_parser())
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
        return readers.build_reader(name, "test", data_root=args.data_root, max_pixels=args.max_image_pixels)
    except readers.DatasetError as exc:
        raise readers.DatasetError(
            f"validation set {name!r} of --dataset {args.dataset!r} cannot be read: {exc}. Choose another with "
            "--val-dataset NAME, or train without per-epoch validation with --val-dataset none") from None


# --------------------------------------------------------------------------- set-up
def experiment_dir(args: argparse.Namespace) -> str:
    return os.path.join(args.output_dir, args.name or f"{args.model}_{'+'.join(dataset_names(args))}")


def args_dict(args: argparse.Namespace) -> dict:
    """Every flag, JSON-clean (tuples as lists), sorted by name."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(args).items())}


def config_of(args: argparse.Namespace) -> dict:
    """The flags that define a run (everything but experiment.RESUME_NEUTRAL_ARGS), JSON-clean."""
    return {k: v for k, v in args_dict(args).items() if k not in experiment.RESUME_NEUTRAL_ARGS}


def flags_diff(old: dict, args: argparse.Namespace) -> dict[str, tuple]:
    """The flags that make `old` (an args.json or a checkpoint's `args`) another run than `args`."""
    return experiment.flags_diff(old, args_dict(args), args_dict(get_args_parser().parse_args([])))


def check_folder_owner(exp_dir: str, args: argparse.Namespace) -> None:
    """Refuse to reuse a folder written by a run with different flags (the same flags resume)."""
    old = experiment.read_json(os.path.join(exp_dir, "args.json"))
    diff = flags_diff(old, args) if old is not None else {}
    if diff:
        raise SystemExit(f"{exp_dir} belongs to another run (flags differ: {experiment.describe_diff(diff)}). "
                         "Use another --name or --output-dir.")


def check_folder_free(exp_dir: str, args: argparse.Namespace) -> None:
    """What a launcher checks before it submits a run to `exp_dir`: no live process holds it, and it is not
    another run's (`check_folder_owner`)."""
    holder = experiment.in_use(exp_dir)
    if holder:
        raise SystemExit(holder)
    check_folder_owner(exp_dir, args)


def resume_source(exp_dir: str, args: argparse.Namespace) -> str | None:
    """The checkpoint a run starts from: the folder's own checkpoint.pt when there is one (a restarted or requeued
    job never goes back in time to a stale --resume), else --resume, else None (a fresh start)."""
    latest = os.path.join(exp_dir, "checkpoint.pt")
    return latest if os.path.exists(latest) else args.resume


def write_run_record(exp_dir: str, args: argparse.Namespace, commit: str) -> None:
    """args.json (atomically) and the provenance files, once the model, weights and data have opened: a start
    that fails before never claims the folder for its flags."""
    experiment.write_json_atomic(os.path.join(exp_dir, "args.json"), args_dict(args))
    experiment.record_provenance(exp_dir, commit, shlex.join([sys.executable] + sys.argv))


def setup_logging(exp_dir: str | None, main_process: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if exp_dir and main_process:
        handlers.append(logging.FileHandler(os.path.join(exp_dir, "train.log")))
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, force=True, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def init_wandb(args: argparse.Namespace, exp_dir: str, commit: str, run_id: str):
    """The wandb run `run_id` (resumed when it exists), named after the experiment; offline without an API key."""
    import wandb

    import utils

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    config = args_dict(args)
    config.update(commit=commit, slurm_job_id=os.environ.get("SLURM_JOB_ID"), world_size=utils.get_world_size())
    tags = list(dict.fromkeys([args.model, args.dataset, *getattr(args, "tags", [])]))
    run = wandb.init(project=args.wandb_project, id=run_id, name=os.path.basename(os.path.normpath(exp_dir)),
                     resume="allow", dir=exp_dir, mode=mode, group=getattr(args, "table", None), config=config,
                     tags=tags)
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return run


# --------------------------------------------------------------------------- evaluation
# captions of these formats are bare class names: zero-shot classification already measures them, and caption
# retrieval would hold every image of the split (50,000 for ImageNet) in memory
CLASS_NAME_CAPTION_FORMATS = ("imagefolder", "filelist", "torchvision")


def evaluate(model, spec: registry.ModelSpec, tokenizer, args, device, name: str, reader) -> dict[str, float]:
    """Validation on the test split of catalog dataset `name` (`reader`: its test-split reader): zero-shot
    metrics exactly as eval_zeroshot.py computes them (when it has class names), then image<->text recall over
    the split (unless its captions are bare class names)."""
    import engine

    model = engine.unwrap(model)
    was_training = model.training
    model.eval()
    try:
        metrics = zero_shot_metrics(model, spec, tokenizer, args, device, name, reader)
        if readers.catalog_entry(name)["format"] not in CLASS_NAME_CAPTION_FORMATS:
            metrics.update(retrieval_metrics(model, tokenizer, reader, registry.image_size_for(vars(args), spec),
                                             device))
    finally:
        model.train(was_training)
    return metrics


def zero_shot_metrics(model, spec: registry.ModelSpec, tokenizer, args, device, name: str,
                      reader) -> dict[str, float]:
    """eval_zeroshot.evaluate_dataset's float metrics (score_<head> = the dataset's anchor metric, acc1_<head>,
    acc5_<head>) on `reader` (the test split opened at start) with the prompts of the model's language; {} for a
    dataset without class names (MUGE...)."""
    import eval_zeroshot

    try:
        result = eval_zeroshot.evaluate_dataset(model, tokenizer, name, spec.base.language,
                                                registry.image_size_for(vars(args), spec), device, args.data_root,
                                                batch_size=256, workers=args.workers, reader=reader)
    except readers.DatasetError as exc:  # no class names/templates (or names that do not fit the split): the
        # run goes on with the other metrics, so the epoch's checkpoint is still written
        log.warning("no zero-shot metrics on %s: %s", name, exc)
        return {}
    return {k: v for k, v in result.items() if isinstance(v, float)}


def retrieval_metrics(model, tokenizer, reader, image_size: int, device) -> dict[str, float]:
    """Image<->text recall over every distinct image and text of the split (the pool for pair datasets)."""
    import torch

    import datasets
    import eval_retrieval

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
    """The number checkpoint_best.pt maximises: `experiment.headline_metric` (the zero-shot anchor metric of head
    z, else top-1, else the mean retrieval recall), -inf without one (no validation)."""
    headline = experiment.headline_metric(metrics)
    return headline[1] if headline is not None else -math.inf


# --------------------------------------------------------------------------- checkpoint
def checkpoint_payload(model, optimizer, scaler, state: engine.RunState, args, commit: str,
                       rng_states: list[dict], total_steps: int, model_config: dict,
                       wandb_id: str | None = None, data: list[dict] | None = None) -> dict:
    """What checkpoint.pt holds; `rng` is the list of every rank's RNG states (`utils.gather_rng_states`),
    `metrics` those of the last validation (measured at `metrics_step`), `total_steps` the schedule's end,
    `model_config` the model's description (`registry.model_config`: build_model name + kwargs), `data` every
    rank's stream positions (`datasets.StreamDataset.state`; None for a map-style run, whose position is
    step_in_epoch). model=None leaves out "model" and "optimizer" (a sharded checkpoint writes them with DCP)."""
    import engine

    tensors = {} if model is None else {"model": engine.unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
    return {**tensors, "model_config": model_config, "scaler": scaler.state_dict(),
            "epoch": state.epoch, "step": state.step, "step_in_epoch": state.step_in_epoch,
            "total_steps": total_steps, "best_metric": state.best_metric, "nonfinite": state.nonfinite,
            "metrics": dict(state.metrics), "metrics_step": state.metrics_step,
            "rng": rng_states, "data": data, "args": config_of(args), "commit": commit, "wandb_id": wandb_id}


def restore(path: str, model, optimizer, scaler, state: engine.RunState, args,
            env: utils.DistEnv) -> tuple[str | None, list | None]:
    """Training state from checkpoint `path` (weights strictly, optimizer, scaler, progress, last validation,
    this rank's RNG); returns (the wandb run id it holds, None before ids were stored; its stream positions
    `data`, None when it has none). A checkpoint written under other flags (its `args`, compared as args.json
    is) is refused: it would not be the same run."""
    import engine
    import fsdp
    import utils
    import weights

    sharded = fsdp.is_sharded_checkpoint(path)
    if fsdp.is_sharded(engine.unwrap(model)) and not sharded:
        raise SystemExit(f"--fsdp resumes a sharded checkpoint (a directory); {path} is a single file: resume it "
                         "without --fsdp, or start from its weights with --pretrained")
    ckpt = {"model": None, "optimizer": None, **utils.load_checkpoint(os.path.join(path, fsdp.STATE_FILE))} \
        if sharded else utils.load_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "epoch", "step", "step_in_epoch", "rng") if k not in ckpt]
    if missing:
        raise RuntimeError(f"checkpoint {path!r} lacks the keys {missing}: not a CLIP Lab training checkpoint "
                           "(use --pretrained for bare weights)")
    diff = flags_diff(ckpt["args"], args) if isinstance(ckpt.get("args"), dict) else {}
    if diff:
        raise SystemExit(f"checkpoint {path} was written by a run with other flags ({experiment.describe_diff(diff)}):"
                         " resuming it would not continue that run; start from its weights with --pretrained instead")
    if sharded:  # any world size, into a sharded or a plain model (a collective when a process group is up)
        fsdp.load_sharded(path, engine.unwrap(model), optimizer, ckpt["param_groups"])
    else:
        weights.load_weights_dict(engine.unwrap(model), ckpt["model"], path)
        optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.step, state.step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
    state.best_metric, state.nonfinite = ckpt["best_metric"], ckpt["nonfinite"]
    state.metrics, state.metrics_step = dict(ckpt.get("metrics", {})), ckpt.get("metrics_step")
    utils.restore_rng(ckpt["rng"], env.rank, env.world_size, args.seed, state.step)
    return ckpt.get("wandb_id"), ckpt.get("data")


# --------------------------------------------------------------------------- lifecycle
def run_summary(args, state: engine.RunState, total_steps: int, val_name: str | None, commit: str, status: str,
                reason: str | None, train_time_s: float) -> dict:
    """summary.json: how the run ended (`status`, `reason`), its progress and the metrics of the last validation
    that actually ran (`metrics_step`: the step they were measured at)."""
    return {"status": status, "reason": reason, "model": args.model, "dataset": args.dataset,
            "val_dataset": val_name, "epoch": state.epoch, "step": state.step, "total_steps": total_steps,
            "best_metric": state.best_metric if math.isfinite(state.best_metric) else None,
            "metrics_step": state.metrics_step, "train_time_s": train_time_s, "commit": commit, **state.metrics}


@contextlib.contextmanager
def owned_folder(exp_dir: str, args: argparse.Namespace, env: utils.DistEnv):
    """Rank 0 holds the folder's lock for the block (taken before anything is written there) and checks that the
    folder is this run's; every rank learns whether that worked, so a refused start ends all ranks at once."""
    import utils

    lock, refusal = None, None
    if env.rank == 0:
        try:
            lock = experiment.FolderLock(exp_dir).acquire()
            check_folder_owner(exp_dir, args)
        except SystemExit as exc:
            refusal = exc
    if not utils.all_ranks_true(refusal is None):
        if lock is not None:
            lock.release()
        raise refusal or SystemExit(f"{exp_dir}: rank 0 refused to start (see its message)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------- main
def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Train (or evaluate) as the flags say; returns the summary dict also written to summary.json. A finished
    experiment is left as it is: its summary is returned and `already finished: <folder> (<metric>)` printed."""
    args = parse_args(args) if not isinstance(args, argparse.Namespace) else args
    if args.list_models is not None:
        print("\n".join(registry.list_models(args.list_models)))
        return {}
    import torch

    import utils

    exp_dir = experiment_dir(args)
    experiment.PREEMPTED.clear()  # a run is preempted only by its own signal, never by an earlier run in this process
    done = experiment.finished_summary(exp_dir)
    if done is not None:  # checked by every rank, before any process group or lock: nothing is touched
        if (utils.detect_launch_env() or (0,))[0] == 0:
            print(f"already finished: {exp_dir} ({experiment.describe_result(done)})", flush=True)
        return done
    env = utils.init_distributed(args.device)
    try:
        with owned_folder(exp_dir, args, env):
            return train(args, env, exp_dir)
    finally:
        if env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(args: argparse.Namespace, env: utils.DistEnv, exp_dir: str) -> dict:
    """The run itself, on a folder this process owns: set-up, resume, the epochs, validation, checkpoints and
    summary.json (also when an exception ends the run once the folder holds its args.json)."""
    import torch
    import torch.nn as nn
    from PIL import Image
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    import datasets
    import engine
    import fsdp
    import losses
    import models
    import utils
    import weights

    if args.fsdp and not env.distributed:
        raise SystemExit("--fsdp needs a distributed launch (torchrun/srun, >= 2 ranks): one process holds the "
                         "whole model anyway; drop --fsdp (such a run also resumes an --fsdp checkpoint)")
    spec = registry.parse_model_name(args.model)
    main_process = env.rank == 0
    commit = utils.git_commit()
    if main_process:
        experiment.remove_stale_temporaries(exp_dir)
    setup_logging(exp_dir, main_process)
    utils.seed_all(args.seed)

    model_config = registry.config_from_flags(vars(args))  # the model's description, stored in every checkpoint
    image_size = model_config["kwargs"]["image_size"]
    model = models.build_from_config(model_config, checkpoint_grad=args.checkpoint_grad,
                                     patch_dropout=args.patch_dropout).to(env.device)
    if args.pretrained:
        weights.load_weights(model, args.pretrained)
        model.after_weights_loaded()
    if args.freeze_vision:
        engine.freeze_vision(model)
    # the same initial weights on every rank (above), then each rank its own stream for dropout masks
    utils.seed_all(utils.rank_seed(args.seed, env.rank))
    tokenizer = datasets.build_tokenizer(spec.base.tokenizer, model_config["kwargs"]["context_length"])
    train_readers = [readers.build_reader(name, "train", data_root=args.data_root, max_pixels=args.max_image_pixels)
                     for name in dataset_names(args)]
    val_name = validation_dataset_name(args)
    val_reader = build_validation_reader(val_name, args)  # a missing validation set fails now, not after an epoch
    dataset = datasets.build_train_dataset(spec, args, train_readers[0], image_size, tokenizer)  # composes every sample
    # JPEGs decoded at reduced size when every view's crop allows it (None with 0.08-scale strong views at 1024 px)
    draft = datasets.draft_for(dataset.transform, *getattr(dataset, "strong_transforms", []))
    for reader in train_readers:
        reader.draft = draft
    stream = datasets.build_stream(args, dataset, train_readers, dataset_weights(args), env.rank,
                                   env.world_size) if is_stream_run(args) else None
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
    lr_schedule = engine.cosine_schedule(args.lr, args.lr_start, args.lr_end, total_steps,
                                  args.warmup_steps if args.warmup_steps is not None
                                  else int(args.warmup_epochs * steps_per_epoch))
    if env.distributed and env.device.type == "cuda":  # projector BN over the global batch (parameters kept)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    context = model_config["kwargs"]["context_length"]
    # model FLOPs per sample, counted once on one composed sample (RNG, weights and BN statistics left as they were)
    flops = engine.count_train_flops(model, dataset.compose(Image.new("RGB", (image_size,) * 2), ["a photo"], 0),
                                     context)
    peak, peak_source = engine.peak_flops(env.device, args.precision, args.peak_tflops)
    if args.fsdp:  # after the FLOP count (the whole model's), before the optimizer (it holds the sharded parameters)
        model = fsdp.shard_model(model, args.precision)
    optimizer = torch.optim.AdamW(engine.param_groups(model, args.wd), lr=args.lr, betas=tuple(args.betas),
                                  eps=args.eps)
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.precision == "fp16")
    state = engine.RunState()
    resume_path, stored_wandb_id = resume_source(exp_dir, args), None
    if resume_path:
        stored_wandb_id, data = restore(resume_path, model, optimizer, scaler, state, args, env)
        if stream is not None:
            stream.resume(data, state.epoch, state.step_in_epoch * args.update_freq)
        log.info("resumed from %s at epoch %d, step %d", resume_path, state.epoch, state.step)
        if resume_path != os.path.join(exp_dir, "checkpoint.pt"):
            stored_wandb_id = None  # another experiment's wandb run
    if args.compile:  # in place: state_dict keys, hooks and checkpoints stay those of the eager module
        engine.compile_model(model, engine.text_bucket(args.text_bucket, True), context)
    ddp_model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.distributed and not args.fsdp else model
    criterion = losses.build_criterion(spec, args, env)
    if main_process:  # everything opened: from here on the folder is this run's record
        write_run_record(exp_dir, args, commit)
    wandb_id = experiment.wandb_run_id(exp_dir, stored_wandb_id) if args.wandb and main_process else stored_wandb_id
    wandb_run = init_wandb(args, exp_dir, commit, wandb_id) if args.wandb and main_process else None
    run_log = engine.RunLog(os.path.join(exp_dir, "log.txt") if main_process else None, wandb_run)

    def save(is_best: bool) -> None:  # called on every rank: the RNG states are gathered
        rng_states = utils.gather_rng_states()
        data = utils.all_gather_object(stream.state()) if stream is not None else None
        if args.fsdp:  # every rank writes its shards
            payload = checkpoint_payload(None, None, scaler, state, args, commit, rng_states, total_steps,
                                         model_config, wandb_id, data)
            fsdp.save_sharded(os.path.join(exp_dir, "checkpoint.pt"), model, optimizer, payload)
            if is_best and main_process:
                fsdp.copy_sharded(os.path.join(exp_dir, "checkpoint.pt"), os.path.join(exp_dir, "checkpoint_best.pt"))
        elif main_process:
            payload = checkpoint_payload(model, optimizer, scaler, state, args, commit, rng_states, total_steps,
                                         model_config, wandb_id, data)
            utils.save_atomic(payload, os.path.join(exp_dir, "checkpoint.pt"))
            if is_best:
                utils.save_atomic(payload, os.path.join(exp_dir, "checkpoint_best.pt"))

    def validate() -> bool:
        """Rank 0 evaluates (state.metrics, best score); True when this is the best checkpoint so far. A sharded
        model evaluates on every rank (each forward all-gathers), rank 0's result counts."""
        state.metrics = evaluate(model, spec, tokenizer, args, env.device, val_name, val_reader) \
            if main_process or args.fsdp else {}
        state.metrics_step = state.step
        score = selection_score(state.metrics)
        is_best, state.best_metric = score > state.best_metric, max(state.best_metric, score)
        log.info("epoch %d step %d eval on %s: %s", state.epoch, state.step, val_name,
                 " ".join(f"{k} {v:.2f}" for k, v in state.metrics.items()))
        return is_best

    loop = engine.LoopConfig(
        step=engine.StepConfig.from_args(args, env.device), update_freq=args.update_freq, batch_size=args.batch_size,
        global_batch=args.batch_size * env.world_size * args.update_freq, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, print_freq=args.print_freq, flops=flops, peak_flops=peak,
        save_every_steps=args.save_every_steps, max_steps=args.max_steps, max_nonfinite=args.max_nonfinite,
        dump_dir=exp_dir)
    log.info("model %s (%.2fM params), %d steps/epoch, global batch %d, %d rank(s) on %s, validation on %s",
             args.model, sum(p.numel() for p in model.parameters()) / 1e6, steps_per_epoch, loop.global_batch,
             env.world_size, env.device, val_name or "nothing (--val-dataset none)")
    log.info("%.3g GFLOP/sample at the full context (fwd + bwd); mfu against %s", flops.per_sample(context) / 1e9,
             f"{peak / 1e12:.3g} TFLOP/s ({peak_source})" if peak else peak_source)

    def train_epoch(batches, meters: engine.EpochMeters) -> engine.Pause:
        return engine.train_one_epoch(ddp_model, criterion, batches, optimizer, scaler, lr_schedule, state, loop,
                                      meters, run_log)

    def end(status: str, reason: str | None) -> dict:
        summary = run_summary(args, state, total_steps, val_name, commit, status, reason, time.time() - t0)
        if main_process:
            experiment.write_json_atomic(os.path.join(exp_dir, "summary.json"), summary)
            log.info("summary: %s", json.dumps(summary))
        if wandb_run is not None:
            wandb_run.summary.update({"status": status, "reason": reason})
        return summary

    t0 = time.time()
    try:
        if args.evaluate:
            validate()
        else:
            engine.run_epochs(args, state, total_steps, val_name, dataset, loader, order, stream, train_epoch, save,
                              validate, run_log)
    except BaseException as exc:
        status, reason = experiment.end_status(exc)
        if main_process:
            try:
                end(status, reason)
            except Exception as write_error:  # e.g. the disk that failed the checkpoint: keep the first error
                log.error("could not write %s/summary.json: %s", exp_dir, write_error)
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    summary = end(*experiment.completed_status(state.step, total_steps, args.evaluate, args.max_steps))
    if wandb_run is not None:
        wandb_run.finish()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
