"""Build Chinese-CLIP LMDBs from MUGE-style raw files:
`python build_lmdb.py --data-dir DIR --splits train,valid,test [--lmdb-dir OUT] [--resize N] [--skip-bad]
[--num-shards N [-j J]]`.

Input (OFA-Sys/Chinese-CLIP README, dataset preparation, commit 31863c7): `DIR/{split}_imgs.tsv`
(`image_id<TAB>base64 JPEG`) and `DIR/{split}_texts.jsonl` (`{"text_id", "text", "image_ids"}`, or MUGE's older
`{split}_queries.jsonl` with `{"query_id", "query_text", "item_ids"}`).

Output, `OUT/{split}/imgs` and `OUT/{split}/pairs`, in the layout Chinese-CLIP's own reader expects:
- imgs: `str(image_id).encode()` -> base64 text (the original, or a re-encoded JPEG with --resize), and
  `b"num_images"` -> `str(count).encode()`;
- pairs: `str(i).encode()` -> `pickle.dumps((image_id, text_id, text))` for every (text, image) combination in
  jsonl order, and `b"num_samples"` -> `str(N).encode()`.

With `--num-shards N` (N > 1) a split is N such folders, `OUT/{split}/00000` ... `OUT/{split}/N-1`: image i goes
to shard i % N (each shard's images are validated and written by its own process, `-j` at once; each reads the
whole tsv and keeps its ids), every pair to its image's shard, numbered from 0 there. Each folder is a complete
Chinese-CLIP LMDB; the `lmdb` catalog format reads the split folder as all of its shards, in order.

Every image is decoded once to validate it, by the readers' one decoder (`readers.decode_image`: the same mode
rule and --max-image-pixels limit as training and evaluation), and every text is checked as the readers check
captions (`readers.check_captions`) and ids (`readers.json_id` / `readers.text_id`: integers, never coerced,
unique). Errors (bad base64, an undecodable or too large image, a text naming a missing image, a duplicate or
non-integer id, a malformed jsonl line, a caption that is not valid Unicode) name the file and line; `--skip-bad`
drops them and prints the count. A UTF-8 byte-order mark at the start of a file is accepted.
The map size starts small and doubles when full. Each split is written into a temporary folder that is renamed
into place at the end, so an interrupted build never leaves a half LMDB.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import logging
import multiprocessing
import os
import pickle
import shutil
import sys
from collections.abc import Callable

import lmdb
from tqdm import tqdm

from readers import (
    DEFAULT_MAX_IMAGE_PIXELS,
    CorruptSample,
    DatasetError,
    UniqueIds,
    b64decode_image,
    check_captions,
    decode_image,
    encode_jpeg,
    max_pixels_arg,
    open_lines,
    parse_imgs_tsv_line,
    parse_text_record,
    texts_jsonl_path,
)

log = logging.getLogger("build_lmdb")


class BuildError(DatasetError):
    """A bad input line, with its file and line."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Build Chinese-CLIP LMDBs (imgs + pairs) from {split}_imgs.tsv + {split}_texts.jsonl")
    p.add_argument("--data-dir", required=True, help="folder holding {split}_imgs.tsv and {split}_texts.jsonl")
    p.add_argument("--splits", required=True, help="comma-separated splits, e.g. train,valid,test")
    p.add_argument("--lmdb-dir", default=None, help="output root (default DATA_DIR/lmdb, as Chinese-CLIP)")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="store JPEGs re-encoded with the short side at most N pixels (a large decode saving)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of --resize re-encoding")
    p.add_argument("--skip-bad", action="store_true", help="drop bad lines (reported) instead of stopping")
    p.add_argument("--max-image-pixels", type=max_pixels_arg, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="images with more pixels (after a JPEG's draft reduction) are bad lines, as in training and "
                        "evaluation; raise it for valid huge images")
    p.add_argument("--initial-map-size", type=int, default=64 << 20,
                   help="initial LMDB map size in bytes; doubled whenever it fills up")
    p.add_argument("--commit-every", type=int, default=1000, help="puts per write transaction")
    p.add_argument("--num-shards", type=int, default=1, metavar="N",
                   help="write each split as N LMDB folders {split}/00000 ... (images by id %% N, each pair with its "
                        "image), in parallel; each is a Chinese-CLIP LMDB and the lmdb catalog format reads them all")
    p.add_argument("-j", "--jobs", type=int, default=None,
                   help="image writers running at once with --num-shards (default: min(N, CPUs))")
    return p


