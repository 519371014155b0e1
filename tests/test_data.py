"""Data at scale: catalog readers on real files, Chinese-CLIP LMDB compatibility, build_lmdb.py, the restricted
unpickler, bad samples, caption sampling, exact mid-epoch resume and the muge-sample dataset."""
import base64
import io
import json
import os
import pickle
import re
import shutil
import zipfile

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

import build_lmdb
import datasets
import main
import models
import readers

TINY_CN = ["--model", "CNCLIP_VITT16_CLIP", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
           "--workers", "0", "--print-freq", "1", "--text-model", "BERT-tiny-chinese"]


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def photo():
    from skimage import data as skdata

    return Image.fromarray(skdata.astronaut())


def jpeg(photo: Image.Image, i: int, size: int = 48) -> bytes:
    """A distinct real JPEG: crop i of the astronaut photo."""
    x, y = (i * 37) % 300, (i * 53) % 300
    out = io.BytesIO()
    photo.crop((x, y, x + 200, y + 160)).resize((size, size * 4 // 5)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_cnclip_lmdb(folder: str, images: dict[int, bytes], pairs: list[tuple], pair_values=None) -> None:
    """An LMDB written the way Chinese-CLIP's build_lmdb_dataset.py writes it: str keys encoded utf-8,
    pickle.dumps((image_id, text_id, text)) pairs, urlsafe/standard base64 image text, num_samples/num_images."""
    os.makedirs(folder, exist_ok=True)
    env = lmdb.open(os.path.join(folder, "pairs"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, pair in enumerate(pairs):
            txn.put(str(i).encode("utf-8"), pair_values[i] if pair_values else pickle.dumps(pair))
        txn.put(b"num_samples", str(len(pairs)).encode("utf-8"))
    env.close()
    env = lmdb.open(os.path.join(folder, "imgs"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for image_id, data in images.items():
            txn.put(str(image_id).encode("utf-8"), base64.urlsafe_b64encode(data))
        txn.put(b"num_images", str(len(images)).encode("utf-8"))
    env.close()


def write_raw_split(folder: str, split: str, images: dict[int, bytes], texts: list[dict]) -> None:
    """MUGE raw files: {split}_imgs.tsv (id<TAB>base64) and {split}_texts.jsonl."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{split}_imgs.tsv"), "w") as f:
        f.writelines(f"{i}\t{base64.b64encode(d).decode()}\n" for i, d in images.items())
    with open(os.path.join(folder, f"{split}_texts.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)


class Evil:
    """Unpickling this runs os.system: a restricted unpickler must refuse it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


# --------------------------------------------------------------------------- LMDB
def test_lmdb_written_by_chinese_clip_reads_as_is(tmp_path, photo):
    images = {1000 + i: jpeg(photo, i) for i in range(4)}
    pairs = [(1000, 7, "一只猫"), (1001, 8, "一杯咖啡"), (1000, 9, "猫的照片"), (1003, 10, "火箭")]
    write_cnclip_lmdb(str(tmp_path / "lmdb" / "train"), images, pairs)
    catalog = {"cn": {"format": "lmdb", "path": "lmdb/{split}"}}
    reader = readers.build_reader("cn", "train", catalog, data_root=str(tmp_path))
    assert len(reader) == 4
    for i, (image_id, text_id, text) in enumerate(pairs):
        assert reader.pair(i) == (image_id, text_id, text)
        image, captions = reader.read(i)
        assert captions == [text]
        np.testing.assert_array_equal(np.asarray(image), pixels(images[image_id]))
    assert reader.image_ids() == sorted(images)


def test_sharded_lmdb_concatenates_folders(tmp_path, photo):
    write_cnclip_lmdb(str(tmp_path / "a" / "train"), {1: jpeg(photo, 1)}, [(1, 1, "甲"), (1, 2, "乙")])
    write_cnclip_lmdb(str(tmp_path / "b" / "train"), {2: jpeg(photo, 2)}, [(2, 3, "丙")])
    catalog = {"sh": {"format": "lmdb", "path": ["a/{split}", "b/{split}"]}}
    reader = readers.build_reader("sh", "train", catalog, data_root=str(tmp_path))
    assert len(reader) == 3
    assert [reader.read(i)[1] for i in range(3)] == [["甲"], ["乙"], ["丙"]]
    np.testing.assert_array_equal(np.asarray(reader.read(2)[0]), pixels(jpeg(photo, 2)))
    with pytest.raises(IndexError):
        reader.read(3)
    # an LMDB that is not in the Chinese-CLIP layout fails at start with what is wrong
    shutil.rmtree(tmp_path / "b" / "train" / "imgs")
    with pytest.raises(readers.DatasetError, match=r"'sh': .*b/train/imgs/data.mdb not found; build the LMDB"):
        readers.build_reader("sh", "train", catalog, data_root=str(tmp_path))
    os.makedirs(tmp_path / "c")
    env = lmdb.open(str(tmp_path / "c" / "imgs"), map_size=1 << 20)
    env.close()
    env = lmdb.open(str(tmp_path / "c" / "pairs"), map_size=1 << 20)
    env.close()
    with pytest.raises(readers.DatasetError, match=r"c/pairs has no 'num_samples' key: not a Chinese-CLIP LMDB"):
        readers.LmdbReader([str(tmp_path / "c")])


def test_restricted_unpickler_refuses_code(tmp_path, photo):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(str(marker)))
    write_cnclip_lmdb(str(tmp_path / "lmdb" / "train"), {1: jpeg(photo, 1)}, [(1, 1, "a"), (1, 2, "b")],
                      pair_values=[pickle.dumps((1, 1, "a")), evil])
    reader = readers.LmdbReader([str(tmp_path / "lmdb" / "train")])
    assert reader.read(0)[1] == ["a"]
    with pytest.raises(readers.UnsafePickleError, match=r"pairs key 1: refusing to unpickle the global posix.system"):
        reader.read(1)
    assert not marker.exists()
    # plain data that is not a (int/str) 3-tuple is refused too, and never reaches the caller
    for value in ([1, 2, "x"], (1, 2, 3.5), (1, 2), {"a": 1}):
        with pytest.raises(readers.UnsafePickleError, match="must be a tuple"):
            readers.load_pair(pickle.dumps(value), "k")
    # the bad-sample machinery does not swallow it
    dataset = datasets.ImageTextDataset(reader, T.ToTensor(), lambda t: torch.zeros(1, 4), max_bad_samples=10)
    with pytest.raises(readers.UnsafePickleError):
        dataset[(1, 0)]
    assert not marker.exists()


def test_lmdb_opened_lazily_per_process_never_across_fork(tmp_path, photo):
    write_cnclip_lmdb(str(tmp_path / "l"), {i: jpeg(photo, i) for i in range(4)}, [(i, i, str(i)) for i in range(4)])
    reader = readers.LmdbReader([str(tmp_path / "l")])
    key = os.path.realpath(tmp_path / "l" / "imgs")
    assert key not in readers._LMDB_ENVS  # nothing left open by the constructor
    reader.read(0)  # opened in the parent
    parent = os.getpid()
    assert readers._LMDB_ENVS[key][0] == parent

    class Probe(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            image, _ = reader.read(i)
            return torch.tensor([os.getpid(), readers._LMDB_ENVS[key][0], image.size[0]])

    got = torch.cat(list(DataLoader(Probe(), batch_size=1, num_workers=2)))
    assert (got[:, 0] == got[:, 1]).all() and (got[:, 0] != parent).all()  # each worker opened its own
    assert readers._LMDB_ENVS[key][0] == parent and reader.read(3)[1] == ["3"]  # the parent's is untouched
    clone = pickle.loads(pickle.dumps(reader))  # spawned workers get a picklable reader
    assert clone.read(2)[1] == ["2"]


def test_lmdb_opened_readonly_without_lock_readahead_or_meminit(tmp_path, photo, monkeypatch):
    """Every environment the reader opens (the size probe in the constructor, each worker's imgs/pairs) is
    readonly, lock=False, readahead=False, meminit=False: what lets many workers share a file on a cluster."""
    write_cnclip_lmdb(str(tmp_path / "l"), {i: jpeg(photo, i) for i in range(2)}, [(i, i, str(i)) for i in range(2)])
    calls = []
    real_open = lmdb.open

    def spy(path, **options):
        calls.append((os.path.basename(path), options))
        return real_open(path, **options)

    monkeypatch.setattr(readers.lmdb, "open", spy)
    reader = readers.LmdbReader([str(tmp_path / "l")])
    assert reader.read(1)[1] == ["1"]
    assert sorted(name for name, _ in calls) == ["imgs", "pairs", "pairs"]  # constructor probe, then lazily both
    for name, options in calls:
        assert {k: options.get(k) for k in ("readonly", "lock", "readahead", "meminit")} == \
            {"readonly": True, "lock": False, "readahead": False, "meminit": False}, name
    env, _ = readers.open_lmdb(str(tmp_path / "l" / "imgs"))  # the cached environment really has them
    flags = env.flags()
    assert (flags["readonly"], flags["lock"], flags["readahead"], flags["meminit"]) == (True, False, False, False)
    for sub in ("imgs", "pairs"):
        readers.close_lmdb(str(tmp_path / "l" / sub))


# --------------------------------------------------------------------------- build_lmdb.py
def raw_dataset(photo, n_images=6):
    images = {500 + i: jpeg(photo, i) for i in range(n_images)}
    texts = [{"text_id": 10, "text": "宇航员", "image_ids": [500, 501]},
             {"text_id": 11, "text": "一张照片", "image_ids": [503]},
             {"text_id": 12, "text": "第三句", "image_ids": [505, 500, 502]}]
    return images, texts


def test_builder_lmdb_reads_back_byte_for_byte(tmp_path, photo):
    images, texts = raw_dataset(photo)
    write_raw_split(str(tmp_path), "train", images, texts)
    write_raw_split(str(tmp_path), "valid", {1: jpeg(photo, 9)}, [{"query_id": 3, "query_text": "旧格式",
                                                                   "item_ids": [1]}])
    os.rename(tmp_path / "valid_texts.jsonl", tmp_path / "valid_queries.jsonl")  # MUGE's older name and keys
    counts = build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train,valid,train"])
    assert [c["split"] for c in counts] == ["train", "valid"]
    expected = [(t["image_ids"][k], t["text_id"], t["text"]) for t in texts for k in range(len(t["image_ids"]))]
    # raw LMDB content, read the way Chinese-CLIP's LMDBDataset reads it
    env = lmdb.open(str(tmp_path / "lmdb" / "train" / "pairs"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"num_samples") == str(len(expected)).encode()
        assert [pickle.loads(txn.get(str(i).encode())) for i in range(len(expected))] == expected
    env.close()
    env = lmdb.open(str(tmp_path / "lmdb" / "train" / "imgs"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"num_images") == str(len(images)).encode()
        for image_id, data in images.items():
            stored = txn.get(str(image_id).encode())
            assert stored == base64.b64encode(data)  # the tsv's base64 text, verbatim
            assert base64.urlsafe_b64decode(stored.decode("utf-8", errors="ignore")) == data
    env.close()
    # and through our reader
    reader = readers.LmdbReader([str(tmp_path / "lmdb" / "train")])
    assert [reader.pair(i) for i in range(len(reader))] == expected
    np.testing.assert_array_equal(np.asarray(reader.read(2)[0]), pixels(images[503]))  # pair 2 = (503, 11)
    assert readers.LmdbReader([str(tmp_path / "lmdb" / "valid")]).read(0)[1] == ["旧格式"]
    assert not [p for p in os.listdir(tmp_path / "lmdb") if p.startswith(".")]  # no temp folders left


def test_builder_resize_and_growing_map(tmp_path, photo):
    images = {i: jpeg(photo, i, size=400) for i in range(12)}
    write_raw_split(str(tmp_path), "train", images, [{"text_id": 1, "text": "x", "image_ids": list(images)}])
    [full] = build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train", "--initial-map-size", "65536",
                              "--commit-every", "4"])
    assert full["map_resizes"] >= 2  # 12 x ~30 KB images never fit a 64 KiB map
    [small] = build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train", "--lmdb-dir", str(tmp_path / "r"),
                               "--resize", "64"])
    reader = readers.LmdbReader([str(tmp_path / "r" / "train")])
    image, _ = reader.read(5)
    assert min(image.size) == 64 and image.size == (80, 64)
    assert len(reader.image_bytes(5)) < len(images[5]) / 4


BUILD_BAD_LINES = ["bad base64", "undecodable image", "duplicate image id", "non-int image id", "missing tab",
                   "missing image", "duplicate text id", "malformed jsonl", "missing key", "wrong type", "not utf-8"]


def corrupt_cases(photo) -> dict[str, tuple]:
    """case -> (imgs tsv, texts jsonl (bytes), error, images kept {id: base64}, pairs kept [(image, text, caption)]).
    The bad line is line 2 of 3 of its file, with a good line after it."""
    b64 = {i: base64.b64encode(jpeg(photo, i)).decode() for i in (1, 2, 3)}
    whole = jpeg(photo, 2, 64)
    truncated = base64.b64encode(whole[:len(whole) * 2 // 3]).decode()
    texts = [b'{"text_id": 1, "text": "a", "image_ids": [1]}', b'{"text_id": 2, "text": "b", "image_ids": [3, 1]}',
             b'{"text_id": 3, "text": "c", "image_ids": [3]}']
    all_pairs = [(1, 1, "a"), (3, 2, "b"), (1, 2, "b"), (3, 3, "c")]
    cases = {}
    for case, line2, message in [
            ("bad base64", "2\t@@@not-base64@@@", "train_imgs.tsv:2: bad base64"),
            ("undecodable image", "2\t" + truncated, "train_imgs.tsv:2: undecodable image"),
            ("duplicate image id", "1\t" + b64[2], "train_imgs.tsv:2: duplicate image id 1"),
            ("non-int image id", "x2\t" + b64[2], "train_imgs.tsv:2: image id b'x2' is not an integer"),
            ("missing tab", "2 " + b64[2], "train_imgs.tsv:2: expected 'image_id<TAB>base64'")]:
        tsv = f"1\t{b64[1]}\n{line2}\n3\t{b64[3]}\n"
        cases[case] = (tsv, b"\n".join(texts) + b"\n", message, {1: b64[1], 3: b64[3]}, all_pairs)
    for case, line2, message in [
            ("missing image", b'{"text_id": 2, "text": "b", "image_ids": [3, 7]}',
             r"train_texts.jsonl:2: image id\(s\) \[7\] of text 2 not in"),
            ("duplicate text id", b'{"text_id": 1, "text": "b", "image_ids": [3, 1]}',
             "train_texts.jsonl:2: duplicate text id 1"),
            ("malformed jsonl", b'{"text_id": 2, "text": ', "train_texts.jsonl:2: malformed json"),
            ("missing key", b'{"text_id": 2, "image_ids": [3]}', r"train_texts.jsonl:2: missing key\(s\) \['text'\]"),
            ("wrong type", b'{"text_id": "2", "text": "b", "image_ids": [3]}',
             "train_texts.jsonl:2: text_id must be an int"),
            ("not utf-8", b'{"text_id": 2, "text": "\xff\xfe", "image_ids": [3]}', "train_texts.jsonl:2: not UTF-8")]:
        tsv = "".join(f"{i}\t{v}\n" for i, v in b64.items())
        jsonl = b"\n".join([texts[0], line2, texts[2]]) + b"\n"
        cases[case] = (tsv, jsonl, message, b64, [all_pairs[0], all_pairs[3]])
    assert sorted(cases) == sorted(BUILD_BAD_LINES)
    return cases


@pytest.mark.parametrize("case", BUILD_BAD_LINES)
def test_builder_reports_bad_input_with_file_and_line(tmp_path, photo, case, capsys):
    tsv, jsonl, message, kept_images, kept_pairs = corrupt_cases(photo)[case]
    (tmp_path / "train_imgs.tsv").write_text(tsv)
    (tmp_path / "train_texts.jsonl").write_bytes(jsonl)
    os.makedirs(tmp_path / "lmdb" / "train")  # an existing LMDB must survive an interrupted build
    (tmp_path / "lmdb" / "train" / "keep").write_text("old")
    with pytest.raises(SystemExit, match=message + ".*use --skip-bad"):
        build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train"])
    assert os.listdir(tmp_path / "lmdb") == ["train"] and os.listdir(tmp_path / "lmdb" / "train") == ["keep"]
    # --skip-bad drops the bad line only: every good line before and after it is in the LMDB
    [counts] = build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train", "--skip-bad"])
    assert counts == {"split": "train", "images": len(kept_images), "texts": len({t for _, t, _ in kept_pairs}),
                      "pairs": len(kept_pairs), "bad": 1, "map_resizes": 0}
    assert "train: skipped 1 bad line(s)" in capsys.readouterr().err
    env = lmdb.open(str(tmp_path / "lmdb" / "train" / "imgs"), readonly=True, lock=False)
    with env.begin() as txn:
        assert dict(txn.cursor()) == {**{str(i).encode(): v.encode() for i, v in kept_images.items()},
                                      b"num_images": str(len(kept_images)).encode()}
    env.close()
    env = lmdb.open(str(tmp_path / "lmdb" / "train" / "pairs"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"num_samples") == str(len(kept_pairs)).encode() and txn.stat()["entries"] == len(kept_pairs) + 1
        assert [pickle.loads(txn.get(str(i).encode())) for i in range(len(kept_pairs))] == kept_pairs
    env.close()
    reader = readers.LmdbReader([str(tmp_path / "lmdb" / "train")])
    for i, (image_id, _, text) in enumerate(kept_pairs):
        image, captions = reader.read(i)
        assert captions == [text]
        np.testing.assert_array_equal(np.asarray(image), pixels(base64.b64decode(kept_images[image_id])))


def test_builder_missing_split_file(tmp_path):
    with pytest.raises(SystemExit, match=r"train_imgs.tsv not found \(split 'train'"):
        build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train"])


# --------------------------------------------------------------------------- other readers
def test_tsv_reader_both_key_sets_and_errors(tmp_path, photo):
    images, texts = raw_dataset(photo)
    write_raw_split(str(tmp_path / "new"), "train", images, texts)
    old = [{"query_id": t["text_id"], "query_text": t["text"], "item_ids": t["image_ids"]} for t in texts]
    write_raw_split(str(tmp_path / "old"), "train", images, old)
    os.rename(tmp_path / "old" / "train_texts.jsonl", tmp_path / "old" / "train_queries.jsonl")
    for folder in ("new", "old"):
        reader = readers.build_reader("m", "train", {"m": {"format": "tsv", "path": folder}}, str(tmp_path))
        assert len(reader) == 6 and reader.read(5)[1] == ["第三句"]
        np.testing.assert_array_equal(np.asarray(reader.read(5)[0]), pixels(images[502]))
    with open(tmp_path / "new" / "train_texts.jsonl", "a") as f:
        f.write('{"text_id": 99, "text": "x", "image_ids": [12345]}\n')
    with pytest.raises(readers.DatasetError, match=r"train_texts.jsonl:4: image id 12345 of text 99 is not in"):
        readers.TsvReader(str(tmp_path / "new"), "train")


def test_yfcc_zip_reader(tmp_path, photo):
    rows = [(12345678, "a title", "a description"), (12345001, "", "only description"), (99000001, "", "")]
    for k, (image_id, _, _) in enumerate(rows):
        zpath, member = readers.yfcc_zip_location(str(tmp_path / "yfcc"), image_id)
        os.makedirs(os.path.dirname(zpath), exist_ok=True)
        with zipfile.ZipFile(zpath, "a") as z:
            z.writestr(member, jpeg(photo, k))
    assert readers.yfcc_zip_location("R", 12345678) == (os.path.join("R", "images", "12", "345.zip"), "678.jpg")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(rows, f)
    (tmp_path / "meta.tsv").write_text("".join(f"{i}\t{t}\t{d}\n" for i, t, d in rows))
    for meta in ("meta.pkl", "meta.tsv"):
        catalog = {"y": {"format": "yfcc15m", "metadata": meta, "root": "yfcc"}}
        reader = readers.build_reader("y", "train", catalog, str(tmp_path))
        assert [reader.read(i)[1] for i in range(3)] == [["a title", "a description"], ["only description"], [""]]
        np.testing.assert_array_equal(np.asarray(reader.read(1)[0]), pixels(jpeg(photo, 1)))
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump([Evil(str(tmp_path / "pwned"))], f)
    with pytest.raises(readers.UnsafePickleError, match="evil.pkl: refusing"):
        readers.load_yfcc_metadata(str(tmp_path / "evil.pkl"))
    assert not (tmp_path / "pwned").exists()


def test_cc3m_cc12m_npy_and_merged(tmp_path, photo):
    os.makedirs(tmp_path / "img")
    for k in range(4):
        (tmp_path / "img" / f"{k}.jpg").write_bytes(jpeg(photo, k))
    cc3m = np.empty(2, dtype=object)
    cc3m[:] = [{"image_id": "0.jpg", "captions": ["zero"]}, {"image_id": "1.jpg", "captions": ["one", "uno"]}]
    cc12m = np.empty(2, dtype=object)
    cc12m[:] = [{"image_name": "2.jpg", "image_id": 2, "captions": ["two"]},
                {"image_name": "3.jpg", "image_id": 3, "captions": ["three"]}]
    np.save(tmp_path / "cc3m.npy", cc3m, allow_pickle=True)
    np.save(tmp_path / "cc12m.npy", cc12m, allow_pickle=True)
    catalog = {"cc3m": {"format": "cc3m", "metadata": "cc3m.npy", "root": "img"},
               "cc12m": {"format": "cc12m", "metadata": "cc12m.npy", "root": "img"},
               "mix": {"format": "merged", "datasets": ["cc3m", "cc12m"]}}
    mix = readers.build_reader("mix", "train", catalog, str(tmp_path))
    assert len(mix) == 4
    assert [mix.read(i)[1] for i in range(4)] == [["zero"], ["one", "uno"], ["two"], ["three"]]
    np.testing.assert_array_equal(np.asarray(mix.read(3)[0]), pixels(jpeg(photo, 3)))
    evil = np.empty(1, dtype=object)
    evil[0] = Evil(str(tmp_path / "pwned"))
    np.save(tmp_path / "evil.npy", evil, allow_pickle=True)
    with pytest.raises(readers.UnsafePickleError, match="refusing to unpickle the global posix.system"):
        readers.load_caption_records(str(tmp_path / "evil.npy"))
    assert not (tmp_path / "pwned").exists()


def test_imagefolder_and_filelist_readers(tmp_path, photo):
    for split in ("train", "val"):
        for c, cls in enumerate(["cat", "sea_lion"]):
            os.makedirs(tmp_path / "if" / split / cls)
            (tmp_path / "if" / split / cls / "a.jpg").write_bytes(jpeg(photo, c))
    catalog = {"if": {"format": "imagefolder", "path": "if", "splits": {"train": "train", "test": "val"}}}
    reader = readers.build_reader("if", "test", catalog, str(tmp_path))
    assert len(reader) == 2 and [reader.label(i) for i in range(2)] == [0, 1]
    assert reader.read(1)[1] == ["sea lion"]
    loader = DataLoader(datasets.ClassificationDataset(reader, T.Compose([T.Resize((8, 8)), T.ToTensor()])),
                        batch_size=2)
    x, y = next(iter(loader))
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 1]
    os.makedirs(tmp_path / "fl" / "imgs")
    (tmp_path / "fl" / "imgs" / "x.jpg").write_bytes(jpeg(photo, 5))
    np.save(tmp_path / "fl" / "val_images.npy", np.array(["imgs/x.jpg", "imgs/x.jpg"]))
    np.save(tmp_path / "fl" / "val_labels.npy", np.array(["count_3", "count_10"]))
    catalog = {"clevr": {"format": "filelist", "path": "fl", "splits": {"test": "val"},
                         "label_order": ["count_10", "count_3"]}}
    reader = readers.build_reader("clevr", "test", catalog, str(tmp_path))
    assert [reader.label(i) for i in range(2)] == [1, 0]
    np.testing.assert_array_equal(np.asarray(reader.read(0)[0]), pixels(jpeg(photo, 5)))


def write_idx(path, array: np.ndarray) -> None:
    """An uncompressed MNIST idx file: magic 0x0000 0x08 (uint8) ndim, big-endian int32 sizes, the bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes() + array.tobytes())


def test_torchvision_reader_reads_mnist_files_on_disk_and_never_downloads(tmp_path, monkeypatch):
    """A tiny MNIST in torchvision's raw layout (`mnist/MNIST/raw/*-idx?-ubyte`; MNIST has no checksum) read through
    the catalog's `mnist` entry; a torchvision set that is not there fails with where to put it."""
    from torchvision import datasets as tvd

    monkeypatch.setattr(tvd.MNIST, "download", lambda self: pytest.fail("MNIST download attempted"))
    raw = tmp_path / "downstream" / "mnist" / "MNIST" / "raw"
    os.makedirs(raw)
    rng = np.random.RandomState(0)
    splits = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        images, labels = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8), rng.permutation(10)[:n].astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = images, labels
    for split, prefix in (("train", "train"), ("test", "t10k")):
        reader = readers.build_reader("mnist", split, data_root=str(tmp_path))
        images, labels = splits[prefix]
        assert isinstance(reader, readers.TorchvisionReader) and len(reader) == len(labels)
        for i in range(len(reader)):
            image, captions = reader.read(i)
            assert image.mode == "RGB" and image.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(image)[..., 1], images[i])
            assert reader.label(i) == labels[i] and captions == [tvd.MNIST.classes[labels[i]]]
    # the folder exists but holds no (or another) dataset: the torchvision error, the root and the fix
    for kind in ("cifar10", "cifar100", "stl10", "mnist"):
        root = tmp_path / "empty" / kind
        os.makedirs(root)
        with pytest.raises(readers.DatasetError, match=rf"dataset 'x': torchvision {kind} not found under "
                                                        rf"{re.escape(str(root))} \(.*\); place the extracted files "
                                                        r"there \(nothing is downloaded\)"):
            readers.TorchvisionReader(kind, str(root), "test", "x")
    with pytest.raises(readers.DatasetError, match=r"'cifar10' \(dataset_catalog.json, path='downstream/cifar10'\): "
                                                    r".* not found"):
        readers.build_reader("cifar10", "test", data_root=str(tmp_path))
    with pytest.raises(readers.DatasetError, match=r"torchvision kind 'svhn' is not one of \['cifar10', 'cifar100', "
                                                    r"'mnist', 'stl10'\]"):
        readers.TorchvisionReader("svhn", str(tmp_path), "test", "x")


# clip-rocket's downstream catalog (facebookresearch/clip-rocket dataset_catalog.json, commit ebd9e58: 23 entries,
# SLIP's 26 less sun397, fer2013 and kinetics700_frames): name -> (format, on-disk folder of the test split); the
# train folder is always `train`.
# clip-rocket's `special` type is our `torchvision` format (no folders: the torchvision class takes train=True/False).
CLIP_ROCKET_DOWNSTREAM = {
    "imagenet": ("imagefolder", "val"), "food101": ("imagefolder", "test"), "cub200": ("imagefolder", "val"),
    "cars": ("imagefolder", "test"), "aircraft": ("imagefolder", "test"), "dtd": ("imagefolder", "test"),
    "pets": ("imagefolder", "test"), "caltech101": ("imagefolder", "test"), "flowers": ("imagefolder", "test"),
    "eurosat": ("imagefolder", "val"), "resisc45": ("imagefolder", "test"), "gtsrb": ("imagefolder", "test"),
    "kitti_distance": ("imagefolder", "val"), "country211": ("imagefolder", "test"),
    "patch_camelyon": ("imagefolder", "val"), "ucf101_frames": ("imagefolder", "val"),
    "hateful_memes": ("imagefolder", "dev"), "rendered_sst2": ("imagefolder", "test"),
    "mnist": ("torchvision", "test"), "cifar10": ("torchvision", "test"), "cifar100": ("torchvision", "test"),
    "stl10": ("torchvision", "test"), "clevr_counts": ("filelist", "val"),
}


def test_catalog_has_every_downstream_set_of_clip_rocket_with_its_format_and_splits():
    catalog = readers.load_catalog()
    assert len(CLIP_ROCKET_DOWNSTREAM) == 23
    wrong = []
    for name, (fmt, test_split) in CLIP_ROCKET_DOWNSTREAM.items():
        entry = catalog.get(name)
        if entry is None:
            wrong.append(f"{name}: missing")
            continue
        got = (entry["format"], readers.split_name(name, entry, "train"), readers.split_name(name, entry, "test"))
        if got != (fmt, "train", test_split):
            wrong.append(f"{name}: (format, train, test) = {got}, clip-rocket has {(fmt, 'train', test_split)}")
        if fmt == "torchvision" and entry.get("kind") != name:
            wrong.append(f"{name}: torchvision kind {entry.get('kind')!r}")
    assert not wrong, "\n".join(wrong)
    assert catalog["clevr_counts"]["label_order"] == ["count_10", "count_3", "count_4", "count_5", "count_6",
                                                      "count_7", "count_8", "count_9"]


def test_catalog_entries_and_missing_dataset_messages(tmp_path, monkeypatch):
    catalog = readers.load_catalog()
    for name in ["yfcc15m", "cc3m", "cc12m", "merged-29m", "muge", "flickr30k-cn", "coco-cn", "imagenet", "muge-sample",
                 "food101", "cifar10", "clevr_counts", "digits", "digits-zh", "synthetic", "synthetic-zh"]:
        assert name in catalog
    paths = [v for e in catalog.values() for k, v in e.items() if k in ("path", "metadata", "root")]
    assert paths and not any(os.path.isabs(p) for p in paths if isinstance(p, str))  # no machine paths
    monkeypatch.delenv("CLIP_LAB_DATA_ROOT", raising=False)
    with pytest.raises(readers.DatasetError, match=r"'muge'.*needs a data root: pass --data-root DIR or export "
                                                    r"CLIP_LAB_DATA_ROOT"):
        readers.build_reader("muge", "train")
    monkeypatch.setenv("CLIP_LAB_DATA_ROOT", str(tmp_path))
    tried = os.path.join(str(tmp_path), "muge/lmdb/train")
    with pytest.raises(readers.DatasetError, match=rf"dataset 'muge' .*: {tried} not found. Fix: .*--data-root.*"
                                                    r"build_lmdb.py"):
        readers.build_reader("muge", "train")
    with pytest.raises(readers.DatasetError, match=r"dataset 'cc3m' .*metadata='cc3m/cc3m_train.npy'"):
        readers.build_reader("merged-29m", "train")
    with pytest.raises(readers.DatasetError, match="'yfcc15m' has no 'test' split"):
        readers.build_reader("yfcc15m", "test")
    with pytest.raises(readers.DatasetError, match=r"dataset 'muge-sample'.*not found"):  # at start, before training
        main.main(TINY_CN + ["--dataset", "muge-sample", "--data-root", str(tmp_path / "nowhere"),
                             "--output-dir", str(tmp_path / "exp")])


# --------------------------------------------------------------------------- decoding
def test_draft_decode_keeps_every_crop_at_full_resolution(photo):
    big = photo.resize((1024, 768))
    out = io.BytesIO()
    big.save(out, format="JPEG", quality=90)
    need = datasets.draft_size(224, 0.5)
    drafted = readers.decode_image(out.getvalue(), "photo", draft=need)
    assert drafted.size == (512, 384) and min(drafted.size) >= need  # DCT-scaled 1/2, not 1/4
    assert readers.decode_image(out.getvalue(), "photo").size == (1024, 768)
    crop = T.RandomResizedCrop(224, scale=(0.5, 1.0))
    torch.manual_seed(0)
    square = Image.new("RGB", (need, need))
    sizes = [crop.get_params(img, crop.scale, crop.ratio)[2:] for img in (drafted, square) for _ in range(2000)]
    assert min(min(h, w) for h, w in sizes) >= 224
    # the draft of a dataset is the largest need over its views; anything but a leading random crop: full decode
    assert datasets.draft_for(datasets.train_transform(224, 0.5)) == need == 366
    strong = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), T.ToTensor()])
    assert datasets.draft_for(datasets.train_transform(224, 0.5), strong) == datasets.draft_size(224, 0.08) > 900
    assert datasets.draft_for(datasets.val_transform(224)) is None


# --------------------------------------------------------------------------- sampler and resume
def test_sampler_resumes_exactly_mid_epoch_for_two_ranks():
    orders = {}
    for epoch in (0, 3):
        full, resumed = [], []
        for rank in (0, 1):
            s = datasets.ResumableSampler(1003, 8, rank=rank, world_size=2, seed=7)
            s.set_epoch(epoch)
            full.append(list(s))
            r = datasets.ResumableSampler(1003, 8, rank=rank, world_size=2, seed=7)
            r.set_epoch(epoch, start_batch=37)
            resumed.append(list(r))
            assert len(r) == len(resumed[-1]) == (62 - 37) * 8
            assert resumed[-1] == full[-1][37 * 8:]  # same (index, seed) keys from batch 37 on
        ids = [i for rank in full for i, _ in rank]
        assert len(ids) == len(set(ids)) == 62 * 16 and set(ids) <= set(range(1003))  # partition, no overlap
        # ranks interleave global batches: 2 ranks x 8 see what 1 rank x 16 sees, batch by batch
        single = datasets.ResumableSampler(1003, 16, seed=7)
        single.set_epoch(epoch)
        one = list(single)
        assert all(sorted(one[16 * j:16 * j + 16]) == sorted(full[0][8 * j:8 * j + 8] + full[1][8 * j:8 * j + 8])
                   for j in range(62))
        orders[epoch] = ids
    assert orders[0] != orders[3]  # a new permutation each epoch


def test_resumed_loader_yields_the_same_samples_with_workers():
    reader = readers.SyntheticReader(200, 16)
    dataset = datasets.ImageTextDataset(reader, datasets.train_transform(16), lambda t: torch.tensor([[len(t)]]))

    def batches(start):
        sampler = datasets.ResumableSampler(len(dataset), 4, rank=1, world_size=2, seed=3)
        sampler.set_epoch(2, start)
        return [b[0] for b in DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2)]

    full, resumed = batches(0), batches(20)
    assert len(resumed) == 5 and all(torch.equal(a, b) for a, b in zip(full[20:], resumed))


