"""Evaluation: the MUGE scorer (hand-computed recalls, the reference script's output, every invalid
submission), top-k against a float64 brute force with ties, extract -> topk -> score end to end on the
real muge-sample dataset, zero-shot metrics and eval_zeroshot.py on digits from a 2-step run."""
import base64
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

import eval_retrieval
import eval_zeroshot
import main
import models
import readers
import weights

GT = [{"text_id": 1, "text": "红色连衣裙", "image_ids": [10]},
      {"text_id": 2, "text": "白色运动鞋", "image_ids": [20, 21]},
      {"text_id": 3, "text": "黑色背包", "image_ids": [30]},
      {"text_id": 4, "text": "没有答案", "image_ids": [40]}]
GALLERY = list(range(10, 60))
# hits: text 1 at rank 1, text 2 at rank 4 (id 21), text 3 at rank 8, text 4 never
PRED = [{"text_id": 1, "image_ids": [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]},
        {"text_id": 2, "image_ids": [11, 12, 13, 21, 14, 15, 16, 17, 18, 19]},
        {"text_id": 3, "image_ids": [11, 12, 13, 14, 15, 16, 17, 30, 18, 19]},
        {"text_id": 4, "image_ids": [11, 12, 13, 14, 15, 16, 17, 18, 19, 22]}]
EXPECTED = {"r1": 25.0, "r5": 50.0, "r10": 75.0, "mean_recall": 50.0}


def write_jsonl(path, rows):
    """rows: dicts (JSON), str lines, or bytes lines written as they are (e.g. another encoding)."""
    with open(path, "wb") as f:
        for row in rows:
            line = row if isinstance(row, bytes) else \
                (row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)).encode("utf-8")
            f.write(line + b"\n")
    return str(path)


