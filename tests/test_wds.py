"""Web-scale data: webdataset shards (the `wds` format, build_wds.py), their exactly resumable streams, weighted
mixtures of any formats, and build_lmdb.py --num-shards."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from webdataset import TarWriter

import build_lmdb
import build_wds
import datasets
import launch
import main
import readers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CN = ["--model", "CNCLIP_VITT16_CLIP", "--text-model", "BERT-tiny-chinese", "--image-size", "32",
           "--batch-size", "8", "--epochs", "1", "--print-freq", "1", "--lr", "1e-3"]


# --------------------------------------------------------------------------- helpers
def tiny_jpeg(i: int, size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), i % 256, dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def write_shards(folder, sizes: list[int], corrupt: dict | None = None, stats: bool = True) -> list[str]:
    """Tar shards whose sample j of shard k has key `{k:03d}{j:03d}`, caption `c<global id>` (global ids count
    from 0 over the shards) and an 8x8 JPEG; `corrupt[(k, j)]` replaces that sample's members. A `_stats.json`
    as build_wds writes it. Returns the shard paths."""
    os.makedirs(folder, exist_ok=True)
    urls, n = [], 0
    for k, size in enumerate(sizes):
        urls.append(os.path.join(folder, f"{k:05d}.tar"))
        with TarWriter(urls[-1], encoder=False) as tar:
            for j in range(size):
                sample = {"__key__": f"{k:03d}{j:03d}", "jpg": tiny_jpeg(n), "txt": f"c{n}".encode(),
                          "json": json.dumps({"caption": f"c{n}", "captions": [f"c{n}"]}).encode()}
                sample.update((corrupt or {}).get((k, j), {}))
                tar.write({key: v for key, v in sample.items() if v is not None})
                n += 1
    if stats:
        with open(os.path.join(folder, readers.STATS_FILE), "w") as f:
            json.dump({"num_samples": n, "shards": {f"{k:05d}.tar": s for k, s in enumerate(sizes)}}, f)
    return urls


def caption_ids(texts) -> torch.Tensor:
    """The test tokenizer: caption `c<id>` -> [[id]]."""
    return torch.tensor([[int(t[1:])] for t in ([texts] if isinstance(texts, str) else texts)])


def composer(max_bad_samples: int = 0) -> datasets.ImageTextDataset:
    return datasets.ImageTextDataset(None, T.ToTensor(), caption_ids, max_bad_samples=max_bad_samples)


def shard_stream(urls, batch_size=4, samples=None, workers=0, rank=0, world_size=1, seed=0, buffer=8,
                 resampled=False, max_bad=0, extra=(), weights=None) -> datasets.StreamDataset:
    """A StreamDataset over shards `urls` (+ `extra` map-style readers, a mixture), the test composer."""
    total, sizes = readers.shard_stats(urls)
    reader = readers.WdsReader(urls, "test-wds", num_samples=total, shard_sizes=sizes)
    comp = composer(max_bad)
    sources = datasets.stream_sources([reader, *extra], comp, seed, buffer, resampled)
    return datasets.StreamDataset(sources, weights or [1.0] * len(sources), batch_size, samples or total, seed,
                                  rank, world_size, workers)


class CaptionedSynthetic(readers.SyntheticReader):
    """A map-style reader whose sample i has the caption c<offset + i>."""

    def __init__(self, num_samples: int, image_size: int = 8, offset: int = 1000) -> None:
        super().__init__(num_samples, image_size)
        self.offset = offset

    def read(self, index: int):
        return super().read(index)[0], [f"c{self.offset + index}"]


def ids_of(batches) -> list[list[int]]:
    return [b[1][:, 0].tolist() for b in batches]


def loader(stream, workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=stream.batch_size, num_workers=workers)


@pytest.fixture(scope="module")
def wds_root(muge_sample_root):
    """The muge-sample data root, plus digits-wds (8 shards of the digits train split) and muge-sample-wds (11
    shards of muge-sample's train pairs) written by build_wds.py: the catalog's example entries."""
    if not os.path.exists(os.path.join(muge_sample_root, "digits-wds", readers.STATS_FILE)):
        build_wds.main(["--dataset", "digits", "--out", os.path.join(muge_sample_root, "digits-wds"),
                        "--shard-size", "200", "-j", "2"])
        build_wds.main(["--dataset", "muge-sample", "--data-root", muge_sample_root, "--shard-size", "64",
                        "--out", os.path.join(muge_sample_root, "muge-sample-wds")])
    return muge_sample_root


# --------------------------------------------------------------------------- build_wds.py + the wds format
def test_build_wds_writes_img2dataset_shards_that_read_back(wds_root):
    """digits-wds and muge-sample-wds through the catalog: sizes from _stats.json, every sample's image (the
    source image as stored JPEG), captions and json; the member layout of img2dataset."""
    for name, source, shards, size in [("digits-wds", "digits", 8, 1438), ("muge-sample-wds", "muge-sample", 11, 672)]:
        reader = readers.build_reader(name, "train", data_root=wds_root)
        src = readers.build_reader(source, "train", data_root=wds_root)
        assert (len(reader), reader.num_shards, len(src)) == (size, shards, size)
        per_shard = 200 if name == "digits-wds" else 64
        for k in (0, shards - 1):
            records = list(reader.records(k))
            assert len(records) == reader.shard_sizes[k] == min(per_shard, size - k * per_shard)
            for j in (0, len(records) - 1):
                record, index = records[j], k * per_shard + j
                assert record["__key__"] == f"{k:05d}{j:0{len(str(per_shard - 1))}d}"
                assert {m for m in record if not m.startswith("__")} == {"jpg", "txt", "json"}
                image, captions = reader.decode(record)
                expected_image, expected_captions = src.read(index)
                stored = readers.decode_image(readers.encode_jpeg(expected_image), "expected")
                np.testing.assert_array_equal(np.asarray(image), np.asarray(stored))
                assert captions == (expected_captions if name == "digits-wds" else expected_captions[:1])
                meta = json.loads(record["json"])
                assert meta["source"] == f"{source}[{index}]" and meta["captions"] == expected_captions
                assert record["txt"].decode() == expected_captions[0] == meta["caption"]


def test_build_wds_is_resumable_reproducible_and_parallel(wds_root, tmp_path):
    """-j 2 writes the same bytes as -j 1; a re-run after a kill (a shard missing, a temporary file left) writes
    only the missing shard; a folder of another build is refused; --resize bounds the short side."""
    base = ["--dataset", "muge-sample", "--data-root", wds_root, "--shard-size", "100"]
    one, two = tmp_path / "one", tmp_path / "two"
    summary = build_wds.main(base + ["--out", str(one)])
    build_wds.main(base + ["--out", str(two), "-j", "2"])
    names = sorted(f for f in os.listdir(one) if f.endswith(".tar"))
    assert names == [f"{k:05d}.tar" for k in range(7)] and summary["num_samples"] == 672
    assert summary["shards_pattern"] == "{00000..00006}.tar" and summary["shards"]["00006.tar"] == 72
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    before = {n: os.stat(two / n).st_mtime_ns for n in names}
    os.remove(two / "00003.tar")
    (two / ".00005.tar.tmp-999").write_bytes(b"half a shard")  # what a killed writer leaves
    build_wds.main(base + ["--out", str(two), "-j", "2"])
    after = {n: os.stat(two / n).st_mtime_ns for n in names}
    assert [n for n in names if after[n] != before[n]] == ["00003.tar"]
    assert (one / "00003.tar").read_bytes() == (two / "00003.tar").read_bytes()
    assert not [f for f in os.listdir(two) if ".tmp-" in f]
    with pytest.raises(SystemExit, match="holds shards of another build"):
        build_wds.main(base[:-1] + ["64", "--out", str(two)])
    build_wds.main(base + ["--out", str(tmp_path / "small"), "--resize", "40"])
    urls = readers.shard_urls("t", {"shards": "small/{00000..00006}.tar"}, str(tmp_path))
    image, _ = readers.WdsReader(urls).decode(next(readers.WdsReader(urls).records(2)))
    assert min(image.size) == 40  # the muge-sample images are 96 px


def test_wds_catalog_entries_resolve_paths_pipes_and_missing_shards(tmp_path):
    urls = write_shards(tmp_path / "s", [3, 2])
    entry = {"format": "wds", "shards": "s/{00000..00001}.tar"}
    assert readers.shard_urls("x", entry, str(tmp_path)) == urls
    assert readers.shard_urls("x", {"shards": "s"}, str(tmp_path)) == urls  # a folder: its .tar files
    piped = readers.shard_urls("x", {"shards": "pipe:cat {root}/s/{00000..00001}.tar"}, str(tmp_path))
    assert piped == [f"pipe:cat {u}" for u in urls]
    # a pipe: command reads the same records (webdataset's gopen runs it)
    reader = readers.WdsReader(piped)
    assert [r["__key__"] for r in reader.records(1)] == ["001000", "001001"]
    assert reader.decode(next(reader.records(0)))[1] == ["c0"]
    assert readers.shard_stats(urls) == (5, {0: 3, 1: 2})
    with pytest.raises(readers.DatasetError, match=r"1 of 3 shards not found, first .*00002\.tar.*build_wds\.py"):
        readers.shard_urls("x", {"shards": "s/{00000..00002}.tar"}, str(tmp_path))
    with pytest.raises(readers.DatasetError, match="needs a data root"):
        readers.shard_urls("x", entry, None)
    no_size = readers.WdsReader(piped, "piped")
    with pytest.raises(readers.DatasetError, match="add \"num_samples\" to its dataset_catalog.json entry"):
        len(no_size)
    # img2dataset's own per-shard stats, when there is no _stats.json
    os.remove(tmp_path / "s" / readers.STATS_FILE)
    for k, n in enumerate((3, 2)):
        (tmp_path / "s" / f"{k:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": n}))
    assert readers.shard_stats(urls) == (5, {0: 3, 1: 2})


CORRUPT = {(0, 1): {"jpg": b"\xff\xd8 not a jpeg"}, (0, 3): {"jpg": None, "png": None},
           (1, 0): {"txt": None, "json": None}, (1, 2): {"txt": b"\xff\xfe", "json": b"\xff\xfe"}}


def test_corrupt_members_and_truncated_shards_are_named_bad_samples(tmp_path):
    """Every kind of bad record is a CorruptSample named shard:key; a truncated tar (mid-member, or cut at a member
    boundary, which only the stats reveal) ends its shard with one named bad sample."""
    urls = write_shards(tmp_path / "s", [4, 4, 4, 4], CORRUPT)
    for url, cut in ((urls[2], lambda m: m[4].offset_data + 5), (urls[3], lambda m: m[6].offset)):
        with tarfile.open(url) as tar:
            at = cut(tar.getmembers())  # inside sample 1's 2nd member; at sample 2's first header
        data = open(url, "rb").read()
        open(url, "wb").write(data[:at])
    total, sizes = readers.shard_stats(urls)
    reader = readers.WdsReader(urls, "w", num_samples=total, shard_sizes=sizes)
    errors = {}
    for k in range(4):
        for record in reader.records(k):
            try:
                reader.decode(record)
            except readers.CorruptSample as exc:
                errors[exc.sample_id] = exc.reason
    assert set(errors) == {f"{urls[0]}:000001", f"{urls[0]}:000003", f"{urls[1]}:001000", f"{urls[1]}:001002",
                           f"{urls[2]}:after 002000", f"{urls[3]}:after 003001"}
    assert "UnidentifiedImageError" in errors[f"{urls[0]}:000001"]
    assert "no image member (jpg;png;webp); members ['json', 'txt']" in errors[f"{urls[0]}:000003"]
    assert "no txt member" in errors[f"{urls[1]}:001000"] and "unreadable txt" in errors[f"{urls[1]}:001002"]
    assert "shard unreadable after 1 sample(s)" in errors[f"{urls[2]}:after 002000"]
    assert "2 sample(s), its stats say 4: truncated shard" in errors[f"{urls[3]}:after 003001"]


def test_bad_records_are_counted_skipped_and_limited_in_the_stream(tmp_path):
    """Under --max-bad-samples the stream skips bad records (counted across workers, named), a resume counts
    them in its position; past the limit the epoch stops with their names."""
    urls = write_shards(tmp_path / "s", [6, 6], CORRUPT)
    stream = shard_stream(urls, batch_size=2, samples=8, workers=2, max_bad=10)
    stream.set_epoch(0)
    stream.sources[0].composer.bad_samples.reset(0)
    delivered = sorted(sum(ids_of(stream.track(iter(loader(stream, 2)))), []))
    assert not {1, 3, 6, 8} & set(delivered) and len(delivered) == 8
    counter = stream.sources[0].composer.bad_samples
    assert counter.count == 4 and sorted(counter.offenders()) == sorted(f"{urls[k]}:{k:03d}{j:03d}" for k, j in CORRUPT)
    strict = shard_stream(urls, batch_size=2, samples=8, workers=2, max_bad=1)
    strict.set_epoch(0)
    with pytest.raises(datasets.TooManyBadSamples, match=r"more than --max-bad-samples 1; offending sample ids "
                                                          r"\['.*s/0000[01]\.tar:00[01]00[0-3]'"):
        list(loader(strict, 2))


# --------------------------------------------------------------------------- order and exact resume
def epoch_ids(urls, world_size: int, workers: int, epoch: int = 0, seed: int = 0, **kw) -> list[list[int]]:
    """Every rank's batches of one epoch (ids), each rank through a real DataLoader with `workers` workers."""
    out = []
    for rank in range(world_size):
        stream = shard_stream(urls, rank=rank, world_size=world_size, workers=workers, seed=seed, **kw)
        stream.set_epoch(epoch)
        out.append(ids_of(stream.track(iter(loader(stream, workers)))))
    return out


