"""Build `muge-sample`, a small real dataset in the MUGE / Chinese-CLIP format, offline:
`python scripts/make_muge_sample.py --out $CLIP_LAB_DATA_ROOT/muge-sample`.

Images are scikit-image's sample photographs and scikit-learn's handwritten digits, augmented (random crop,
horizontal flip, brightness/contrast/colour) to a few hundred JPEGs; each class has three Chinese captions.
Writes `{train,valid,test}_imgs.tsv` (image_id<TAB>base64 JPEG) and `{split}_texts.jsonl`
({"text_id", "text", "image_ids"}: a caption with every image of its class in the split), then the LMDBs
`lmdb/{split}/{imgs,pairs}` with build_lmdb.py. Unlike MUGE's hidden test set, the test texts keep their
image ids, so retrieval can be scored.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import sys
import warnings

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import build_lmdb  # noqa: E402

# scikit-image sample (function name) -> three Chinese captions
PHOTOS = {
    "astronaut": ["一位宇航员的肖像", "穿着宇航服的女航天员", "宇航员在国旗前微笑"],
    "brick": ["一面砖墙", "灰色的砖块纹理", "砖墙的特写"],
    "camera": ["拿着相机的摄影师", "黑白照片中的摄影师", "一个人在草地上拍照"],
    "cell": ["显微镜下的细胞", "细胞的显微照片", "生物细胞图像"],
    "chelsea": ["一只橘色的猫", "小猫的特写", "一只虎斑猫看着镜头"],
    "clock": ["一个时钟", "墙上的钟表", "模糊的时钟照片"],
    "coffee": ["一杯咖啡", "白色杯子里的咖啡", "桌上的一杯拿铁"],
    "coins": ["一堆硬币", "黑白的古代硬币", "桌上的钱币"],
    "colorwheel": ["一个色轮", "彩色的圆形色环", "颜色渐变的圆盘"],
    "grass": ["一片草地", "草的纹理", "茂密的野草特写"],
    "gravel": ["碎石路面", "砾石的纹理", "地上的小石子"],
    "horse": ["一匹马的剪影", "黑白的马的轮廓", "奔跑的马的形状"],
    "hubble_deep_field": ["深空中的星系", "哈勃望远镜拍摄的星空", "宇宙中的许多星系"],
    "immunohistochemistry": ["免疫组化染色切片", "病理切片的显微图像", "染色的组织切片"],
    "moon": ["月球表面", "月亮上的环形山", "黑白的月面照片"],
    "page": ["一页旧书的文字", "印刷的书页", "扫描的文字页面"],
    "retina": ["视网膜眼底照片", "眼底的血管", "一张医学眼底图像"],
    "rocket": ["发射台上的火箭", "即将发射的火箭", "一枚火箭和发射塔"],
}
DIGIT_NAMES = "零一二三四五六七八九"
DIGIT_TEMPLATES = ["手写数字{}", "数字{}的照片", "一个手写的{}"]
SPLITS = {"train": 0.7, "valid": 0.15, "test": 0.15}


def to_rgb(array: np.ndarray) -> Image.Image:
    """A scikit-image array (bool, gray, RGB or RGBA) -> an RGB PIL image."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(array[..., :3].astype(np.uint8))


def augment(image: Image.Image, rng: np.random.RandomState, size: int) -> Image.Image:
    """Random crop (50-100% of the area), horizontal flip, brightness/contrast/colour in [0.7, 1.3]; the
    short side resized to `size`."""
    w, h = image.size
    scale = np.sqrt(rng.uniform(0.5, 1.0))
    cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
    x, y = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
    image = image.crop((x, y, x + cw, y + ch))
    if rng.rand() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.7, 1.3))
    ratio = size / min(image.size)
    return image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))),
                        Image.Resampling.BICUBIC)


def jpeg_b64(image: Image.Image, quality: int = 90) -> str:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return base64.b64encode(out.getvalue()).decode("ascii")


def source_images() -> list[tuple[str, list[str], list[Image.Image]]]:
    """(class key, captions, source images): the photographs, then one class per digit (12 real digits each)."""
    from skimage import data as skdata
    from sklearn.datasets import load_digits

    classes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, captions in PHOTOS.items():
            classes.append((key, captions, [to_rgb(getattr(skdata, key)())]))
    digits = load_digits()
    for d in range(10):
        chosen = np.flatnonzero(digits.target == d)[:12]
        images = [to_rgb((digits.images[i] * (255 / 16)).round().astype(np.uint8)).resize((32, 32),
                                                                                           Image.Resampling.BICUBIC)
                  for i in chosen]
        classes.append((f"digit{d}", [t.format(DIGIT_NAMES[d]) for t in DIGIT_TEMPLATES], images))
    return classes


def make_muge_sample(out: str, variants: int = 12, size: int = 96, seed: int = 0, build: bool = True) -> dict:
    """Write the raw tsv/jsonl splits (and their LMDBs when `build`) under `out`; returns counts per split."""
    rng = np.random.RandomState(seed)
    os.makedirs(out, exist_ok=True)
    rows: dict[str, list[tuple[int, str]]] = {s: [] for s in SPLITS}
    texts: dict[str, list[dict]] = {s: [] for s in SPLITS}
    image_id, text_id = 100000, 500000
    for _, captions, sources in source_images():
        images = [augment(src, rng, size) for src in sources for _ in range(max(1, variants // len(sources)))]
        order = rng.permutation(len(images))
        n_train = int(round(len(images) * SPLITS["train"]))
        n_valid = max(1, int(round(len(images) * SPLITS["valid"])))
        parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
                 "test": order[n_train + n_valid:]}
        for split, idx in parts.items():
            ids = []
            for i in idx:
                rows[split].append((image_id, jpeg_b64(images[i])))
                ids.append(image_id)
                image_id += 1
            for caption in captions:
                texts[split].append({"text_id": text_id, "text": caption, "image_ids": ids})
                text_id += 1
    for split in SPLITS:
        with open(os.path.join(out, f"{split}_imgs.tsv"), "w", encoding="utf-8") as f:
            f.writelines(f"{i}\t{b64}\n" for i, b64 in rows[split])
        with open(os.path.join(out, f"{split}_texts.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in texts[split])
    counts = {s: {"images": len(rows[s]), "texts": len(texts[s])} for s in SPLITS}
    if build:
        build_lmdb.main(["--data-dir", out, "--splits", ",".join(SPLITS)])
    return counts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser("Build the muge-sample dataset (tsv + jsonl + LMDB) offline")
    p.add_argument("--out", required=True, help="output folder, e.g. $CLIP_LAB_DATA_ROOT/muge-sample")
    p.add_argument("--variants", type=int, default=12, help="augmented images per photograph/digit class")
    p.add_argument("--size", type=int, default=96, help="short side of the stored JPEGs")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentations and splits")
    p.add_argument("--no-lmdb", action="store_true", help="write only the raw tsv/jsonl files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    counts = make_muge_sample(args.out, args.variants, args.size, args.seed, build=not args.no_lmdb)
    logging.info("muge-sample in %s: %s", args.out, counts)
    return counts


if __name__ == "__main__":
    main(sys.argv[1:])