def cn_clip_script(name):
    spec = importlib.util.find_spec("cn_clip")
    if spec is None:
        pytest.skip("cn_clip (test-only reference) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "eval", name)


def test_score_hand_computed_and_identical_to_reference_script(tmp_path):
    gt, pred = write_jsonl(tmp_path / "gt.jsonl", GT), write_jsonl(tmp_path / "pred.jsonl", PRED)
    out = tmp_path / "ours.json"
    result = eval_retrieval.score(gt, pred, str(out))
    assert result["success"] is True
    assert result["scoreJson"]["r1"] == pytest.approx(EXPECTED["r1"])
    assert result["scoreJson"]["r5"] == pytest.approx(EXPECTED["r5"])
    assert result["scoreJson"]["r10"] == pytest.approx(EXPECTED["r10"])
    assert result["score"] == result["scoreJson"]["score"] == result["scoreJson"]["mean_recall"] == pytest.approx(50)
    assert list(result) == ["success", "score", "scoreJson"]
    assert list(result["scoreJson"]) == ["score", "mean_recall", "r1", "r5", "r10"]
    # Chinese-CLIP's evaluation.py, run as it is, writes the same JSON
    ref_out = tmp_path / "ref.json"
    proc = subprocess.run([sys.executable, cn_clip_script("evaluation.py"), gt, pred, str(ref_out)],
                          capture_output=True, text=True, check=True)
    assert "finished successfully" in proc.stdout
    assert json.loads(ref_out.read_text()) == json.loads(out.read_text())


def test_score_muge_keys_and_image_to_text(tmp_path):
    muge_gt = [{"query_id": g["text_id"], "query_text": g["text"], "item_ids": g["image_ids"]} for g in GT]
    muge_pred = [{"query_id": p["text_id"], "item_ids": p["image_ids"]} for p in PRED]
    gt, pred = write_jsonl(tmp_path / "q.jsonl", muge_gt), write_jsonl(tmp_path / "p.jsonl", muge_pred)
    assert eval_retrieval.score(gt, pred, str(tmp_path / "o.json"))["scoreJson"]["mean_recall"] == pytest.approx(50)
    # Chinese-CLIP keys in the predictions against MUGE ground truth are accepted too
    pred2 = write_jsonl(tmp_path / "p2.jsonl", PRED)
    assert eval_retrieval.score(gt, pred2, str(tmp_path / "o2.json"))["success"]

    # image->text: ir2tr inverts the annotation (first-seen order), the --tr scorer uses image_id/text_ids
    tr, unlabelled = eval_retrieval.ir_to_tr(write_jsonl(tmp_path / "valid_texts.jsonl", GT))
    assert tr.endswith("valid_texts.tr.jsonl") and unlabelled == 0
    rows = [json.loads(line) for line in open(tr, encoding="utf-8")]
    assert rows == [{"image_id": 10, "text_ids": [1]}, {"image_id": 20, "text_ids": [2]},
                    {"image_id": 21, "text_ids": [2]}, {"image_id": 30, "text_ids": [3]},
                    {"image_id": 40, "text_ids": [4]}]
    texts = list(range(1, 11))
    tr_pred = [{"image_id": 10, "text_ids": texts},  # rank 1
               {"image_id": 20, "text_ids": [5, 6, 2, 1, 3, 4, 7, 8, 9, 10]},  # rank 3
               {"image_id": 21, "text_ids": [5, 6, 7, 8, 9, 10, 1, 3, 4, 2]},  # rank 10
               {"image_id": 30, "text_ids": [1, 2, 4, 5, 6, 7, 8, 9, 10, 11]},  # miss
               {"image_id": 40, "text_ids": [4, 1, 2, 3, 5, 6, 7, 8, 9, 10]}]  # rank 1
    res = eval_retrieval.score(tr, write_jsonl(tmp_path / "tr_pred.jsonl", tr_pred), str(tmp_path / "tr.json"),
                               tr=True)
    assert (res["scoreJson"]["r1"], res["scoreJson"]["r5"], res["scoreJson"]["r10"]) == \
        pytest.approx((40.0, 60.0, 80.0))
    ref_out = tmp_path / "ref_tr.json"
    subprocess.run([sys.executable, cn_clip_script("evaluation_tr.py"), tr, str(tmp_path / "tr_pred.jsonl"),
                    str(ref_out)], capture_output=True, check=True)
    assert json.loads(ref_out.read_text()) == res


def _bad(index, **change):
    rows = [dict(p) for p in PRED]
    rows[index] = {**rows[index], **change}
    return rows


INVALID = {
    "not json": (PRED[:2] + ["{text_id: 3"] + PRED[3:], "line 3: Cannot parse this line into json object"),
    "no text_id": ([{"image_ids": PRED[0]["image_ids"]}] + PRED[1:], "line 1: There exists one line not containing "
                                                                     "text_id"),
    # the reference raises NameError "name 'qid' is not defined" here; we name the value and line
    "string text_id, first line": (_bad(0, text_id="1"), "line 1: Found an invalid text_id '1', it should be an "
                                                         "integer"),
    "string text_id, later line": (_bad(2, text_id="3"), "line 3: Found an invalid text_id '3'"),
    "no image_ids": ([{"text_id": 1}] + PRED[1:], "line 1: There exists one line not containing the predicted "
                                                  "image_ids"),
    "image_ids not a list": (_bad(1, image_ids="10"), "line 2: The image_ids field of text_id 2 is not a list"),
    "wrong length": (_bad(1, image_ids=[10, 11]), "line 2: Text_id 2 has wrong number of predicted image_ids! "
                                                  "Require 10, but 2 founded."),
    "string image id": (_bad(0, image_ids=["10"] + PRED[0]["image_ids"][1:]),
                        "line 1: Text_id 1 has an invalid predicted image_id '10' at rank 1"),
    "bool image id": (_bad(0, image_ids=PRED[0]["image_ids"][:9] + [True]), "at rank 10"),
    "duplicate ids": (_bad(0, image_ids=[10] * 10), "line 1: Text_id 1 has duplicate topk images"),
    "missing query": (PRED[:3], "The following text_ids have no prediction in your submission, please check "
                                "again: 4"),
    "duplicate line": (PRED + [PRED[1]], "line 5: Text_id 2 is predicted twice (first on line 2)"),
    "id not in gallery": (_bad(3, image_ids=PRED[3]["image_ids"][:9] + [999]),
                          "line 4: Text_id 4 predicts image_ids not in the gallery: [999]"),
    # a GBK-encoded line: the reference dies with an uncaught UnicodeDecodeError and writes no JSON
    "not UTF-8": (PRED[:2] + [json.dumps({**PRED[2], "note": "黑色背包"}, ensure_ascii=False).encode("gbk")]
                  + PRED[3:], "pred.jsonl:3: the submission file is not UTF-8 text (byte 0xba at column 80)"),
}
MUGE_GT = [{"query_id": g["text_id"], "query_text": g["text"], "item_ids": g["image_ids"]} for g in GT]
MUGE_PRED = [{"query_id": p["text_id"], "item_ids": p["image_ids"]} for p in PRED]


def _bad_muge(index, **change):
    rows = [dict(p) for p in MUGE_PRED]
    rows[index] = {**rows[index], **change}
    return rows


# the MUGE baseline's keys and wording (Query_id ..., products)
INVALID_MUGE = {
    "no query_id": ([{"item_ids": MUGE_PRED[0]["item_ids"]}] + MUGE_PRED[1:],
                    "line 1: There exists one line not containing query_id"),
    "string query_id": (_bad_muge(1, query_id="2"), "line 2: Found an invalid query_id '2', it should be an integer"),
    "no item_ids": (MUGE_PRED[:2] + [{"query_id": 3}] + MUGE_PRED[3:],
                    "line 3: There exists one line not containing the predicted item_ids"),
    "wrong length": (_bad_muge(0, item_ids=[10]), "line 1: Query_id 1 has wrong number of predicted item_ids! "
                                                  "Require 10, but 1 founded."),
    "string item id": (_bad_muge(2, item_ids=MUGE_PRED[2]["item_ids"][:4] + ["30"] + MUGE_PRED[2]["item_ids"][5:]),
                       "line 3: Query_id 3 has an invalid predicted item_id '30' at rank 5"),
    "duplicate item ids": (_bad_muge(1, item_ids=[11, 12, 13, 21, 14, 15, 16, 17, 18, 11]),
                           "line 2: Query_id 2 has duplicate topk products in your prediction"),
    "missing query": (MUGE_PRED[1:], "The following query_ids have no prediction in your submission, please check "
                                     "again: 1"),
    "duplicate line": (MUGE_PRED + [MUGE_PRED[0]], "line 5: Query_id 1 is predicted twice (first on line 1)"),
    "id not in gallery": (_bad_muge(0, item_ids=[9] + MUGE_PRED[0]["item_ids"][1:]),
                          "line 1: Query_id 1 predicts item_ids not in the gallery: [9]"),
    "not UTF-8": (MUGE_PRED[:3] + [b'{"query_id": 4, "item_ids": [11, 12, 13, 14, 15, 16, 17, 18, 19, 22]} \xff'],
                  "pred.jsonl:4: the submission file is not UTF-8 text (byte 0xff at column 71)"),
}


@pytest.mark.parametrize("keys,case", [("cn_clip", c) for c in INVALID] + [("muge", c) for c in INVALID_MUGE])
def test_score_invalid_submissions(tmp_path, keys, case):
    rows, message = (INVALID if keys == "cn_clip" else INVALID_MUGE)[case]
    gt = write_jsonl(tmp_path / "gt.jsonl", GT if keys == "cn_clip" else MUGE_GT)
    pred = write_jsonl(tmp_path / "pred.jsonl", rows)
    gallery = tmp_path / "gallery.ids.npy"
    np.save(gallery, np.array(GALLERY, dtype=np.int64))
    out = tmp_path / "out.json"
    result = eval_retrieval.score(gt, pred, str(out), gallery=str(gallery))
    assert result == json.loads(out.read_text())
    assert result["success"] is False and result["score"] == 0 and result["scoreJson"] == {}
    assert set(result) == {"errorDetail", "errorMsg", "score", "scoreJson", "success"}
    assert message in result["errorMsg"] and result["errorDetail"] == result["errorMsg"]
    # --strict: a non-zero exit code for scripts; without it 0, as the reference
    argv = ["score", gt, pred, str(out), "--gallery", str(gallery)]
    assert eval_retrieval.main(argv + ["--strict"]) == 1
    assert eval_retrieval.main(argv) == 0


def test_score_missing_file_and_blank_lines(tmp_path):
    gt = write_jsonl(tmp_path / "gt.jsonl", GT)
    res = eval_retrieval.score(gt, str(tmp_path / "nope.jsonl"), str(tmp_path / "o.json"))
    assert res["errorMsg"] == "The submission file is not found!"
    # blank lines are skipped (the reference fails on them with a json error)
    pred = write_jsonl(tmp_path / "pred.jsonl", [PRED[0], "", "   ", *PRED[1:], ""])
    assert eval_retrieval.score(gt, pred, str(tmp_path / "o.json"))["scoreJson"]["mean_recall"] == pytest.approx(50)
    # t2i ground truth scored as i2t names the fix
    res = eval_retrieval.score(gt, pred, str(tmp_path / "o.json"), tr=True)
    assert "score without --tr" in res["errorMsg"] and "gt.jsonl:1" in res["errorMsg"]
    # a ground truth saved in GBK (its Chinese texts), a folder given as the submission, an unreadable
    # gallery: the failure JSON names the file (and line), --strict exits 1
    gbk = write_jsonl(tmp_path / "gt_gbk.jsonl", [json.dumps(g, ensure_ascii=False).encode("gbk") for g in GT])
    for args, message in [((gbk, pred), "gt_gbk.jsonl:1: the ground-truth file is not UTF-8 text (byte 0xba at "
                                        "column 25)"),
                          ((gt, str(tmp_path)), f"{tmp_path}: cannot read the submission file"),
                          ((gt, pred, "--gallery", gbk), f"--gallery {gbk}: cannot read the gallery ids")]:
        out = tmp_path / "failed.json"
        assert eval_retrieval.main(["score", *args[:2], str(out), *args[2:], "--strict"]) == 1
        res = json.loads(out.read_text())
        assert res["success"] is False and res["score"] == 0 and message in res["errorMsg"] == res["errorDetail"]


def brute_force_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    # exact scores: float32 x float32 products are exact in float64 and math.fsum rounds their sum once, so equal
    # vectors get equal scores (a float64 BLAS product may still round duplicate columns apart)
    q64, g64 = queries.astype(np.float64), gallery.astype(np.float64)
    scores = np.array([[math.fsum(q * g) for g in g64] for q in q64])
    idx = np.arange(gallery.shape[0])
    return np.stack([np.lexsort((idx, -row))[:k] for row in scores])  # score desc, then gallery order


def test_topk_matches_float64_brute_force_with_ties():
    rng = np.random.RandomState(0)
    # small integers: every dot product is exact in float32, so ties are real ties
    gallery = rng.randint(-2, 3, size=(300, 8)).astype(np.float32)
    gallery[100:140] = gallery[5]  # 41 identical items: ties across the top-k boundary
    gallery[200] = gallery[7]
    queries = rng.randint(-2, 3, size=(57, 8)).astype(np.float32)
    queries[:5] = gallery[5]
    for chunk_bytes in (4 * 300 * 7, 1 << 20):  # 7 query rows per chunk, and all at once
        got = eval_retrieval.topk_indices(queries, gallery, 10, chunk_bytes)
        assert np.array_equal(got, brute_force_topk(queries, gallery, 10))
    # random unit vectors (no ties): same as float64 up to float32 near-ties, which unit vectors do not have
    g = rng.randn(500, 16).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[rng.choice(500, 40)] + 0.1 * rng.randn(40, 16).astype(np.float32)
    got = eval_retrieval.topk_indices(q, g, 10)
    assert np.array_equal(got, brute_force_topk(q, g, 10))


@pytest.mark.parametrize("Q,G,D,dup", [(6000, 12, 64, 0), (500, 2000, 256, 40)])
def test_topk_memory_bounded_by_max_chunk_bytes(Q, G, D, dup):
    """Many queries against a tiny gallery (the shortlist is the whole gallery: a (chunk, G, D) gather), and a
    larger gallery whose duplicates at the cut force whole-row rescoring: every array numpy allocates stays
    within a few max_chunk_bytes (tracemalloc sees numpy's buffers), and the result is the float64 brute force."""
    import tracemalloc

    rng = np.random.RandomState(3)
    gallery = rng.randint(-2, 3, size=(G, D)).astype(np.float32)  # exact integer scores: real ties
    gallery[G // 2:G // 2 + dup] = gallery[1]
    gallery[-1] = gallery[0]
    queries = rng.randint(-2, 3, size=(Q, D)).astype(np.float32)
    queries[:50] = gallery[1]
    budget = 256 * 2**10
    assert eval_retrieval._query_chunk(Q, G, min(G, 18), D, budget) * max(8 * G, 4 * min(G, 18) * D) <= budget
    tracemalloc.start()
    try:
        got = eval_retrieval.topk_indices(queries, gallery, 10, max_chunk_bytes=budget)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the (Q, k) int64 output, the transposed gallery copy and at most three live intermediates under the budget
    # (before: an 18 MB 6000 x 12 x 64 float32 gather for the tiny gallery, a 2 MB 2000 x 256 one per tie row)
    assert peak <= got.nbytes + gallery.nbytes + 3 * budget, peak
    assert np.array_equal(got, brute_force_topk(queries, gallery, 10))


def test_topk_cli_formats_and_reads_chinese_clip_jsonl(tmp_path):
    rng = np.random.RandomState(1)
    img, txt = rng.randn(30, 4).astype(np.float32), rng.randn(12, 4).astype(np.float32)
    img_ids, txt_ids = np.arange(1000, 1030), np.arange(7, 19)
    eval_retrieval.save_features(str(tmp_path / "i.npy"), img_ids, img, "image_id")
    eval_retrieval.save_features(str(tmp_path / "t.npy"), txt_ids, txt, "text_id")
    for src in ("npy", "jsonl"):
        out = str(tmp_path / f"pred_{src}.jsonl")
        eval_retrieval.main(["topk", "--image-feats", str(tmp_path / f"i.{src}"), "--text-feats",
                             str(tmp_path / f"t.{src}"), "--output", out])
        rows = [json.loads(line) for line in open(out)]
        expect = img_ids[brute_force_topk(txt, img, 10)]
        assert [r["text_id"] for r in rows] == txt_ids.tolist()
        assert [r["image_ids"] for r in rows] == expect.tolist() and list(rows[0]) == ["text_id", "image_ids"]
    out = str(tmp_path / "tr.jsonl")
    eval_retrieval.main(["topk", "--image-feats", str(tmp_path / "i.npy"), "--text-feats", str(tmp_path / "t.npy"),
                         "--output", out, "--tr", "--top-k", "5"])
    rows = [json.loads(line) for line in open(out)]
    assert list(rows[0]) == ["image_id", "text_ids"] and len(rows) == 30
    assert [r["text_ids"] for r in rows] == txt_ids[brute_force_topk(img, txt, 5)].tolist()


@pytest.fixture
def cnclip_tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = models.build_model(models.parse_model_name("CNCLIP_VITT16_CLIP"), image_size=32, embed_dim=32,
                               text_model="BERT-tiny-chinese")
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "epoch": 0, "step": 0,
                "args": {"model": "CNCLIP_VITT16_CLIP", "image_size": 32, "embed_dim": 32,
                         "text_model": "BERT-tiny-chinese", "dataset": "muge-sample"}}, path)
    return str(path), model.eval()