# --------------------------------------------------------------------------- bad samples, caption sampling
def corrupt_lmdb(tmp_path, photo, bad: set[int], n=24) -> readers.LmdbReader:
    images = {i: (b"\xff\xd8 not really a jpeg" if i in bad else jpeg(photo, i, 16)) for i in range(n)}
    write_cnclip_lmdb(str(tmp_path / "c"), images, [(i, i, f"t{i}") for i in range(n)])
    return readers.LmdbReader([str(tmp_path / "c")])


def test_bad_samples_replaced_deterministically_counted_and_limited(tmp_path, photo):
    bad = {3, 4, 10, 17}
    reader = corrupt_lmdb(tmp_path, photo, bad)
    with pytest.raises(readers.CorruptSample, match=r"lmdb\[3\] \(image 3, text 3, .*/c/imgs\)"):
        reader.read(3)

    def epoch(workers, limit):
        dataset = datasets.ImageTextDataset(reader, T.Compose([T.Resize((8, 8)), T.ToTensor()]),
                                            lambda t: torch.tensor([[int(t[1:])]]), max_bad_samples=limit)
        sampler = datasets.ResumableSampler(len(dataset), 4, seed=1)
        dataset.bad_samples.reset(0)
        ids = torch.cat([b[1] for b in DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)])
        return ids[:, 0].tolist(), dataset.bad_samples

    ids0, counter0 = epoch(0, 10)
    ids2, counter2 = epoch(2, 10)
    assert ids0 == ids2  # the replacement does not depend on the workers
    assert not set(ids0) & bad and len(ids0) == 24
    assert counter0.count == counter2.count >= 4 and set(counter2.offenders()) >= bad  # counted across workers
    with pytest.raises(datasets.TooManyBadSamples, match=r"more than --max-bad-samples 2; offending sample ids"):
        epoch(2, 2)


