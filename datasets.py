"""Data: transforms, tokenizers, sample composition (views, captions, bad-sample policy) and the sampler.

Storage (the catalog, the readers and the image decoder) is readers.py; this module turns what a reader
returns (RGB images, by readers.decode_image's one rule) into training samples. Transforms take RGB and never
convert modes:
- `ImageTextDataset` / `MultiViewDataset` compose a sample (image views + tokenised captions) from a reader;
- transforms and tokenizers are named builder functions;
- `ResumableSampler` fixes the per-epoch order across ranks and can start mid-epoch; `StreamDataset` streams wds
  shards and mixtures with an exact resume;
- `build_train_dataset` / `build_stream` compose a run's training set from main.py's flags.
Randomness of a sample (crop, caption choice) is seeded by (seed, epoch, index), so it does not
depend on worker count, rank layout or where a resumed run restarted.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torchvision import transforms as T
from torchvision.transforms import v2

import registry
from readers import HERE, CorruptSample, DatasetError, Reader, WdsReader

CHINESE_VOCAB = os.path.join(HERE, "assets", "bert_chinese_vocab.txt")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
log = logging.getLogger("clip_lab")


# --------------------------------------------------------------------------- seeded randomness
@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with Python, NumPy and torch RNGs seeded by `seed`, then restore their states. Inside a
    DataLoader worker nothing is restored: every sample seeds its own block, nothing else there draws from the
    global RNGs, and copying NumPy's MT19937 state out and back costs ~0.15 ms a sample (bench.py data)."""
    restore = get_worker_info() is None
    if restore:
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also reseed (and lose) CUDA's
    try:
        yield
    finally:
        if restore:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


def sample_seed(seed: int, epoch: int, index: int, *more: int) -> int:
    """A 63-bit seed for one sample of one epoch (`more`: where a stream read it), independent of ranks and
    workers."""
    return int(np.random.SeedSequence([seed, epoch, index, *more]).generate_state(2, dtype=np.uint64)[0] >> 1)


def draft_size(image_size: int, min_scale: float, min_ratio: float = 3 / 4) -> int:
    """Smallest short side that keeps every RandomResizedCrop(image_size, scale=(min_scale, 1),
    ratio=(min_ratio, 1/min_ratio)) crop at >= image_size pixels a side: a crop has area s*W*H >= s*short^2
    and aspect r, so its smaller side is >= short*sqrt(s*min_ratio)."""
    return math.ceil(image_size / math.sqrt(min_scale * min_ratio))


def draft_for(*transforms) -> int | None:
    """The JPEG draft size that keeps the crops of every given view pipeline at full resolution: the largest
    `draft_size` over their RandomResizedCrop-like first geometric op (torchvision's or timm's: `size`,
    `scale`, `ratio`); None (full decode) when a pipeline starts with anything else."""
    needs = []
    for tf in transforms:
        crop = next((op for op in getattr(tf, "transforms", [tf]) if hasattr(op, "size")), None)
        if crop is None or not (hasattr(crop, "scale") and hasattr(crop, "ratio")):
            return None
        size = crop.size if isinstance(crop.size, int) else max(crop.size)
        needs.append(draft_size(size, crop.scale[0], min(crop.ratio[0], 1 / crop.ratio[1])))
    return max(needs) if needs else None

# --------------------------------------------------------------------------- transforms
class NormalizeUint8(torch.nn.Module):
    """uint8 (3, H, W) -> float32 (x / 255 - mean) / std in one conversion and two in-place passes (what
    `v2.ToDtype(scale=True)` + `v2.Normalize` do in four; 0.055 ms less per 224 px image, bench.py data)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(mean).view(-1, 1, 1) * 255, persistent=False)
        self.register_buffer("scale", 1 / (torch.tensor(std).view(-1, 1, 1) * 255), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:  # a float image would be scaled by 255 twice (and changed in place)
            raise TypeError(f"NormalizeUint8 takes uint8 images (PIL -> v2.PILToTensor), got {image.dtype}")
        return image.float().sub_(self.shift).mul_(self.scale)  # (3, H, W)


def train_transform(image_size: int, min_scale: float = 0.5) -> v2.Compose:
    """Weak training view: random resized crop (scale [min_scale, 1], bicubic, antialiased), float, OpenAI
    normalisation. The crop is resampled on the uint8 tensor (torch's vectorised antialiased bicubic, within
    one grey level of PIL's and 5x faster, bench.py data), so the float conversion touches only 224 px."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        NormalizeUint8(OPENAI_MEAN, OPENAI_STD),
    ])