def test_every_sample_once_per_epoch_over_ranks_and_workers_in_a_seeded_order(tmp_path):
    """8 equal shards over 2 ranks x 2 workers: every sample exactly once per epoch; the order is a function of
    (seed, epoch) only (the same when read again), another for the next epoch or another seed."""
    urls = write_shards(tmp_path / "s", [12] * 8)
    first = epoch_ids(urls, 2, 2)
    flat = sorted(i for rank in first for batch in rank for i in batch)
    assert flat == list(range(96)) and [len(r) for r in first] == [12, 12]
    assert epoch_ids(urls, 2, 2) == first
    for other in (epoch_ids(urls, 2, 2, epoch=1), epoch_ids(urls, 2, 2, seed=1)):
        assert other != first and sorted(i for r in other for b in r for i in b) == flat
    # the shuffle buffer mixes records inside a shard: a stream's first batch is not the tar order
    assert any(batch != sorted(batch) or batch[-1] - batch[0] != 3 for rank in first for batch in rank)


def test_uneven_shards_wrap_the_short_streams_as_documented(tmp_path):
    """9 shards over 4 streams (3, 2, 2, 2 shards) and an epoch of 13 batches per rank: every batch is full; a
    sample is read twice only by a stream that ran out of its own shards (its second pass); nothing else repeats."""
    urls = write_shards(tmp_path / "s", [12] * 9)
    first_pass = []
    for rank in range(2):
        stream = shard_stream(urls, rank=rank, world_size=2, workers=2)
        stream.set_epoch(0)
        assert stream.batches_per_epoch == 108 // 8
        for batch in loader(stream, 2):
            ids, positions = batch[1][:, 0].tolist(), batch[-1]
            assert len(ids) == 4
            first_pass += [i for i, p in zip(ids, positions[:, 2].tolist()) if p == 0]  # source 0's pass
    assert len(first_pass) == len(set(first_pass)) < 2 * 13 * 4