N_ITEMS, BAD = 5, 2  # one broken item in the middle of five
ONE_BAD_ITEM_CASES = ["yfcc15m missing zip member", "yfcc15m missing zip shard", "cc3m missing image file",
                      "cc12m undecodable image file", "tsv bad base64", "tsv undecodable jpeg",
                      "imagefolder truncated jpg", "filelist garbage jpg", "lmdb missing image id"]


def one_bad_item_reader(case: str, tmp, photo) -> tuple[readers.Reader, list[str]]:
    """A reader of `case`'s format over N_ITEMS items with captions `caption k`, item BAD broken as `case` says
    -> (reader, what its CorruptSample message must name: the sample, the image id, the path)."""
    good = [jpeg(photo, k, 16) for k in range(N_ITEMS)]
    whole = jpeg(photo, BAD, 64)
    truncated = whole[:len(whole) * 2 // 3]  # opens (the header is whole), fails when decoded
    fmt = case.split()[0]
    if fmt == "yfcc15m":
        ids = [12345600 + k for k in range(N_ITEMS)]  # one shard, images/12/345.zip, members 600.jpg ...
        if case.endswith("shard"):
            ids[BAD] = 12399902  # images/12/399.zip is never written
        for k, image_id in enumerate(ids):
            if k != BAD:
                zpath, member = readers.yfcc_zip_location(str(tmp / "yfcc"), image_id)
                os.makedirs(os.path.dirname(zpath), exist_ok=True)
                with zipfile.ZipFile(zpath, "a") as z:
                    z.writestr(member, good[k])
        (tmp / "meta.tsv").write_text("".join(f"{i}\tcaption {k}\t\n" for k, i in enumerate(ids)))
        zpath, member = readers.yfcc_zip_location(str(tmp / "yfcc"), ids[BAD])
        assert os.path.exists(zpath) != case.endswith("shard")
        return readers.YfccReader(str(tmp / "meta.tsv"), str(tmp / "yfcc")), \
            [f"yfcc15m[{BAD}]", f"image {ids[BAD]}", f"{zpath}:{member}"]
    if fmt in ("cc3m", "cc12m"):
        key = "image_id" if fmt == "cc3m" else "image_name"
        os.makedirs(tmp / "img")
        for k in range(N_ITEMS):
            if k != BAD or fmt == "cc12m":  # cc3m: the file is missing; cc12m: it holds no image
                (tmp / "img" / f"{k}.jpg").write_bytes(b"<html>404 Not Found</html>" if k == BAD else good[k])
        records = np.empty(N_ITEMS, dtype=object)
        records[:] = [{key: f"{k}.jpg", "captions": [f"caption {k}"]} for k in range(N_ITEMS)]
        np.save(tmp / "meta.npy", records, allow_pickle=True)
        return readers.CaptionRecordsReader(str(tmp / "meta.npy"), str(tmp / "img"), fmt, key), \
            [f"{fmt}[{BAD}]", str(tmp / "img" / f"{BAD}.jpg")]
    if fmt == "tsv":
        b64 = [base64.b64encode(g).decode() for g in good]
        b64[BAD] = "@@@not*base64@" if case.endswith("base64") else base64.b64encode(truncated).decode()
        (tmp / "train_imgs.tsv").write_text("".join(f"{500 + k}\t{b64[k]}\n" for k in range(N_ITEMS)))
        (tmp / "train_texts.jsonl").write_text("".join(
            json.dumps({"text_id": k, "text": f"caption {k}", "image_ids": [500 + k]}) + "\n" for k in range(N_ITEMS)))
        return readers.TsvReader(str(tmp), "train"), [f"tsv[{BAD}]", f"image {500 + BAD}",
                                                        str(tmp / "train_imgs.tsv")]
    if fmt == "imagefolder":
        for k in range(N_ITEMS):
            os.makedirs(tmp / "if" / f"caption {k}")
            (tmp / "if" / f"caption {k}" / "a.jpg").write_bytes(truncated if k == BAD else good[k])
        return readers.ImageFolderReader(str(tmp / "if")), \
            [f"imagefolder[{BAD}]", str(tmp / "if" / f"caption {BAD}" / "a.jpg")]
    if fmt == "filelist":
        os.makedirs(tmp / "fl" / "imgs")
        for k in range(N_ITEMS):
            (tmp / "fl" / "imgs" / f"{k}.jpg").write_bytes(os.urandom(300) if k == BAD else good[k])
        np.save(tmp / "fl" / "val_images.npy", np.array([f"imgs/{k}.jpg" for k in range(N_ITEMS)]))
        np.save(tmp / "fl" / "val_labels.npy", np.arange(N_ITEMS))
        return readers.FilelistReader(str(tmp / "fl"), "val", [f"caption {k}" for k in range(N_ITEMS)]), \
            [f"filelist[{BAD}]", str(tmp / "fl" / "imgs" / f"{BAD}.jpg")]
    assert case == "lmdb missing image id"
    write_cnclip_lmdb(str(tmp / "l"), {k: good[k] for k in range(N_ITEMS) if k != BAD},
                      [(k, 100 + k, f"caption {k}") for k in range(N_ITEMS)])
    return readers.LmdbReader([str(tmp / "l")]), [f"lmdb[{BAD}]", f"image {BAD}, text {100 + BAD}, {tmp / 'l'}/imgs)"]


@pytest.mark.parametrize("case", ONE_BAD_ITEM_CASES)
def test_every_reader_raises_corrupt_sample_that_the_dataset_replaces_and_counts(tmp_path, photo, case):
    """Each storage format turns its own kind of broken item into a CorruptSample naming the sample and the path;
    ImageTextDataset then serves a whole good sample in its place, the same one whatever the workers, counts it
    and stops past --max-bad-samples."""
    reader, names = one_bad_item_reader(case, tmp_path, photo)
    assert len(reader) == N_ITEMS
    with pytest.raises(readers.CorruptSample) as raised:
        reader.read(BAD)
    assert all(name in str(raised.value) for name in names), (str(raised.value), names)
    owner = {f"caption {k}": k for k in range(N_ITEMS)}

    def epoch(workers: int, limit: int):
        dataset = datasets.ImageTextDataset(reader, T.Compose([T.Resize((8, 8)), T.ToTensor()]),
                                            lambda text: torch.tensor([[owner[text]]]), max_bad_samples=limit)
        sampler = datasets.ResumableSampler(N_ITEMS, 1, seed=1, shuffle=False)  # items 0..4 in order
        dataset.bad_samples.reset(0)
        batches = list(DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers))
        return torch.cat([b[0] for b in batches]), [int(b[1]) for b in batches], dataset.bad_samples

    views, ids, counter = epoch(0, 1)
    replacement = ids[BAD]
    assert ids[:BAD] + ids[BAD + 1:] == [k for k in range(N_ITEMS) if k != BAD] and replacement != BAD
    assert torch.equal(views[BAD], views[replacement])  # the replacement's image with its own caption
    assert counter.count == 1 and counter.offenders() == [BAD]  # seed 1: the first replacement draw is good
    views2, ids2, counter2 = epoch(2, 1)
    assert ids2 == ids and torch.equal(views2, views) and counter2.count == 1 and counter2.offenders() == [BAD]
    with pytest.raises(datasets.TooManyBadSamples,
                       match=rf"offending sample ids \[{BAD}\] \(last: {re.escape(names[0])}"):
        epoch(0, 0)