def autoaugment_transform(image_size: int):
    """Chinese-CLIP's `--use-augment` training view (timm create_transform): RandomResizedCrop(scale 0.9-1,
    bicubic), horizontal flip, AutoAugment 'original' policy, tensor, OpenAI normalisation."""
    from timm.data import create_transform

    return create_transform(input_size=image_size, scale=(0.9, 1.0), is_training=True, color_jitter=None,
                            auto_augment="original", interpolation="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD)


def val_transform(image_size: int) -> T.Compose:
    """Evaluation view: resize the short side, centre crop, tensor, OpenAI normalisation."""
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


def squash_transform(image_size: int) -> T.Compose:
    """Chinese-CLIP's evaluation view: bicubic resize to a square (no crop), tensor, OpenAI normalisation."""
    return T.Compose([T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
                      T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])


def strong_view_transform(image_size: int, max_scale: float = 1.0, min_scale: float = 0.08, blur_prob: float = 0.5,
                          solarize_prob: float = 0.0, grayscale_prob: float = 0.2,
                          jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1), jitter_prob: float = 0.8,
                          randaugment: str | None = None) -> T.Compose:
    """Strong (SimCLR/BYOL-style) view of CL2L: RandomResizedCrop(scale [min_scale, max_scale], bicubic),
    colour jitter (brightness, contrast, saturation, hue) w.p. jitter_prob, grayscale w.p. grayscale_prob,
    Gaussian blur (sigma in [0.1, 2], 13-tap kernel = 3 sigma_max each side) w.p. blur_prob, solarize
    (threshold 128) w.p. solarize_prob, horizontal flip, then optionally timm's RandAugment policy
    `randaugment` (e.g. 'rand-m9-mstd0.5'), tensor, OpenAI normalisation."""
    steps = [
        T.RandomResizedCrop(image_size, scale=(min_scale, max_scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(*jitter)], p=jitter_prob),
        T.RandomGrayscale(p=grayscale_prob),
        T.RandomApply([T.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=blur_prob),
        T.RandomSolarize(threshold=128, p=solarize_prob),
        T.RandomHorizontalFlip(),
    ]
    if randaugment:
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_const": int(image_size * 0.45),
                   "img_mean": tuple(round(255 * m) for m in OPENAI_MEAN)}
        steps.append(rand_augment_transform(randaugment, hparams))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])


def strong_view_transforms(num_augs: int, image_size: int, max_scale: float = 1.0, blur_prob: float = 0.5,
                           solarize_prob: float = 0.0, grayscale_prob: float = 0.2, byol_augment: bool = False,
                           randaugment: str | None = None) -> list[T.Compose]:
    """The num_augs strong-view pipelines. byol_augment (num_augs = 2): BYOL's asymmetric pair, jitter
    (0.4, 0.4, 0.2, 0.1), blur p (1.0, 0.1), solarize p (0.0, 0.2), grayscale 0.2 (Grill et al., 2020); otherwise
    num_augs copies of `strong_view_transform` with the given probabilities (each view sampled independently)."""
    if byol_augment:
        if num_augs != 2:
            raise ValueError(f"--byol-augment defines exactly 2 strong views, got --num-augs {num_augs}")
        return [strong_view_transform(image_size, max_scale, blur_prob=blur, solarize_prob=sol, grayscale_prob=0.2,
                                      jitter=(0.4, 0.4, 0.2, 0.1), randaugment=randaugment)
                for blur, sol in ((1.0, 0.0), (0.1, 0.2))]
    return [strong_view_transform(image_size, max_scale, blur_prob=blur_prob, solarize_prob=solarize_prob,
                                  grayscale_prob=grayscale_prob, randaugment=randaugment) for _ in range(num_augs)]


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
    """Chinese-CLIP tokenisation: lower-case, BERT wordpiece on the 21,128-token Chinese vocab, [CLS] ids[:L-2]
    [SEP], [PAD]=0 on the right (OFA-Sys/Chinese-CLIP cn_clip/clip/utils.py `tokenize`, commit 31863c7)."""

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
class TooManyBadSamples(RuntimeError):
    """More corrupt samples in one epoch than --max-bad-samples; the message lists the offending ids."""