def test_extract_topk_score_end_to_end_on_muge_sample(tmp_path, muge_sample_root, cnclip_tiny_checkpoint):
    ckpt, model = cnclip_tiny_checkpoint
    data = os.path.join(muge_sample_root, "muge-sample")
    out = tmp_path / "run"
    results = eval_retrieval.main(["run", "--resume", ckpt, "--data-dir", data, "--split", "valid",
                                   "--output-dir", str(out), "--device", "cpu"])
    assert results == 0
    summary = json.loads((out / "valid_retrieval.json").read_text())
    # the same numbers from the features with the tensor metric (recall_at_k, stable ties)
    img_ids, img = eval_retrieval.load_features(str(out / "valid.img_feat.npy"))
    txt_ids, txt = eval_retrieval.load_features(str(out / "valid.txt_feat.npy"))
    gt, _ = eval_retrieval.read_reference(os.path.join(data, "valid_texts.jsonl"))
    assert sorted(txt_ids.tolist()) == sorted(gt) and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    col = {i: c for c, i in enumerate(img_ids.tolist())}
    positives = torch.zeros(len(txt_ids), len(img_ids), dtype=torch.bool)
    for r, t in enumerate(txt_ids.tolist()):
        positives[r, [col[i] for i in gt[t]]] = True
    sim = torch.from_numpy(txt) @ torch.from_numpy(img).t()
    expect = eval_retrieval.recall_at_k(sim, positives)
    t2i = summary["text_to_image"]["scoreJson"]
    assert (t2i["r1"], t2i["r5"], t2i["r10"]) == pytest.approx((expect["R@1"], expect["R@5"], expect["R@10"]))
    i2t = summary["image_to_text"]["scoreJson"]
    expect = eval_retrieval.recall_at_k(sim.t(), positives.t())
    assert (i2t["r1"], i2t["r5"], i2t["r10"]) == pytest.approx((expect["R@1"], expect["R@5"], expect["R@10"]))
    # Chinese-CLIP's evaluation.py on the same files writes the identical JSON (non-round fractions)
    ref_out = tmp_path / "ref.json"
    subprocess.run([sys.executable, cn_clip_script("evaluation.py"), os.path.join(data, "valid_texts.jsonl"),
                    str(out / "valid_predictions.jsonl"), str(ref_out)], capture_output=True, check=True)
    assert json.loads(ref_out.read_text()) == summary["text_to_image"]
    # features equal the model's own, through the Chinese-CLIP squash transform of the LMDB images
    first = next(eval_retrieval.iter_image_records(os.path.join(data, "lmdb", "valid", "imgs")))
    from io import BytesIO

    from PIL import Image

    import datasets
    pixels = datasets.squash_transform(32)(Image.open(BytesIO(first[1])))[None]
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)[0].numpy()
    assert np.abs(img[col[first[0]]] - direct).max() < 1e-5
    # the Chinese-CLIP jsonl export carries the same vectors; the tsv gives the same image features
    eval_retrieval.main(["extract", "--resume", ckpt, "--image-data", os.path.join(data, "valid_imgs.tsv"),
                         "--output-dir", str(out / "tsv"), "--jsonl", "--device", "cpu"])
    jl_ids, jl = eval_retrieval.load_features(str(out / "tsv" / "features.img_feat.jsonl"))
    order = [col[i] for i in jl_ids.tolist()]
    assert np.abs(jl - img[order]).max() < 1e-5
    first_line = json.loads(open(out / "tsv" / "features.img_feat.jsonl").readline())
    assert list(first_line) == ["image_id", "feature"] and len(first_line["feature"]) == 32


