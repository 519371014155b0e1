"""Image-text retrieval: recall metrics, feature extraction, top-k predictions and the MUGE scorer.

A query is a hit at K when any of its ground-truth items is among its K most similar gallery items;
R@K is the percent of queries that hit, and the mean recall (MR) averages R@1/5/10. A query without any
ground-truth item (MUGE's test texts, `"image_ids": []`) is unlabelled: excluded from R@K and counted
(`labelled_queries`, the one rule of the scorer, `ir2tr`, `run` and main.py's validation); a split with no
labelled query is an error, and `--strict` makes any unlabelled query one.

Command line (file formats of OFA-Sys/Chinese-CLIP cn_clip/eval/*.py, commit 31863c7):

    python eval_retrieval.py extract --resume CKPT|--pretrained W --image-data DIR_OR_TSV --text-data X.jsonl \
        --output-dir OUT [--jsonl] [--precision fp32|bf16|fp16] [-j WORKERS] [--max-image-pixels N]
    python eval_retrieval.py topk --image-feats F --text-feats F --output PRED.jsonl [--tr] [--top-k 10]
    python eval_retrieval.py score GT.jsonl PRED.jsonl OUT.json [--tr] [--gallery IDS] [--strict]
    python eval_retrieval.py ir2tr --input valid_texts.jsonl [--strict]          # -> valid_texts.tr.jsonl
    python eval_retrieval.py run --resume CKPT --data-dir DIR --split valid --output-dir OUT [--precision P] [-j N] \
        [--strict] [--max-image-pixels N]

Features are L2-normalised float32 `NAME.npy` with the ids in `NAME.ids.npy` (int64), or Chinese-CLIP's
`{"image_id"|"text_id", "feature"}` jsonl. Predictions are `{"text_id", "image_ids"}` (text->image) or
`{"image_id", "text_ids"}` (image->text, `--tr`). The scorer also accepts the MUGE keys
(`query_id`/`item_ids`) and writes the MUGE server's JSON; an unreadable or non-UTF-8 file is a failure
JSON naming the file and line, not a traceback (also for deeply nested JSON and integers too long to parse).
Images are decoded by `readers.decode_image` (the training readers' rule), ids follow the readers' id rule
(integers, never coerced, unique), and non-finite numbers stop evaluation where they enter it: extracted features
before they are written, feature files read by `topk` (`readers.check_finite`).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import readers

if TYPE_CHECKING:  # torch is imported inside the functions that need it: `score`/`ir2tr` start in ~0.1 s
    import torch

log = logging.getLogger("clip_lab")

KS = (1, 5, 10)


def _no_grad(fn):
    """torch.no_grad() as a decorator that imports torch only when the function runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------- the unlabelled-query rule
class UnlabelledQueries(ValueError):
    """A split with no labelled query (nothing to score), or any unlabelled query under --strict."""


def labelled_queries(query_ids: list, n_items: list[int], what: str, strict: bool = False) -> tuple[list[int], int]:
    """The one rule for queries without ground truth, used by the scorer, `ir2tr`, `run` and main.py's validation
    (recall_at_k): query i (named query_ids[i]) with n_items[i] == 0 ground-truth items is unlabelled, excluded from
    R@K and counted. Returns (positions of the labelled queries, number of unlabelled ones).

    Raises UnlabelledQueries when no query is labelled ("<what>: none of the N queries has a ground-truth item:
    nothing to score") or, with `strict`, when any is ("<what>: U of N queries have no ground-truth item (first: id
    X)")."""
    labelled = [i for i, n in enumerate(n_items) if n > 0]
    unlabelled = len(n_items) - len(labelled)
    if not labelled:
        raise UnlabelledQueries(f"{what}: none of the {len(n_items)} queries has a ground-truth item: nothing to "
                                "score (a test split without labels?)")
    if strict and unlabelled:
        first = next(query_ids[i] for i, n in enumerate(n_items) if n == 0)
        raise UnlabelledQueries(f"{what}: {unlabelled} of {len(n_items)} queries have no ground-truth item "
                                f"(first: id {first}); without --strict they are excluded from recall and counted")
    return labelled, unlabelled


# --------------------------------------------------------------------------- metrics on tensors
def recall_at_k(sim: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = KS, what: str = "queries",
                strict: bool = False) -> dict[str, float]:
    """sim (Q, G) similarities, positives (Q, G) bool ground truth -> {"R@k": percent for each k,
    "unlabelled_queries": count}, queries without a positive excluded by `labelled_queries`' rule.

    Ties are broken by gallery order (a stable sort), like Chinese-CLIP's top-k scripts.
    """
    import torch

    counts = positives.sum(dim=1).tolist()  # (Q,) ground-truth items per query
    rows, unlabelled = labelled_queries(list(range(len(counts))), counts, what, strict)
    rows = torch.as_tensor(rows)
    order = torch.sort(sim[rows], dim=1, descending=True, stable=True).indices  # (Q', G)
    hits = torch.gather(positives[rows], 1, order)  # (Q', G) ground truth in ranked order
    return {**{f"R@{k}": float(hits[:, :k].any(dim=1).float().mean() * 100) for k in ks},
            "unlabelled_queries": float(unlabelled)}