class BadSampleCounter:
    """Corrupt samples of the current epoch, counted across DataLoader workers (shared memory + a lock).

    `record` stores the sample index (or, for a streamed record without one, its `shard:key` name) and raises
    TooManyBadSamples once the count exceeds `limit`; `reset(epoch)` starts a new epoch (call it in the main
    process before iterating the loader).
    """

    NAMES, NAME_BYTES = 64, 240  # names kept for the first offenders without an index

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ids = torch.full((limit + 1,), -1, dtype=torch.int64).share_memory_()  # first limit+1 offenders
        self.names = torch.zeros((min(limit + 1, self.NAMES), self.NAME_BYTES), dtype=torch.uint8).share_memory_()
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()  # [count, epoch]
        self.lock = torch.multiprocessing.get_context().Lock()

    @property
    def count(self) -> int:
        return int(self.state[0])

    def offenders(self) -> list[int | str]:
        """The first limit+1 offenders: sample indices, or `shard:key` names of streamed records."""
        out: list[int | str] = []
        for n, i in enumerate(self.ids.tolist()[:self.count]):
            if i >= 0:
                out.append(i)
            elif n < len(self.names):
                out.append(bytes(self.names[n].tolist()).rstrip(b"\0").decode("utf-8", errors="replace"))
        return out

    def reset(self, epoch: int) -> None:
        with self.lock:
            self.ids.fill_(-1)
            self.names.zero_()
            self.state[0], self.state[1] = 0, epoch

    def record(self, index: int | None, error: CorruptSample) -> None:
        with self.lock:
            n = int(self.state[0])
            if n <= self.limit:
                self.ids[n] = -1 if index is None else index
            if index is None and n < len(self.names):
                name = error.sample_id.encode("utf-8")[-self.NAME_BYTES:]  # the end: shard file and key
                self.names[n, :len(name)] = torch.frombuffer(bytearray(name), dtype=torch.uint8)
            self.state[0] = n + 1
        log.warning("bad sample %d of epoch %d (limit %d), replaced: %s", n + 1, int(self.state[1]), self.limit, error)
        if n + 1 > self.limit:
            raise TooManyBadSamples(f"{n + 1} corrupt samples in epoch {int(self.state[1])}, more than "
                                    f"--max-bad-samples {self.limit}; offending sample ids {self.offenders()} "
                                    f"(last: {error}). Fix or drop them, or raise --max-bad-samples")


def pick_captions(captions: Sequence[str], mode: str, n: int = 1) -> list[str]:
    """Captions for `n` text views under the caller's seeded RNG (clip-rocket's --caption-sampling):
    'single' draws one caption at random and gives it to every view; 'multi' lets each view draw its own."""
    if not captions:
        raise ValueError("a sample has no caption")
    if mode == "single":
        return [captions[random.randrange(len(captions))]] * n
    if mode == "multi":
        return [captions[random.randrange(len(captions))] for _ in range(n)]
    raise ValueError(f"unknown caption sampling {mode!r}: single or multi")