@pytest.mark.parametrize("case", ["shards", "resampled", "mixture", "bad records"])
def test_stream_resumes_exactly_at_any_batch_with_two_workers(tmp_path, case):
    """A run that stops after b batches (positions taken from the batches the loop got) and a new stream object
    resumed from those positions deliver exactly the batches the uninterrupted epoch delivers after b."""
    corrupt = CORRUPT if case == "bad records" else None
    urls = write_shards(tmp_path / "s", [10, 7, 12, 9, 11], corrupt)
    extra = [CaptionedSynthetic(40, image_size=8)] if case == "mixture" else []

    def make():
        return shard_stream(urls, workers=2, samples=64, resampled=case == "resampled", max_bad=20, buffer=5,
                            extra=extra, weights=[2.0, 1.0] if extra else None)

    straight = make()
    straight.set_epoch(3)
    full = ids_of(straight.track(iter(loader(straight, 2))))
    assert len(full) == 16
    for b in (5, 8):
        first = make()
        first.set_epoch(3)
        batches = first.track(iter(loader(first, 2)))
        head = ids_of(next(batches) for _ in range(b))
        state = first.state()
        del batches
        resumed = make()  # a new process knows only the checkpoint
        resumed.resume([state], 3, b)
        resumed.set_epoch(3, b)
        assert head + ids_of(resumed.track(iter(loader(resumed, 2)))) == full, b