def both_directions(sim: torch.Tensor, positives: torch.Tensor) -> dict[str, float]:
    """sim (N, T) image-text similarities, positives (N, T) -> image_to_text_R@k, text_to_image_R@k, their
    unlabelled query counts and mean_recall (the mean of the six recalls)."""
    out = {}
    for direction, (s, p) in (("image_to_text", (sim, positives)), ("text_to_image", (sim.t(), positives.t()))):
        out.update({f"{direction}_{k}": v for k, v in recall_at_k(s, p, what=direction.replace("_to_", "->")).items()})
    out["mean_recall"] = sum(out[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image") for k in KS) / 6
    return out


@_no_grad
def caption_retrieval(model, tokenizer, images: torch.Tensor, captions: list[list[str]],
                      device: torch.device, batch_size: int = 256) -> dict[str, float]:
    """Image<->text recall over the whole pool, where image i has the caption strings captions[i].

    The text gallery holds each distinct caption once; an image's ground truth is all of its
    captions, a caption's ground truth all images it describes. images: (N, 3, H, W). This is the
    real retrieval recall over every image and text of the split, not an in-batch accuracy.
    """
    import torch
    import torch.nn.functional as F

    import models

    texts = sorted({c for caps in captions for c in caps})
    text_index = {t: i for i, t in enumerate(texts)}
    positives = torch.zeros(len(captions), len(texts), dtype=torch.bool)  # (N, T)
    for i, caps in enumerate(captions):
        positives[i, [text_index[c] for c in caps]] = True
    img = torch.cat([F.normalize(model.encode_image(images[i:i + batch_size].to(device)).float(), dim=-1).cpu()
                     for i in range(0, len(images), batch_size)])  # (N, D)
    txt = torch.cat([F.normalize(model.encode_text(
        models.trim_padding(tokenizer(texts[i:i + batch_size])).to(device)).float(),
                                 dim=-1).cpu() for i in range(0, len(texts), batch_size)])  # (T, D)
    sim = img @ txt.t()  # (N, T)
    return both_directions(sim, positives)


def reader_pairs(reader) -> list[tuple[int, int, str]] | None:
    """(image_id, text_id, text) of every sample of a pair reader (LMDB / tsv), or None for other readers."""
    if hasattr(reader, "pair"):
        return [tuple(reader.pair(i)) for i in range(len(reader))]
    if isinstance(getattr(reader, "pairs", None), list):
        return [tuple(p) for p in reader.pairs]
    return None


@_no_grad
def pool_retrieval(model, tokenizer, reader, pairs: list[tuple[int, int, str]], transform, device: torch.device,
                   batch_size: int = 256) -> dict[str, float]:
    """Retrieval recall over the whole validation pool of a pair dataset (MUGE / Chinese-CLIP layout).

    The gallery is every distinct image id and every distinct text id of the split (not the pairs, and
    not a batch): text->image is what the MUGE scorer measures, image->text its `--tr` variant. Images
    are encoded in batches, so memory stays bounded for a 30k-image pool.
    """
    import torch
    import torch.nn.functional as F

    import models

    first_pair: dict[int, int] = {}
    texts: dict[int, str] = {}
    for index, (image_id, text_id, text) in enumerate(pairs):
        first_pair.setdefault(image_id, index)
        texts.setdefault(text_id, text)
    image_ids, text_ids = list(first_pair), list(texts)
    image_row = {i: r for r, i in enumerate(image_ids)}
    text_row = {t: r for r, t in enumerate(text_ids)}
    positives = torch.zeros(len(image_ids), len(text_ids), dtype=torch.bool)  # (N, T)
    for image_id, text_id, _ in pairs:
        positives[image_row[image_id], text_row[text_id]] = True
    img = []
    indices = list(first_pair.values())
    for start in range(0, len(indices), batch_size):
        pixels = torch.stack([transform(reader.read(i)[0]) for i in indices[start:start + batch_size]])
        img.append(F.normalize(model.encode_image(pixels.to(device)).float(), dim=-1).cpu())
    captions = [texts[t] for t in text_ids]
    txt = [F.normalize(model.encode_text(
        models.trim_padding(tokenizer(captions[i:i + batch_size])).to(device)).float(), dim=-1).cpu()
           for i in range(0, len(captions), batch_size)]
    sim = torch.cat(img) @ torch.cat(txt).t()  # (N, T)
    out = both_directions(sim, positives)
    return {**out, "text_to_image_mean_recall": sum(out[f"text_to_image_R@{k}"] for k in KS) / 3,
            "pool_images": float(len(image_ids)), "pool_texts": float(len(text_ids))}


# --------------------------------------------------------------------------- top-k
def topk_indices(queries: np.ndarray, gallery: np.ndarray, k: int = 10, max_chunk_bytes: int = 32 * 2**20,
                 margin: int = 8, tie_tol: float = 1e-5) -> np.ndarray:
    """(Q, D) queries, (G, D) gallery (float32) -> (Q, k) int64 gallery indices by descending dot product.

    Ties are broken by gallery order (lower index first), as the stable sort of Chinese-CLIP's
    make_topk_predictions does. NumPy only (no torch import: the `topk` process starts in 0.1 s, not 1.6 s).
    A BLAS matrix product may round the scores of two identical gallery vectors differently (the result
    depends on a column's place in the kernel's tile), so the product only shortlists the k + margin best
    of each query; those are rescored one dot product at a time (identical vectors, identical scores) and
    ordered by (score descending, index ascending). A query with more than `margin` scores within `tie_tol`
    of its k-th (many duplicates at the cut) is rescored over the whole gallery, in gallery blocks.
    Every intermediate array (the (C, G) scores, argpartition's (C, G) int64 indices, the (C, n, D) gathered
    shortlist, a rescored block) stays under `max_chunk_bytes`, except that one query row always fits; the
    only other allocations are the output and a transposed copy of the gallery.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    Q, G, D = queries.shape[0], gallery.shape[0], gallery.shape[1]
    k = min(k, G)
    shortlist = min(G, k + margin)
    chunk = _query_chunk(Q, G, shortlist, D, max_chunk_bytes)
    gallery_t = np.ascontiguousarray(gallery.T)  # (D, G)
    out = np.empty((Q, k), dtype=np.int64)
    for start in range(0, Q, chunk):
        q = queries[start:start + chunk]  # (C, D)
        scores = q @ gallery_t  # (C, G)
        if shortlist < G:
            cand = np.argpartition(scores, G - shortlist, axis=1)[:, G - shortlist:]  # (C, n) unordered
        else:
            cand = np.broadcast_to(np.arange(G), scores.shape)
        out[start:start + chunk] = _rank_exactly(q, gallery, cand, k)
        if shortlist < G:  # the shortlist's last score within tie_tol of the k-th: rescore the whole row
            short_scores = np.sort(np.take_along_axis(scores, cand, axis=1), axis=1)  # (C, n) ascending
            for row in np.nonzero(short_scores[:, -k] - short_scores[:, 0] <= tie_tol)[0]:
                out[start + row] = _rank_row_exactly(q[row], gallery, k, max_chunk_bytes)
    return out


def _query_chunk(Q: int, G: int, n: int, D: int, max_chunk_bytes: int) -> int:
    """Query rows per chunk: the (C, G) float32 scores and int64 argpartition indices and the (C, n, D)
    float32 shortlist gather all fit in `max_chunk_bytes` (at least one row)."""
    per_row = max(8 * G, 4 * n * D, 1)
    return max(1, min(Q, max_chunk_bytes // per_row))


def _rank_exactly(q: np.ndarray, gallery: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """(C, D) queries, (C, n) candidate indices -> (C, k) of them by (dot product desc, index asc), each dot
    product computed on its own (einsum's loop, not BLAS), so equal vectors score equally."""
    exact = np.einsum("cd,cnd->cn", q, gallery[cand])  # (C, n)
    order = np.lexsort((cand, -exact), axis=-1)[:, :k]  # last key primary: score desc, then index asc
    return np.take_along_axis(cand, order, axis=1)


def _rank_row_exactly(q: np.ndarray, gallery: np.ndarray, k: int, max_chunk_bytes: int) -> np.ndarray:
    """(D,) query -> (k,) indices over the whole gallery by (dot product desc, index asc): the exact scores
    of `_rank_exactly`, in gallery blocks of at most `max_chunk_bytes`."""
    G, D = gallery.shape
    block = max(1, max_chunk_bytes // (4 * D))
    exact = np.concatenate([np.einsum("cd,cnd->cn", q[None], gallery[None, s:s + block])[0]
                            for s in range(0, G, block)])  # (G,)
    return np.lexsort((np.arange(G), -exact))[:k]


# --------------------------------------------------------------------------- feature files
def ids_path(features_path: str) -> str:
    """`NAME.npy` -> `NAME.ids.npy`, where the ids of a feature array are stored."""
    if not features_path.endswith(".npy"):
        raise ValueError(f"{features_path}: feature arrays end in .npy")
    return features_path[:-len(".npy")] + ".ids.npy"


def save_features(path: str, ids: np.ndarray, feats: np.ndarray, id_key: str | None = None) -> None:
    """Write `path` (.npy, float32 (N, D)) and its ids (int64 (N,)); with `id_key` also Chinese-CLIP jsonl."""
    np.save(path, feats.astype(np.float32))
    np.save(ids_path(path), ids.astype(np.int64))
    if id_key:
        with open(path[:-len(".npy")] + ".jsonl", "w", encoding="utf-8") as f:
            for i, v in zip(ids.tolist(), feats.tolist()):
                f.write(json.dumps({id_key: i, "feature": v}) + "\n")


def load_features(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read (ids int64 (N,), features float32 (N, D)) from our .npy pair or Chinese-CLIP's jsonl (ids by the readers'
    id rule, unique). A NaN or infinite feature is a readers.NonFiniteError naming the first id; a malformed line a
    ValueError naming file:line."""
    if path.endswith(".npy"):
        feats = np.load(path, mmap_mode="r")
        ids = np.load(ids_path(path))
        if feats.ndim != 2 or len(ids) != len(feats) or ids.dtype != np.int64:
            raise ValueError(f"{path}: features {feats.shape} do not match {len(ids)} int64 ids in {ids_path(path)} "
                             f"({ids.dtype})")
        feats = np.array(feats, dtype=np.float32)  # a writable in-memory copy
        if len(np.unique(ids)) != len(ids):
            raise readers.DatasetError(f"{ids_path(path)}: duplicate ids, e.g. {_first_duplicate(ids.tolist())}")
    else:
        ids, feats = _load_features_jsonl(path)
    readers.check_finite(feats, ids, "features", path)
    return ids, feats


def _first_duplicate(values: list) -> object:
    seen = set()
    return next(v for v in values if v in seen or seen.add(v))


def _load_features_jsonl(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Chinese-CLIP's `{"image_id"|"text_id"|"query_id", "feature"}` lines -> (ids (N,), features (N, D))."""
    rows = []
    unique = readers.UniqueIds(path, "id")
    with readers.open_lines(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"{where}: malformed json ({exc})") from None
            key = next((k for k in ("image_id", "text_id", "query_id") if isinstance(obj, dict) and k in obj), None)
            if key is None or "feature" not in obj or not isinstance(obj["feature"], list):
                raise ValueError(f"{where}: a feature line needs image_id/text_id and a feature list")
            unique.add(readers.json_id(obj[key], where, key), lineno)
            rows.append(obj["feature"])
    try:
        feats = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    except (ValueError, TypeError) as exc:  # ragged rows, strings
        raise ValueError(f"{path}: feature lists of different lengths or non-numbers ({exc})") from None
    return np.fromiter(unique.lines, dtype=np.int64, count=len(unique)), feats


def write_predictions(path: str, query_ids: np.ndarray, gallery_ids: np.ndarray, idx: np.ndarray,
                      tr: bool = False) -> None:
    """One `{"text_id", "image_ids"}` (or `{"image_id", "text_ids"}` with tr) line per query, in query order."""
    qkey, gkey = ("image_id", "text_ids") if tr else ("text_id", "image_ids")
    ranked = gallery_ids[np.asarray(idx)].tolist()  # (Q, k)
    with open(path, "w", encoding="utf-8") as f:
        for q, row in zip(query_ids.tolist(), ranked):
            f.write(json.dumps({qkey: q, gkey: row}) + "\n")


def make_topk(image_feats: str, text_feats: str, output: str, top_k: int = 10, tr: bool = False) -> dict:
    """Load both feature files, rank, write the prediction jsonl; returns timings in seconds."""
    t0 = time.perf_counter()
    image_ids, images = load_features(image_feats)
    text_ids, texts = load_features(text_feats)
    t1 = time.perf_counter()
    queries, gallery, qids, gids = (images, texts, image_ids, text_ids) if tr else (texts, images, text_ids, image_ids)
    idx = topk_indices(queries, gallery, top_k)
    t2 = time.perf_counter()
    write_predictions(output, qids, gids, idx, tr)
    return {"load_s": t1 - t0, "topk_s": t2 - t1, "write_s": time.perf_counter() - t2}


# --------------------------------------------------------------------------- MUGE scorer
class SubmissionError(Exception):
    """An invalid ground-truth or prediction file; the message names the file, line and id."""


@dataclass(frozen=True)
class Keys:
    """Field names of one direction and one key convention."""

    query: str
    items: str
    label: str  # how messages name a query ("Text_id", "Image_id", "Query_id")
    item_word: str  # "images", "texts", "products"


T2I, I2T, MUGE = Keys("text_id", "image_ids", "Text_id", "images"), \
    Keys("image_id", "text_ids", "Image_id", "texts"), Keys("query_id", "item_ids", "Query_id", "products")


def iter_jsonl(path: str, what: str) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, parsed object or None when the line is not JSON, raw line); blank lines and a UTF-8
    byte-order mark at the start of the file are skipped. Not JSON includes nesting too deep for the parser and
    integers too long to convert (Python's 4300-digit limit)."""
    if not os.path.exists(path):
        raise SubmissionError(f"The {what} file is not found!" + ("" if what == "submission" else f" ({path})"))
    try:
        # undecodable bytes become lone surrogates (the reference's UnicodeDecodeError names no line), so the
        # line that is not UTF-8 is found below; newline handling stays Python's universal newlines
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError as exc:
                    byte = ord(line[exc.start]) - 0xDC00
                    raise SubmissionError(f"{path}:{lineno}: the {what} file is not UTF-8 text (byte 0x{byte:02x} "
                                          f"at column {exc.start + 1}); save it as UTF-8") from None
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, as is a too long integer
                    obj = None
                yield lineno, obj, line
    except OSError as exc:  # a folder, no permission, an I/O error
        raise SubmissionError(f"{path}: cannot read the {what} file: {exc.strerror or exc}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_reference(path: str, tr: bool = False) -> tuple[dict[int, list[int]], Keys]:
    """Ground truth {query id: [item ids]}, ids by the readers' id rule: integers (int64; a 1000.7 or "1000" is an
    error naming the line, never coerced), a query id at most once (the MUGE reference lets a later line overwrite
    an earlier one silently)."""
    reference, keys, first_line = {}, None, {}
    for lineno, obj, line in iter_jsonl(path, "ground-truth"):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise SubmissionError(f"{where}: cannot parse this ground-truth line into a json object: {line}")
        if keys is None:
            keys = I2T if tr else (MUGE if "query_id" in obj and "text_id" not in obj else T2I)
        if keys.query not in obj or keys.items not in obj:
            other = "image_ids" if tr else "text_ids"
            hint = f" (it has {other}: use {'score without --tr' if tr else 'score --tr'})" if other in obj else ""
            raise SubmissionError(f"{where}: a ground-truth line needs {keys.query} and {keys.items}{hint}: {line}")
        if not isinstance(obj[keys.items], list):
            raise SubmissionError(f"{where}: {keys.query} must be an integer and {keys.items} a list: {line}")
        try:
            qid = readers.json_id(obj[keys.query], where, keys.query)
            items = readers.json_ids(obj[keys.items], where, f"each of {keys.items}")
        except readers.DatasetError as exc:
            raise SubmissionError(str(exc)) from None
        if qid in first_line:
            raise SubmissionError(f"{where}: duplicate {keys.query} {qid} (first on line {first_line[qid]})")
        first_line[qid], reference[qid] = lineno, items
    if keys is None:
        raise SubmissionError(f"{path}: the ground-truth file has no queries")
    return reference, keys


def read_submission(path: str, reference: dict, keys: Keys, k: int = 10,
                    gallery: set[int] | None = None) -> dict[int, list[int]]:
    """Validate the prediction file line by line (the reference's checks, plus duplicate lines, ids not in
    the gallery and a correct message for a non-integer query id); returns {query id: [k item ids]}."""
    submission: dict[int, list[int]] = {}
    first_line: dict[int, int] = {}
    q, items, label = keys.query, keys.items, keys.label
    for lineno, obj, line in iter_jsonl(path, "submission"):
        where = f"line {lineno}"
        if not submission and isinstance(obj, dict) and keys in (T2I, MUGE) and q not in obj:
            other = MUGE if keys is T2I else T2I  # predictions may use either convention
            if other.query in obj:
                keys, q, items, label = other, other.query, other.items, other.label
        if not isinstance(obj, dict):
            raise SubmissionError(f"{where}: Cannot parse this line into json object: {line}")
        if q not in obj:
            raise SubmissionError(f"{where}: There exists one line not containing {q}: {line}")
        qid = obj[q]
        if not _is_int(qid):
            raise SubmissionError(f"{where}: Found an invalid {q} {qid!r}, it should be an integer (not string), "
                                  "please check your schema")
        if items not in obj:
            raise SubmissionError(f"{where}: There exists one line not containing the predicted {items}: {line}")
        ids = obj[items]
        if not isinstance(ids, list):
            raise SubmissionError(f"{where}: The {items} field of {q} {qid} is not a list, please check your schema")
        if len(ids) != k:
            raise SubmissionError(f"{where}: {label} {qid} has wrong number of predicted {items}! "
                                  f"Require {k}, but {len(ids)} founded.")
        for rank, item in enumerate(ids):
            if not _is_int(item):
                raise SubmissionError(f"{where}: {label} {qid} has an invalid predicted {items[:-1]} {item!r} at "
                                      f"rank {rank + 1}, it should be an integer (not string), please check your "
                                      "schema")
        if len(set(ids)) != k:
            raise SubmissionError(f"{where}: {label} {qid} has duplicate topk {keys.item_word} in your prediction. "
                                  "Pleace check again!")
        if gallery is not None:
            unknown = [item for item in ids if item not in gallery]
            if unknown:
                raise SubmissionError(f"{where}: {label} {qid} predicts {items[:-1]}s not in the gallery: "
                                      f"{unknown[:10]}")
        if qid in first_line:
            raise SubmissionError(f"{where}: {label} {qid} is predicted twice (first on line {first_line[qid]}); "
                                  "each query needs exactly one line")
        first_line[qid] = lineno
        submission[qid] = ids
    missing = [qid for qid in reference if qid not in submission]
    if missing:
        raise SubmissionError(f"The following {q}s have no prediction in your submission, please check again: "
                              + ", ".join(str(i) for i in missing))
    extra = len(submission.keys() - reference.keys())
    if extra:
        log.warning("%s: %d predicted %ss are not in the ground truth and are ignored", path, extra, q)
    return submission


def compute_recalls(reference: dict, predictions: dict, ks: tuple[int, ...] = KS, what: str = "queries",
                    strict: bool = False) -> dict[str, float]:
    """MUGE metric: R@K = fraction of the labelled ground-truth queries with any gt id in the top K, MR = mean of
    R@1/5/10; unlabelled queries (no gt id) are excluded and counted (`labelled_queries`).

    Returned x100 with the reference's exact float operations (fraction, mean, then x100), so the JSON is
    bit-identical to the MUGE/Chinese-CLIP evaluator's on a split where every query is labelled."""
    qids = list(reference)
    rows, unlabelled = labelled_queries(qids, [len(reference[q]) for q in qids], what, strict)
    hits = dict.fromkeys(ks, 0)
    for qid in (qids[i] for i in rows):
        pred = predictions[qid]
        for k in ks:
            hits[k] += any(g in pred[:k] for g in set(reference[qid]))
    r = {k: hits[k] * 1.0 / len(rows) for k in ks}
    mean_recall = sum(r[k] for k in ks) / float(len(ks))
    return {"mean_recall": mean_recall * 100, **{f"r{k}": r[k] * 100 for k in ks}, "unlabelled_queries": unlabelled}


def load_gallery_ids(path: str) -> set[int]:
    """Gallery ids from an ids .npy, a features file (.npy/.jsonl with image_id/text_id) or an LMDB/tsv."""
    if path.endswith(".ids.npy"):
        return set(np.load(path).tolist())
    if path.endswith(".npy") or path.endswith(".jsonl"):
        return set(load_features(path)[0].tolist())
    return set(iter_image_ids(path))


def _lmdb_error() -> type[Exception]:
    import lmdb

    return lmdb.Error


def score(gt_path: str, pred_path: str, out_path: str, tr: bool = False, gallery: str | None = None,
          k: int = 10, strict: bool = False) -> dict:
    """Score a prediction file like the MUGE server; writes and returns its JSON (success or failure). Unlabelled
    queries are excluded and counted (`"unlabelled_queries": N` in scoreJson when N > 0, so that a fully labelled
    split gives the reference's JSON); with `strict` any unlabelled query is a failure."""
    try:
        reference, keys = read_reference(gt_path, tr)
        try:
            gallery_ids = load_gallery_ids(gallery) if gallery else None
        except (OSError, ValueError, RecursionError, _lmdb_error()) as exc:  # UnicodeDecodeError, a bad jsonl
            raise SubmissionError(f"--gallery {gallery}: cannot read the gallery ids: {type(exc).__name__}: "
                                  f"{exc}") from None
        predictions = read_submission(pred_path, reference, keys, k, gallery_ids)
        direction = "image->text" if keys is I2T else "text->image"
        r = compute_recalls(reference, predictions, what=f"{gt_path} ({direction})", strict=strict)
        result = {"success": True, "score": r["mean_recall"],
                  "scoreJson": {"score": r["mean_recall"], "mean_recall": r["mean_recall"],
                                "r1": r["r1"], "r5": r["r5"], "r10": r["r10"]}}
        if r["unlabelled_queries"]:
            result["scoreJson"]["unlabelled_queries"] = r["unlabelled_queries"]
    except (SubmissionError, UnlabelledQueries) as exc:
        msg = exc.args[0]
        result = {"errorDetail": msg, "errorMsg": msg, "score": 0, "scoreJson": {}, "success": False}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def ir_to_tr(input_path: str, output_path: str | None = None, gallery_ids: list[int] | None = None,
             strict: bool = False) -> tuple[str, int]:
    """Text->image annotations to image->text (`X.jsonl` -> `X.tr.jsonl`, images in first-seen order); texts
    without an image are unlabelled (`labelled_queries`: counted, an error when no text has one, or any with
    `strict`). With `gallery_ids`, every gallery image without a text gets a `"text_ids": []` line, so the scorer
    counts it as an unlabelled image->text query. Returns (output path, unlabelled texts). Raises SubmissionError."""
    output_path = output_path or input_path.removesuffix(".jsonl") + ".tr.jsonl"
    reference, _ = read_reference(input_path)
    qids = list(reference)
    try:
        _, unlabelled = labelled_queries(qids, [len(reference[q]) for q in qids], f"{input_path} (texts)", strict)
    except UnlabelledQueries as exc:
        raise SubmissionError(str(exc)) from None
    t2i: dict[int, list[int]] = {}
    for text_id, image_ids in reference.items():
        for image_id in image_ids:
            t2i.setdefault(image_id, []).append(text_id)
    for image_id in gallery_ids or []:
        t2i.setdefault(image_id, [])
    with open(output_path, "w", encoding="utf-8") as f:
        for image_id, text_ids in t2i.items():
            f.write(json.dumps({"image_id": image_id, "text_ids": text_ids}) + "\n")
    return output_path, unlabelled


# --------------------------------------------------------------------------- extraction
class ImageRecords:
    """Random access to the images of an LMDB `imgs` folder (key order, as Chinese-CLIP walks it; readers.LmdbImages)
    or a `<id>\\t<base64>` tsv (file order; readers.TsvImages): item i -> (image id, transform(RGB image)), the image
    decoded by `readers.decode_image` (the training readers' rule and --max-image-pixels).

    The ids are listed once; LMDB environments and files are opened lazily in each process, so DataLoader workers
    decode and transform in parallel. A corrupt or too large image is a readers.CorruptSample "image <id> in <path>:
    ...", returned (not raised) by `item` so that a DataLoader worker hands it to the main process intact."""

    def __init__(self, path: str, transform=None, max_pixels: int = readers.DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.path, self.transform, self.max_pixels = path, transform, max_pixels
        self.images = readers.LmdbImages(path) if os.path.isdir(path) else readers.TsvImages(path)
        self.ids = self.images.image_ids()

    def __len__(self) -> int:
        return len(self.ids)

    def raw(self, index: int) -> bytes:
        """The encoded image bytes of item `index`."""
        return self.images.image_bytes(self.ids[index])

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = readers.read_image(lambda: self.raw(index), f"image {image_id} in {self.path}",
                                   max_pixels=self.max_pixels)
        return image_id, (self.transform(image) if self.transform else image)

    def item(self, index: int):
        """`self[index]`, or the CorruptSample it raises."""
        try:
            return self[index]
        except readers.CorruptSample as exc:
            return exc


def _collate_or_error(batch: list):
    """default_collate, or the first CorruptSample of the batch (re-raised by the main process)."""
    from torch.utils.data import default_collate

    return next((item for item in batch if isinstance(item, Exception)), None) or default_collate(batch)


class _Items:
    """ImageRecords.item as a map-style dataset (a corrupt image travels from a worker as a value)."""

    def __init__(self, records: ImageRecords) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return self.records.item(index)


def iter_image_records(path: str) -> Iterator[tuple[int, bytes]]:
    """(image id, encoded image bytes) from an LMDB `imgs` folder (key order) or a `<id>\\t<base64>` tsv."""
    records = ImageRecords(path)
    for index, image_id in enumerate(records.ids):
        yield image_id, records.raw(index)


def iter_image_ids(path: str) -> Iterator[int]:
    """The image ids of an LMDB `imgs` folder or a tsv, without decoding the images."""
    yield from ImageRecords(path).ids


def _progress(iterable, desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not sys.stderr.isatty(), mininterval=5)


PRECISIONS = ("fp32", "bf16", "fp16")


def default_workers() -> int:
    """DataLoader workers of `extract`: up to 4, never more than the usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores)


@_no_grad
def extract_image_features(model, path: str, image_size: int, device: torch.device, batch_size: int = 64,
                           head: str = "z", workers: int = 0, precision: str = "fp32",
                           max_pixels: int = readers.DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,), L2-normalised features (N, D)) of every image of an LMDB imgs folder or tsv, in its order.

    `workers` DataLoader processes decode and transform (the squash transform) while the model runs; the
    batches, hence the features, are the same for any number of workers. A corrupt or too large image raises
    readers.CorruptSample naming its id and file; an empty or misnamed source a readers.DatasetError; a NaN or
    infinite feature a readers.NonFiniteError (nothing is written)."""
    import torch
    import torch.nn.functional as F

    import datasets
    import utils

    records = ImageRecords(path, datasets.squash_transform(image_size), max_pixels)
    if not len(records):
        raise readers.DatasetError(f"{path}: no images")
    loader = datasets.eval_loader(_Items(records), batch_size, workers, pin_memory=device.type == "cuda",
                                  collate_fn=_collate_or_error)
    ids, feats = [], []
    for batch in _progress(loader, "images", total=len(loader)):
        if isinstance(batch, Exception):
            raise batch
        batch_ids, pixels = batch  # (B,), (B, 3, R, R)
        with utils.autocast(precision, device):
            out = model.encode_image(pixels.to(device, non_blocking=True), head=head)
        feats.append(F.normalize(out.float(), dim=-1).cpu().numpy())
        ids.append(torch.as_tensor(batch_ids).numpy())
    ids, feats = np.concatenate(ids).astype(np.int64), np.concatenate(feats)
    readers.check_finite(feats, ids, "image features", path)
    return ids, feats


@_no_grad
def extract_text_features(model, tokenizer, path: str, device: torch.device, batch_size: int = 64,
                          head: str = "z", precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,), L2-normalised features (N, D)) of every `{"text_id", "text"}` line of a jsonl (ids by the readers'
    id rule, unique; a text that is not valid Unicode a readers.CorruptSample naming file:line; a NaN or infinite
    feature a readers.NonFiniteError)."""
    import torch.nn.functional as F

    import models
    import utils

    ids, texts = readers.UniqueIds(path, "text id"), []
    with readers.open_lines(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                where = f"{path}:{lineno}"
                text_id, text, _ = readers.parse_text_record(line, where, need_image_ids=False)
                ids.add(text_id, lineno)
                texts.extend(readers.check_captions([text], where))
    if not texts:
        raise readers.DatasetError(f"{path}: no texts")
    feats = []
    for i in _progress(range(0, len(texts), batch_size), "texts"):
        tokens = models.trim_padding(tokenizer(texts[i:i + batch_size])).to(device)  # (B, L')
        with utils.autocast(precision, device):
            out = model.encode_text(tokens, head=head)
        feats.append(F.normalize(out.float(), dim=-1).cpu().numpy())
    ids, feats = np.fromiter(ids.lines, dtype=np.int64, count=len(ids)), np.concatenate(feats)
    readers.check_finite(feats, ids, "text features", path)
    return ids, feats


def extract(args: argparse.Namespace) -> dict[str, str]:
    """`extract` subcommand: image and/or text features of a model into --output-dir; returns the paths."""
    import datasets
    import weights

    try:
        model, spec, info = weights.load_model_for_eval(resume=args.resume, pretrained=args.pretrained,
                                                        model_name=args.model, device=args.device)
    except weights.WeightsError as exc:  # a corrupt, unsafe, non-finite or foreign checkpoint
        raise SystemExit(f"{args.command}: {exc}") from None
    device = next(model.parameters()).device
    os.makedirs(args.output_dir, exist_ok=True)
    paths = {}
    stem = args.name or "features"
    if args.image_data:
        t0 = time.perf_counter()
        ids, feats = extract_image_features(model, args.image_data, info["image_size"], device, args.img_batch_size,
                                            workers=args.workers, precision=args.precision,
                                            max_pixels=args.max_image_pixels)
        paths["image"] = os.path.join(args.output_dir, f"{stem}.img_feat.npy")
        save_features(paths["image"], ids, feats, "image_id" if args.jsonl else None)
        log.info("%d image features (%.1f images/s, %s, %d workers) stored in %s", len(ids),
                 len(ids) / (time.perf_counter() - t0), args.precision, args.workers, paths["image"])
    if args.text_data:
        tokenizer = datasets.build_tokenizer(spec.base.tokenizer, info["context_length"])
        ids, feats = extract_text_features(model, tokenizer, args.text_data, device, args.text_batch_size,
                                           precision=args.precision)
        paths["text"] = os.path.join(args.output_dir, f"{stem}.txt_feat.npy")
        save_features(paths["text"], ids, feats, "text_id" if args.jsonl else None)
        log.info("%d text features stored in %s", len(ids), paths["text"])
    return paths


# --------------------------------------------------------------------------- command line
def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default=None, help="a CLIP Lab checkpoint (the model is rebuilt from its stored args)")
    p.add_argument("--pretrained", default=None,
                   help="released weights: OpenAI CLIP (.pt TorchScript or state_dict), Chinese-CLIP .pt, or ours")
    p.add_argument("--model", default=None, help="model name for --pretrained; default: inferred from the weights")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--img-batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--text-batch-size", type=int, default=64, help="texts per forward pass")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (as Chinese-CLIP's extraction); bf16/fp16: autocast on CUDA, several times faster with "
                        "features within ~1e-2 of fp32 (bf16 also on CPU if asked; fp16 needs CUDA)")
    p.add_argument("-j", "--workers", type=int, default=default_workers(),
                   help="DataLoader processes decoding and transforming images (default min(4, cores)); 0: in the "
                        "main process. The features do not depend on it")
    p.add_argument("--max-image-pixels", type=readers.max_pixels_arg, default=readers.DEFAULT_MAX_IMAGE_PIXELS,
                   help="an image with more pixels (after a JPEG's draft reduction) stops extraction, as it is a bad "
                        "sample in training; raise it for valid huge images")



def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("eval_retrieval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="image/text features of a model (npy + ids, optionally Chinese-CLIP jsonl)")
    _model_flags(p)
    p.add_argument("--image-data", default=None, help="LMDB imgs folder or <id>\\t<base64> tsv")
    p.add_argument("--text-data", default=None, help="{split}_texts.jsonl")
    p.add_argument("--output-dir", required=True, help="where NAME.img_feat.npy / NAME.txt_feat.npy go")
    p.add_argument("--name", default=None, help="file stem (default: features)")
    p.add_argument("--jsonl", action="store_true", help="also write Chinese-CLIP's {id, feature} jsonl")

    p = sub.add_parser("topk", help="top-k predictions jsonl from two feature files")
    p.add_argument("--image-feats", required=True, help="image features (.npy with .ids.npy, or jsonl)")
    p.add_argument("--text-feats", required=True, help="text features (.npy with .ids.npy, or jsonl)")
    p.add_argument("--output", required=True, help="prediction jsonl")
    p.add_argument("--top-k", type=int, default=10, help="predictions per query")
    p.add_argument("--tr", action="store_true", help="image->text (queries are images)")

    p = sub.add_parser("score", help="the MUGE server metric on a prediction file")
    p.add_argument("ground_truth", help="{split}_texts.jsonl (or .tr.jsonl with --tr, or MUGE queries)")
    p.add_argument("predictions", help="prediction jsonl")
    p.add_argument("output", help="result JSON")
    p.add_argument("--tr", action="store_true", help="image->text files")
    p.add_argument("--gallery", default=None, help="ids of the gallery (ids .npy, features, LMDB or tsv) to check")
    p.add_argument("--strict", action="store_true",
                   help="exit code 1 when the submission is invalid or any query has no ground-truth item (without "
                        "it such queries are excluded from recall and counted as unlabelled_queries)")

    p = sub.add_parser("ir2tr", help="text->image annotations to image->text")
    p.add_argument("--input", required=True, help="{split}_texts.jsonl")
    p.add_argument("--output", default=None, help="default: {split}_texts.tr.jsonl")
    p.add_argument("--strict", action="store_true", help="a text without any image is an error")

    p = sub.add_parser("run", help="extract + topk + score both directions for a dataset split")
    _model_flags(p)
    p.add_argument("--data-dir", required=True, help="dataset folder with {split}_texts.jsonl and lmdb/{split}/imgs "
                                                     "or {split}_imgs.tsv")
    p.add_argument("--split", default="valid", help="valid or test")
    p.add_argument("--output-dir", required=True, help="features, predictions and scores go here")
    p.add_argument("--strict", action="store_true", help="any query without a ground-truth item is an error")
    return parser


def run(args: argparse.Namespace) -> dict[str, dict]:
    """`run` subcommand: extract, rank and score text->image and image->text; prints the table."""
    texts = os.path.join(args.data_dir, f"{args.split}_texts.jsonl")
    images = os.path.join(args.data_dir, "lmdb", args.split, "imgs")
    if not os.path.isdir(images):
        images = os.path.join(args.data_dir, f"{args.split}_imgs.tsv")
    for path in (texts, images):
        if not os.path.exists(path):
            raise SystemExit(f"run: {path} not found (expected {args.split}_texts.jsonl and lmdb/{args.split}/imgs "
                             f"or {args.split}_imgs.tsv under {args.data_dir})")
    args.image_data, args.text_data, args.name, args.jsonl = images, texts, args.split, False
    paths = extract(args)
    out = args.output_dir
    results = {}
    for tr in (False, True):
        direction = "image_to_text" if tr else "text_to_image"
        pred = os.path.join(out, f"{args.split}_{'tr_' if tr else ''}predictions.jsonl")
        make_topk(paths["image"], paths["text"], pred, 10, tr)
        if tr:  # every gallery image is an image->text query; one without a text is unlabelled
            try:
                gt, _ = ir_to_tr(texts, os.path.join(out, f"{args.split}_texts.tr.jsonl"),
                                 np.load(ids_path(paths["image"])).tolist())
            except SubmissionError as exc:
                raise SystemExit(f"{direction}: {exc}") from None
        else:
            gt = texts
        results[direction] = score(gt, pred, os.path.join(out, f"{args.split}_{direction}_score.json"), tr,
                                   gallery=ids_path(paths["text" if tr else "image"]), strict=args.strict)
    rows = ["| direction | R@1 | R@5 | R@10 | MR | unlabelled queries |", "|---|---|---|---|---|---|"]
    for direction, res in results.items():
        if not res["success"]:
            raise SystemExit(f"{direction}: {res['errorMsg']}")
        s = res["scoreJson"]
        rows.append(f"| {direction} | {s['r1']:.2f} | {s['r5']:.2f} | {s['r10']:.2f} | {s['mean_recall']:.2f} | "
                    f"{s.get('unlabelled_queries', 0)} |")
    print("\n".join(rows))
    with open(os.path.join(out, f"{args.split}_retrieval.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = get_parser().parse_args(argv)
    if args.command in ("extract", "run") and not (args.resume or args.pretrained):
        raise SystemExit(f"{args.command}: give --resume CKPT or --pretrained WEIGHTS")
    if args.command in ("extract", "run") and args.precision == "fp16":
        import utils

        if utils.resolve_device(args.device).type != "cuda":
            raise SystemExit(f"{args.command}: --precision fp16 needs CUDA; use bf16 or fp32 on a CPU")
    try:
        return _command(args)
    except (readers.DatasetError, readers.CorruptSample, readers.NonFiniteError, SubmissionError, OSError) as exc:
        raise SystemExit(f"{args.command}: {exc}") from None  # a named error, not a traceback


def _command(args: argparse.Namespace) -> int:
    if args.command == "extract":
        if not (args.image_data or args.text_data):
            raise SystemExit("extract: give --image-data and/or --text-data")
        extract(args)
    elif args.command == "topk":
        timing = make_topk(args.image_feats, args.text_feats, args.output, args.top_k, args.tr)
        log.info("top-%d predictions saved in %s (%s)", args.top_k, args.output,
                 ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))
    elif args.command == "score":
        result = score(args.ground_truth, args.predictions, args.output, args.tr, args.gallery, strict=args.strict)
        if result["success"]:
            unlabelled = result["scoreJson"].get("unlabelled_queries")
            print("The evaluation finished successfully." +
                  (f" {unlabelled} unlabelled queries (no ground-truth item) were excluded." if unlabelled else ""))
        else:
            print(f"The evaluation failed: {result['errorMsg']}")
            return 1 if args.strict else 0
    elif args.command == "ir2tr":
        path, unlabelled = ir_to_tr(args.input, args.output, strict=args.strict)
        print(f"wrote {path}" + (f" ({unlabelled} texts without an image skipped)" if unlabelled else ""))
    elif args.command == "run":
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