class ImageTextDataset(Dataset):
    """(image view (3,H,W), tokens (L,)) pairs from a reader, the caption through `text_augmenter.weak` when one
    is given (a one-view model with --text-augment). Keys are (index, seed) pairs from ResumableSampler (a bare
    int index means seed = index).

    A corrupt sample (the reader raises CorruptSample) is counted in `bad_samples` and replaced by a sample
    drawn with random.Random(seed): the same replacement whatever the workers, ranks or resume point.
    """

    def __init__(self, reader: Reader, transform, tokenizer, caption_sampling: str = "single",
                 max_bad_samples: int = 0, text_augmenter=None) -> None:
        self.reader, self.transform, self.tokenizer = reader, transform, tokenizer
        self.caption_sampling, self.text_augmenter = caption_sampling, text_augmenter
        self.bad_samples = BadSampleCounter(max_bad_samples)

    def __len__(self) -> int:
        return len(self.reader)

    def read_sample(self, index: int, seed: int) -> tuple[Image.Image, list[str]]:
        """reader.read(index), or a deterministic replacement when the sample is corrupt."""
        rng = None
        while True:
            try:
                return self.reader.read(index)
            except CorruptSample as exc:
                self.bad_samples.record(index, exc)  # raises past the limit
                rng = rng or random.Random(seed)
                index = rng.randrange(len(self.reader))

    def __getitem__(self, key) -> tuple[torch.Tensor, ...]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        return self.compose(*self.read_sample(index, seed), seed)

    def compose(self, image: Image.Image, captions: Sequence[str], seed: int) -> tuple[torch.Tensor, ...]:
        """The training sample of an image and its captions, its randomness seeded by `seed`."""
        with seeded(seed):
            caption = pick_captions(captions, self.caption_sampling)[0]
            if self.text_augmenter is not None:
                caption = self.text_augmenter.weak(caption)
            view = self.transform(image)  # (3, H, W)
        return view, self.tokenizer(caption)[0]  # (L,)


class MultiViewDataset(ImageTextDataset):
    """CLIP🚀 samples: (weak view (3,H,W), tokens (1+A, L), strong views (A,3,H',W')) with A = num_augs =
    len(strong_transforms).

    Token row 0 is the weak text (`text_augmenter.weak`), rows 1..A the strong texts (`.strong`); with
    caption_sampling 'multi' every text view draws its own caption. All of it (captions, crops, text
    ops) runs under `seeded(seed)`, so a sample is the same whatever the workers, ranks or resume point.
    """

    def __init__(self, reader: Reader, transform, tokenizer, caption_sampling: str = "single",
                 max_bad_samples: int = 0, strong_transforms: Sequence = (), text_augmenter=None) -> None:
        super().__init__(reader, transform, tokenizer, caption_sampling, max_bad_samples, text_augmenter)
        self.strong_transforms = list(strong_transforms)

    def compose(self, image: Image.Image, captions: Sequence[str], seed: int) -> tuple[torch.Tensor, ...]:
        num_augs = len(self.strong_transforms)
        with seeded(seed):
            texts = pick_captions(captions, self.caption_sampling, 1 + num_augs)
            if self.text_augmenter is not None:
                texts = [self.text_augmenter.weak(texts[0])] + [self.text_augmenter.strong(t) for t in texts[1:]]
            view = self.transform(image)  # (3, H, W)
            strong = [t(image) for t in self.strong_transforms]  # A x (3, H', W')
        tokens = self.tokenizer(texts)  # (1+A, L)
        strong_views = torch.stack(strong) if strong else view.new_zeros((0, *view.shape))  # (A, 3, H', W')
        return view, tokens, strong_views


class ClassificationDataset(Dataset):
    """(image, label) pairs from a reader that knows labels, for zero-shot evaluation."""

    def __init__(self, reader, transform) -> None:
        self.reader, self.transform = reader, transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.reader.read(index)
        return self.transform(image), self.reader.label(index)


