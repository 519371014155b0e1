"""Storage: the dataset catalog, every storage reader, safe unpickling and the one image decoder.

A reader knows only stored bytes and captions: `read(i) -> (RGB PIL image, [captions])` (and `label(i)` for
classification sets). Transforms, tokenizers, sample composition and the sampler live in datasets.py.
The rules every path shares live here, one function each: `decode_image` (bytes -> RGB: draft, the
--max-image-pixels limit, the mode rule of `to_rgb`), `check_captions` (text a tokenizer can encode), the id rule
(`json_id`, `text_id`, `UniqueIds`: integers, never coerced, unique; `open_lines` skips a byte-order mark) and
`check_finite` (no NaN or infinity where numbers enter evaluation). File handles are opened per process
(`_per_process`, `PerProcessFile`), never used across a fork.
This module never imports torch at import time, so the builders (build_lmdb.py) and the NumPy-only
retrieval tools (`eval_retrieval.py score|topk`) start fast; torchvision is imported only by the two
readers that need it.
"""
from __future__ import annotations

import binascii
import bisect
import contextlib
import io
import json
import logging
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import lmdb
import numpy as np
import pybase64
from PIL import Image, UnidentifiedImageError

HERE = os.path.dirname(os.path.abspath(__file__))
CATALOG_PATH = os.path.join(HERE, "dataset_catalog.json")
log = logging.getLogger("clip_lab")


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


def read_repo_json(filename: str) -> dict:
    """A JSON file next to this module (labels.json, templates.json)."""
    with open(os.path.join(HERE, filename), encoding="utf-8") as f:
        return json.load(f)


def load_labels_and_templates(name: str) -> tuple[list[str], list[str]]:
    """Class names (labels.json) and prompt templates (templates.json) of a classification dataset."""
    labels, templates = read_repo_json("labels.json"), read_repo_json("templates.json")
    if name not in labels or name not in templates:
        raise DatasetError(f"dataset {name!r} has no class names in labels.json or no templates in templates.json")
    return labels[name], templates[name]



# --------------------------------------------------------------------------- the one image decoder
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # PIL's decompression-bomb error threshold, 2 * Image.MAX_IMAGE_PIXELS
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
CORRUPT_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, Image.DecompressionBombError)
_OPEN_ERRORS = (SyntaxError, IndexError, TypeError, struct.error)  # a plugin saying "not my format" (Image.open's)


class CorruptSample(Exception):
    """A sample whose stored bytes (or caption) cannot be read or decoded; ImageTextDataset skips, replaces and
    counts it. `reason` is optional so that a DataLoader worker's copy can be re-raised with one message."""

    def __init__(self, sample_id: str, reason: str = "") -> None:
        super().__init__(sample_id, reason)
        self.sample_id, self.reason = sample_id, reason

    def __str__(self) -> str:
        return f"{self.sample_id}: {self.reason}" if self.reason else self.sample_id


def _open_unchecked(data: bytes) -> Image.Image:
    """`Image.open` on bytes (each registered format's `accept` on the first 16 bytes, then its factory; the common
    plugins first, every plugin if none fits) without PIL's decompression-bomb check on the header size:
    `decode_image` applies --max-image-pixels itself, after a JPEG draft had the chance to shrink the image.
    Plugins that check sizes inside their own code (GIF frames, TIFF tiles, WebP) keep PIL's limit as well."""
    fp, prefix = io.BytesIO(data), data[:16]
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            if accept is not None:
                fits = accept(prefix)
                if not fits or isinstance(fits, str):  # a str is PIL's "looks like it, but unsupported" warning
                    continue
            fp.seek(0)
            try:
                return factory(fp, "")
            except _OPEN_ERRORS:
                continue
    raise UnidentifiedImageError("cannot identify image file")


def max_pixels_arg(text: str) -> int:
    """argparse type of every --max-image-pixels flag (main.py, eval_zeroshot.py, eval_retrieval.py, build_lmdb.py):
    a positive integer."""
    value = int(text)
    if value < 1:
        raise ValueError(f"--max-image-pixels must be a positive number of pixels, got {text}")
    return value


