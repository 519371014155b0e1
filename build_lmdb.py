"""Build Chinese-CLIP LMDBs from MUGE-style raw files:
`python build_lmdb.py --data-dir DIR --splits train,valid,test [--lmdb-dir OUT] [--resize N] [--skip-bad]`.

Input (OFA-Sys/Chinese-CLIP README, dataset preparation, commit 31863c7): `DIR/{split}_imgs.tsv`
(`image_id<TAB>base64 JPEG`) and `DIR/{split}_texts.jsonl` (`{"text_id", "text", "image_ids"}`, or MUGE's older
`{split}_queries.jsonl` with `{"query_id", "query_text", "item_ids"}`).

Output, `OUT/{split}/imgs` and `OUT/{split}/pairs`, in the layout Chinese-CLIP's own reader expects:
- imgs: `str(image_id).encode()` -> base64 text (the original, or a re-encoded JPEG with --resize), and
  `b"num_images"` -> `str(count).encode()`;
- pairs: `str(i).encode()` -> `pickle.dumps((image_id, text_id, text))` for every (text, image) combination in
  jsonl order, and `b"num_samples"` -> `str(N).encode()`.

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
import io
import logging
import os
import pickle
import shutil
import sys

import lmdb
from PIL import Image
from tqdm import tqdm

from readers import (
    DEFAULT_MAX_IMAGE_PIXELS,
    CorruptSample,
    DatasetError,
    UniqueIds,
    b64decode_image,
    check_captions,
    decode_image,
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
    """Image bytes decoded by the readers' rule (a JPEG drafted, never below `size`), re-encoded as a JPEG with the
    short side at most `size` (bicubic), as standard base64."""
    image = decode_image(data, where, size, max_pixels)
    scale = size / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return base64.b64encode(out.getvalue())


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


def build_split(data_dir: str, split: str, out_dir: str, args: argparse.Namespace) -> dict:
    """Write `out_dir/split/{imgs,pairs}`; returns counts. Raises BuildError on the first bad line unless
    --skip-bad."""
    imgs_path, texts_path = os.path.join(data_dir, f"{split}_imgs.tsv"), texts_jsonl_path(data_dir, split)
    for path in (imgs_path, texts_path):
        if not os.path.isfile(path):
            raise BuildError(f"{path} not found (split {split!r} of --data-dir {data_dir})")
    final = os.path.join(out_dir, split)
    tmp = os.path.join(out_dir, f".{split}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    bad: list[str] = []

    def fail(exc: BuildError) -> None:
        if not args.skip_bad:
            raise exc
        bad.append(str(exc))
        log.warning("skipped: %s", exc)

    try:
        imgs = GrowingWriter(os.path.join(tmp, "imgs"), args.initial_map_size, args.commit_every)
        seen = UniqueIds(imgs_path, "image id")
        with open_lines(imgs_path, binary=True) as f, \
                tqdm(total=os.path.getsize(imgs_path), unit="B", unit_scale=True, desc=f"{split} images",
                     file=sys.stderr) as bar:
            for lineno, line in enumerate(f, 1):
                bar.update(len(line))
                where = f"{imgs_path}:{lineno}"
                try:
                    image_id, b64 = parse_imgs_tsv_line(line, where)
                    seen.check(image_id, lineno)
                    data = check_image(b64, where, args.max_image_pixels)
                except DatasetError as exc:
                    fail(exc if isinstance(exc, BuildError) else BuildError(str(exc)))
                    continue
                seen.add(image_id, lineno)
                imgs.put(str(image_id).encode("utf-8"), resized_b64(data, args.resize, args.quality, where,
                                                                    args.max_image_pixels) if args.resize else b64)
        imgs.put(b"num_images", str(len(seen)).encode("utf-8"))
        imgs.close()

        pairs = GrowingWriter(os.path.join(tmp, "pairs"), args.initial_map_size, args.commit_every)
        n_pairs, text_ids = 0, UniqueIds(texts_path, "text id")
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
                    fail(BuildError(f"{where}: not UTF-8 ({exc})"))
                    continue
                except (DatasetError, CorruptSample) as exc:
                    fail(exc if isinstance(exc, BuildError) else BuildError(str(exc)))
                    continue
                text_ids.add(text_id, lineno)
                for image_id in image_ids:
                    pairs.put(str(n_pairs).encode("utf-8"), pickle.dumps((image_id, text_id, text)))
                    n_pairs += 1
        pairs.put(b"num_samples", str(n_pairs).encode("utf-8"))
        pairs.close()

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
    counts = {"split": split, "images": len(seen), "texts": len(text_ids), "pairs": n_pairs, "bad": len(bad),
              "map_resizes": imgs.resizes + pairs.resizes}
    log.info("%s: %d images, %d texts, %d pairs -> %s%s", split, len(seen), len(text_ids), n_pairs, final,
             f"; {len(bad)} bad line(s) skipped" if bad else "")
    if bad:
        print(f"{split}: skipped {len(bad)} bad line(s)", file=sys.stderr)
    return counts


def main(argv: list[str] | None = None) -> list[dict]:
    """Build every split; exits with the file:line message of the first bad line unless --skip-bad."""
    args = get_args_parser().parse_args(argv)
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