def eval_loader(dataset: Dataset, batch_size: int, workers: int = 0, pin_memory: bool = False,
                collate_fn=None) -> DataLoader:
    """The DataLoader of an evaluation pass: the dataset in order, and its own generator, so that evaluating
    never draws from the global torch RNG (a DataLoader iterator takes its base seed from it), which also
    drives the training run's dropout: `--eval-freq` must not change the trained weights."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=collate_fn, generator=torch.Generator())


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


# --------------------------------------------------------------------------- streams: wds shards and mixtures
# A stream run (wds shards, a --dataset mixture, --samples-per-epoch) reads R ranks x S streams (S = max(workers, 1)
# per rank: DataLoader worker w of a fresh iterator is stream w). Global stream g = rank * S + s owns its own
# shards and indices, so every stream's order is a pure function of (seed, epoch, g); its position (a few ints per
# source) travels with each sample to the main process, which keeps the position of the last batch it handed to
# the training loop. The DataLoader hands batches over in worker order (batch j of an iterator comes from worker
# j % S), so stream s delivers the rank's batches s, s + S, ...; a run resumed at batch b makes worker w continue
# stream (b + w) % S, and batch b + j comes from the same stream, at the same position, as in the run it continues.
SOURCE_INTS = 3  # a source's position: [pass (resampled: 0), slot (shard or index number in the pass), offset]
_PERM, _SHARDS, _DRAW, _MIX = 1, 2, 3, 4  # tags keeping the seeded draws of different purposes apart
MIX_BLOCK = 4096  # mixture choices are drawn in blocks, so a resume finds slot t without replaying the stream


def seeded_rng(*keys: int) -> np.random.Generator:
    """NumPy's PCG64 seeded by a tuple of non-negative ints (SeedSequence: distinct tuples, independent streams)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


class IndexSource:
    """A map-style dataset as a stream (a mixture component): pass p of an epoch is a permutation of its indices
    seeded by (seed, epoch, source, p); global stream g of G takes the indices at g, g+G, ...; when they run out
    the next pass follows. Corrupt samples are replaced as in `ImageTextDataset.read_sample`."""

    def __init__(self, dataset: ImageTextDataset, source: int, seed: int) -> None:
        self.dataset, self.source, self.seed = dataset, source, seed
        self.name = getattr(dataset.reader, "name", f"source {source}")

    def __len__(self) -> int:
        return len(self.dataset)

    def check_streams(self, streams: int) -> None:
        if len(self) < streams:
            raise DatasetError(f"{self.name}: {len(self)} samples cannot feed {streams} streams (ranks x workers)")

    def samples(self, epoch: int, g: int, streams: int, position: list[int]) -> Iterator[tuple[tuple | None, list]]:
        """(sample, position after it) from `position` on; endless."""
        p, start = position[0], position[1]
        while True:
            order = np.arange(len(self), dtype=np.int32 if len(self) < 2**31 else np.int64)  # half the memory
            seeded_rng(self.seed, epoch, _PERM, self.source, p).shuffle(order)
            order = order[g::streams].copy()  # this stream's share; the full permutation is freed
            for k in range(start, len(order)):
                index = int(order[k])
                yield self.dataset[(index, sample_seed(self.seed, epoch, index, self.source, p))], [p, k + 1, 0]
            p, start = p + 1, 0