# --------------------------------------------------------------------------- mixtures
def test_mixture_draws_sources_by_weight_from_the_seed(tmp_path):
    """--dataset A,B --dataset-weights 1,2 over 3,000 draws: realised proportions within 4 sigma of 1/3, 2/3; the
    same draws for the same seed, others for another; the samples follow the draws (any formats: map-style sets
    and wds shards); default weights are the sizes (every sample alike)."""
    a, b = CaptionedSynthetic(50, offset=1000), CaptionedSynthetic(30, offset=2000)
    urls = write_shards(tmp_path / "s", [20, 20])  # a third source in another format: wds shards, ids < 1000

    def stream_of(weights, seed=0, readers_=(a, b)):
        sources = datasets.stream_sources(list(readers_), composer(), seed, buffer=4)
        stream = datasets.StreamDataset(sources, weights, 1, 3000, seed)
        stream.set_epoch(0)
        return stream

    def draws(stream, n=3000):
        cache: dict = {}
        return [stream.source_of(0, 0, t, cache) for t in range(n)]

    first = draws(stream_of([1, 2]))
    share = first.count(1) / len(first)
    assert abs(share - 2 / 3) < 4 * (2 / 9 / 3000) ** 0.5
    assert draws(stream_of([1, 2])) == first and draws(stream_of([1, 2], seed=1)) != first
    three = stream_of([1, 1, 2], readers_=(a, b, readers.WdsReader(urls, num_samples=40)))
    expected = draws(three)
    assert abs(expected.count(2) / 3000 - 0.5) < 4 * (1 / 4 / 3000) ** 0.5
    samples = [int(sample[1][0]) for _, sample in zip(range(150), three)]
    assert [{1: 0, 2: 1, 0: 2}[i // 1000] for i in samples] == expected[:150]  # sources 0, 1 map-style, 2 wds
    args = main.parse_args(["--dataset", "synthetic,digits", "--batch-size", "8"])
    stream = datasets.build_stream(args, composer(), [a, b], main.dataset_weights(args))
    assert np.allclose(stream.probs, [50 / 80, 30 / 80]) and stream.batches_per_epoch == 80 // 8
    args = main.parse_args(["--dataset", "synthetic,digits", "--batch-size", "8", "--dataset-weights", "1,3",
                            "--samples-per-epoch", "200"])
    stream = datasets.build_stream(args, composer(), [a, b], main.dataset_weights(args))
    assert np.allclose(stream.probs, [0.25, 0.75]) and stream.batches_per_epoch == 200 // 8


def test_mixture_and_stream_flags_are_checked_at_parse_time(capsys):
    for argv, message in [(["--dataset", "digits,digitz"], "--dataset: unknown dataset 'digitz'"),
                          (["--dataset", "digits,digits"], "names a set twice"),
                          (["--dataset", "digits,synthetic", "--dataset-weights", "1"], "need 2 positive finite"),
                          (["--dataset", "digits,synthetic", "--dataset-weights", "1,-2"], "need 2 positive finite"),
                          (["--dataset", "digits,synthetic", "--dataset-weights", "1,x"], "comma-separated numbers"),
                          (["--samples-per-epoch", "0"], "--samples-per-epoch must be >= 1"),
                          (["--wds-shuffle-buffer", "-1"], "--wds-shuffle-buffer must be >= 0"),
                          (["--dataset", "digits,synthetic", "--wds-resampled"], "no set of --dataset")]:
        with pytest.raises(SystemExit):
            main.parse_args(argv)
        assert message in capsys.readouterr().err, argv


def test_run_sh_keeps_a_mixture_whole_instead_of_sweeping_it():
    """launch.py's sweep syntax splits comma lists: a --dataset mixture and its weights are one experiment."""
    out = launch.expand_sweep(["--dataset", "cc3m,cc12m-wds", "--dataset-weights=1,2", "--seed", "0,1"])
    assert [s for _, s in out] == ["_seed0", "_seed1"]
    assert out[0][0] == ["--dataset", "cc3m,cc12m-wds", "--dataset-weights=1,2", "--seed", "0"]


def test_mixture_validates_on_its_first_sets_rule_and_names_its_folder():
    def resolved(*argv):
        return main.validation_dataset_name(main.parse_args(list(argv)))

    assert resolved("--dataset", "muge-sample,digits-zh") == "muge-sample"  # the first set has a test split
    assert resolved("--dataset", "cc3m,muge-sample") == "imagenet"  # its catalog val_dataset
    assert resolved("--dataset", "digits-wds") == "digits" and not main.has_test_split("muge-sample-wds")
    assert resolved("--dataset", "muge-sample-wds,digits") == "muge-sample"
    assert resolved("--dataset", "cc3m,digits", "--val-dataset", "digits") == "digits"
    args = main.parse_args(["--dataset", "muge-sample-wds,digits-zh", "--model", "CNCLIP_VITT16_CLIP"])
    assert main.experiment_dir(args).endswith("CNCLIP_VITT16_CLIP_muge-sample-wds+digits-zh")
    assert main.is_stream_run(args) and not main.is_stream_run(main.parse_args([]))
    assert main.is_stream_run(main.parse_args(["--samples-per-epoch", "100"]))


# --------------------------------------------------------------------------- build_lmdb.py --num-shards
def test_build_lmdb_num_shards_each_readable_by_chinese_clip(muge_sample_root, tmp_path):
    """--num-shards 3 -j 2: three LMDB folders, each read by Chinese-CLIP's own LMDBDataset (images equal to
    ours through the same transform); together the pairs of the one-folder build, which the lmdb catalog format
    reads from the split folder."""
    pytest.importorskip("cn_clip.training.data", reason="cn_clip (test-only reference) is not installed")
    from cn_clip.training.data import LMDBDataset

    raw = os.path.join(muge_sample_root, "muge-sample")
    root = tmp_path / "root"
    counts = build_lmdb.main(["--data-dir", raw, "--splits", "train", "--lmdb-dir",
                              str(root / "muge-sample" / "lmdb"), "--num-shards", "3", "-j", "2"])
    assert counts == [{"split": "train", "images": 224, "texts": 84, "pairs": 672, "bad": 0, "map_resizes": 0,
                       "shards": 3}]
    split = root / "muge-sample" / "lmdb" / "train"
    assert sorted(os.listdir(split)) == ["00000", "00001", "00002"]
    ours = readers.build_reader("muge-sample", "train", data_root=str(root))  # the split folder = its 3 shards
    whole = readers.build_reader("muge-sample", "train", data_root=muge_sample_root)
    assert sorted(ours.pair(i) for i in range(len(ours))) == sorted(whole.pair(i) for i in range(len(whole)))
    readers.close_lmdb()  # py-lmdb opens an environment once per process: Chinese-CLIP's reader first
    theirs = []
    for folder in sorted(os.listdir(split)):
        reference = LMDBDataset(str(split / folder), split="train", max_txt_length=52, resolution=32)
        theirs.append([reference[i][0] for i in range(len(reference))])
        del reference  # closes its environments
    ours = readers.build_reader("muge-sample", "train", data_root=str(root))  # its handles were closed
    squash, n = datasets.squash_transform(32), 0
    for k, images in enumerate(theirs):
        assert len(images) == ours.offsets[k + 1] - ours.offsets[k] > 0
        for image in images:
            assert ours.pair(n)[0] % 3 == k  # image id % N is its shard
            torch.testing.assert_close(image, squash(ours.read(n)[0]), atol=1e-6, rtol=0)
            n += 1
    assert n == 672


def test_build_lmdb_num_shards_keeps_the_bad_line_rules(tmp_path):
    """With shards, a bad image line is still named by file:line, --skip-bad keeps the same images and pairs as
    one folder, and a duplicate id keeps its first line (the same id always lands in the same shard)."""
    good = {i: base64_jpeg(i) for i in (1, 2, 3, 4)}
    (tmp_path / "train_imgs.tsv").write_text("".join(f"{i}\t{b}\n" for i, b in good.items()) +
                                             f"5\t{base64_jpeg(5)[:40]}\n3\t{base64_jpeg(9)}\n")
    (tmp_path / "train_texts.jsonl").write_text(
        "".join(json.dumps({"text_id": t, "text": f"t{t}", "image_ids": ids}) + "\n"
                for t, ids in ((1, [1, 2]), (2, [3]), (3, [4, 1]))))
    with pytest.raises(SystemExit, match=r"train_imgs.tsv:5: undecodable image"):
        build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train", "--num-shards", "2"])
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        [counts] = build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train", "--skip-bad",
                                    "--num-shards", str(n), "--lmdb-dir", str(out)])
        assert (counts["images"], counts["pairs"], counts["bad"]) == (4, 5, 2)
        reader = readers.LmdbReader(readers.lmdb_shards(str(out / "train")))
        assert sorted(reader.pair(i) for i in range(len(reader))) == \
            sorted([(1, 1, "t1"), (2, 1, "t1"), (3, 2, "t2"), (4, 3, "t3"), (1, 3, "t3")])
        assert sorted(np.asarray(reader.read(i)[0]).mean().round() for i in range(len(reader))) == \
            sorted(float(i) for i in (1, 2, 3, 4, 1))  # image 3 is its first line's