class GrowingWriter:
    """Buffered puts into an LMDB whose map size doubles on MDB_MAP_FULL (no fixed 1 TiB map)."""

    def __init__(self, path: str, map_size: int, commit_every: int) -> None:
        self.env = lmdb.open(path, map_size=map_size, subdir=True, lock=True, readahead=False, meminit=False)
        self.map_size, self.commit_every, self.buffer = map_size, commit_every, []
        self.resizes = 0

    def put(self, key: bytes, value: bytes) -> None:
        self.buffer.append((key, value))
        if len(self.buffer) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        while self.buffer:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.buffer:
                        txn.put(key, value)
                self.buffer = []
            except lmdb.MapFullError:  # the transaction was aborted: grow and redo it
                self.map_size *= 2
                self.resizes += 1
                self.env.set_mapsize(self.map_size)

    def close(self) -> None:
        self.flush()
        self.env.sync()
        self.env.close()


def resized_b64(data: bytes, size: int, quality: int, where: str = "image",
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """Image bytes decoded by the readers' rule (a JPEG drafted, never below `size`), re-encoded with the short
    side at most `size` (readers.encode_jpeg), as standard base64."""
    return base64.b64encode(encode_jpeg(decode_image(data, where, size, max_pixels), size, quality))


def check_image(b64: bytes, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """Decoded image bytes of a base64 field (standard or urlsafe alphabet), decoded once by `readers.decode_image`
    to validate (a JPEG at 1/8 size: every entropy-coded byte is still read, much faster)."""
    try:
        data = b64decode_image(b64)
    except (binascii.Error, ValueError) as exc:
        raise BuildError(f"{where}: bad base64 ({exc})") from None
    try:
        decode_image(data, where, 64, max_pixels)
    except CorruptSample as exc:
        raise BuildError(str(exc)) from None
    return data


def fail(exc: DatasetError | CorruptSample, skip_bad: bool) -> str:
    """A bad input line: raised as a BuildError, or (with --skip-bad) logged and returned for the count."""
    error = exc if isinstance(exc, BuildError) else BuildError(str(exc))
    if not skip_bad:
        raise error
    log.warning("skipped: %s", error)
    return str(error)


def write_images(imgs_path: str, folder: str, shard: int, num_shards: int, args: argparse.Namespace,
                 progress: Callable[[int], object]) -> tuple[set[int], list[str], int]:
    """Shard `shard` of `num_shards` of the tsv's images into `folder/imgs`: the lines whose image id % num_shards
    is `shard` (a line without a readable id belongs to shard line % num_shards), each decoded once to validate it;
    a duplicate id keeps its first line. `progress(bytes)` is called for every line of the shard.
    Returns (image ids written, bad-line messages, map resizes)."""
    imgs = GrowingWriter(os.path.join(folder, "imgs"), args.initial_map_size, args.commit_every)
    seen = UniqueIds(imgs_path, "image id")  # an id's lines all fall in one shard: duplicates are found there
    bad: list[str] = []
    with open_lines(imgs_path, binary=True) as f:
        for lineno, line in enumerate(f, 1):
            where = f"{imgs_path}:{lineno}"
            try:
                image_id, b64 = parse_imgs_tsv_line(line, where)
            except DatasetError as exc:
                if lineno % num_shards == shard:
                    progress(len(line))
                    bad.append(fail(exc, args.skip_bad))
                continue
            if image_id % num_shards != shard:
                continue
            progress(len(line))
            try:
                seen.check(image_id, lineno)
                data = check_image(b64, where, args.max_image_pixels)
            except DatasetError as exc:
                bad.append(fail(exc, args.skip_bad))
                continue
            seen.add(image_id, lineno)
            imgs.put(str(image_id).encode("utf-8"), resized_b64(data, args.resize, args.quality, where,
                                                                args.max_image_pixels) if args.resize else b64)
    imgs.put(b"num_images", str(len(seen)).encode("utf-8"))
    imgs.close()
    return set(seen.lines), bad, imgs.resizes


_COUNTER: list = []  # a forked image writer's shared progress counter (set by _init_writer)


def _init_writer(counter) -> None:
    _COUNTER[:] = [counter]


def _count_bytes(n: int) -> None:
    with _COUNTER[0].get_lock():
        _COUNTER[0].value += n


def _write_image_shard(job: tuple) -> tuple[set[int], list[str], int]:
    return write_images(*job, progress=_count_bytes)


def write_image_shards(imgs_path: str, folders: list[str], args: argparse.Namespace,
                       bar: tqdm) -> list[tuple[set[int], list[str], int]]:
    """`write_images` for every shard folder: in this process for one, else in forked processes (-j of them at
    once, default min(shards, CPUs)) with the bar following their shared byte count."""
    if len(folders) == 1:
        return [write_images(imgs_path, folders[0], 0, 1, args, bar.update)]
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("q", 0)
    jobs = [(imgs_path, folder, k, len(folders), args) for k, folder in enumerate(folders)]
    with ctx.Pool(args.jobs or min(len(folders), os.cpu_count() or 1), _init_writer, (counter,)) as pool:
        result = pool.map_async(_write_image_shard, jobs)
        while not result.ready():
            result.wait(0.2)
            bar.update(counter.value - bar.n)
        results = result.get()  # re-raises a writer's BuildError
    bar.update(counter.value - bar.n)
    return results


def build_split(data_dir: str, split: str, out_dir: str, args: argparse.Namespace) -> dict:
    """Write `out_dir/split/{imgs,pairs}` (with --num-shards N > 1: `out_dir/split/{00000..N-1}/{imgs,pairs}`, the
    images split by id % N, each pair in its image's shard); returns counts. Raises BuildError on the first bad
    line unless --skip-bad."""
    imgs_path, texts_path = os.path.join(data_dir, f"{split}_imgs.tsv"), texts_jsonl_path(data_dir, split)
    for path in (imgs_path, texts_path):
        if not os.path.isfile(path):
            raise BuildError(f"{path} not found (split {split!r} of --data-dir {data_dir})")
    final = os.path.join(out_dir, split)
    tmp = os.path.join(out_dir, f".{split}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    num_shards = args.num_shards
    folders = [tmp] if num_shards == 1 else [os.path.join(tmp, f"{k:05d}") for k in range(num_shards)]
    for folder in folders:
        os.makedirs(folder)
    try:
        with tqdm(total=os.path.getsize(imgs_path), unit="B", unit_scale=True, desc=f"{split} images",
                  file=sys.stderr) as bar:
            results = write_image_shards(imgs_path, folders, args, bar)
        seen = set().union(*(ids for ids, _, _ in results))
        bad = [message for _, messages, _ in results for message in messages]
        resizes = sum(r for _, _, r in results)

        writers = [GrowingWriter(os.path.join(folder, "pairs"), args.initial_map_size, args.commit_every)
                   for folder in folders]
        shard_pairs, text_ids = [0] * num_shards, UniqueIds(texts_path, "text id")
        with open_lines(texts_path, binary=True) as f, \
                tqdm(total=os.path.getsize(texts_path), unit="B", unit_scale=True, desc=f"{split} texts",
                     file=sys.stderr) as bar:
            for lineno, raw in enumerate(f, 1):
                bar.update(len(raw))
                if not raw.strip():
                    continue
                where = f"{texts_path}:{lineno}"
                try:
                    text_id, text, image_ids = parse_text_record(raw.decode("utf-8"), where)
                    text_ids.check(text_id, lineno)
                    check_captions([text], where)
                    missing = [i for i in image_ids if i not in seen]
                    if missing:
                        raise BuildError(f"{where}: image id(s) {missing} of text {text_id} not in {imgs_path}")
                except UnicodeDecodeError as exc:
                    bad.append(fail(BuildError(f"{where}: not UTF-8 ({exc})"), args.skip_bad))
                    continue
                except (DatasetError, CorruptSample) as exc:
                    bad.append(fail(exc, args.skip_bad))
                    continue
                text_ids.add(text_id, lineno)
                for image_id in image_ids:
                    k = image_id % num_shards
                    writers[k].put(str(shard_pairs[k]).encode("utf-8"), pickle.dumps((image_id, text_id, text)))
                    shard_pairs[k] += 1
        for writer, n in zip(writers, shard_pairs):
            writer.put(b"num_samples", str(n).encode("utf-8"))
            writer.close()
            resizes += writer.resizes

        if os.path.exists(final):
            log.info("replacing the existing %s", final)
            old = os.path.join(out_dir, f".{split}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_pairs = sum(shard_pairs)
    counts = {"split": split, "images": len(seen), "texts": len(text_ids), "pairs": n_pairs, "bad": len(bad),
              "map_resizes": resizes}
    if num_shards > 1:
        counts["shards"] = num_shards
    log.info("%s: %d images, %d texts, %d pairs -> %s%s%s", split, len(seen), len(text_ids), n_pairs, final,
             f" ({num_shards} shards)" if num_shards > 1 else "",
             f"; {len(bad)} bad line(s) skipped" if bad else "")
    if bad:
        print(f"{split}: skipped {len(bad)} bad line(s)", file=sys.stderr)
    return counts


def main(argv: list[str] | None = None) -> list[dict]:
    """Build every split; exits with the file:line message of the first bad line unless --skip-bad."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.num_shards < 1 or (args.jobs is not None and args.jobs < 1):
        parser.error("--num-shards and -j must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out_dir = args.lmdb_dir or os.path.join(args.data_dir, "lmdb")
    os.makedirs(out_dir, exist_ok=True)
    splits = list(dict.fromkeys(s.strip() for s in args.splits.split(",") if s.strip()))
    try:
        return [build_split(args.data_dir, split, out_dir, args) for split in splits]
    except BuildError as exc:
        hint = "" if args.skip_bad else " (use --skip-bad to drop bad lines)"
        raise SystemExit(f"build_lmdb: {exc}{hint}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