def _draft_scale(size: tuple[int, int], draft: int | None, max_pixels: int) -> int:
    """The JPEG DCT scale denominator (1, 2, 4 or 8) `decode_image` asks libjpeg for: the largest of
    - PIL's draft choice for `draft` (the smallest image whose sides stay >= draft), and
    - the smallest reduction whose pixel count is within `max_pixels` (8 when none is)."""
    w, h = size
    fit = min(w // draft, h // draft) if draft else 0
    by_draft = next((s for s in (8, 4, 2) if fit >= s), 1)
    by_limit = next((s for s in (1, 2, 4, 8) if -(-w // s) * -(-h // s) <= max_pixels), 8)
    return max(by_draft, by_limit)


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} Mpx" if pixels >= 10**6 else f"{pixels} px"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB by the one rule every path shares (decoded now: errors surface here):
    - an alpha band (RGBA, LA, PA, RGBa, La) or a `transparency` entry (a palette or L/RGB image with a tRNS
      colour): composited on white `BACKGROUND`, out = (a * colour + (255 - a) * 255) / 255;
    - 16-bit greyscale (I;16, I;16B, I;16L) and 32-bit integer (I) images: scaled from 0..65535 to 0..255 as
      round(v / 257) (values outside 0..65535 clipped), never clipped to white by an 8-bit cast;
    - every other mode (L, 1, P, CMYK, YCbCr, LAB, HSV, F, RGBX) by PIL's `convert("RGB")` (1-bit: 0/255;
      CMYK: PIL's conversion without a colour profile; F: clipped to 0..255).
    """
    image.load()
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)  # (H, W)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8)).convert("RGB")  # (H, W) uint8: L
    if "transparency" in image.info or any(band in ("A", "a") for band in image.getbands()):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", image.size, BACKGROUND)
        out.paste(rgba, (0, 0), rgba)  # the alpha band as the paste mask
        return out
    return image.convert("RGB")


def decode_image(data: bytes, where: str, draft: int | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, decoded now: the one decoder of every path (training readers,
    validation, zero-shot, `eval_retrieval.py extract`, build_lmdb.py).

    1. identify the format without PIL's decompression-bomb check (`_open_unchecked`);
    2. a JPEG is decoded by libjpeg's DCT scaling (PIL `Image.draft`) at 1/2, 1/4 or 1/8 size when `draft` allows
       it (the smallest image whose sides stay >= draft: much less work on large photos) or when the full image
       has more than `max_pixels` pixels (the largest reduction within the limit);
    3. an image still above `max_pixels` (any other format, or a JPEG too large even at 1/8) is refused;
    4. every mode is converted to RGB by `to_rgb`'s rule.
    `where` names the sample in every error (e.g. "image 7 in valid_imgs.tsv"). Raises CorruptSample
    "<where>: undecodable image (...)" or "<where>: 14000x13000 = 182 Mpx exceeds --max-image-pixels (default
    179 Mpx)".
    """
    try:
        image = _open_unchecked(data)
        if image.format in ("JPEG", "MPO"):
            scale = _draft_scale(image.size, draft, max_pixels)
            if scale > 1:
                image.draft(image.mode, (max(1, image.width // scale), max(1, image.height // scale)))
        pixels = image.width * image.height
        if pixels > max_pixels:
            limit = "(default " + _mpx(max_pixels) + ")" if max_pixels == DEFAULT_MAX_IMAGE_PIXELS else \
                f"{max_pixels} (default {DEFAULT_MAX_IMAGE_PIXELS})"
            raise CorruptSample(where, f"{image.width}x{image.height} = {_mpx(pixels)} exceeds --max-image-pixels "
                                       f"{limit}; raise it to decode such images")
        return to_rgb(image)
    except CORRUPT_ERRORS as exc:
        raise CorruptSample(where, f"undecodable image ({exc!r})") from None


def read_image(fetch: Callable[[], bytes], where: str, draft: int | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """`decode_image(fetch(), ...)`, where a failing fetch (a missing key, zip member or file, bad base64, an I/O
    error) is a CorruptSample naming `where` as well."""
    try:
        data = fetch()
    except (*CORRUPT_ERRORS, KeyError) as exc:
        raise CorruptSample(where, repr(exc)) from None
    return decode_image(data, where, draft, max_pixels)


# --------------------------------------------------------------------------- captions, ids, finiteness
def check_captions(captions: Sequence, where: str) -> list[str]:
    """The captions of a sample, each a string a tokenizer can encode: valid Unicode text (no lone surrogate such
    as a `"\\ud800"` escape in JSON, which the BERT tokenizer rejects with a TypeError). Raises CorruptSample
    naming `where` and the caption's position otherwise (a bad sample in training, a file:line error in builders)."""
    for k, text in enumerate(captions):
        if not isinstance(text, str):
            raise CorruptSample(where, f"caption {k} is a {type(text).__name__}, not text: {text!r:.60}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CorruptSample(where, f"caption {k} is not valid Unicode text ({exc.reason} at character "
                                       f"{exc.start}: {text!r:.60})") from None
    return list(captions)


INT64_RANGE = (-2**63, 2**63)


def json_id(value, where: str, key: str) -> int:
    """The id rule for JSON: an integer (not a bool, a float such as 1000.7 or 1000.0, or a string such as "1000":
    never coerced) that fits in int64 (feature files store int64 ids). DatasetError naming `where` otherwise."""
    if type(value) is not int or not INT64_RANGE[0] <= value < INT64_RANGE[1]:
        raise DatasetError(f"{where}: {key} must be an integer (int64), got {value!r:.40}")
    return value


def json_ids(values: list, where: str, key: str) -> list:
    """`json_id` of every value of a JSON list (`key` names one of them), checked in one pass when all are fine."""
    if all(type(v) is int for v in values) and (not values or INT64_RANGE[0] <= min(values)
                                                   and max(values) < INT64_RANGE[1]):
        return values
    return [json_id(v, where, key) for v in values]


def text_id(field: bytes | str, where: str, key: str = "image id") -> int:
    """The id rule for a text field (a tsv column, an LMDB key): an int64 integer written as `str(id)` writes it
    (ASCII digits, an optional '-', no leading zero), nothing else: no spaces, '+', '_', leading zeros or '.' that
    int() would accept or a float parser would round, so one id has one spelling (the LMDB key). DatasetError
    otherwise."""
    raw = field.encode("ascii", "replace") if isinstance(field, str) else bytes(field)
    digits = raw[1:] if raw[:1] == b"-" else raw
    if not (digits.isdigit() and len(digits) <= 19 and raw == str(int(raw)).encode()
            and INT64_RANGE[0] <= int(raw) < INT64_RANGE[1]):
        raise DatasetError(f"{where}: {key} {raw[:40]!r} is not an integer")
    return int(raw)


class UniqueIds:
    """Ids seen so far in one file (id -> line); `add` raises a DatasetError naming both lines on a duplicate."""

    def __init__(self, path: str, key: str) -> None:
        self.path, self.key, self.lines = path, key, {}

    def check(self, value: int, lineno: int) -> int:
        """`value`, or a DatasetError when another line already holds it."""
        first = self.lines.get(value, lineno)
        if first != lineno:
            raise DatasetError(f"{self.path}:{lineno}: duplicate {self.key} {value} (first on line {first})")
        return value

    def add(self, value: int, lineno: int) -> int:
        """`check`, then record `value` as seen on `lineno`."""
        self.lines[self.check(value, lineno)] = lineno
        return value

    def __contains__(self, value: int) -> bool:
        return value in self.lines

    def __len__(self) -> int:
        return len(self.lines)


def open_lines(path: str, binary: bool = False):
    """`path` opened for reading line by line, past a UTF-8 byte-order mark at its start (Windows editors write
    one): text mode decodes UTF-8 (the utf-8-sig codec); binary mode starts after the mark's three bytes."""
    if binary:
        f = open(path, "rb")
        if f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        return f
    return open(path, encoding="utf-8-sig")


class NonFiniteError(ValueError):
    """NaN or infinite numbers where evaluation takes numbers in (weights, features, similarities)."""


def check_finite(values: np.ndarray, ids: Sequence, what: str, where: str, label: str = "id") -> None:
    """Raise NonFiniteError "<where>: N of M <what> are not finite (first: <label> <id>)" when any row of `values`
    ((M, ...) array, row i named ids[i]) holds a NaN or an infinity. One reduction when all is well."""
    values = np.asarray(values)
    if values.size == 0 or np.isfinite(values.sum()):
        return  # NaN and +-inf propagate through the sum (an overflow to inf just takes the exact path below)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)  # (M,)
    if bad.any():
        first = ids[int(np.argmax(bad))]
        raise NonFiniteError(f"{where}: {int(bad.sum())} of {len(values)} {what} are not finite "
                             f"(first: {f'{label} {first}' if label else first})")


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
        image = to_rgb(Image.fromarray(self.images[index]))  # (8, 8) uint8: L
        return image, check_captions(self.captions[int(self.labels[index])], f"digits[{index}]")

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


# --------------------------------------------------------------------------- storage formats at scale
LMDB_READ_OPTIONS = dict(readonly=True, create=False, lock=False, readahead=False, meminit=False, max_readers=2048)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that asks for anything but the plain types a format admits (never loaded)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the (module, name) globals in `allowed` and refuses every other one.

    Plain containers, ints and strings need no global at all, so `allowed=()` admits data only;
    `os.system`, `builtins.eval`, `subprocess.Popen`, ... are refused before anything is called.
    """

    def __init__(self, file, allowed: frozenset = frozenset()) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refusing to unpickle the global {module}.{name}: only plain data is admitted")


def restricted_loads(data: bytes, where: str, allowed: frozenset = frozenset()):
    """pickle.loads with `_RestrictedUnpickler`; `where` (file/key) is named in every error."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), allowed).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{where}: {exc}") from None


def load_pair(data: bytes, where: str) -> tuple:
    """A Chinese-CLIP pairs value, `pickle.dumps((image_id, text_id, text))`, admitting only tuple/int/str."""
    try:
        pair = restricted_loads(data, where)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise CorruptSample(where, f"unreadable pickle ({exc})") from None
    if not (type(pair) is tuple and len(pair) == 3 and all(type(v) in (int, str) for v in pair)):
        raise UnsafePickleError(f"{where}: a pair must be a tuple (image_id, text_id, text) of int/str, "
                                f"got {type(pair).__name__} {pair!r:.80}")
    return pair


_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def b64decode_image(value: bytes | str) -> bytes:
    """Base64 text in Chinese-CLIP's urlsafe alphabet or the standard one -> the encoded image bytes.

    pybase64's SIMD decoder, strict in the alphabet the text uses (build_lmdb --resize writes the standard
    one), else as lenient as the standard library (line breaks, mixed alphabets): 17x faster than
    `base64.urlsafe_b64decode` on a 260 KB photo (bench.py data). Raises binascii.Error (a ValueError)."""
    if isinstance(value, str):
        value = value.encode("ascii")
    standard = b"+" in value or b"/" in value  # memchr scans; a urlsafe string has neither
    try:
        return pybase64.b64decode(value, altchars=None if standard else b"-_", validate=True)
    except binascii.Error:
        return pybase64.b64decode(value.translate(_URLSAFE_TO_STANDARD))


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()

def encode_jpeg(image: Image.Image, short_side: int | None = None, quality: int = 95) -> bytes:
    """An RGB image as JPEG bytes, first shrunk (bicubic) to a short side of at most `short_side` pixels: the
    builders' one store-resize rule (build_lmdb.py and build_wds.py --resize)."""
    scale = short_side / min(image.size) if short_side else 1.0
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()



def _per_process(obj, attr: str, opener):
    """`opener()` cached on `obj.attr` for the current process only: a handle opened before a fork
    (DataLoader workers) is never used in the child, which opens its own."""
    cached = getattr(obj, attr, None)
    if cached is None or cached[0] != os.getpid():
        cached = (os.getpid(), opener())
        setattr(obj, attr, cached)
    return cached[1]


class _LazyHandles:
    """Pickling drops per-process handles (files, LMDB environments), so spawned workers reopen them."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_h_")}


class PerProcessFile(_LazyHandles):
    """A file handle that a library keeps open and reads by seek + read (nltk's WordNet data files), opened again in
    each process: a handle inherited through fork shares its file offset with the parent's and every other
    worker's, so their seeks and reads interleave. `opener()` returns the real handle; a new process gets a fresh
    one at the start of the file (the library seeks before it reads). Iteration and `with` pass through."""

    def __init__(self, opener: Callable[[], object]) -> None:
        self._opener = opener

    def handle(self):
        return _per_process(self, "_h_file", self._opener)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.handle(), name)

    def __iter__(self):
        return iter(self.handle())

    def __enter__(self) -> PerProcessFile:
        return self

    def __exit__(self, *exc) -> None:
        self.handle().close()


# ---- yfcc15m
def yfcc_zip_location(root: str, image_id: int) -> tuple[str, str]:
    """YFCC100M zip layout: image 12345678 is member `678.jpg` of `root/images/12/345.zip`."""
    d = f"{image_id:08d}"
    return os.path.join(root, "images", d[:2], d[2:5] + ".zip"), d[5:] + ".jpg"


def load_yfcc_metadata(path: str) -> list[tuple[int, str, str]]:
    """(image id, title, description) rows from SLIP's pickle (a list of 3-tuples; read with the restricted
    unpickler), a tsv (id<TAB>title<TAB>description) or a jsonl ({"image_id", "title", "description"})."""
    rows: list[tuple[int, str, str]] = []
    if path.endswith((".pkl", ".pickle")):
        with open(path, "rb") as f:
            data = restricted_loads(f.read(), path)
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a list of (image_id, title, description), got {type(data).__name__}")
        for i, row in enumerate(data):
            if not (isinstance(row, tuple) and len(row) == 3 and type(row[0]) is int
                    and all(isinstance(v, str) for v in row[1:])):
                raise DatasetError(f"{path}: item {i} is not an (int, str, str) tuple: {row!r:.80}")
            rows.append(row)
        return rows
    with open_lines(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                if path.endswith(".jsonl"):
                    rec = json.loads(line)
                    rows.append((json_id(rec["image_id"], f"{path}:{lineno}", "image_id"), rec.get("title") or "",
                                 rec.get("description") or ""))
                else:
                    image_id, title, desc = line.rstrip("\n").split("\t")
                    rows.append((text_id(image_id, f"{path}:{lineno}"), title, desc))
            except DatasetError:
                raise
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise DatasetError(f"{path}:{lineno}: expected image id, title, description ({exc})") from None
    return rows


class YfccReader(_LazyHandles):
    """The `yfcc15m` format: zip shards of JPEGs plus (id, title, description) metadata.
    Captions are the non-empty ones of {title, description}, or [''] (clip-rocket's rule)."""

    def __init__(self, metadata: str, root: str, name: str = "yfcc15m",
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.rows, self.root, self.name, self.draft = load_yfcc_metadata(metadata), root, name, None
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def _zip(self, path: str) -> zipfile.ZipFile:
        cache = _per_process(self, "_h_zips", dict)
        if path not in cache:
            if len(cache) >= 32:  # keep a few shards open; close the oldest
                cache.pop(next(iter(cache))).close()
            cache[path] = zipfile.ZipFile(path)
        return cache[path]

    def read(self, index: int) -> tuple[Image.Image, list[str]]:
        image_id, title, desc = self.rows[index]
        zpath, member = yfcc_zip_location(self.root, image_id)
        where = f"{self.name}[{index}] (image {image_id}, {zpath}:{member})"
        image = read_image(lambda: self._zip(zpath).read(member), where, self.draft, self.max_pixels)
        return image, check_captions([c for c in (title, desc) if c] or [""], where)


# ---- cc3m / cc12m
NPY_ARRAY_GLOBALS = frozenset({("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
                               ("numpy", "ndarray"), ("numpy", "dtype")})


def load_caption_records(path: str) -> list[dict]:
    """clip-rocket's cc3m/cc12m metadata: a .npy object array of dicts ({'image_id' or 'image_name', 'captions'}),
    unpickled with only numpy's array-rebuilding globals admitted; or a .jsonl of the same dicts."""
    if path.endswith(".jsonl"):
        records = []
        with open_lines(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except (ValueError, RecursionError) as exc:
                        raise DatasetError(f"{path}:{lineno}: malformed json ({exc})") from None
        return records
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise DatasetError(f"{path}: unsupported .npy version {version}")
        _, _, dtype = readers[version](f)
        if not dtype.hasobject:
            raise DatasetError(f"{path}: expected an object array of dicts, got dtype {dtype}")
        array = restricted_loads(f.read(), path, NPY_ARRAY_GLOBALS)
    if not isinstance(array, np.ndarray) or array.dtype != object:
        raise DatasetError(f"{path}: expected an object array of dicts, got {type(array).__name__}")
    return list(array.ravel())


class CaptionRecordsReader(_LazyHandles):
    """The `cc3m` / `cc12m` formats: metadata records plus an image root; the image of a record is
    `root/str(image_id)` (cc3m) or `root/image_name` (cc12m)."""

    def __init__(self, metadata: str, root: str, name: str, path_key: str,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.records, self.root, self.name, self.path_key, self.draft = (load_caption_records(metadata), root, name,
                                                                         path_key, None)
        self.max_pixels = max_pixels
        for i, rec in enumerate(self.records[:1000]):  # a cheap schema check at start
            if not isinstance(rec, dict) or path_key not in rec or not isinstance(rec.get("captions"), (list, tuple)):
                raise DatasetError(f"{metadata}: record {i} lacks {path_key!r} or a 'captions' list: {rec!r:.80}")

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> tuple[Image.Image, list[str]]:
        rec = self.records[index]
        path = os.path.join(self.root, str(rec[self.path_key]))
        where = f"{self.name}[{index}] ({path})"
        image = read_image(lambda: _read_file(path), where, self.draft, self.max_pixels)
        return image, check_captions(list(rec["captions"]) or [""], where)


# ---- merged mixtures
class MergedReader:
    """The `merged` format: the concatenation of several catalog entries (e.g. cc3m + cc12m + yfcc15m = 29M)."""

    def __init__(self, parts: list[tuple[str, Reader]]) -> None:
        self.names, self.parts = [n for n, _ in parts], [r for _, r in parts]
        self.offsets = np.cumsum([0] + [len(r) for r in self.parts]).tolist()

    @property
    def draft(self) -> int | None:
        return getattr(self.parts[0], "draft", None)

    @draft.setter
    def draft(self, value: int | None) -> None:
        for part in self.parts:
            part.draft = value

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, index: int) -> tuple[Image.Image, list[str]]:
        part = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[part].read(index - self.offsets[part])


# ---- Chinese-CLIP LMDB
_LMDB_ENVS: dict[str, tuple] = {}  # realpath -> (pid, environment, long-lived read transaction)


def open_lmdb(path: str) -> tuple[lmdb.Environment, lmdb.Transaction]:
    """A read-only environment and a long-lived read transaction, opened once per process.

    py-lmdb refuses to open one environment twice in a process, and LMDB forbids using one across fork():
    a forked DataLoader worker closes the copy it inherited (never reading through it) and opens its own.
    """
    key = os.path.realpath(path)
    cached = _LMDB_ENVS.get(key)
    if cached is not None and cached[0] == os.getpid():
        return cached[1], cached[2]
    if cached is not None:  # inherited through fork: release the child's copy of the mapping and descriptors
        with contextlib.suppress(lmdb.Error):
            cached[1].close()
    env = lmdb.open(path, **LMDB_READ_OPTIONS)
    _LMDB_ENVS[key] = (os.getpid(), env, env.begin())
    return env, _LMDB_ENVS[key][2]


def close_lmdb(path: str | None = None) -> None:
    """Close this process's cached environments (every one, or that of `path`), e.g. before another
    program opens the same LMDB in this process."""
    for key in [os.path.realpath(path)] if path else list(_LMDB_ENVS):
        cached = _LMDB_ENVS.pop(key, None)
        if cached is not None and cached[0] == os.getpid():
            cached[1].close()


def lmdb_get_once(path: str, key: bytes) -> bytes | None:
    """One value, without leaving the environment open in this process unless it already was."""
    cached = _LMDB_ENVS.get(os.path.realpath(path))
    if cached is not None and cached[0] == os.getpid():
        return cached[2].get(key)
    env = lmdb.open(path, **LMDB_READ_OPTIONS)
    try:
        with env.begin() as txn:
            return txn.get(key)
    finally:
        env.close()


def lmdb_shards(folder: str) -> list[str]:
    """The LMDB folders of a split: `folder` itself when it holds `imgs/`, else its sub-folders that do, in name
    order (`build_lmdb.py --num-shards N` writes `{split}/00000 ... {split}/N-1`)."""
    if os.path.isdir(os.path.join(folder, "imgs")):
        return [folder]
    shards = sorted(os.path.join(folder, d) for d in os.listdir(folder)
                    if os.path.isdir(os.path.join(folder, d, "imgs")))
    return shards or [folder]  # none: LmdbReader names the missing imgs/data.mdb


class LmdbReader(_LazyHandles):
    """The `lmdb` format, Chinese-CLIP's layout, possibly sharded over several folders, each holding
    `imgs` (str(image_id) -> base64 text, + `num_images`) and `pairs` (str(i) -> pickled (image_id, text_id,
    text), + `num_samples`). Environments are opened lazily in each process (readonly, lock=False,
    readahead=False, meminit=False) and never used across a fork. Each pair is one sample with captions [text].
    """

    def __init__(self, folders: list[str], name: str = "lmdb", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.folders, self.name, self.draft, self.max_pixels = list(folders), name, None, max_pixels
        counts = []
        for folder in self.folders:
            for sub in ("imgs", "pairs"):
                if not os.path.isfile(os.path.join(folder, sub, "data.mdb")):
                    raise DatasetError(f"dataset {name!r}: {os.path.join(folder, sub, 'data.mdb')} not found; build "
                                       f"the LMDB with `python build_lmdb.py --data-dir DIR --splits ...`")
            n = lmdb_get_once(os.path.join(folder, "pairs"), b"num_samples")  # nothing stays open before a fork
            if n is None:
                raise DatasetError(f"dataset {name!r}: {folder}/pairs has no 'num_samples' key: "
                                   "not a Chinese-CLIP LMDB")
            counts.append(int(n))
        self.offsets = np.cumsum([0] + counts).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def _txn(self, shard: int, sub: str) -> lmdb.Transaction:
        txns = _per_process(self, "_h_txns", lambda: [{s: open_lmdb(os.path.join(f, s))[1] for s in ("imgs", "pairs")}
                                                      for f in self.folders])
        return txns[shard][sub]

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index -> (shard, index inside the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def pair(self, index: int) -> tuple:
        """(image_id, text_id, text) of sample `index`."""
        shard, local = self.locate(index)
        raw = self._txn(shard, "pairs").get(str(local).encode("utf-8"))
        where = f"{self.folders[shard]}/pairs key {local}"
        if raw is None:
            raise CorruptSample(f"{self.name}[{index}]", f"{where} is missing")
        return load_pair(raw, where)

    def image_bytes(self, image_id, shard: int = 0) -> bytes:
        """The encoded image of `image_id` in a shard (base64-decoded, urlsafe or standard alphabet)."""
        value = self._txn(shard, "imgs").get(str(image_id).encode("utf-8"))
        if value is None:
            raise KeyError(f"image id {image_id} not in {self.folders[shard]}/imgs")
        return b64decode_image(value)

    def image_ids(self, shard: int = 0) -> list[int]:
        """Every image id of a shard, in key order."""
        where = f"{self.folders[shard]}/imgs"
        return [text_id(k, where, "key") for k in self._txn(shard, "imgs").cursor().iternext(values=False)
                if k != b"num_images"]

    def read(self, index: int) -> tuple[Image.Image, list[str]]:
        image_id, text_id_, text = self.pair(index)
        shard, _ = self.locate(index)
        where = f"{self.name}[{index}] (image {image_id}, text {text_id_}, {self.folders[shard]}/imgs)"
        image = read_image(lambda: self.image_bytes(image_id, shard), where, self.draft, self.max_pixels)
        return image, check_captions([text], where)


class LmdbImages:
    """The `imgs` LMDB of one split (str(image_id) -> base64 image, + `num_images`), by id, for
    `eval_retrieval.py extract`: the ids are listed once (key order, as Chinese-CLIP walks them) and the environment
    is opened per process (`open_lmdb`). A folder that is not such an LMDB (no data.mdb, the split folder above
    it, its `pairs` sibling) is a DatasetError saying which folder to give."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(os.path.join(path, "data.mdb")):
            hint = f"; give its images LMDB, {os.path.join(path, 'imgs')}" \
                if os.path.isfile(os.path.join(path, "imgs", "data.mdb")) else ""
            raise DatasetError(f"{path}: not an LMDB folder (no data.mdb){hint}")
        txn = open_lmdb(path)[1]
        if txn.get(b"num_images") is None:
            pairs = txn.get(b"num_samples") is not None
            raise DatasetError(f"{path}: not an images LMDB (no 'num_images' key)" + (
                f"; it is a pairs LMDB (it has 'num_samples'): give the images LMDB beside it, "
                f"{os.path.join(os.path.dirname(os.path.normpath(path)), 'imgs')}" if pairs else ""))
        self.ids = [text_id(k, path, "key") for k in txn.cursor().iternext(keys=True, values=False)
                    if k != b"num_images"]

    def image_ids(self) -> list[int]:
        return list(self.ids)

    def image_bytes(self, image_id: int) -> bytes:
        """The encoded image of `image_id` (base64-decoded)."""
        value = open_lmdb(self.path)[1].get(str(image_id).encode("utf-8"))
        if value is None:
            raise KeyError(f"image id {image_id} not in {self.path}")
        return b64decode_image(value)


# ---- raw MUGE / Chinese-CLIP files
def parse_imgs_tsv_line(line: bytes, where: str) -> tuple[int, bytes]:
    """`image_id<TAB>base64` -> (int id, base64 bytes), the id by `text_id`'s rule; DatasetError naming `where`
    (file:line) otherwise."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != 2:
        raise DatasetError(f"{where}: expected 'image_id<TAB>base64', got {len(fields)} field(s)")
    return text_id(fields[0], where), fields[1]


def parse_text_record(line: str, where: str, need_image_ids: bool = True) -> tuple[int, str, list[int]]:
    """A jsonl text line, Chinese-CLIP keys {text_id, text, image_ids} or MUGE's older {query_id, query_text,
    item_ids} -> (text_id, text, image_ids), ids by `json_id`'s rule; DatasetError naming `where` (file:line)
    otherwise. need_image_ids=False (feature extraction) admits a line without image_ids (then [])."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested; ValueError: a 5000-digit integer
        raise DatasetError(f"{where}: malformed json ({exc})") from None
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected a json object, got {type(rec).__name__}")
    keys = ("text_id", "text", "image_ids") if "text_id" in rec else ("query_id", "query_text", "item_ids")
    if not need_image_ids:
        rec.setdefault(keys[2], [])
    missing = [k for k in keys if k not in rec]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {missing} (expected text_id/text/image_ids or "
                           "query_id/query_text/item_ids)")
    tid, text, image_ids = (rec[k] for k in keys)
    if not isinstance(text, str) or not isinstance(image_ids, list):
        raise DatasetError(f"{where}: {keys[0]} must be an int, {keys[1]} a string and {keys[2]} a list of ints")
    return json_id(tid, where, keys[0]), text, json_ids(image_ids, where, keys[2][:-1])


def texts_jsonl_path(folder: str, split: str) -> str:
    """`{split}_texts.jsonl` (Chinese-CLIP), else MUGE's older `{split}_queries.jsonl`."""
    path = os.path.join(folder, f"{split}_texts.jsonl")
    older = os.path.join(folder, f"{split}_queries.jsonl")
    return older if not os.path.exists(path) and os.path.exists(older) else path


class TsvImages(_LazyHandles):
    """The images of an `image_id<TAB>base64` tsv (`{split}_imgs.tsv`): every line's byte offset indexed once,
    images read by id through a file opened lazily in each process. A malformed line or a duplicate id is a
    DatasetError naming file:line."""

    def __init__(self, imgs_path: str) -> None:
        self.imgs_path = imgs_path
        self.offsets: dict[int, int] = {}  # image id -> byte offset of its line, in file order
        ids = UniqueIds(imgs_path, "image id")
        with open_lines(imgs_path, binary=True) as f:
            offset = f.tell()  # 3 after a byte-order mark
            for lineno, line in enumerate(f, 1):
                image_id, _ = parse_imgs_tsv_line(line, f"{imgs_path}:{lineno}")
                self.offsets[ids.add(image_id, lineno)] = offset
                offset += len(line)

    def image_ids(self) -> list[int]:
        return list(self.offsets)

    def image_bytes(self, image_id: int) -> bytes:
        """The encoded image of `image_id` (base64-decoded)."""
        f = _per_process(self, "_h_file", lambda: open(self.imgs_path, "rb"))
        f.seek(self.offsets[image_id])
        _, b64 = parse_imgs_tsv_line(f.readline(), self.imgs_path)
        return b64decode_image(b64)


class TsvReader(TsvImages):
    """The `tsv` format: `{split}_imgs.tsv` (id<TAB>base64) + `{split}_texts.jsonl` (or `_queries.jsonl`).
    Each (text, image) combination is one sample, in jsonl order (as Chinese-CLIP's LMDB builder)."""

    def __init__(self, folder: str, split: str, name: str = "tsv", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.name, self.draft, self.max_pixels = name, None, max_pixels
        imgs_path, self.texts_path = os.path.join(folder, f"{split}_imgs.tsv"), texts_jsonl_path(folder, split)
        for path in (imgs_path, self.texts_path):
            if not os.path.isfile(path):
                raise DatasetError(f"dataset {name!r}: {path} not found")
        super().__init__(imgs_path)
        self.pairs: list[tuple[int, int, str]] = []  # (image_id, text_id, text)
        text_ids = UniqueIds(self.texts_path, "text id")
        with open_lines(self.texts_path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                tid, text, image_ids = parse_text_record(line, f"{self.texts_path}:{lineno}")
                text_ids.add(tid, lineno)
                for image_id in image_ids:
                    if image_id not in self.offsets:
                        raise DatasetError(f"{self.texts_path}:{lineno}: image id {image_id} of text {tid} is "
                                           f"not in {self.imgs_path}")
                    self.pairs.append((image_id, tid, text))

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[Image.Image, list[str]]:
        image_id, tid, text = self.pairs[index]
        where = f"{self.name}[{index}] (image {image_id}, text {tid}, {self.imgs_path})"
        image = read_image(lambda: self.image_bytes(image_id), where, self.draft, self.max_pixels)
        return image, check_captions([text], where)


# ---- webdataset shards (img2dataset layout)
WDS_IMAGE_KEYS = "jpg;png;webp"
STATS_FILE = "_stats.json"  # a shard folder's summary (build_wds.py); img2dataset writes NNNNN_stats.json per shard


def _is_remote(url: str) -> bool:
    """A `pipe:` command or a URL with a scheme (gopen opens it); anything else is a path on disk."""
    return url.startswith("pipe:") or "://" in url


def shard_urls(name: str, entry: dict, data_root: str | None, split: str = "train") -> list[str]:
    """The shard URLs of a `wds` entry: `shards` with `{split}` and `{root}` (the data root) replaced, then
    brace-expanded (`{00000..00331}`, as webdataset and img2dataset write them). A path is relative to the
    data root; a folder stands for every `*.tar` in it; every local shard is checked to exist. A `pipe:`
    command (`pipe:cat {root}/cc3m/{00000..00331}.tar`, `pipe:aws s3 cp s3://bucket/{000..099}.tar -`) is
    run by webdataset's gopen for each shard. Raises a DatasetError naming the entry, the path and the fix."""
    import braceexpand  # webdataset's own dependency: the brace syntax of its shard URLs

    pattern = str(entry["shards"]).replace("{split}", split)
    root = resolve_data_root(data_root)
    if "{root}" in pattern:
        if root is None:
            raise DatasetError(f"dataset {name!r} (dataset_catalog.json, shards={entry['shards']!r}) uses {{root}}: "
                               "pass --data-root DIR or export CLIP_LAB_DATA_ROOT=DIR")
        pattern = pattern.replace("{root}", root)
    if _is_remote(pattern):
        return list(braceexpand.braceexpand(pattern))
    if not os.path.isabs(pattern) and root is None:
        raise DatasetError(f"dataset {name!r} (dataset_catalog.json, shards={pattern!r}) needs a data root: pass "
                           "--data-root DIR or export CLIP_LAB_DATA_ROOT=DIR, DIR being the folder that holds it")
    full = os.path.join(root or "", pattern)
    if os.path.isdir(full):
        urls = sorted(os.path.join(full, f) for f in os.listdir(full) if f.endswith(".tar"))
    else:
        urls = list(braceexpand.braceexpand(full))
    missing = [u for u in urls if not os.path.isfile(u)]
    if not urls or missing:
        raise DatasetError(f"dataset {name!r} (dataset_catalog.json, shards={pattern!r}): "
                           + (f"{len(missing)} of {len(urls)} shards not found, first {missing[0]}" if urls else
                              f"no .tar shard in {full}")
                           + f". Fix: put the shards there, point --data-root / $CLIP_LAB_DATA_ROOT (now {root!r}) at "
                           "the folder that holds them, or edit the entry's 'shards' (build shards with "
                           "`python build_wds.py --dataset NAME --out DIR`)")
    return urls


def shard_stats(urls: list[str]) -> tuple[int | None, dict[int, int]]:
    """(total samples, {shard index: samples}) of local shards from their folder's `_stats.json` (build_wds.py:
    {"num_samples", "shards": {file name: count}}), else from img2dataset's per-shard `NNNNN_stats.json`
    ("successes"); (None, {}) when neither is there (remote shards: give `num_samples` in the catalog)."""
    local = [u for u in urls if not _is_remote(u)]
    if not local or len(local) != len(urls):
        return None, {}
    folders = {os.path.dirname(u) for u in urls}
    sizes: dict[int, int] = {}
    summaries = {}
    for folder in folders:
        path = os.path.join(folder, STATS_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                summaries[folder] = json.load(f).get("shards", {})
    for i, url in enumerate(urls):
        folder, base = os.path.split(url)
        if base in summaries.get(folder, {}):
            sizes[i] = int(summaries[folder][base])
            continue
        per_shard = os.path.join(folder, base[:-len(".tar")] + "_stats.json") if base.endswith(".tar") else ""
        if not os.path.isfile(per_shard):
            return None, {}
        with open(per_shard, encoding="utf-8") as f:
            sizes[i] = int(json.load(f)["successes"])
    return sum(sizes.values()), sizes


def _mapped(path: str) -> mmap.mmap:
    """A local shard memory-mapped: tarfile's 10 KiB stream reads become copies, not system calls (0.33 -> 0.23 ms
    per 200 KB sample, bench.py data), with no copy of the shard in memory."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # an empty file raises: a named bad sample


class WdsReader:
    """The `wds` format: webdataset tar shards, each sample `<key>.jpg|png|webp` + `<key>.txt` + `<key>.json`
    (img2dataset's output). Not map-style: `records(shard)` streams one shard's raw records (webdataset's tar
    iterator, nothing decoded) and `decode(record)` turns one into (RGB image, [captions]) through
    `decode_image`; datasets.py orders shards and records. A member that does not decode, a record without an
    image or caption, and a shard that cannot be read to its end (truncated tar, failing `pipe:` command,
    fewer samples than its stats say) are CorruptSample named `shard:key`.

    caption_key: `txt` (a member) or `json:<field>` (a string or a list of strings in `<key>.json`).
    """

    def __init__(self, urls: list[str], name: str = "wds", caption_key: str = "txt",
                 image_keys: str = WDS_IMAGE_KEYS, num_samples: int | None = None,
                 shard_sizes: dict[int, int] | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.urls, self.name, self.caption_key, self.draft = list(urls), name, caption_key, None
        self.max_pixels = max_pixels
        self.image_keys = [k.strip().lower() for k in image_keys.split(";") if k.strip()]
        self.num_samples, self.shard_sizes = num_samples, dict(shard_sizes or {})
        if not (caption_key == "txt" or caption_key.startswith("json:")):
            raise DatasetError(f"dataset {name!r}: caption_key {caption_key!r} is neither 'txt' nor 'json:<field>'")

    def __len__(self) -> int:
        if self.num_samples is None:
            raise DatasetError(f"dataset {self.name!r}: the number of samples is unknown (no _stats.json beside the "
                               "shards): add \"num_samples\" to its dataset_catalog.json entry or pass "
                               "--samples-per-epoch")
        return self.num_samples

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def records(self, shard: int) -> Iterator[dict]:
        """The raw records of shard `shard` in tar order: dicts of member extension -> bytes plus `__key__` and
        `__url__`. A read failure ends the shard with one record carrying `__error__` (never raises)."""
        from webdataset import tariterators
        from webdataset.gopen import gopen

        url, count, key, stream = self.urls[shard], 0, None, None
        try:
            stream = gopen(url) if _is_remote(url) else _mapped(url)
            files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
            for record in tariterators.group_by_keys(files):
                count, key = count + 1, record["__key__"]
                yield record
        except Exception as exc:  # noqa: BLE001  tarfile, gopen and pipe errors have no common base
            yield {"__key__": f"after {key}" if key else "start", "__url__": url,
                   "__error__": f"shard unreadable after {count} sample(s): {exc!r}"}
            return
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):  # a pipe closed early exits with SIGPIPE: not an error
                    stream.close()
        expected = self.shard_sizes.get(shard)
        if expected is not None and count < expected:
            yield {"__key__": f"after {key}", "__url__": url,
                   "__error__": f"{count} sample(s), its stats say {expected}: truncated shard"}

    def decode(self, record: dict) -> tuple[Image.Image, list[str]]:
        """(RGB image, [captions]) of a raw record; CorruptSample named `shard:key` when it cannot be."""
        where = f"{record['__url__']}:{record['__key__']}"
        if "__error__" in record:
            raise CorruptSample(where, record["__error__"])
        data = next((record[k] for k in self.image_keys if k in record), None)
        if data is None:
            raise CorruptSample(where, f"no image member ({';'.join(self.image_keys)}); members "
                                       f"{sorted(k for k in record if not k.startswith('__'))}")
        return decode_image(data, where, self.draft, self.max_pixels), self._captions(record, where)

    def _captions(self, record: dict, where: str) -> list[str]:
        field = self.caption_key.partition(":")[2]
        member = "json" if field else "txt"
        if member not in record:
            raise CorruptSample(where, f"no {member} member for caption_key {self.caption_key!r}")
        try:
            text = record[member].decode("utf-8")
            value = json.loads(text).get(field) if field else text
        except (UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise CorruptSample(where, f"unreadable {member} member ({exc})") from None
        captions = [value] if isinstance(value, str) else value
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise CorruptSample(where, f"caption_key {self.caption_key!r} gives {value!r:.80}, not a string or a "
                                       "list of strings")
        return check_captions(captions, where)


def wds_reader(name: str, entry: dict, data_root: str | None, split: str,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> WdsReader:
    """The WdsReader of catalog entry `name`: its shards, keys and size (`num_samples`, else the shards' stats)."""
    urls = shard_urls(name, entry, data_root, split)
    total, sizes = shard_stats(urls)
    return WdsReader(urls, name, entry.get("caption_key", "txt"), entry.get("image_keys", WDS_IMAGE_KEYS),
                     entry.get("num_samples", total), sizes, max_pixels)


# ---- downstream classification
class ImageFolderReader:
    """The `imagefolder` format: `root/<class>/<image>`; captions are the class name (labels.json if it has
    the dataset, else the folder name)."""

    def __init__(self, root: str, classnames: list[str] | None = None, name: str = "imagefolder",
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        classes, class_to_idx = find_classes(root)
        self.samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
        self.classnames = classnames or [c.replace("_", " ") for c in classes]
        if len(self.classnames) != len(classes):
            raise DatasetError(f"dataset {name!r}: {root} has {len(classes)} class folders but labels.json "
                               f"lists {len(self.classnames)} names")
        self.name, self.draft, self.max_pixels = name, None, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[Image.Image, list[str]]:
        path, label = self.samples[index]
        where = f"{self.name}[{index}] ({path})"
        return read_image(lambda: _read_file(path), where, self.draft, self.max_pixels), \
            check_captions([self.classnames[label]], where)

    def label(self, index: int) -> int:
        return self.samples[index][1]


class FilelistReader(ImageFolderReader):
    """The `filelist` format: `root/{split}_images.npy` (image paths, relative to root) and
    `{split}_labels.npy` (ints, or strings mapped through the entry's `label_order`)."""

    def __init__(self, root: str, split: str, classnames: list[str] | None, label_order: list[str] | None = None,
                 name: str = "filelist", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        images = np.load(os.path.join(root, f"{split}_images.npy"), allow_pickle=False)
        labels = np.load(os.path.join(root, f"{split}_labels.npy"), allow_pickle=False)
        if label_order is not None:
            index = {c: i for i, c in enumerate(label_order)}
            labels = np.array([index[str(v)] for v in labels])
        self.samples = [(os.path.join(root, str(p)), int(y)) for p, y in zip(images, labels)]
        n_classes = len(label_order) if label_order else int(labels.max()) + 1
        self.classnames = classnames or [str(i) for i in range(n_classes)]
        self.name, self.draft, self.max_pixels = name, None, max_pixels


class TorchvisionReader:
    """The `torchvision` format (clip-rocket's `special`): CIFAR10, CIFAR100, STL10, MNIST already on disk
    (never downloaded)."""

    def __init__(self, kind: str, root: str, split: str, name: str) -> None:
        from torchvision import datasets as tvd

        train = split == "train"
        builders = {"cifar10": lambda: tvd.CIFAR10(root, train=train, download=False),
                    "cifar100": lambda: tvd.CIFAR100(root, train=train, download=False),
                    "stl10": lambda: tvd.STL10(root, split="train" if train else "test", download=False),
                    "mnist": lambda: tvd.MNIST(root, train=train, download=False)}
        if kind not in builders:
            raise DatasetError(f"dataset {name!r}: torchvision kind {kind!r} is not one of {sorted(builders)}")
        try:
            self.dataset = builders[kind]()
        except RuntimeError as exc:
            raise DatasetError(f"dataset {name!r}: torchvision {kind} not found under {root} ({exc}); place the "
                               "extracted files there (nothing is downloaded)") from None
        self.classnames = [str(c) for c in getattr(self.dataset, "classes", [])]

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> tuple[Image.Image, list[str]]:
        image, label = self.dataset[index]  # decoded by torchvision from raw arrays (CIFAR: RGB, MNIST: L)
        return to_rgb(image), check_captions([self.classnames[label] if self.classnames else str(label)],
                                             f"torchvision[{index}]")

    def label(self, index: int) -> int:
        return int(self.dataset[index][1])


# ---- catalog paths
def resolve_data_root(data_root: str | None = None) -> str | None:
    """`--data-root` if given, else `$CLIP_LAB_DATA_ROOT`, else None."""
    return data_root or os.environ.get("CLIP_LAB_DATA_ROOT") or None


def entry_path(name: str, entry: dict, key: str, data_root: str | None, split: str = "", kind: str = "any") -> str:
    """The catalog path `entry[key]` (with `{split}` filled in) under the data root, checked to exist.

    A missing path raises a DatasetError naming the entry, the path tried and how to fix it.
    """
    rel = str(entry[key]).format(split=split)
    root = resolve_data_root(data_root)
    if not os.path.isabs(rel) and root is None:
        raise DatasetError(f"dataset {name!r} (dataset_catalog.json, {key}={rel!r}) needs a data root: pass "
                           f"--data-root DIR or export CLIP_LAB_DATA_ROOT=DIR, DIR being the folder that holds {rel!r}")
    path = os.path.join(root or "", rel)
    exists = {"dir": os.path.isdir, "file": os.path.isfile}.get(kind, os.path.exists)(path)
    if not exists:
        raise DatasetError(f"dataset {name!r} (dataset_catalog.json, {key}={rel!r}): {path} not found. Fix: put the "
                           f"data there, point --data-root / $CLIP_LAB_DATA_ROOT (now {root!r}) at the folder that "
                           f"holds {rel!r}, or edit the entry's {key!r}" +
                           (" (build an LMDB with `python build_lmdb.py --data-dir DIR --splits train,valid,test`)"
                            if entry.get("format") == "lmdb" else ""))
    return path


def split_name(name: str, entry: dict, split: str) -> str:
    """The on-disk split of a logical split (train/test), through the entry's optional `splits` map."""
    splits = entry.get("splits")
    if splits is None:
        return split
    if split not in splits:
        raise DatasetError(f"dataset {name!r} has no {split!r} split (dataset_catalog.json lists {sorted(splits)}); "
                           "choose another --val-dataset")
    return splits[split]


def _classnames(entry: dict, name: str) -> list[str] | None:
    names = read_repo_json("labels.json").get(entry.get("labels", name))
    return [n if isinstance(n, str) else n[0] for n in names] if names else None


def build_reader(name: str, split: str, catalog: dict | None = None, data_root: str | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Reader:
    """The reader for catalog entry `name` and logical `split` (train/test), dispatched on its `format`.

    Catalog paths are relative to `data_root` (else $CLIP_LAB_DATA_ROOT); a missing file fails here with the
    entry name, the path tried and how to fix it. `max_pixels` (--max-image-pixels) goes to every reader that
    decodes stored images (`decode_image`).
    """
    catalog = catalog if catalog is not None else load_catalog()
    entry = catalog_entry(name, catalog)
    fmt = entry["format"]
    if fmt == "digits":
        return DigitsReader(split, entry.get("labels", name))
    if fmt == "synthetic":
        return SyntheticReader(entry.get("num_samples", 256) if split == "train" else entry.get("num_test", 64),
                               entry.get("image_size", 32), entry.get("language", "en"))
    if fmt == "merged":
        return MergedReader([(part, build_reader(part, split, catalog, data_root, max_pixels))
                             for part in entry["datasets"]])
    on_disk = split_name(name, entry, split)
    if fmt == "wds":
        return wds_reader(name, entry, data_root, on_disk, max_pixels)
    if fmt == "lmdb":
        keys = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
        folders = [entry_path(name, {**entry, "path": p}, "path", data_root, on_disk, "dir") for p in keys]
        return LmdbReader([shard for folder in folders for shard in lmdb_shards(folder)], name, max_pixels)
    if fmt == "tsv":
        return TsvReader(entry_path(name, entry, "path", data_root, on_disk, "dir"), on_disk, name, max_pixels)
    if fmt == "yfcc15m":
        return YfccReader(entry_path(name, entry, "metadata", data_root, on_disk, "file"),
                          entry_path(name, entry, "root", data_root, on_disk, "dir"), name, max_pixels)
    if fmt in ("cc3m", "cc12m"):
        return CaptionRecordsReader(entry_path(name, entry, "metadata", data_root, on_disk, "file"),
                                    entry_path(name, entry, "root", data_root, on_disk, "dir"), name,
                                    "image_id" if fmt == "cc3m" else "image_name", max_pixels)
    if fmt == "imagefolder":
        return ImageFolderReader(entry_path(name, {**entry, "path": os.path.join(entry["path"], on_disk)}, "path",
                                            data_root, on_disk, "dir"), _classnames(entry, name), name, max_pixels)
    if fmt == "filelist":
        return FilelistReader(entry_path(name, entry, "path", data_root, on_disk, "dir"), on_disk,
                              _classnames(entry, name), entry.get("label_order"), name, max_pixels)
    if fmt == "torchvision":
        return TorchvisionReader(entry["kind"], entry_path(name, entry, "path", data_root, on_disk, "dir"), on_disk,
                                 name)
    raise DatasetError(f"dataset {name!r}: format {fmt!r} has no reader")