class ShardSource:
    """A `wds` reader as a stream. Pass p of an epoch is a permutation of the shards seeded by (seed, epoch,
    source, p); global stream g of G reads the shards at g, g+G, ... of it, one after the other, then the next
    pass. `resampled` (open_clip's --dataset-resampled): stream g's k-th shard is drawn with replacement, seeded
    by (seed, epoch, source, g, k), endlessly. Inside a shard, webdataset's shuffle buffer of `buffer` raw
    records, seeded by (seed, epoch, source, pass, slot, shard), orders the records; a position is (pass, slot,
    records of the shard consumed), so a resume re-reads at most one shard's bytes, decoding none of them.
    A corrupt record (`CorruptSample` from the reader) is counted in the composer's BadSampleCounter and
    skipped: the stream yields (None, position) for it."""

    def __init__(self, reader, composer: ImageTextDataset, source: int, seed: int, buffer: int = 1000,
                 resampled: bool = False) -> None:
        self.reader, self.composer, self.source, self.seed = reader, composer, source, seed
        self.buffer, self.resampled, self.name = buffer, resampled, reader.name

    def __len__(self) -> int:
        return len(self.reader)

    def check_streams(self, streams: int) -> None:
        if not self.resampled and self.reader.num_shards < streams:
            raise DatasetError(f"{self.name}: {self.reader.num_shards} shard(s) cannot feed {streams} streams (ranks "
                               "x max(workers, 1)): every stream reads whole shards. Use fewer --workers, more "
                               "shards (build_wds.py --shard-size), or --wds-resampled")

    def shard(self, epoch: int, g: int, streams: int, p: int, slot: int) -> int | None:
        """The shard at `slot` of stream g's list in pass p (None past its end)."""
        n = self.reader.num_shards
        if self.resampled:
            return int(seeded_rng(self.seed, epoch, _DRAW, self.source, g, slot).integers(n))
        mine = seeded_rng(self.seed, epoch, _SHARDS, self.source, p).permutation(n)[g::streams]
        return int(mine[slot]) if slot < len(mine) else None

    def records(self, shard: int, rng: random.Random) -> Iterator[dict]:
        """The shard's raw records in shuffle-buffer order."""
        from webdataset import filters

        records = self.reader.records(shard)
        return filters.shuffle(self.buffer, self.buffer, rng=rng)(records) if self.buffer > 1 else records

    def samples(self, epoch: int, g: int, streams: int, position: list[int]) -> Iterator[tuple[tuple | None, list]]:
        p, slot, offset = position
        while True:
            shard = self.shard(epoch, g, streams, p, slot)
            if shard is None:
                p, slot = p + 1, 0
                continue
            rng = random.Random(sample_seed(self.seed, epoch, shard, self.source, p, slot))
            for r, record in enumerate(self.records(shard, rng)):
                if r < offset:  # consumed before the resume: read, not decoded
                    continue
                try:
                    image, captions = self.reader.decode(record)
                except CorruptSample as exc:
                    self.composer.bad_samples.record(None, exc)  # raises past --max-bad-samples
                    yield None, [p, slot, r + 1]
                    continue
                seed = sample_seed(self.seed, epoch, shard, self.source, p, slot, r)
                yield self.composer.compose(image, captions, seed), [p, slot, r + 1]
            slot, offset = slot + 1, 0


def stream_sources(readers_: Sequence, composer: ImageTextDataset, seed: int, buffer: int = 1000,
                   resampled: bool = False) -> list[IndexSource | ShardSource]:
    """One source per reader: a ShardSource for `wds` readers, an IndexSource (the composer on that reader, sharing
    its bad-sample counter) for map-style ones."""
    sources: list[IndexSource | ShardSource] = []
    for i, reader in enumerate(readers_):
        if isinstance(reader, WdsReader):
            sources.append(ShardSource(reader, composer, i, seed, buffer, resampled))
        else:
            part = copy.copy(composer)
            part.reader = reader
            sources.append(IndexSource(part, i, seed))
    return sources