def test_extract_workers_and_precision(tmp_path, muge_sample_root, cnclip_tiny_checkpoint):
    """`extract -j 2` (DataLoader workers decode and transform) writes the very same ids and features as
    `-j 0`, from the LMDB and from the tsv; bf16 autocast on CPU only when asked, close to fp32; fp16 needs CUDA."""
    ckpt, _ = cnclip_tiny_checkpoint
    data = os.path.join(muge_sample_root, "muge-sample")
    lmdb_imgs, tsv = os.path.join(data, "lmdb", "valid", "imgs"), os.path.join(data, "valid_imgs.tsv")
    texts = os.path.join(data, "valid_texts.jsonl")

    def extract(name, *flags, image_data=lmdb_imgs):
        assert eval_retrieval.main(["extract", "--resume", ckpt, "--image-data", image_data, "--text-data", texts,
                                    "--output-dir", str(tmp_path), "--name", name, "--device", "cpu",
                                    "--img-batch-size", "16", *flags]) == 0
        return [eval_retrieval.load_features(str(tmp_path / f"{name}.{kind}_feat.npy")) for kind in ("img", "txt")]

    (ids0, img0), (tids0, txt0) = extract("w0", "-j", "0")
    (ids2, img2), (tids2, txt2) = extract("w2", "--workers", "2")
    assert ids0.tolist() == ids2.tolist() and np.array_equal(img0, img2)  # 56 images: 3 batches of 16 + 8
    assert tids0.tolist() == tids2.tolist() and np.array_equal(txt0, txt2)
    (ids_t, img_t), _ = extract("tsv", "-j", "2", image_data=tsv)
    row = {i: r for r, i in enumerate(ids0.tolist())}
    assert sorted(ids_t.tolist()) == sorted(ids0.tolist()) and np.array_equal(img_t, img0[[row[i] for i in ids_t]])
    (ids_b, img_b), (_, txt_b) = extract("bf16", "-j", "0", "--precision", "bf16")
    assert ids_b.tolist() == ids0.tolist() and not np.array_equal(img_b, img0)  # autocast did run
    assert np.abs(img_b - img0).max() < 0.05 and np.abs(txt_b - txt0).max() < 0.05
    with pytest.raises(SystemExit, match="fp16 needs CUDA"):
        extract("fp16", "--precision", "fp16")


