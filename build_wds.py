"""Build webdataset tar shards from any catalog dataset (LMDB, tsv, cc3m/cc12m, yfcc15m, image folders, digits):
`python build_wds.py --dataset NAME --out DIR [--split train] [--data-root ROOT] [--shard-size 10000] [--resize N]
[-j N]`.

Output, in img2dataset's layout (what the `wds` catalog format reads):
- `DIR/{00000..K-1}.tar`: shard k holds the reader's samples [k*S, (k+1)*S) in order, each as `<key>.jpg` (the
  decoded image re-encoded as JPEG, `--resize N`: short side at most N), `<key>.txt` (its first caption) and
  `<key>.json` ({"key", "caption", "captions", "source", "width", "height"}); key = `{k:05d}{i:0Nd}`, N the
  digits of S - 1. Members carry a fixed mtime, so a build is byte-for-byte reproducible (for any -j).
- `DIR/{k:05d}_stats.json` per shard (img2dataset's keys: "count", "successes", "failed_to_decode", plus the
  build's "source") and `DIR/_stats.json` ({"num_samples", "shards": {file: count}, "failed", "source",
  "shards_pattern"}), from which the reader takes `num_samples`.

Resumable: a shard is written under a temporary name, its stats written, then renamed into place; a re-run
skips complete shards (and refuses a folder built from another source, split, shard size or resize). `-j N`
writes N shards at once (forked processes) under one progress bar. A sample the reader reports corrupt
(readers.CorruptSample) is dropped, logged and counted (`failed_to_decode`), as img2dataset drops failed
downloads.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import multiprocessing
import os
import sys
from collections.abc import Callable

from tqdm import tqdm
from webdataset import TarWriter  # imports torch: a command's start-up cost, once before the writers fork

import readers

log = logging.getLogger("build_wds")
MTIME = 946684800  # 2000-01-01, the members' fixed modification time (an int: no PAX header per member)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Build webdataset tar shards (img2dataset layout) from a dataset_catalog.json entry")
    p.add_argument("--dataset", required=True, help="catalog key of the source (any map-style format)")
    p.add_argument("--split", default="train", help="logical split of the source (train or test)")
    p.add_argument("--out", required=True, help="output folder of the shards")
    p.add_argument("--data-root", default=None, help="root for catalog paths (else $CLIP_LAB_DATA_ROOT)")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard (img2dataset's default)")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="store JPEGs with the short side at most N pixels (a large decode saving in training)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the stored images")
    p.add_argument("-j", "--jobs", type=int, default=1, help="shards written at once (processes)")
    p.add_argument("--max-image-pixels", type=readers.max_pixels_arg, default=readers.DEFAULT_MAX_IMAGE_PIXELS,
                   help="source images with more pixels (after a JPEG's draft reduction) are skipped and counted, as "
                        "in training; raise it for valid huge images")
    return p


def shard_name(k: int) -> str:
    return f"{k:05d}.tar"


def stats_path(out: str, k: int) -> str:
    return os.path.join(out, f"{k:05d}_stats.json")


def write_json_atomic(path: str, value: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def write_shard(reader, out: str, k: int, source: dict, progress: Callable[[int], object]) -> dict:
    """Shard k: samples [k*S, (k+1)*S) of `reader` into `out/{k:05d}.tar` (temporary name, stats, rename);
    returns its stats."""

    size = source["shard_size"]
    first, last = k * size, min((k + 1) * size, len(reader))
    digits = len(str(size - 1))
    tmp = os.path.join(out, f".{shard_name(k)}.tmp-{os.getpid()}")
    written, failed = 0, 0
    try:
        with TarWriter(tmp, encoder=False, mtime=MTIME) as tar:
            for i in range(first, last):
                try:
                    image, captions = reader.read(i)
                except readers.CorruptSample as exc:
                    log.warning("skipped: %s", exc)
                    failed += 1
                    progress(1)
                    continue
                key = f"{k:05d}{i - first:0{digits}d}"
                data = readers.encode_jpeg(image, source["resize"], source["quality"])
                if source["resize"]:
                    image = readers.decode_image(data, f"{shard_name(k)}:{key}")  # the stored size, for the json
                meta = {"key": key, "caption": captions[0], "captions": list(captions),
                        "source": f"{source['dataset']}[{i}]", "width": image.width, "height": image.height}
                tar.write({"__key__": key, "jpg": data, "txt": captions[0].encode("utf-8"),
                           "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
                written += 1
                progress(1)
        stats = {"count": last - first, "successes": written, "failed_to_decode": failed, "source": source}
        write_json_atomic(stats_path(out, k), stats)
        os.replace(tmp, os.path.join(out, shard_name(k)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return stats


def complete_shards(out: str, num_shards: int, source: dict) -> dict[int, dict]:
    """Stats of the shards a previous run finished (tar in place); a shard of another build is an error."""
    done = {}
    for k in range(num_shards):
        if not os.path.exists(os.path.join(out, shard_name(k))):
            continue
        with open(stats_path(out, k), encoding="utf-8") as f:
            stats = json.load(f)
        if stats.get("source") != source:
            raise SystemExit(f"build_wds: {out} holds shards of another build ({stats_path(out, k)}: "
                             f"{stats.get('source')}, this run: {source}); use another --out")
        done[k] = stats
    return done


_WORKER: dict = {}  # a forked writer's reader, output folder, source and shared progress counter


def _init_worker(reader, out: str, source: dict, counter) -> None:
    _WORKER.update(reader=reader, out=out, source=source, counter=counter)


def _count(n: int) -> None:
    with _WORKER["counter"].get_lock():
        _WORKER["counter"].value += n


def _write_shard_job(k: int) -> tuple[int, dict]:
    return k, write_shard(_WORKER["reader"], _WORKER["out"], k, _WORKER["source"], _count)


def write_shards(reader, out: str, todo: list[int], source: dict, jobs: int, bar: tqdm) -> dict[int, dict]:
    """Every shard in `todo`, `jobs` at a time (forked processes; the bar follows their shared sample count)."""
    if jobs == 1 or len(todo) <= 1:
        return {k: write_shard(reader, out, k, source, bar.update) for k in todo}
    ctx = multiprocessing.get_context("fork")
    counter, start = ctx.Value("q", 0), bar.n
    with ctx.Pool(min(jobs, len(todo)), _init_worker, (reader, out, source, counter)) as pool:
        result = pool.map_async(_write_shard_job, todo)
        while not result.ready():
            result.wait(0.2)
            bar.update(start + counter.value - bar.n)
        stats = dict(result.get())
    bar.update(start + counter.value - bar.n)
    return stats


def build(args: argparse.Namespace) -> dict:
    """Write the shards that are missing and `_stats.json`; returns the summary."""
    reader = readers.build_reader(args.dataset, args.split, data_root=args.data_root,
                                  max_pixels=args.max_image_pixels)
    if isinstance(reader, readers.WdsReader):
        raise SystemExit(f"build_wds: {args.dataset!r} is already webdataset shards")
    reader.draft = args.resize  # JPEGs decoded at reduced size when they are stored smaller anyway
    source = {"dataset": args.dataset, "split": args.split, "samples": len(reader), "shard_size": args.shard_size,
              "resize": args.resize, "quality": args.quality}
    os.makedirs(args.out, exist_ok=True)
    for stale in glob.glob(os.path.join(args.out, ".*.tar.tmp-*")):  # left by a killed run
        os.remove(stale)
    num_shards = math.ceil(len(reader) / args.shard_size)
    done = complete_shards(args.out, num_shards, source)
    todo = [k for k in range(num_shards) if k not in done]
    if done:
        log.info("%d of %d shards already complete in %s: writing the other %d", len(done), num_shards, args.out,
                 len(todo))
    with tqdm(total=len(reader), initial=sum(s["count"] for s in done.values()), unit="img", desc=args.dataset,
              file=sys.stderr) as bar:
        done.update(write_shards(reader, args.out, todo, source, args.jobs, bar))
    shards = {shard_name(k): done[k]["successes"] for k in range(num_shards)}
    summary = {"num_samples": sum(shards.values()), "failed": sum(s["failed_to_decode"] for s in done.values()),
               "shards": shards, "source": source, "shards_pattern": f"{{00000..{num_shards - 1:05d}}}.tar"}
    write_json_atomic(os.path.join(args.out, readers.STATS_FILE), summary)
    log.info("%d samples in %d shards -> %s/%s (catalog: \"format\": \"wds\", \"shards\": \"<folder under the data "
             "root>/%s\")%s", summary["num_samples"], num_shards, args.out, summary["shards_pattern"],
             summary["shards_pattern"], f"; {summary['failed']} corrupt sample(s) skipped" if summary["failed"] else "")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.jobs < 1:
        parser.error("--shard-size and -j must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return build(args)
    except readers.DatasetError as exc:
        raise SystemExit(f"build_wds: {exc}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