def test_main_stops_past_max_bad_samples_and_skips_below(tmp_path, muge_sample_root, capfd):
    root = tmp_path / "root"
    shutil.copytree(os.path.join(muge_sample_root, "muge-sample", "lmdb"), root / "muge-sample" / "lmdb")
    env = lmdb.open(str(root / "muge-sample" / "lmdb" / "train" / "imgs"), map_size=1 << 28)
    with env.begin(write=True) as txn:
        keys = [k for k in txn.cursor().iternext(values=False) if k != b"num_images"]
        for k in keys[::2]:  # half of the images are corrupt
            txn.put(k, base64.b64encode(b"\xff\xd8 truncated"))
    env.close()
    args = TINY_CN + ["--dataset", "muge-sample", "--data-root", str(root),
                      "--max-steps", "2"]
    with pytest.raises(SystemExit, match=r"stopping: \d+ corrupt samples in epoch 0, more than --max-bad-samples 0; "
                                         r"offending sample ids \[\d+"):
        main.main(args + ["--output-dir", str(tmp_path / "a")])
    summary = main.main(args + ["--output-dir", str(tmp_path / "b"), "--max-bad-samples", "10000"])
    assert summary["step"] == 2
    out = capfd.readouterr()
    assert re.search(r"WARNING epoch 0: \d+ corrupt sample\(s\) replaced: \[\d+", out.out + out.err)


