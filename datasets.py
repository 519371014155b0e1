"""Data: the catalog, storage readers, sample composition, transforms, tokenizers and the sampler.

Layers, each knowing only its own job:
- readers (`DigitsReader`, `SyntheticReader`, ...) know bytes/images and captions of an index;
- `ImageTextDataset` composes a training sample (image views + tokenised caption) from a reader;
- transforms and tokenizers are named builder functions;
- `ResumableSampler` fixes the per-epoch order across ranks and can start mid-epoch.
Randomness of a sample (crop, caption choice) is seeded by (seed, epoch, index), so it does not
depend on worker count, rank layout or where a resumed run restarted.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

HERE = os.path.dirname(os.path.abspath(__file__))
CATALOG_PATH = os.path.join(HERE, "dataset_catalog.json")
CHINESE_VOCAB = os.path.join(HERE, "assets", "bert_chinese_vocab.txt")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- catalog
class DatasetError(ValueError):
    """A dataset that is unknown, misconfigured or missing on disk."""


def load_catalog(path: str = CATALOG_PATH) -> dict:
    """Read dataset_catalog.json (name -> entry with at least a `format` key)."""
    with open(path, encoding="utf-8") as f:
        catalog = json.load(f)
    for name, entry in catalog.items():
        if "format" not in entry:
            raise DatasetError(f"{path}: entry {name!r} has no 'format' key")
    return catalog


def catalog_entry(name: str, catalog: dict | None = None) -> dict:
    """The catalog entry of `name`, or a DatasetError listing the known names."""
    catalog = catalog if catalog is not None else load_catalog()
    if name not in catalog:
        raise DatasetError(f"unknown dataset {name!r}: dataset_catalog.json has {sorted(catalog)}")
    return catalog[name]


def load_labels_and_templates(name: str) -> tuple[list[str], list[str]]:
    """Class names (labels.json) and prompt templates (templates.json) of a classification dataset."""
    with open(os.path.join(HERE, "labels.json"), encoding="utf-8") as f:
        labels = json.load(f)
    with open(os.path.join(HERE, "templates.json"), encoding="utf-8") as f:
        templates = json.load(f)
    if name not in labels or name not in templates:
        raise DatasetError(f"dataset {name!r} has no class names in labels.json or no templates in templates.json")
    return labels[name], templates[name]


# --------------------------------------------------------------------------- seeded randomness
@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with Python, NumPy and torch RNGs seeded by `seed`, then restore their states."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch, independent of ranks and workers."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)[0] >> 1)


# --------------------------------------------------------------------------- readers
class Reader(Protocol):
    """Storage layer: the image and captions of index i, nothing else."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[Image.Image, list[str]]: ...


def digits_split(split: str, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 digits, split by image with a fixed permutation.

    Returns (images uint8 (N, 8, 8) in 0..255, labels int (N,)).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    n_test = int(round(len(order) * test_fraction))
    chosen = order[:n_test] if split in ("test", "val") else order[n_test:]
    images = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)
    return images, digits.target[chosen]


class DigitsReader:
    """The `digits` format: real handwritten digits with captions built from the dataset's templates."""

    def __init__(self, split: str, labels_key: str) -> None:
        self.images, self.labels = digits_split(split)
        classnames, templates = load_labels_and_templates(labels_key)
        self.captions = [[t.format(c) for t in templates] for c in classnames]  # per class

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> tuple[Image.Image, list[str]]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return image, self.captions[int(self.labels[index])]

    def label(self, index: int) -> int:
        return int(self.labels[index])


class SyntheticReader:
    """The `synthetic` format: random images and captions, for fast tests (no files)."""

    WORDS = ("red", "green", "blue", "cat", "dog", "car", "tree", "house", "sky", "river", "small", "large")

    def __init__(self, num_samples: int, image_size: int = 32, language: str = "en") -> None:
        self.num_samples, self.image_size, self.language = num_samples, image_size, language

    def __len__(self) -> int:
        return self.num_samples

    def read(self, index: int) -> tuple[Image.Image, list[str]]:
        rng = np.random.RandomState(index)
        pixels = rng.randint(0, 256, size=(self.image_size, self.image_size, 3), dtype=np.uint8)
        words = rng.choice(self.WORDS, size=4)
        caption = " ".join(words) if self.language == "en" else "一张" + "".join(words) + "的照片"
        return Image.fromarray(pixels), [f"a photo of a {caption}" if self.language == "en" else caption]

    def label(self, index: int) -> int:
        return index % len(self.WORDS)