def base64_jpeg(i: int) -> str:
    import base64

    return base64.b64encode(tiny_jpeg(i)).decode()


# --------------------------------------------------------------------------- training end to end
@pytest.fixture
def one_thread():
    """One intra-op thread here, as in the resumed subprocess (OMP_NUM_THREADS=1): the same float sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resume_in_subprocess(argv: list[str], launcher: list[str] | None = None) -> None:
    """main.py `argv` in a new process (the resume: it knows only the experiment folder)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "main.py")] + argv
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical_runs(folder, straight: str, resumed: str, steps: int) -> None:
    a, b = load(folder / straight / "checkpoint.pt"), load(folder / resumed / "checkpoint.pt")
    assert a["step"] == b["step"] == steps
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log = [json.loads(line) for line in open(folder / resumed / "log.txt", encoding="utf-8")]
    assert [r["global_step"] for r in log if r["type"] == "train"] == list(range(1, steps + 1))


@pytest.mark.parametrize("model,dataset,extra", [
    ("CL2L_VITT16_CL2L", "digits-wds", ["--cl2l-hidden-dim", "32", "--transformer-layers", "1"]),
    ("CNCLIP_VITT16_CLIP", "muge-sample-wds,digits-zh", ["--dataset-weights", "2,1", "--text-model",
                                                         "BERT-tiny-chinese"])])