def test_max_bad_samples_is_per_epoch(tmp_path, photo, capfd):
    """2 corrupt images among 16 samples, --max-bad-samples 3, 2 epochs of 2 steps: every epoch stays within the
    limit while the run's total (>= 4) does not, and the run completes (the count restarts each epoch)."""
    root = tmp_path / "root" / "muge-sample" / "lmdb"  # the catalog's muge-sample entry, with a test split
    bad = {5, 11}
    train = {i: b"\xff\xd8 truncated" if i in bad else jpeg(photo, i) for i in range(16)}
    write_cnclip_lmdb(str(root / "train"), train, [(i, i, f"第{i}张照片") for i in range(16)])
    write_cnclip_lmdb(str(root / "test"), {i: jpeg(photo, 20 + i) for i in range(8)},
                      [(i, i, f"第{i}张测试照片") for i in range(8)])
    summary = main.main(TINY_CN + ["--dataset", "muge-sample", "--data-root", str(tmp_path / "root"), "--epochs", "2",
                                   "--max-bad-samples", "3", "--output-dir", str(tmp_path / "exp")])
    assert summary["epoch"] == 2 and summary["step"] == 4
    out = capfd.readouterr()
    per_epoch = {int(e): (int(n), ids) for e, n, ids in
                 re.findall(r"epoch (\d+): (\d+) corrupt sample\(s\) replaced: \[([\d, ]+)\]", out.out + out.err)}
    assert sorted(per_epoch) == [0, 1]
    assert all(2 <= n <= 3 and {int(i) for i in ids.split(",")} == bad for n, ids in per_epoch.values())
    assert sum(n for n, _ in per_epoch.values()) > 3


def test_caption_sampling_single_and_multi():
    captions = ["a", "b", "c", "d"]
    singles, multis = set(), set()
    for seed in range(50):
        with datasets.seeded(seed):
            single = datasets.pick_captions(captions, "single", 3)
        with datasets.seeded(seed):
            assert datasets.pick_captions(captions, "single", 3) == single  # seeded
        with datasets.seeded(seed):
            multi = datasets.pick_captions(captions, "multi", 3)
        assert len(set(single)) == 1 and set(multi) <= set(captions)
        singles.add(single[0])
        multis.add(len(set(multi)))
    assert singles == set(captions) and max(multis) > 1  # random choice, per view under multi
    with pytest.raises(ValueError, match="unknown caption sampling"):
        datasets.pick_captions(captions, "all")
    assert main.parse_args(["--caption-sampling", "multi"]).caption_sampling == "multi"