def build_reader(name: str, split: str, catalog: dict | None = None) -> Reader:
    """The reader for catalog entry `name` and `split` (train/test), dispatched on its `format`."""
    entry = catalog_entry(name, catalog)
    fmt = entry["format"]
    if fmt == "digits":
        return DigitsReader(split, entry.get("labels", name))
    if fmt == "synthetic":
        return SyntheticReader(entry.get("num_samples", 256) if split == "train" else entry.get("num_test", 64),
                               entry.get("image_size", 32), entry.get("language", "en"))
    raise DatasetError(f"dataset {name!r}: format {fmt!r} has no reader")


# --------------------------------------------------------------------------- transforms
def train_transform(image_size: int, min_scale: float = 0.5) -> T.Compose:
    """Weak training view: random resized crop (scale [min_scale, 1]), tensor, OpenAI normalisation."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


def val_transform(image_size: int) -> T.Compose:
    """Evaluation view: resize the short side, centre crop, tensor, OpenAI normalisation."""
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


# --------------------------------------------------------------------------- tokenizers
class BpeTokenizer:
    """OpenAI CLIP BPE (open_clip's SimpleTokenizer): [SOT] tokens [EOT], zero-padded to context_length."""

    def __init__(self, context_length: int = 77) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self.tokenizer = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """-> LongTensor (N, context_length); over-long texts keep [EOT] as the last token."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))


class BertTokenizer:
    """Chinese-CLIP tokenisation: lower-case, BERT wordpiece on the 21,128-token Chinese vocab,
    [CLS] ids[:L-2] [SEP], [PAD]=0 on the right (reference/chinese_clip.md §3)."""

    def __init__(self, context_length: int = 52, vocab_file: str = CHINESE_VOCAB) -> None:
        from transformers import BertTokenizer as HFBertTokenizer  # the fast (Rust) tokenizer in transformers 5

        with open(vocab_file, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.context_length = context_length
        self.tokenizer = HFBertTokenizer(vocab=vocab, do_lower_case=True)

    @staticmethod
    def preprocess(text: str) -> str:
        return text.lower().replace("“", '"').replace("”", '"')

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer([self.preprocess(t) for t in texts], max_length=self.context_length,
                             padding="max_length", truncation=True, return_tensors="pt")
        return out["input_ids"]


def build_tokenizer(kind: str, context_length: int) -> BpeTokenizer | BertTokenizer:
    """'bpe' (CLIP) or 'bert' (Chinese-CLIP) tokenizer."""
    if kind == "bpe":
        return BpeTokenizer(context_length)
    if kind == "bert":
        return BertTokenizer(context_length)
    raise ValueError(f"unknown tokenizer kind {kind!r}")


# --------------------------------------------------------------------------- datasets
class ImageTextDataset(Dataset):
    """(image view, tokens) pairs from a reader. Keys are (index, seed) pairs from ResumableSampler
    (a bare int index means seed = index)."""

    def __init__(self, reader: Reader, transform, tokenizer) -> None:
        self.reader, self.transform, self.tokenizer = reader, transform, tokenizer

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        image, captions = self.reader.read(index)
        with seeded(seed):
            caption = captions[random.randrange(len(captions))]
            view = self.transform(image)  # (3, H, W)
        return view, self.tokenizer(caption)[0]  # (L,)


class ClassificationDataset(Dataset):
    """(image, label) pairs from a reader that knows labels, for zero-shot evaluation."""

    def __init__(self, reader, transform) -> None:
        self.reader, self.transform = reader, transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.reader.read(index)
        return self.transform(image), self.reader.label(index)


# --------------------------------------------------------------------------- sampler
@dataclass
class ResumableSampler(Sampler):
    """Deterministic per-epoch permutation, partitioned into global batches across ranks.

    Global batch j of an epoch is perm[j*G:(j+1)*G] with G = world_size * batch_size; rank r takes
    the slice [r*B:(r+1)*B] of it, so N ranks x B see exactly the samples of one process with N*B.
    The last incomplete global batch is dropped. `set_epoch(epoch, start_batch)` restarts an epoch
    at a given local batch (mid-epoch resume). Yields (index, sample_seed) keys.
    """

    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    start_batch: int = 0

    def __post_init__(self) -> None:
        if self.batches_per_epoch == 0:
            raise DatasetError(f"{self.num_samples} samples cannot fill one global batch of "
                               f"{self.world_size} x {self.batch_size}")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.world_size * self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()
        G, B = self.world_size * self.batch_size, self.batch_size
        for j in range(self.start_batch, self.batches_per_epoch):
            for index in order[j * G + self.rank * B: j * G + (self.rank + 1) * B].tolist():
                yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