def test_training_from_shards_resumes_exactly_with_two_workers(wds_root, tmp_path, one_thread, model, dataset,
                                                               extra):
    """A CL2L run on digits-wds shards and a CNCLIP run on a weighted mixture of muge-sample-wds shards and the
    map-style digits-zh, 2 DataLoader workers: 6 steps straight == 3 steps + process exit + resume in a new
    process + 3 steps, bit for bit. The checkpoint holds each (rank, worker) stream's position."""
    base = ["--model", model, "--dataset", dataset, "--data-root", wds_root, "--image-size", "32",
            "--batch-size", "8", "--epochs", "1", "--workers", "2", "--print-freq", "1", "--lr", "1e-3",
            "--output-dir", str(tmp_path), "--wds-shuffle-buffer", "50", *extra]
    main.main(base + ["--name", "straight", "--max-steps", "6"])
    main.main(base + ["--name", "resumed", "--max-steps", "3"])
    half = load(tmp_path / "resumed" / "checkpoint.pt")
    assert (half["step"], half["step_in_epoch"]) == (3, 3)
    [rank0] = half["data"]
    assert rank0["epoch"] == 0 and rank0["batch"] == 3 and len(rank0["streams"]) == 2
    assert [p[0] for p in rank0["streams"]] == [16, 8]  # slots consumed: batches 0, 2 from stream 0; 1 from 1
    resume_in_subprocess(base + ["--name", "resumed", "--max-steps", "6"])
    assert_identical_runs(tmp_path, "straight", "resumed", 6)