def multi_caption_reader(tmp_path, photo, n_images: int = 3) -> readers.CaptionRecordsReader:
    """cc3m-format records of n_images images with 4 captions each, `image k caption c`."""
    os.makedirs(tmp_path / "img")
    with open(tmp_path / "cc.jsonl", "w", encoding="utf-8") as f:
        for k in range(n_images):
            (tmp_path / "img" / f"{k}.jpg").write_bytes(jpeg(photo, k, 16))
            captions = [f"image {k} caption {c}" for c in range(4)]
            f.write(json.dumps({"image_id": f"{k}.jpg", "captions": captions}) + "\n")
    return readers.CaptionRecordsReader(str(tmp_path / "cc.jsonl"), str(tmp_path / "img"), "cc3m", "image_id")


def caption_ids(texts) -> torch.Tensor:
    """A stand-in tokenizer: each text `image k caption c` -> the row [4k + c]."""
    return torch.tensor([[4 * int(t.split()[1]) + int(t.split()[3])] for t in ([texts] if isinstance(texts, str)
                                                                           else texts)])


def text_rows(dataset, epochs: int) -> dict[tuple[int, int], list[int]]:
    """(epoch, index) -> the caption ids of the sample's text views (token rows), over whole epochs."""
    rows = {}
    for epoch in range(epochs):
        sampler = datasets.ResumableSampler(len(dataset), 1, seed=0, shuffle=False)
        sampler.set_epoch(epoch)
        for key in sampler:
            tokens = dataset[key][1]  # (1+A, L) for a multi-view sample, (L,) for a pair
            rows[(epoch, key[0])] = tokens[:, 0].tolist() if tokens.dim() == 2 else [int(tokens[0])]
    return rows


def test_caption_sampling_single_and_multi_through_the_multi_view_dataset(tmp_path, photo):
    """single: the weak and the A strong text views of a sample share one caption; multi: each draws its own.
    Both draw anew each epoch and are fixed by (seed, epoch, index)."""
    reader = multi_caption_reader(tmp_path, photo)
    view = T.Compose([T.Resize((8, 8)), T.ToTensor()])

    def rows(mode: str) -> dict:
        return text_rows(datasets.MultiViewDataset(reader, view, caption_ids, caption_sampling=mode,
                                                   strong_transforms=[view] * 3), epochs=8)

    single, multi = rows("single"), rows("multi")
    assert single == rows("single") and multi == rows("multi")
    for drawn in (single, multi):
        assert len(drawn) == 24 and all(len(ids) == 4 and {i // 4 for i in ids} == {index}
                                        for (_, index), ids in drawn.items())  # the sample's own captions
        assert all(len({tuple(drawn[(epoch, index)]) for epoch in range(8)}) > 1 for index in range(3))
    assert all(len(set(ids)) == 1 for ids in single.values())
    assert sum(len(set(ids)) > 1 for ids in multi.values()) >= 20  # 4 views agree by chance 1 time in 64
    assert {i % 4 for ids in multi.values() for i in ids} == {0, 1, 2, 3}


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_caption_sampling_flag_reaches_the_training_dataset(tmp_path, photo, mode):
    """main's --caption-sampling is what the training dataset of a one-view and of a multi-view model uses."""
    reader = multi_caption_reader(tmp_path, photo)
    for model in ("CLIP_VITT16_CLIP", "CL2L_VITT16_CL2L"):
        args = main.parse_args(["--model", model, "--dataset", "synthetic", "--caption-sampling", mode])
        dataset = datasets.build_train_dataset(models.parse_model_name(model), args, reader, 16, caption_ids)
        assert dataset.caption_sampling == mode
    drawn = text_rows(dataset, epochs=4)  # CL2L: weak + 2 strong text views (no stop words in these captions)
    assert all(len(ids) == 3 for ids in drawn.values())
    assert any(len(set(ids)) > 1 for ids in drawn.values()) == (mode == "multi")


# --------------------------------------------------------------------------- muge-sample
@pytest.mark.slow  # the default RBT3 text tower: ~10 s on 2 idle cores
def test_muge_sample_trains_with_chinese_clip(muge_sample_root, tmp_path):
    folder = os.path.join(muge_sample_root, "muge-sample")
    for split in ("train", "valid", "test"):
        for name in (f"{split}_imgs.tsv", f"{split}_texts.jsonl", f"lmdb/{split}/imgs/data.mdb"):
            assert os.path.isfile(os.path.join(folder, name))
    reader = readers.build_reader("muge-sample", "train", data_root=muge_sample_root)
    tsv = readers.build_reader("muge-sample-tsv", "train", data_root=muge_sample_root)
    assert len(reader) == len(tsv) >= 300 and len(reader.image_ids()) >= 150
    assert reader.pair(0) == tsv.pairs[0] and reader.read(0)[1] == tsv.read(0)[1]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in reader.read(0)[1][0])
    summary = main.main(["--model", "CNCLIP_VITT16_CLIP", "--dataset", "muge-sample", "--data-root", muge_sample_root,
                         "--image-size", "32", "--batch-size", "8", "--max-steps", "2", "--workers", "1",
                         "--output-dir", str(tmp_path)])
    assert summary["step"] == 2


def test_b64decode_image_reads_both_alphabets_and_lenient_text_like_the_standard_library():
    """Chinese-CLIP writes urlsafe base64, build_lmdb --resize the standard alphabet, hand-made files may wrap
    lines: every form decodes to the same bytes as `base64.urlsafe_b64decode`; non-base64 raises ValueError."""
    import base64 as stdlib_b64
    import warnings

    raw = bytes(range(256)) * 40  # every byte value: both alphabets' special characters occur
    forms = [stdlib_b64.urlsafe_b64encode(raw), stdlib_b64.b64encode(raw), stdlib_b64.encodebytes(raw),
             stdlib_b64.urlsafe_b64encode(raw).decode("ascii")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated pybase64 alphabet mixing on the fast paths
        for form in forms[:2] + forms[3:]:
            assert readers.b64decode_image(form) == raw
    assert readers.b64decode_image(forms[2]) == stdlib_b64.urlsafe_b64decode(forms[2]) == raw
    with pytest.raises(ValueError):
        readers.b64decode_image(b"a")


def test_normalize_uint8_equals_to_dtype_then_normalize():
    """The fused uint8 -> normalised float step of the training transform equals torchvision's two ops."""
    from torchvision.transforms import v2

    image = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8)
    reference = v2.Normalize(datasets.OPENAI_MEAN, datasets.OPENAI_STD)(
        v2.ToDtype(torch.float32, scale=True)(image))
    fused = datasets.NormalizeUint8(datasets.OPENAI_MEAN, datasets.OPENAI_STD)(image)
    assert fused.dtype == torch.float32 and image.dtype == torch.uint8  # the input is left alone
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        datasets.NormalizeUint8(datasets.OPENAI_MEAN, datasets.OPENAI_STD)(image.float())