def test_pool_retrieval_uses_distinct_images_and_texts(muge_sample_root, cnclip_tiny_checkpoint):
    import datasets

    _, model = cnclip_tiny_checkpoint
    reader = readers.build_reader("muge-sample", "test", data_root=muge_sample_root)
    pairs = eval_retrieval.reader_pairs(reader)
    tokenizer = datasets.build_tokenizer("bert", 52)
    metrics = eval_retrieval.pool_retrieval(model, tokenizer, reader, pairs, datasets.val_transform(32),
                                            torch.device("cpu"))
    assert metrics["pool_images"] == len({p[0] for p in pairs}) < len(pairs)
    assert metrics["pool_texts"] == len({p[1] for p in pairs})
    assert 0 <= metrics["text_to_image_R@1"] <= metrics["text_to_image_R@5"] <= metrics["text_to_image_R@10"] <= 100


def test_pool_retrieval_equals_the_scorer_on_the_same_split(tmp_path, muge_sample_root, cnclip_tiny_checkpoint):
    """main.py's validation recall (pool_retrieval over the LMDB reader's pairs) is, value for value, what
    `eval_retrieval.py run` (extract -> topk -> the MUGE scorer, both directions) reports for the same model,
    split and transform."""
    import datasets

    ckpt, model = cnclip_tiny_checkpoint
    reader = readers.build_reader("muge-sample", "test", data_root=muge_sample_root)
    metrics = eval_retrieval.pool_retrieval(model, datasets.build_tokenizer("bert", 52), reader,
                                            eval_retrieval.reader_pairs(reader), datasets.squash_transform(32),
                                            torch.device("cpu"), batch_size=16)  # 56 images: 3 full batches + 8
    out = tmp_path / "run"
    assert eval_retrieval.main(["run", "--resume", ckpt, "--data-dir", os.path.join(muge_sample_root, "muge-sample"),
                                "--split", "test", "--output-dir", str(out), "--device", "cpu", "--workers", "0"]) == 0
    summary = json.loads((out / "test_retrieval.json").read_text())
    n_text, n_image = len(np.load(out / "test.txt_feat.ids.npy")), len(np.load(out / "test.img_feat.ids.npy"))
    assert (metrics["pool_texts"], metrics["pool_images"]) == (n_text, n_image)
    for direction in ("text_to_image", "image_to_text"):
        scored = summary[direction]["scoreJson"]
        for k in (1, 5, 10):  # one query more or less is 100 / n_queries apart
            assert metrics[f"{direction}_R@{k}"] == pytest.approx(scored[f"r{k}"], abs=1e-4), (direction, k)
    assert metrics["text_to_image_mean_recall"] == pytest.approx(summary["text_to_image"]["score"], abs=1e-4)
    assert 0 < summary["text_to_image"]["score"] < 100
    # main.py's per-epoch validation of a pair dataset is this very computation (same transform)
    validation = main.retrieval_metrics(model, datasets.build_tokenizer("bert", 52), reader, 32, torch.device("cpu"))
    assert validation == pytest.approx(metrics, abs=1e-4)


def test_zeroshot_metrics_against_hand_computed_values():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.7, 0.2], [0.0, 0.1, 0.9], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 1, 2, 1])
    # per class recall: class 0: 1/1, class 1: 2/3, class 2: 1/1 -> mean 8/9; top-1 = 4/5
    assert eval_zeroshot.dataset_metric(logits, labels, "mean_per_class") == pytest.approx(100 * 8 / 9)
    assert eval_zeroshot.dataset_metric(logits, labels, "top1") == pytest.approx(80.0)
    assert eval_zeroshot.dataset_metric(logits, labels, "top1_top5") == pytest.approx(90.0)
    binary = torch.tensor([[0.0, 0.3], [0.0, 0.1], [0.0, 0.2], [0.0, 0.4]])
    # scores 0.3, 0.1, 0.2, 0.4 with labels 1, 0, 1, 0: pairs (pos > neg): 0.3>0.1, 0.2>0.1 -> 2 of 4 -> 50
    assert eval_zeroshot.dataset_metric(binary, torch.tensor([1, 0, 1, 0]), "roc_auc") == pytest.approx(50.0)