@pytest.mark.slow
def test_two_rank_training_from_shards_resumes_exactly(wds_root, tmp_path):
    """2 gloo ranks x 2 workers on digits-wds (4 streams over 8 shards): 4 steps straight == 2 + exit + 2."""
    base = TINY_RUN + ["--dataset", "digits-wds", "--data-root", wds_root, "--output-dir", str(tmp_path),
                       "--device", "cpu", "--batch-size", "4", "--workers", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    resume_in_subprocess(base + ["--name", "straight", "--max-steps", "4"], torchrun)
    resume_in_subprocess(base + ["--name", "resumed", "--max-steps", "2"], torchrun)
    half = load(tmp_path / "resumed" / "checkpoint.pt")
    assert [(d["batch"], d["streams"]) for d in half["data"]] == [(2, [[4, 0, 0, 4], [4, 0, 0, 4]])] * 2
    resume_in_subprocess(base + ["--name", "resumed", "--max-steps", "4"], torchrun)
    assert_identical_runs(tmp_path, "straight", "resumed", 4)


def test_resume_mid_epoch_on_another_worker_count_is_refused(wds_root, tmp_path):
    base = TINY_RUN + ["--dataset", "digits-wds", "--data-root", wds_root, "--output-dir", str(tmp_path),
                       "--name", "run", "--val-dataset", "none"]
    main.main(base + ["--max-steps", "1"])
    with pytest.raises(readers.DatasetError, match=r"1 rank\(s\) x 1 stream\(s\); this run has 1 rank\(s\) x 2 "
                                                   r"stream\(s\).*same number of ranks and --workers"):
        main.main(flag(base, "--workers", "2") + ["--max-steps", "2"])


def flag(argv: list[str], name: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(name) + 1] = value
    return argv


def test_resampled_epochs_and_bad_shards_in_training(tmp_path):
    """--wds-resampled cuts the endless stream into epochs of --samples-per-epoch; bad records of a wds set stop
    the run past --max-bad-samples with their shard:key names and are skipped below it."""
    root = tmp_path / "root"
    urls = write_shards(root / "digits-wds", [4] * 8, CORRUPT)  # the digits-wds entry's 8 shards
    base = TINY_RUN + ["--dataset", "digits-wds", "--data-root", str(root), "--output-dir", str(tmp_path),
                       "--val-dataset", "none"]
    with pytest.raises(SystemExit, match=r"stopping: 4 corrupt samples in epoch 0, more than --max-bad-samples 3; "
                                         r"offending sample ids \[.*00000\.tar:000001"):
        main.main(base + ["--name", "strict", "--max-bad-samples", "3"])
    summary = main.main(base + ["--name", "lenient", "--max-bad-samples", "8"])
    assert (summary["epoch"], summary["step"]) == (1, 32 // 8)
    summary = main.main(base + ["--name", "resampled", "--wds-resampled", "--samples-per-epoch", "16",
                                "--epochs", "2", "--max-bad-samples", "100"])
    assert (summary["epoch"], summary["step"]) == (2, 2 * (16 // 8))
    assert urls[0].endswith("00000.tar")