# --------------------------------------------------------------------------- one decoder, captions, ids
def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def mode_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """One 40x30 image per stored mode -> (encoded bytes, the RGB pixels the documented rule gives, computed here
    with NumPy: alpha composited on white, 16-bit scaled by 1/257, palette looked up, 1-bit as 0/255)."""
    y, x = np.mgrid[0:30, 0:40]
    rgb = np.stack([x * 6, y * 8, (x + y) * 3], axis=-1).astype(np.uint8)  # (30, 40, 3)
    alpha = ((x * 255) // 39).astype(np.uint8)  # 0 (transparent, red underneath) .. 255
    under = np.zeros_like(rgb)
    under[..., 0] = 255  # what a dropped alpha band shows: red
    grey = rgb[..., 1]

    def on_white(colour: np.ndarray, a: np.ndarray) -> np.ndarray:
        a = a[..., None].astype(np.float64)
        return np.round((colour * a + 255.0 * (255 - a)) / 255).astype(np.uint8)

    rgba = np.where(alpha[..., None] > 0, rgb, under)
    palette = np.array([[0, 0, 0], [250, 20, 30], [20, 200, 40], [10, 30, 220]], dtype=np.uint8)
    index = ((x // 10) % 4).astype(np.uint8)
    p = Image.fromarray(index)
    p.putpalette(palette.ravel().tolist())
    p_transparent = p.copy()
    p_transparent.info["transparency"] = 1  # index 1 transparent
    bits = (x + y) % 3 == 0
    sixteen = (x * 1600 + y * 60).astype(np.uint16)  # up to 64,140: an 8-bit cast would clip most of it to white
    cmyk = Image.fromarray(np.stack([rgb[..., 0], rgb[..., 1], rgb[..., 2], grey // 2], axis=-1), mode="CMYK")
    jpeg_rgb, jpeg_cmyk = encoded(Image.fromarray(rgb), "JPEG", quality=95), encoded(cmyk, "JPEG", quality=95)
    return {
        "RGB": (encoded(Image.fromarray(rgb)), rgb),
        "RGB jpeg": (jpeg_rgb, np.asarray(Image.open(io.BytesIO(jpeg_rgb)))),  # libjpeg's decode is the reference
        "L": (encoded(Image.fromarray(grey)), np.repeat(grey[..., None], 3, axis=-1)),
        "CMYK jpeg": (jpeg_cmyk, np.asarray(Image.open(io.BytesIO(jpeg_cmyk)).convert("RGB"))),  # PIL's CMYK rule
        "RGBA": (encoded(Image.fromarray(np.dstack([rgba, alpha]), mode="RGBA")), on_white(rgb, alpha)),
        "LA": (encoded(Image.fromarray(np.dstack([grey, alpha]), mode="LA")),
               on_white(np.repeat(grey[..., None], 3, axis=-1), alpha)),
        "P": (encoded(p), palette[index]),
        "P transparent": (encoded(p_transparent, transparency=1),
                          np.where((index == 1)[..., None], np.uint8(255), palette[index])),
        "1": (encoded(Image.fromarray(bits)), np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, -1)),
        "I;16": (encoded(Image.fromarray(sixteen)), np.repeat(((sixteen.astype(np.int64) + 128) // 257)
                                                              .astype(np.uint8)[..., None], 3, axis=-1)),
    }


def test_every_mode_gives_the_same_rgb_and_tensor_on_every_path(tmp_path):
    """One decoder: the train readers (tsv, and the LMDB build_lmdb.py writes), the validation and zero-shot readers
    (an image folder through ClassificationDataset) and `eval_retrieval.py extract`'s ImageRecords (tsv and LMDB)
    give the rule's RGB pixels for every stored mode, and the same tensors through both evaluation transforms."""
    import eval_retrieval

    images = mode_images()
    modes = list(images)
    ids = {mode: 700 + k for k, mode in enumerate(modes)}
    write_raw_split(str(tmp_path), "train", {ids[m]: images[m][0] for m in modes},
                    [{"text_id": ids[m], "text": f"图片{k}", "image_ids": [ids[m]]} for k, m in enumerate(modes)])
    build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train"])
    for k, mode in enumerate(modes):  # class folder k holds image k: folder order = mode order
        os.makedirs(tmp_path / "folder" / f"c{k:02d}")
        (tmp_path / "folder" / f"c{k:02d}" / ("a.jpg" if "jpeg" in mode else "a.png")).write_bytes(images[mode][0])
    tsv, lmdb_reader = readers.TsvReader(str(tmp_path), "train"), readers.LmdbReader([str(tmp_path / "lmdb" / "train")])
    folder = readers.ImageFolderReader(str(tmp_path / "folder"))
    assert [folder.label(k) for k in range(len(folder))] == list(range(len(modes)))
    for transform in (datasets.val_transform(24), datasets.squash_transform(24)):
        extract_tsv = eval_retrieval.ImageRecords(str(tmp_path / "train_imgs.tsv"), transform)
        extract_lmdb = eval_retrieval.ImageRecords(str(tmp_path / "lmdb" / "train" / "imgs"), transform)
        zero_shot = datasets.ClassificationDataset(folder, transform)
        for k, mode in enumerate(modes):
            decoded = {"tsv reader": tsv.read(k)[0], "lmdb reader (build_lmdb)": lmdb_reader.read(k)[0],
                       "image folder reader": folder.read(k)[0],
                       "extract (tsv)": eval_retrieval.ImageRecords(str(tmp_path / "train_imgs.tsv"))[k][1]}
            for path, image in decoded.items():
                assert image.mode == "RGB", (mode, path, image.mode)
                assert np.abs(np.asarray(image, dtype=int) - images[mode][1]).max() <= 1, (mode, path)
            tensors = {"train reader + transform": transform(tsv.read(k)[0]),
                       "build_lmdb -> LMDB -> reader + transform": transform(lmdb_reader.read(k)[0]),
                       "zero-shot": zero_shot[k][0], "extract tsv": extract_tsv[k][1],
                       "extract lmdb": extract_lmdb[k][1]}
            assert extract_tsv[k][0] == extract_lmdb[k][0] == ids[mode]
            reference = tensors.pop("train reader + transform")
            for path, tensor in tensors.items():
                assert torch.equal(tensor, reference), (mode, path)


def flat_jpeg(width: int, height: int) -> bytes:
    """A valid baseline greyscale JPEG of one flat grey (128), made in microseconds at any size: one 1-bit Huffman
    code for "DC difference 0" and one for "end of block", so every 8x8 block is 2 zero bits and the entropy-coded
    data is zero bytes (a 14000x13000 image is 711 KB)."""
    import struct

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    one_code = b"\x01" + b"\x00" * 15 + b"\x00"  # one code of length 1, for symbol 0
    blocks = -(-width // 8) * -(-height // 8)
    return (b"\xff\xd8" + segment(0xFFDB, b"\x00" + b"\x01" * 64)
            + segment(0xFFC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
            + segment(0xFFC4, b"\x00" + one_code + b"\x10" + one_code)
            + segment(0xFFDA, b"\x01\x01\x00\x00\x3f\x00") + bytes(-(-blocks * 2 // 8)) + b"\xff\xd9")


def flat_png(width: int, height: int) -> bytes:
    """A valid 8-bit greyscale PNG of one flat black (zlib level 1 over the zero rows: ~0.5 s for 182 Mpx)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, rows = zlib.compressobj(1), bytes((width + 1) * 1000)  # filter byte 0 + the pixels, 1000 rows at a time
    idat = b"".join(z.compress(rows[:(width + 1) * min(1000, height - r)]) for r in range(0, height, 1000))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat + z.flush()) + chunk(b"IEND", b"")


def test_large_jpeg_decodes_by_draft_and_a_large_png_is_refused_by_the_limit(tmp_path, photo):
    """A valid 14000x13000 JPEG (182 Mpx, above PIL's decompression-bomb limit) decodes on every path: libjpeg's DCT
    scaling shrinks it under --max-image-pixels (or to the training draft) before anything is allocated. A 182 Mpx
    PNG cannot be shrunk while decoding: every path refuses it with the same message, a bad sample in training."""
    import eval_retrieval

    big_jpeg, big_png = flat_jpeg(14000, 13000), flat_png(14000, 13000)
    assert Image.open(io.BytesIO(flat_jpeg(40, 24))).convert("L").getextrema() == (128, 128)
    write_raw_split(str(tmp_path), "train", {1: big_jpeg, 2: big_png, 3: jpeg(photo, 3)},
                    [{"text_id": k, "text": f"图{k}", "image_ids": [k]} for k in (1, 2, 3)])
    message = "14000x13000 = 182 Mpx exceeds --max-image-pixels (default 179 Mpx)"
    reader = readers.TsvReader(str(tmp_path), "train")
    image = reader.read(0)[0]
    assert image.size == (7000, 6500) and image.mode == "RGB"  # 1/2: the largest size within 179 Mpx
    assert image.getpixel((3500, 3250)) == (128, 128, 128)
    with pytest.raises(readers.CorruptSample, match=re.escape(f"tsv[1] (image 2, text 2, {tmp_path}/train_imgs.tsv): "
                                                              f"{message}")):
        reader.read(1)
    reader.draft = datasets.draft_for(datasets.train_transform(224, 0.5))
    assert reader.read(0)[0].size == (1750, 1625)  # the training draft goes further: 1/8, sides still >= 366
    records = eval_retrieval.ImageRecords(str(tmp_path / "train_imgs.tsv"), datasets.squash_transform(16))
    assert records[0][1].shape == (3, 16, 16)
    with pytest.raises(readers.CorruptSample, match=re.escape(f"image 2 in {tmp_path}/train_imgs.tsv: {message}")):
        records[1]
    with pytest.raises(SystemExit, match=re.escape(f"train_imgs.tsv:2: {message}")):
        build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train"])
    [counts] = build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train", "--skip-bad"])
    assert counts["images"] == 2 and counts["bad"] == 2  # the PNG line and the text naming it
    # in training it is a bad sample: named, counted, replaced
    dataset = datasets.ImageTextDataset(reader, datasets.squash_transform(16), lambda t: torch.zeros(1, 4),
                                        max_bad_samples=1)
    dataset.bad_samples.reset(0)
    assert [dataset[i][0].shape for i in range(3)] == [(3, 16, 16)] * 3 and dataset.bad_samples.offenders() == [1]


def test_max_image_pixels_flag_reaches_every_path(tmp_path, photo, capfd):
    """--max-image-pixels is one limit for training (a bad sample: named, counted, replaced), build_lmdb.py,
    `eval_retrieval.py extract` and eval_zeroshot.py: a 120x100 PNG (12,000 px) passes at 12000 and is refused
    at 11999."""
    import eval_retrieval

    png = encoded(photo.resize((120, 100)))
    root = tmp_path / "root" / "muge-sample" / "lmdb"
    train = {i: png if i == 5 else jpeg(photo, i) for i in range(8)}
    write_cnclip_lmdb(str(root / "train"), train, [(i, i, f"第{i}张照片") for i in range(8)])
    summary = main.main(TINY_CN + ["--dataset", "muge-sample", "--data-root", str(tmp_path / "root"), "--max-steps",
                                   "1", "--val-dataset", "none", "--max-bad-samples", "3", "--max-image-pixels",
                                   "11999", "--output-dir", str(tmp_path / "exp")])
    assert summary["step"] == 1
    out = capfd.readouterr()
    assert re.search(r"replaced: muge-sample\[5\] \(image 5, text 5, .*/imgs\): 120x100 = 12000 px exceeds "
                     r"--max-image-pixels 11999 \(default 178956970\)", out.out + out.err)
    write_raw_split(str(tmp_path / "raw"), "valid", {1: png}, [{"text_id": 1, "text": "图", "image_ids": [1]}])
    with pytest.raises(SystemExit, match=r"valid_imgs.tsv:1: 120x100 = 12000 px exceeds --max-image-pixels 11999"):
        build_lmdb.main(["--data-dir", str(tmp_path / "raw"), "--splits", "valid", "--max-image-pixels", "11999"])
    build_lmdb.main(["--data-dir", str(tmp_path / "raw"), "--splits", "valid", "--max-image-pixels", "12000"])
    records = eval_retrieval.ImageRecords(str(tmp_path / "raw" / "valid_imgs.tsv"), max_pixels=11999)
    with pytest.raises(readers.CorruptSample, match="image 1 in .*valid_imgs.tsv: 120x100 = 12000 px exceeds"):
        records[0]
    assert eval_retrieval.ImageRecords(str(tmp_path / "raw" / "valid_imgs.tsv"), max_pixels=12000)[0][1].size == \
        (120, 100)
    assert readers.build_reader("muge-sample", "train", data_root=str(tmp_path / "root"),
                                max_pixels=12000).read(5)[0].size == (120, 100)
    import eval_zeroshot

    for parser, argv in [(main.get_args_parser(), []), (eval_retrieval.get_parser(), ["extract", "--output-dir", "o"]),
                         (eval_retrieval.get_parser(), ["run", "--data-dir", "d", "--output-dir", "o"]),
                         (eval_zeroshot.get_parser(), []),
                         (build_lmdb.get_args_parser(), ["--data-dir", "d", "--splits", "s"])]:
        assert parser.parse_args(argv + ["--max-image-pixels", "5"]).max_image_pixels == 5
        assert parser.parse_args(argv).max_image_pixels == readers.DEFAULT_MAX_IMAGE_PIXELS == 178956970


def test_a_caption_that_cannot_be_tokenised_is_a_bad_sample_in_training_and_a_file_line_error_in_building(
        tmp_path, photo):
    """A lone surrogate escaped in valid JSON ("\\ud800") is not text the BERT tokenizer can encode (a TypeError that
    --max-bad-samples did not catch): every reader checks captions the same way (readers.check_captions)."""
    lines = ['{"text_id": 1, "text": "一只猫", "image_ids": [1]}',
             '{"text_id": 2, "text": "\\ud800 坏", "image_ids": [2]}',
             '{"text_id": 3, "text": "一杯咖啡", "image_ids": [3]}']
    assert json.loads(lines[1])["text"] == "\ud800 坏"
    write_raw_split(str(tmp_path), "train", {k: jpeg(photo, k) for k in (1, 2, 3)}, [])
    (tmp_path / "train_texts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"train_texts.jsonl:2: caption 0 is not valid Unicode text \(surrogates not "
                                         r"allowed at character 0"):
        build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train"])
    [counts] = build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train", "--skip-bad"])
    assert counts["texts"] == 2 and counts["bad"] == 1
    # training through the tsv reader with the real Chinese BERT tokenizer: named, counted, replaced
    reader = readers.TsvReader(str(tmp_path), "train")
    with pytest.raises(readers.CorruptSample, match=r"tsv\[1\] \(image 2, text 2, .*\): caption 0 is not valid"):
        reader.read(1)
    dataset = datasets.ImageTextDataset(reader, datasets.squash_transform(16), datasets.build_tokenizer("bert", 52),
                                        max_bad_samples=1)
    dataset.bad_samples.reset(0)
    assert all(dataset[i][1].shape == (52,) for i in range(3)) and dataset.bad_samples.offenders() == [1]
    # the same in an LMDB's pickled pairs and in cc3m-style records
    write_cnclip_lmdb(str(tmp_path / "l"), {1: jpeg(photo, 1)}, [(1, 5, "好\udfff")])
    with pytest.raises(readers.CorruptSample, match=r"lmdb\[0\] .*caption 0 is not valid Unicode"):
        readers.LmdbReader([str(tmp_path / "l")]).read(0)
    os.makedirs(tmp_path / "img")
    (tmp_path / "img" / "0.jpg").write_bytes(jpeg(photo, 0))
    (tmp_path / "meta.jsonl").write_text('{"image_id": "0.jpg", "captions": ["ok", "\\udc80"]}\n')
    with pytest.raises(readers.CorruptSample, match=r"cc3m\[0\] .*caption 1 is not valid Unicode"):
        readers.CaptionRecordsReader(str(tmp_path / "meta.jsonl"), str(tmp_path / "img"), "cc3m", "image_id").read(0)


@pytest.mark.parametrize("field", [b" 7", b"+7", b"1_000", b"07", b"7.0", b"\xef\xbb\xbf7", b"9" * 25])
def test_tsv_image_ids_are_integers_as_str_writes_them(tmp_path, photo, field):
    """`int()` accepts " 7", "+7", "1_000" and "07": one id would have several spellings (and LMDB keys), so the
    readers and the builder refuse them, naming the line (a byte-order mark is accepted at the start of the file
    only)."""
    b64 = base64.b64encode(jpeg(photo, 1))
    (tmp_path / "train_imgs.tsv").write_bytes(b"1\t" + b64 + b"\n" + field + b"\t" + b64 + b"\n")
    (tmp_path / "train_texts.jsonl").write_text('{"text_id": 1, "text": "x", "image_ids": [1]}\n')
    with pytest.raises(readers.DatasetError, match=r"train_imgs.tsv:2: image id .* is not an integer"):
        readers.TsvReader(str(tmp_path), "train")
    with pytest.raises(SystemExit, match=r"train_imgs.tsv:2: image id .* is not an integer"):
        build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train"])


def test_text_ids_are_unique_integers_and_a_byte_order_mark_is_accepted(tmp_path, photo):
    """One id rule in the tsv reader and build_lmdb.py (and `extract` and the scorer, tests/test_eval.py): ids are
    integers (1000.7 or "1000" is an error naming the line, never coerced), unique (a duplicate names both lines),
    and a UTF-8 byte-order mark at the start of a file (Windows editors) is accepted."""
    images = {1000: jpeg(photo, 0), 1001: jpeg(photo, 1)}
    texts = [{"text_id": 1, "text": "猫", "image_ids": [1000]}, {"text_id": 2, "text": "狗", "image_ids": [1001]}]
    write_raw_split(str(tmp_path), "train", images, texts)
    for name in ("train_imgs.tsv", "train_texts.jsonl"):  # a byte-order mark before line 1 of both files
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (tmp_path / name).read_bytes())
    reader = readers.TsvReader(str(tmp_path), "train")
    assert reader.pairs == [(1000, 1, "猫"), (1001, 2, "狗")]
    np.testing.assert_array_equal(np.asarray(reader.read(0)[0]), pixels(images[1000]))
    [counts] = build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train"])
    assert counts["images"] == 2 and counts["texts"] == 2
    assert readers.LmdbReader([str(tmp_path / "lmdb" / "train")]).image_ids() == [1000, 1001]
    for line3, message in [('{"text_id": 1, "text": "又一只猫", "image_ids": [1001]}',
                            r"train_texts.jsonl:3: duplicate text id 1 \(first on line 1\)"),
                           ('{"text_id": 1000.7, "text": "x", "image_ids": [1001]}',
                            r"train_texts.jsonl:3: text_id must be an integer \(int64\), got 1000.7"),
                           ('{"text_id": "1000", "text": "x", "image_ids": [1001]}',
                            r"train_texts.jsonl:3: text_id must be an integer \(int64\), got '1000'"),
                           ('{"text_id": 3, "text": "x", "image_ids": [1001.0]}',
                            r"train_texts.jsonl:3: image_id must be an integer \(int64\), got 1001.0"),
                           ('{"text_id": 3, "text": "x", "image_ids": [' + "9" * 30 + "]}",
                            r"train_texts.jsonl:3: image_id must be an integer \(int64\), got 9999")]:
        with open(tmp_path / "train_texts.jsonl", "a", encoding="utf-8") as f:
            f.write(line3 + "\n")
        with pytest.raises(readers.DatasetError, match=message):
            readers.TsvReader(str(tmp_path), "train")
        with pytest.raises(SystemExit, match=message):
            build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train"])
        lines = (tmp_path / "train_texts.jsonl").read_bytes().splitlines(keepends=True)
        (tmp_path / "train_texts.jsonl").write_bytes(b"".join(lines[:2]))


def test_reader_lookups_in_forked_workers_equal_a_single_process(tmp_path, photo):
    """Every file-backed handle of a reader (the tsv file, yfcc zip shards, LMDB environments) is opened per process:
    two workers forked after the parent read through each give exactly the parent's samples."""
    from conftest import forked_lookups

    n = 24
    images = {100 + i: jpeg(photo, i, 16 + i) for i in range(n)}
    write_raw_split(str(tmp_path), "train", images, [{"text_id": i, "text": f"图{i}", "image_ids": [100 + i]}
                                                     for i in range(n)])
    build_lmdb.main(["--data-dir", str(tmp_path), "--splits", "train"])
    ids = [12345600 + i for i in range(n)]
    for k, image_id in enumerate(ids):
        zpath, member = readers.yfcc_zip_location(str(tmp_path / "yfcc"), image_id)
        os.makedirs(os.path.dirname(zpath), exist_ok=True)
        with zipfile.ZipFile(zpath, "a") as z:
            z.writestr(member, jpeg(photo, k, 16 + k))
    (tmp_path / "meta.tsv").write_text("".join(f"{i}\ttitle {i}\t\n" for i in ids))
    for reader in (readers.TsvReader(str(tmp_path), "train"), readers.LmdbReader([str(tmp_path / "lmdb" / "train")]),
                   readers.YfccReader(str(tmp_path / "meta.tsv"), str(tmp_path / "yfcc"))):
        def sample(i, reader=reader):
            image, captions = reader.read(i)
            return image.tobytes(), image.size, captions

        reader.read(n - 1)  # the parent's handles are open, at the end of the file
        order = list(range(n)) * 8
        reference = [sample(i) for i in order]
        assert forked_lookups(sample, order) == [reference] * 2, type(reader).__name__