class StreamDataset(IterableDataset):
    """The training stream of a wds / mixture run: each slot of global stream g draws its source by `weights`
    (seeded by (seed, epoch, g), in blocks of MIX_BLOCK slots) and takes that source's next sample. An epoch is
    `samples_per_epoch` samples: per rank batches_per_epoch = samples_per_epoch // (world_size * batch_size)
    batches, batch j made by stream j % S. Each sample carries one more tensor, (stream, slot count, source
    positions...) int64, which `track` strips and keeps (the last one per stream is the checkpointed position).

    When shards do not divide evenly over the R*S streams, or the epoch asks a stream for more samples than its
    shards hold, that stream goes on into its next pass (a second, reshuffled reading of its own shards) and a
    stream holding more leaves its tail unread this epoch; with equal shards whose count is a multiple of R*S and
    batches_per_epoch a multiple of S, every sample is read exactly once per epoch, less the remainder.
    """

    def __init__(self, sources: Sequence, weights: Sequence[float], batch_size: int, samples_per_epoch: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0) -> None:
        super().__init__()
        if len(weights) != len(sources) or not all(w > 0 for w in weights):
            raise ValueError(f"need one positive weight per source, got {list(weights)} for {len(sources)}")
        self.sources, self.batch_size, self.seed = list(sources), batch_size, seed
        self.rank, self.world_size, self.streams = rank, world_size, max(workers, 1)
        self.probs = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.batches_per_epoch = samples_per_epoch // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DatasetError(f"{samples_per_epoch} samples per epoch cannot fill one global batch of "
                               f"{world_size} x {batch_size}")
        for source in self.sources:
            source.check_streams(world_size * self.streams)
        self.epoch, self.start_batch, self.batches_done = 0, 0, 0
        self.positions = self.fresh_positions()
        self.resume_point: tuple | None = None

    def fresh_positions(self) -> list[list[int]]:
        return [[0] * (1 + SOURCE_INTS * len(self.sources)) for _ in range(self.streams)]

    def source_of(self, epoch: int, g: int, t: int, cache: dict) -> int:
        """The source of slot t of stream g (0 for a single source)."""
        if len(self.sources) == 1:
            return 0
        block = t // MIX_BLOCK
        if cache.get("block") != block:
            rng = seeded_rng(self.seed, epoch, _MIX, g, block)
            cache.update(block=block, choices=rng.choice(len(self.sources), size=MIX_BLOCK, p=self.probs))
        return int(cache["choices"][t % MIX_BLOCK])

    def stream(self, epoch: int, g: int, position: Sequence[int]) -> Iterator[tuple[tuple, list[int]]]:
        """(sample, position after it) of global stream g from `position` on; endless."""
        t, k = position[0], SOURCE_INTS
        parts = [list(position[1 + c * k: 1 + (c + 1) * k]) for c in range(len(self.sources))]
        streams = self.world_size * self.streams
        its = [s.samples(epoch, g, streams, parts[c]) for c, s in enumerate(self.sources)]  # lazy: nothing opened
        cache: dict = {}
        while True:
            c = self.source_of(epoch, g, t, cache)
            sample = None
            while sample is None:  # a skipped corrupt record: the same source's next one
                sample, parts[c] = next(its[c])
            t += 1
            yield sample, [t] + [v for part in parts for v in part]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != self.streams:
            raise RuntimeError(f"StreamDataset built for {self.streams} stream(s) per rank runs in {n} worker(s)")
        s = (self.start_batch + w) % n  # the stream whose batches this worker delivers from now on
        quota = len(range(self.start_batch + w, self.batches_per_epoch, n))
        samples = self.stream(self.epoch, self.rank * n + s, self.positions[s])
        for _ in range(quota * self.batch_size):
            sample, position = next(samples)
            yield (*sample, torch.tensor([s, *position], dtype=torch.int64))
        samples.close()  # closes the open shard (and its pipe:) now

    # ---- positions (main process)
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start `epoch` at this rank's batch `start_batch` (> 0 only when `resume` has the positions)."""
        if start_batch and (self.resume_point is None or self.resume_point[:2] != (epoch, start_batch)):
            raise DatasetError(f"no stream positions for batch {start_batch} of epoch {epoch}: a stream run resumes "
                               "mid-epoch only from a checkpoint that holds them")
        self.epoch, self.start_batch, self.batches_done = epoch, start_batch, start_batch
        self.positions = [list(p) for p in self.resume_point[2]] if start_batch else self.fresh_positions()

    def track(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, ...]]:
        """The loader's batches without their position tensor, whose last row becomes its stream's position."""
        for batch in batches:
            *tensors, position = batch
            last = position[-1].tolist()  # (stream, slot count, source positions...)
            self.positions[last[0]] = last[1:]
            self.batches_done += 1
            yield tuple(tensors)

    def state(self) -> dict:
        """This rank's position: weights_only-safe ints (checkpoint `data`, one entry per rank)."""
        return {"epoch": self.epoch, "batch": self.batches_done, "streams": [list(p) for p in self.positions]}

    def resume(self, states: list[dict] | None, epoch: int, start_batch: int) -> None:
        """Take this rank's stream positions from a checkpoint's `data` (a list of `state()` per rank) for a
        resume at `start_batch` of `epoch`; a different ranks x workers layout cannot continue mid-epoch."""
        if start_batch == 0:
            return
        if not states or len(states) != self.world_size or len(states[self.rank]["streams"]) != self.streams:
            have = (f"{len(states)} rank(s) x {len(states[0]['streams'])} stream(s)" if states else "no positions")
            raise DatasetError(f"the checkpoint stopped mid-epoch with {have}; this run has {self.world_size} rank(s) "
                               f"x {self.streams} stream(s) (max(--workers, 1) per rank). Shard streams continue "
                               "exactly only with the same layout: resume with the same number of ranks and --workers")
        state = states[self.rank]
        if (state["epoch"], state["batch"]) != (epoch, start_batch):
            raise DatasetError(f"the checkpoint's stream positions are at batch {state['batch']} of epoch "
                               f"{state['epoch']}, its step at batch {start_batch} of epoch {epoch}")
        self.resume_point = (epoch, start_batch, state["streams"])