@pytest.mark.slow
def test_eval_zeroshot_cli_on_digits_from_a_two_step_run(tmp_path):
    exp = tmp_path / "exp"
    args = list(TINY_RUN)
    args[args.index("--dataset") + 1] = "digits"
    main.main(args + ["--output-dir", str(exp), "--name", "run", "--max-steps", "2"])
    ckpt = str(exp / "run" / "checkpoint.pt")
    results = eval_zeroshot.main(["--resume", ckpt, "--datasets", "digits", "--output-dir", str(tmp_path / "zs")])
    written = json.loads((tmp_path / "zs" / "zeroshot_checkpoint.json").read_text())
    assert written["results"] == results and written["model"] == "CLIP_VITT16_CLIP"
    digits = results["digits"]
    assert digits["metric"] == "top1" and digits["score_z"] == digits["acc1_z"] and digits["num_images"] == 359
    # the same number through the functions main.py's validation uses, on the model rebuilt independently
    import datasets

    model, spec, info = weights.load_model_for_eval(resume=ckpt, device="cpu")
    assert info["image_size"] == 32
    loader = torch.utils.data.DataLoader(datasets.ClassificationDataset(readers.build_reader("digits", "test"),
                                                                        datasets.val_transform(32)), batch_size=256)
    classnames, templates = readers.load_labels_and_templates("digits")
    acc = eval_zeroshot.zeroshot_accuracy(model, datasets.build_tokenizer("bpe", 77), classnames, templates, loader,
                                          torch.device("cpu"))
    assert acc["acc1_z"] == pytest.approx(digits["acc1_z"]) and acc["acc5_z"] == pytest.approx(digits["acc5_z"])
    # a zh model picks the Chinese labels of the same dataset
    zh = eval_zeroshot.class_names_and_templates("digits", {"labels": "digits"}, "zh")
    assert (zh.source, zh.language) == ("digits-zh", "zh")
    with pytest.raises(SystemExit, match="1 of 1 datasets failed: nope"):
        eval_zeroshot.main(["--resume", ckpt, "--datasets", "nope"])


def test_eval_model_rebuilt_from_stored_args_with_recipe_options(tmp_path):
    """A CL2L checkpoint with non-default projector options is rebuilt from its args and loads strictly."""
    name = "CL2L_VITT16_CL2L"
    recipe = models.RecipeOptions(clip_proj_type="mlp", clip_hidden_dim=48, cl2l_hidden_dim=40)
    model = models.build_model(models.parse_model_name(name), image_size=32, embed_dim=16, text_layers=1,
                               recipe=recipe)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "args": {"model": name, "image_size": 32, "embed_dim": 16,
                                                      "transformer_layers": 1, "clip_proj_type": "mlp",
                                                      "clip_hidden_dim": 48, "cl2l_hidden_dim": 40}}, path)
    rebuilt, spec, info = weights.load_model_for_eval(resume=str(path), device="cpu")
    assert set(rebuilt.embedding_heads) == {"z", "h"} and info["image_size"] == 32
    with pytest.raises(weights.WeightsError, match="missing keys"):
        torch.save({"model": model.state_dict(), "args": {"model": name, "image_size": 32, "embed_dim": 16,
                                                          "transformer_layers": 1}}, path)
        weights.load_model_for_eval(resume=str(path), device="cpu")


def test_topk_breaks_ties_between_duplicate_float_vectors_by_gallery_order():
    """Duplicated real-valued gallery vectors: a BLAS product may round their scores differently by column
    position; the rescoring makes them exact ties, broken by gallery order as the float64 reference does."""
    rng = np.random.RandomState(0)
    base = rng.randn(50, 512).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    gallery = np.repeat(base, 3, axis=0)  # items 3i, 3i+1, 3i+2 identical
    queries = rng.randn(64, 512).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    # (NumPy's OpenBLAS rounds ~1 % of these duplicate pairs apart in `queries @ gallery.T`)
    got = eval_retrieval.topk_indices(queries, gallery, 60)
    assert np.array_equal(got, brute_force_topk(queries, gallery, 60))


# --------------------------------------------------------------------------- unlabelled queries, malformed input
def labelled_split(n_queries=12, unlabelled=(3, 7, 11)):
    """12 text queries over a 50-image gallery, 3 of them unlabelled (`"image_ids": []`, as MUGE's test texts), and
    perfect predictions (each labelled query's image first)."""
    gt = [{"text_id": q, "text": f"q{q}", "image_ids": [] if q in unlabelled else [10 + q]} for q in range(n_queries)]
    pred = [{"text_id": q, "image_ids": [10 + q] + [i for i in GALLERY if i != 10 + q][:9]} for q in range(n_queries)]
    return gt, pred


