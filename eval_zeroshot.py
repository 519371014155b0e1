"""Zero-shot classification: prompt-ensembled class embeddings, the anchors' metrics, and a CLI.

The functions here serve both `main.py`'s per-epoch validation and offline evaluation.
Class embedding (Radford et al., 2021, §3.1.4): embed every template filled with the class name (and
each synonym when labels.json lists several), L2-normalise each, average them, L2-normalise the average.

    python eval_zeroshot.py --resume CKPT [--pretrained W] [--datasets imagenet,cifar10] [--output-dir DIR]

Every dataset asked for is evaluated: the table shows those that ran, then the ones that failed with the reason
(missing data, a corrupt image, non-finite embeddings), and the exit status is non-zero when any failed. Without
--datasets, one catalog entry per stored dataset is evaluated, the one of the model's language (a Chinese model
evaluates `digits-zh`, not `digits` too). Class embeddings and similarities must be finite
(`readers.check_finite`). Two classes whose names are equal after the normalisation the prompts see (lower case,
runs of whitespace as one space) get identical prompts, so only one can be predicted: a warning naming them for the
shipped lists (labels.json: ImageNet's "missile" 657/744 and "sunglasses"/"太阳镜" 836/837, kept as-is for
comparability with published numbers), an error naming the lines for a dataset's own label_cn.txt / label.txt.

Metric per dataset as SLIP/clip-rocket report it (facebookresearch/clip-rocket eval_zeroshot.py, commit ebd9e58):
mean per-class accuracy for aircraft, pets, caltech101 and flowers; ROC-AUC of sim[:,1]-sim[:,0] for
hateful_memes; (top-1+top-5)/2 for kinetics700_frames; top-1 otherwise (a catalog entry's "metric" key
overrides); top-1/top-5 are reported for every dataset too (Chinese-CLIP's ELEVATER table is top-1).

Class names and templates, for a model of language L (the first that exists):
  zh: labels.json `<key>-zh` with templates.json `<key>-zh`;
  zh: `label_cn.txt` in the dataset's catalog folder (ELEVATER ships one per dataset: one class per line, line i
      = class i) with templates.json `<key>-zh`;
  any: labels.json `<key>` with templates.json `<key>` (a Chinese model then gets English prompts, with a warning);
  any: `label.txt` in the dataset's folder (ELEVATER's English names) with templates.json `<key>`.
`<key>` is the catalog entry's "labels" (else its name) for labels.json and its "templates" (else `<key>`) for
templates.json: the ELEVATER entries (elevater-*) set only "templates", so their names come from label_cn.txt alone
and build_reader checks the count against the class folders. English names and templates are SLIP's (MIT); the
`<key>-zh` templates of the ELEVATER sets are the ones Chinese-CLIP's zeroshot_evaluation.py uses (MIT): its own
lists for aircraft, food101, flowers, eurosat/resisc45 and country211, its 183 generic ones for the rest.

Image transform: datasets.val_transform (resize + centre crop, SLIP's); a catalog entry's "eval_transform": "squash"
selects Chinese-CLIP's bicubic resize to a square with no crop (datasets.squash_transform), as the elevater-*
and imagenet-cn entries do. ELEVATER's optional index.json only orders predictions for a benchmark submission
(Chinese-CLIP's zeroshot_dataset.md), so accuracy does not depend on it and it is not read.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import models
import readers

log = logging.getLogger("clip_lab")

DATASET_METRICS = {"aircraft": "mean_per_class", "pets": "mean_per_class", "caltech101": "mean_per_class",
                   "flowers": "mean_per_class", "hateful_memes": "roc_auc", "kinetics700_frames": "top1_top5"}
CLASS_NAME_FILES = {"en": "label.txt", "zh": "label_cn.txt"}  # ELEVATER's class names in a dataset's folder


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames: list, templates: list[str],
                        device: torch.device, head: str = "z") -> torch.Tensor:
    """-> (C, D) unit-norm class embeddings of embedding head `head`, one row per class.

    A class is a name or a list of synonyms; its prompts are every template x every synonym."""
    rows = []
    for name in classnames:
        synonyms = [name] if isinstance(name, str) else list(name)
        prompts = [t.format(s) for s in synonyms for t in templates]
        tokens = models.trim_padding(tokenizer(prompts)).to(device)  # (P, L')
        embeds = F.normalize(model.encode_text(tokens, head=head).float(), dim=-1)  # (P, D)
        rows.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(rows)  # (C, D)


@torch.no_grad()
def encode_images(model, loader: DataLoader, device: torch.device,
                  head: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
    """-> ((N, D) unit-norm image embeddings, (N,) labels) over a loader of (image, label) batches."""
    feats, labels = [], []
    for images, target in loader:
        feats.append(F.normalize(model.encode_image(images.to(device), head=head).float(), dim=-1).cpu())
        labels.append(torch.as_tensor(target))
    return torch.cat(feats), torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the k highest logits, for each k (capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=-1).indices  # (N, kmax)
    hits = top == labels[:, None]
    return {f"acc{k}": float(hits[:, :min(k, logits.shape[1])].any(dim=1).float().mean() * 100) for k in ks}


def mean_per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes present in `labels` of the per-class top-1 recall (percent); the confusion-matrix
    diagonal over row sums, as SLIP computes it for aircraft/pets/caltech101/flowers."""
    pred = logits.argmax(dim=1)
    per_class = [float((pred[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    return 100 * sum(per_class) / len(per_class)


def roc_auc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC-AUC (percent) of the binary score sim[:, 1] - sim[:, 0] (hateful_memes)."""
    from sklearn.metrics import roc_auc_score

    if logits.shape[1] != 2:
        raise ValueError(f"ROC-AUC needs 2 classes, got {logits.shape[1]}")
    return 100 * float(roc_auc_score(labels.numpy(), (logits[:, 1] - logits[:, 0]).numpy()))


def dataset_metric(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """The anchor metric of a dataset: top1, mean_per_class, roc_auc or top1_top5 (their mean)."""
    if metric == "top1":
        return topk_accuracy(logits, labels, (1,))["acc1"]
    if metric == "mean_per_class":
        return mean_per_class_accuracy(logits, labels)
    if metric == "roc_auc":
        return roc_auc(logits, labels)
    if metric == "top1_top5":
        acc = topk_accuracy(logits, labels)
        return (acc["acc1"] + acc["acc5"]) / 2
    raise ValueError(f"unknown zero-shot metric {metric!r} (top1, mean_per_class, roc_auc, top1_top5)")


@torch.no_grad()
def zeroshot_similarities(model, tokenizer, classnames: list, templates: list[str], loader: DataLoader,
                          device: torch.device,
                          where: str = "zero-shot") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({head or zh_<w> blend: (N, C) cosine similarities}, (N,) labels) for each embedding head.

    A model with the heads z and h (CL2L) also gets the blends zh_<w> = w*sim_z + (1-w)*sim_h, w = 0.1..0.9.
    A NaN or infinite class embedding or similarity is a readers.NonFiniteError naming `where`, the head and the
    first class or image."""
    sims, labels = {}, None
    for head in getattr(model, "embedding_heads", ("z",)):
        classifier = zeroshot_classifier(model, tokenizer, classnames, templates, device, head)  # (C, D)
        readers.check_finite(classifier.cpu().numpy(), classnames, f"class embeddings of head {head}", where,
                             label="class")
        feats, labels = encode_images(model, loader, device, head)  # (N, D), (N,)
        sims[head] = feats @ classifier.cpu().t()  # (N, C)
        readers.check_finite(sims[head].numpy(), range(len(feats)), f"images' similarities of head {head}", where,
                             label="image")
    if {"z", "h"} <= sims.keys():
        for w in [round(0.1 * i, 1) for i in range(1, 10)]:
            sims[f"zh_{w}"] = w * sims["z"] + (1 - w) * sims["h"]
    return sims, labels


@torch.no_grad()
def zeroshot_accuracy(model, tokenizer, classnames: list, templates: list[str], loader: DataLoader,
                      device: torch.device) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy (percent) for each embedding head of `model`.

    Keys are acc1_<head>/acc5_<head> ("z": the CLIP projector). A model with the heads z and h (CL2L)
    also gets the blends zh_<w>: similarities w*sim_z + (1-w)*sim_h for w in 0.1..0.9.
    """
    sims, labels = zeroshot_similarities(model, tokenizer, classnames, templates, loader, device)
    metrics = {}
    for name, sim in sims.items():
        metrics.update({f"{k}_{name}": v for k, v in topk_accuracy(sim, labels).items()})
    return metrics


# --------------------------------------------------------------------------- offline evaluation
class ClassNames(NamedTuple):
    """What a dataset is classified with: names (a name or a list of synonyms per class), prompt templates,
    `source` (the labels.json key or the class-name file) and the names' `language`."""
    names: list
    templates: list[str]
    source: str
    language: str


def class_name_file(name: str, entry: dict, language: str, data_root: str | None = None) -> str | None:
    """ELEVATER's class-name file of `language` (label_cn.txt, label.txt) in the dataset's catalog folder
    (`path`, under the data root), or None when there is none."""

    if language not in CLASS_NAME_FILES or "path" not in entry:
        return None
    try:
        folder = readers.entry_path(name, entry, "path", data_root, kind="dir")
    except readers.DatasetError:  # no data root, or the folder is missing: build_reader says so later
        return None
    path = os.path.join(folder, CLASS_NAME_FILES[language])
    return path if os.path.isfile(path) else None


def read_class_names(path: str) -> list[str]:
    """One class name per line (line i = class i), as Chinese-CLIP reads ELEVATER's label_cn.txt; trailing blank
    lines are dropped, a blank line before the last name is an error, and so is a name that repeats another after
    the prompts' normalisation (`duplicate_classes`)."""

    with open(path, encoding="utf-8-sig") as f:
        names = [line.strip() for line in f]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise readers.DatasetError(f"{path}: no class names (expected one per line)")
    if "" in names:
        raise readers.DatasetError(f"{path}:{names.index('') + 1}: blank line (expected one class name per line)")
    duplicates = duplicate_classes(names)
    if duplicates:
        first, again = duplicates[0][:2]
        raise readers.DatasetError(f"{path}:{again + 1}: class {again} {names[again]!r} repeats line {first + 1} "
                                   f"(class {first}, {names[first]!r}) after lower-casing and whitespace "
                                   "normalisation: both classes get the same prompts, so one could never be predicted")
    return names


def prompt_key(name) -> tuple[str, ...]:
    """What the prompts of a class (a name or a list of synonyms) see of it: each name lower-cased (both tokenizers
    lower-case) with runs of whitespace as one space, as a sorted tuple of the distinct names."""
    synonyms = [name] if isinstance(name, str) else list(name)
    return tuple(sorted({" ".join(s.split()).lower() for s in synonyms}))


def warn_duplicate_classes(name: str, classes: ClassNames) -> None:
    """A warning per group of `duplicate_classes` of a shipped list (labels.json: ImageNet's "missile" 657/744 and
    "sunglasses"/"太阳镜" 836/837), kept as-is for comparability with published numbers; a dataset's own class-name
    file with duplicates never gets here (`read_class_names` refuses it)."""
    for group in duplicate_classes(classes.names):
        log.warning("%s (labels.json %r): classes %s share the name %r after the prompts' normalisation, so only "
                    "the first can be predicted; kept as-is for comparability with published numbers", name,
                    classes.source, "/".join(map(str, group)), classes.names[group[0]])


def duplicate_classes(names: list) -> list[list[int]]:
    """Groups (ascending class indices, 2 or more) of classes whose `prompt_key`s are equal, in order."""
    groups: dict[tuple, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(prompt_key(name), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def class_names_and_templates(name: str, entry: dict, language: str, data_root: str | None = None,
                              labels: dict | None = None, templates: dict | None = None) -> ClassNames:
    """Class names and templates of catalog dataset `name` for a model of `language`, the first found in the order
    of the module docstring; a DatasetError when there are none (MUGE, synthetic...). `labels`/`templates`: the
    parsed labels.json/templates.json (read when None)."""

    labels = readers.read_repo_json("labels.json") if labels is None else labels
    templates = readers.read_repo_json("templates.json") if templates is None else templates
    key, tkey = entry.get("labels", name), entry.get("templates", entry.get("labels", name))
    base, tbase = key.removesuffix("-zh"), tkey.removesuffix("-zh")
    # (labels.json key or None for the folder's class-name file, templates.json key, language of the names)
    order = [(base + "-zh", tbase + "-zh", "zh"), (None, tbase + "-zh", "zh")] if language == "zh" else []
    order += [(base, tbase, "en"), (key, tkey, "zh" if key.endswith("-zh") else "en"), (None, tbase, "en")]
    for labels_at, templates_at, names_language in order:
        if templates_at not in templates:
            continue
        if labels_at is not None and labels_at in labels:
            return ClassNames(labels[labels_at], templates[templates_at], labels_at, names_language)
        path = class_name_file(name, entry, names_language, data_root) if labels_at is None else None
        if path:
            return ClassNames(read_class_names(path), templates[templates_at], path, names_language)
    raise readers.DatasetError(f"dataset {name!r} has no class names with prompt templates for a {language} model: "
                                f"add {base!r} (or {base + '-zh'!r}) to labels.json and templates.json, or put "
                                f"{CLASS_NAME_FILES['zh']} / {CLASS_NAME_FILES['en']} in its folder")


EVAL_TRANSFORMS = ("center_crop", "squash")  # a catalog entry's "eval_transform"; center_crop is the default


def eval_transform(name: str, entry: dict, image_size: int):
    """The image transform of catalog dataset `name`: its "eval_transform" key, "center_crop" (default,
    datasets.val_transform: SLIP's resize + centre crop) or "squash" (Chinese-CLIP's bicubic resize to a square, no
    crop: datasets.squash_transform); a DatasetError for any other value."""
    import datasets

    kind = entry.get("eval_transform", "center_crop")
    if kind == "center_crop":
        return datasets.val_transform(image_size)
    if kind == "squash":
        return datasets.squash_transform(image_size)
    raise readers.DatasetError(f"dataset {name!r} (dataset_catalog.json): unknown eval_transform {kind!r}; "
                                f"choose one of {', '.join(EVAL_TRANSFORMS)}")


def evaluate_dataset(model, tokenizer, name: str, language: str, image_size: int, device: torch.device,
                     data_root: str | None = None, batch_size: int = 256, workers: int = 0, reader=None,
                     max_pixels: int = readers.DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """Zero-shot metrics of one catalog dataset: {"metric", "labels" (the labels.json key or class-name file the
    names came from), "num_images", "score_<head>" (the anchor metric), "acc1_<head>", "acc5_<head>"}.
    `reader`: its test-split reader when the caller holds one (main.py's validation), else built here with
    `max_pixels` (--max-image-pixels)."""
    import datasets

    entry = readers.catalog_entry(name)
    classes = class_names_and_templates(name, entry, language, data_root)
    if classes.language != language:
        log.warning("%s: no %s class names, evaluating a %s model with the %s ones (%s)", name, language, language,
                    classes.language, classes.source)
    warn_duplicate_classes(name, classes)
    metric = entry.get("metric", DATASET_METRICS.get(name, "top1"))
    reader = reader if reader is not None else readers.build_reader(name, "test", data_root=data_root,
                                                                    max_pixels=max_pixels)
    on_disk = getattr(reader, "classnames", None) or classes.names
    if len(on_disk) != len(classes.names):
        raise readers.DatasetError(f"dataset {name!r}: its test split has {len(on_disk)} classes but "
                                    f"{classes.source} lists {len(classes.names)} names")
    loader = datasets.eval_loader(datasets.ClassificationDataset(reader, eval_transform(name, entry, image_size)),
                                  batch_size, workers)
    sims, targets = zeroshot_similarities(model, tokenizer, classes.names, classes.templates, loader, device, name)
    out: dict = {"metric": metric, "labels": classes.source, "num_images": len(targets)}
    for head, sim in sims.items():
        out[f"score_{head}"] = dataset_metric(sim, targets, metric)
        out.update({f"{k}_{head}": v for k, v in topk_accuracy(sim, targets).items()})
    return out


def default_datasets(language: str, data_root: str | None = None) -> list[str]:
    """Catalog datasets with class names and templates for a model of `language`: those of its language (the
    catalog's `language`, else that of the names found), and for a Chinese model every dataset with Chinese
    names (labels.json `<key>-zh`, or label_cn.txt in its folder under `data_root`) and `<key>-zh` templates;
    one entry per stored dataset (`storage_key`)."""

    labels, templates = readers.read_repo_json("labels.json"), readers.read_repo_json("templates.json")
    catalog = readers.load_catalog()
    chosen: dict[tuple, str] = {}  # stored data -> the one entry evaluated on it
    for name, entry in catalog.items():
        try:
            classes = class_names_and_templates(name, entry, language, data_root, labels, templates)
        except readers.DatasetError:
            continue
        if entry.get("language", classes.language) == language or classes.language == language != "en":
            # entries reading the same data (digits / digits-zh, imagenet / imagenet-cn): one evaluation, the entry
            # whose catalog language is the model's
            key = storage_key(entry)
            if key not in chosen or entry.get("language") == language != catalog[chosen[key]].get("language"):
                chosen[key] = name
    return list(chosen.values())


def storage_key(entry: dict) -> tuple:
    """What identifies the stored data of a catalog entry: its format and paths."""
    return tuple(entry.get(k) for k in ("format", "path", "root", "metadata", "kind"))


def format_table(results: dict[str, dict]) -> str:
    """Markdown table: dataset, metric, then the score of every head."""
    heads = sorted({k[len("score_"):] for r in results.values() for k in r if k.startswith("score_")})
    lines = ["| dataset | metric | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['metric']} | " + " | ".join(f"{r.get('score_' + h, float('nan')):.2f}"
                                                               for h in heads) + " |")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("eval_zeroshot", description="zero-shot classification over catalog datasets")
    p.add_argument("--resume", default=None, help="a CLIP Lab checkpoint; the model is rebuilt from its stored args")
    p.add_argument("--pretrained", default=None,
                   help="released weights (OpenAI CLIP, Chinese-CLIP, ours); with --resume applied first")
    p.add_argument("--model", default=None, help="model name for --pretrained; default: inferred from the weights")
    p.add_argument("--datasets", default=None,
                   help="comma-separated catalog names; default: every catalog dataset with labels and templates "
                        "in the model's language whose files exist")
    p.add_argument("--output-dir", default=None, help="where zeroshot_<checkpoint>.json goes (default: the "
                                                      "checkpoint's folder)")
    p.add_argument("--data-root", default=None, help="root of catalog paths (else $CLIP_LAB_DATA_ROOT)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("-j", "--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--max-image-pixels", type=readers.max_pixels_arg, default=readers.DEFAULT_MAX_IMAGE_PIXELS,
                   help="an image with more pixels (after a JPEG's draft reduction) fails its dataset, as it is a bad "
                        "sample in training; raise it for valid huge images")
    return p


EVAL_ERRORS = (readers.DatasetError, readers.CorruptSample, readers.NonFiniteError, OSError)


def _one_line(exc: BaseException) -> str:
    """An error's message on one line: a DataLoader worker's copy carries the worker's traceback first, ending with
    "module.Error: message", of which the message is kept."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.removeprefix(f"{type(exc).__module__}.{type(exc).__name__}: ")


def main(argv: list[str] | None = None) -> dict:
    """Evaluate every dataset and write `{output_dir}/zeroshot_<checkpoint stem>.json` ({"results", "failures"});
    returns {dataset: metrics}. Exits non-zero after the table when a dataset failed (with --datasets: any error;
    without: an error other than missing data, which is skipped with a warning)."""
    import datasets
    import weights

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = get_parser().parse_args(argv)
    if not (args.resume or args.pretrained):
        raise SystemExit("eval_zeroshot: give --resume CKPT and/or --pretrained WEIGHTS")
    try:
        model, spec, info = weights.load_model_for_eval(resume=args.resume, pretrained=args.pretrained,
                                                        model_name=args.model, device=args.device)
    except (weights.WeightsError, readers.NonFiniteError) as exc:  # a corrupt, unsafe, non-finite or foreign checkpoint
        raise SystemExit(f"eval_zeroshot: {exc}") from None
    device = next(model.parameters()).device
    tokenizer = datasets.build_tokenizer(spec.base.tokenizer, info["context_length"])
    explicit = args.datasets is not None
    names = args.datasets.split(",") if explicit else default_datasets(spec.base.language, args.data_root)
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for name in names:
        try:
            results[name] = evaluate_dataset(model, tokenizer, name, spec.base.language, info["image_size"], device,
                                             args.data_root, args.batch_size, args.workers,
                                             max_pixels=args.max_image_pixels)
        except EVAL_ERRORS as exc:
            if not explicit and isinstance(exc, readers.DatasetError):
                log.warning("skipping %s: %s", name, exc)
            else:
                failures[name] = f"{type(exc).__name__}: {_one_line(exc)}"
                log.error("%s failed: %s", name, failures[name])
            continue
        log.info("%s: %s", name, " ".join(f"{k} {v:.2f}" for k, v in results[name].items()
                                          if isinstance(v, float)))
    print(format_table(results))
    if failures:
        print(f"\nfailed ({len(failures)} of {len(names)}):")
        print("\n".join(f"- {name}: {reason}" for name, reason in failures.items()))
    source = args.resume or args.pretrained.split(",")[0]
    out_dir = args.output_dir or os.path.dirname(os.path.abspath(source))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"zeroshot_{os.path.splitext(os.path.basename(source))[0]}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"checkpoint": args.resume, "pretrained": args.pretrained, "model": spec.name,
                   "results": results, "failures": failures}, f, indent=1)
    log.info("results written to %s", path)
    if failures:
        raise SystemExit(f"eval_zeroshot: {len(failures)} of {len(names)} datasets failed: {', '.join(failures)}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