# --------------------------------------------------------------------------- the training set of a run
def build_stream(args: argparse.Namespace, composer: ImageTextDataset, train_readers: list,
                 weights: list[float] | None, rank: int = 0, world_size: int = 1) -> StreamDataset:
    """The training stream of a wds / mixture run (main.py's flags `args`): one source per --dataset set, drawn by
    `weights` (--dataset-weights; default: the sets' sizes), epochs of --samples-per-epoch (default: the sum of
    the sizes), world_size ranks x max(--workers, 1) streams (see `StreamDataset`)."""
    needs_sizes = (weights is None and len(train_readers) > 1) or args.samples_per_epoch is None
    sizes = [len(r) for r in train_readers] if needs_sizes else []  # a wds set without num_samples fails here
    sources = stream_sources(train_readers, composer, args.seed, args.wds_shuffle_buffer, args.wds_resampled)
    return StreamDataset(sources, weights or sizes or [1.0], args.batch_size, args.samples_per_epoch or sum(sizes),
                         args.seed, rank, world_size, args.workers)


def build_train_dataset(spec: registry.ModelSpec, args: argparse.Namespace, reader: Reader, image_size: int,
                        tokenizer) -> ImageTextDataset:
    """The training dataset of main.py's flags `args`: ImageTextDataset (weak view, weak text) for one-view models,
    its weak text through the text augmenter with --text-augment; MultiViewDataset (weak view, 1 + num_augs texts,
    num_augs strong views) with the text augmenter of the base's language for the multi-view models."""
    import text_augment

    weak = autoaugment_transform(image_size) if getattr(args, "use_augment", False) \
        else train_transform(image_size, args.weak_min_scale)
    multi_view = spec.objective.num_augs > 0
    if multi_view and args.multicrop_resize not in (None, image_size) and spec.backbone.name.startswith("VIT"):
        raise SystemExit(f"--multicrop-resize {args.multicrop_resize} != image size {image_size}: the ViT backbone "
                         f"{spec.backbone.name} takes one input size (R50 takes any)")
    augmenter = None
    if multi_view or args.text_augment:
        if args.text_augment and args.synonym_replacement_prob > 0 and spec.base.language == "en":
            if not text_augment.wordnet_available():
                raise SystemExit(text_augment.WORDNET_FIX)
            text_augment.wordnet_synonyms("photo")  # load WordNet (~10 s) once here, so forked workers share it
        augmenter = text_augment.build_text_augmenter(
            spec.base.language, remove_stopwords_prob=args.remove_stopwords_prob, text_augment=args.text_augment,
            synonym_replacement_prob=args.synonym_replacement_prob, random_swap_prob=args.random_swap_prob,
            random_deletion_prob=args.random_deletion_prob, no_text_augment_prob=args.no_text_augment_prob,
            clean_before_augment=args.clean_before_augment)
    if not multi_view:
        return ImageTextDataset(reader, weak, tokenizer, caption_sampling=args.caption_sampling,
                                max_bad_samples=args.max_bad_samples, text_augmenter=augmenter)
    strong = strong_view_transforms(
        registry.num_augs(spec, args), args.multicrop_resize or image_size, args.multicrop_max_scale, args.blur_prob,
        args.solarize_prob, args.grayscale_prob, args.byol_augment, args.randaugment)
    return MultiViewDataset(reader, weak, tokenizer, caption_sampling=args.caption_sampling,
                            max_bad_samples=args.max_bad_samples, strong_transforms=strong, text_augmenter=augmenter)