def test_unlabelled_queries_are_excluded_and_counted_by_one_rule(tmp_path):
    """3 of 12 queries without ground truth: a perfect model scores 100 (not 75) with "unlabelled_queries": 3; a
    split where no query has ground truth is an error saying so (not a success with 0.0); --strict makes any
    unlabelled query an error. ir2tr and the tensor recall of main.py's validation apply the same rule."""
    gt_rows, pred_rows = labelled_split()
    gt, pred = write_jsonl(tmp_path / "gt.jsonl", gt_rows), write_jsonl(tmp_path / "pred.jsonl", pred_rows)
    out = tmp_path / "out.json"
    result = eval_retrieval.score(gt, pred, str(out))
    assert result["success"] and result["scoreJson"] == {"score": 100.0, "mean_recall": 100.0, "r1": 100.0,
                                                         "r5": 100.0, "r10": 100.0, "unlabelled_queries": 3}
    assert json.loads(out.read_text()) == result
    assert eval_retrieval.main(["score", gt, pred, str(out)]) == 0
    assert eval_retrieval.main(["score", gt, pred, str(out), "--strict"]) == 1
    assert "3 of 12 queries have no ground-truth item (first: id 3)" in json.loads(out.read_text())["errorMsg"]
    none = write_jsonl(tmp_path / "none.jsonl", [{**g, "image_ids": []} for g in gt_rows])
    assert eval_retrieval.main(["score", none, pred, str(out), "--strict"]) == 1
    failed = json.loads(out.read_text())
    assert not failed["success"] and "none of the 12 queries has a ground-truth item: nothing to score" in \
        failed["errorMsg"]
    # ir2tr: texts without an image are counted; none with one is an error, not an empty file
    path, unlabelled = eval_retrieval.ir_to_tr(gt, str(tmp_path / "gt.tr.jsonl"))
    assert unlabelled == 3 and len(open(path).readlines()) == 9
    with pytest.raises(SystemExit, match="ir2tr: .*none of the 12 queries has a ground-truth item"):
        eval_retrieval.main(["ir2tr", "--input", none, "--output", str(tmp_path / "none.tr.jsonl")])
    assert not (tmp_path / "none.tr.jsonl").exists()
    with pytest.raises(SystemExit, match="ir2tr: .*3 of 12 queries have no ground-truth item"):
        eval_retrieval.main(["ir2tr", "--input", gt, "--strict"])
    # the tensor recall of main.py's validation (pool_retrieval / caption_retrieval): the same rule
    sim = torch.eye(4)  # (Q, G): query q is most similar to item q
    positives = torch.eye(4, dtype=torch.bool)
    positives[2, 2] = False  # query 2 has no ground truth
    assert eval_retrieval.recall_at_k(sim, positives) == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0,
                                                         "unlabelled_queries": 1.0}
    with pytest.raises(eval_retrieval.UnlabelledQueries, match="1 of 4 queries have no ground-truth item"):
        eval_retrieval.recall_at_k(sim, positives, strict=True)
    with pytest.raises(eval_retrieval.UnlabelledQueries, match="none of the 4 queries"):
        eval_retrieval.recall_at_k(sim, torch.zeros(4, 4, dtype=torch.bool))


DEEP = "[" * 100_000 + "]" * 100_000  # nesting the json parser cannot follow (a RecursionError)
LONG_INT = "9" * 5000  # beyond Python's 4300-digit int conversion limit (a ValueError, not a JSONDecodeError)


@pytest.mark.parametrize("where", ["ground truth", "predictions", "gallery"])
@pytest.mark.parametrize("value", ["deep", "long"])
def test_scorer_writes_its_failure_json_for_deeply_nested_json_and_too_long_integers(tmp_path, where, value):
    bad = {"deep": '{"text_id": 2, "image_ids": ' + DEEP + "}", "long": '{"text_id": ' + LONG_INT + ', "image_ids": '
           '[20]}'}[value]
    gt_rows, pred_rows = GT, PRED
    if where == "ground truth":
        gt_rows = GT[:1] + [bad] + GT[2:]
    elif where == "predictions":
        pred_rows = PRED[:1] + [bad] + PRED[2:]
    gt, pred = write_jsonl(tmp_path / "gt.jsonl", gt_rows), write_jsonl(tmp_path / "pred.jsonl", pred_rows)
    gallery = write_jsonl(tmp_path / "gallery.jsonl", [{"image_id": i, "feature": [1.0, 0.0]} for i in GALLERY[:3]]
                          + [bad.replace("text_id", "image_id").replace("image_ids", "feature")]
                          if where == "gallery" else [{"image_id": i, "feature": [1.0, 0.0]} for i in GALLERY])
    out = tmp_path / "out.json"
    assert eval_retrieval.main(["score", gt, pred, str(out), "--gallery", gallery, "--strict"]) == 1
    result = json.loads(out.read_text())
    assert result["success"] is False and result["errorMsg"]
    assert {"ground truth": "gt.jsonl:2: cannot parse", "predictions": "line 2: Cannot parse",
            "gallery": "--gallery"}[where] in result["errorMsg"]


def test_scorer_reference_ids_follow_the_id_rule(tmp_path):
    """Ground-truth ids are integers (a string item id would never match a prediction: a silent miss), a query id
    appears once (the reference lets a later line overwrite an earlier one), and a byte-order mark is accepted."""
    pred = write_jsonl(tmp_path / "pred.jsonl", PRED)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + open(write_jsonl(tmp_path / "gt.jsonl", GT), "rb").read())
    assert eval_retrieval.score(str(bom), pred, str(tmp_path / "o.json"))["scoreJson"]["mean_recall"] == \
        pytest.approx(50)
    for rows, message in [(GT[:2] + [{**GT[2], "image_ids": ["30"]}] + GT[3:],
                           "gt.jsonl:3: each of image_ids must be an integer (int64), got '30'"),
                          (GT + [{**GT[1], "image_ids": [11]}], "gt.jsonl:5: duplicate text_id 2 (first on line 2)"),
                          (GT[:1] + [{**GT[1], "text_id": 2.0}] + GT[2:],
                           "gt.jsonl:2: text_id must be an integer (int64), got 2.0")]:
        result = eval_retrieval.score(write_jsonl(tmp_path / "gt.jsonl", rows), pred, str(tmp_path / "o.json"))
        assert not result["success"] and message in result["errorMsg"], result["errorMsg"]


# --------------------------------------------------------------------------- extract: named errors, the id rule
def test_extract_names_a_corrupt_image_and_a_pairs_folder_without_a_traceback(tmp_path, muge_sample_root,
                                                                               cnclip_tiny_checkpoint):
    ckpt, _ = cnclip_tiny_checkpoint
    lines = [f"{i}\t{base64.b64encode(encoded_jpeg(i)).decode()}" for i in range(4)]
    lines[2] = "2\t" + base64.b64encode(b"<html>not an image</html>").decode()
    (tmp_path / "imgs.tsv").write_text("\n".join(lines) + "\n")
    for workers in ("0", "2"):
        with pytest.raises(SystemExit) as raised:
            eval_retrieval.main(["extract", "--resume", ckpt, "--image-data", str(tmp_path / "imgs.tsv"),
                                 "--output-dir", str(tmp_path / "o"), "--device", "cpu", "-j", workers,
                                 "--img-batch-size", "2"])
        assert str(raised.value).startswith(f"extract: image 2 in {tmp_path}/imgs.tsv: undecodable image (")
        assert "Traceback" not in str(raised.value)
    assert not (tmp_path / "o" / "features.img_feat.npy").exists()  # nothing written
    split = os.path.join(muge_sample_root, "muge-sample", "lmdb", "valid")
    for folder, message in [(os.path.join(split, "pairs"), f"{split}/pairs: not an images LMDB (no 'num_images' key); "
                                                           f"it is a pairs LMDB (it has 'num_samples'): give the "
                                                           f"images LMDB beside it, {split}/imgs"),
                            (split, f"{split}: not an LMDB folder (no data.mdb); give its images LMDB, {split}/imgs")]:
        with pytest.raises(SystemExit) as raised:
            eval_retrieval.main(["extract", "--resume", ckpt, "--image-data", folder, "--output-dir",
                                 str(tmp_path / "o"), "--device", "cpu"])
        assert str(raised.value) == f"extract: {message}"


def encoded_jpeg(i: int) -> bytes:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.new("RGB", (20 + i, 16), (40 * i, 90, 200)).save(out, format="JPEG")
    return out.getvalue()


def test_extract_text_ids_follow_the_id_rule(tmp_path, cnclip_tiny_checkpoint):
    """`extract` once cast every text id with np.asarray(..., int64): 1000.7 became 1000 and "1000" 1000, and a
    duplicate id gave two rows that `run` then blamed on the predictions."""
    ckpt, _ = cnclip_tiny_checkpoint
    good = [{"text_id": 1000, "text": "一只猫"}, {"text_id": 1001, "text": "一杯咖啡", "image_ids": []}]

    def extract(rows, prefix=b""):
        path = tmp_path / "texts.jsonl"
        path.write_bytes(prefix + open(write_jsonl(path, rows), "rb").read())
        return eval_retrieval.main(["extract", "--resume", ckpt, "--text-data", str(path), "--output-dir",
                                    str(tmp_path / "o"), "--device", "cpu"])

    assert extract(good, b"\xef\xbb\xbf") == 0  # a byte-order mark before line 1
    assert np.load(tmp_path / "o" / "features.txt_feat.ids.npy").tolist() == [1000, 1001]
    for bad, message in [({"text_id": 1000.7, "text": "x"}, "texts.jsonl:3: text_id must be an integer (int64), got "
                                                             "1000.7"),
                         ({"text_id": "1002", "text": "x"}, "texts.jsonl:3: text_id must be an integer (int64), got "
                                                            "'1002'"),
                         ({"text_id": 1000, "text": "x"}, "texts.jsonl:3: duplicate text id 1000 (first on line 1)")]:
        with pytest.raises(SystemExit) as raised:
            extract(good + [bad])
        assert message in str(raised.value)


# --------------------------------------------------------------------------- non-finite numbers
def test_non_finite_weights_and_features_stop_evaluation(tmp_path, muge_sample_root, cnclip_tiny_checkpoint):
    """One `inf` weight once gave a plausible retrieval table, and NaN feature rows were ranked in gallery order
    with `score --strict` reporting success: every place numbers enter evaluation checks them."""
    ckpt, model = cnclip_tiny_checkpoint
    state = torch.load(ckpt, weights_only=True)
    state["model"]["visual.blocks.0.attn.qkv.weight"][3, 5] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    data = os.path.join(muge_sample_root, "muge-sample")
    n_tensors = sum(v.is_floating_point() for v in model.state_dict().values())
    with pytest.raises(SystemExit, match=re.escape(f"inf.pt: 1 of {n_tensors} weight tensors are not finite (first: "
                                                   "visual.blocks.0.attn.qkv.weight)")):
        eval_retrieval.main(["run", "--resume", str(tmp_path / "inf.pt"), "--data-dir", data, "--output-dir",
                             str(tmp_path / "run"), "--device", "cpu"])
    torch.save({"model": state["model"]}, tmp_path / "inf_weights.pt")  # what `weights.py convert` writes
    with pytest.raises(SystemExit, match=re.escape(f"inf_weights.pt: 1 of {n_tensors} weight tensors are not finite")):
        eval_retrieval.main(["extract", "--pretrained", str(tmp_path / "inf_weights.pt"),
                             "--image-data", os.path.join(data, "valid_imgs.tsv"),
                             "--output-dir", str(tmp_path / "o"), "--device", "cpu"])
    # feature files read by topk
    rng = np.random.RandomState(0)
    img, txt = rng.randn(50, 8).astype(np.float32), rng.randn(4, 8).astype(np.float32)
    img[[13, 40]] = np.nan
    eval_retrieval.save_features(str(tmp_path / "img.npy"), np.array(GALLERY, dtype=np.int64), img, "image_id")
    eval_retrieval.save_features(str(tmp_path / "txt.npy"), np.array([1, 2, 3, 4], dtype=np.int64), txt)
    for feats in ("img.npy", "img.jsonl"):
        with pytest.raises(SystemExit, match=re.escape(f"topk: {tmp_path / feats}: 2 of 50 features are not finite "
                                                       "(first: id 23)")):
            eval_retrieval.main(["topk", "--image-feats", str(tmp_path / feats), "--text-feats",
                                 str(tmp_path / "txt.npy"), "--output", str(tmp_path / "pred.jsonl")])
    assert not (tmp_path / "pred.jsonl").exists()
    # features a model computes, checked before they are written
    broken = models.build_model(models.parse_model_name("CNCLIP_VITT16_CLIP"), image_size=32, embed_dim=32,
                                text_model="BERT-tiny-chinese").eval()
    with torch.no_grad():
        broken.image_projection.weight[0, 0] = float("nan")
    imgs = os.path.join(data, "lmdb", "valid", "imgs")
    with pytest.raises(readers.NonFiniteError, match=f"{imgs}: .* of .* image features are not finite \\(first: id "):
        eval_retrieval.extract_image_features(broken, imgs, 32, torch.device("cpu"), 16)
