"""Zero-shot data and evaluation: labels.json/templates.json against the catalog and the published class and
template counts, the prompt-ensembled class embedding against a hand computation, the anchor metrics
(mean per class, ROC-AUC) through evaluate_dataset on generated image folders, and Chinese class names read from
an ELEVATER-style label_cn.txt; the elevater-* catalog entries of Chinese-CLIP's zero-shot table (§7.4) on
folders laid out as ELEVATER_all.zip ships them, with Chinese-CLIP's squash transform."""
import json
import math
import os
import re

import pytest
import torch
from PIL import Image

import datasets
import eval_zeroshot
import readers

LABELS = json.load(open(os.path.join(readers.HERE, "labels.json"), encoding="utf-8"))
TEMPLATES = json.load(open(os.path.join(readers.HERE, "templates.json"), encoding="utf-8"))
CATALOG = readers.load_catalog()
DOWNSTREAM = [n for n, e in CATALOG.items()  # SLIP's English sets (the zh elevater-*/imagenet-cn are below)
              if e["format"] in ("imagefolder", "torchvision", "filelist") and e.get("language") != "zh"]

# class counts of the datasets (checked against facebookresearch/SLIP labels.json)
CLASS_COUNTS = {"imagenet": 1000, "food101": 101, "cub200": 200, "cars": 196, "aircraft": 100, "dtd": 47, "pets": 37,
                "caltech101": 102, "flowers": 102, "eurosat": 10, "resisc45": 45, "gtsrb": 43, "kitti_distance": 4,
                "country211": 211, "patch_camelyon": 2, "ucf101_frames": 101, "hateful_memes": 2, "rendered_sst2": 2,
                "mnist": 10, "cifar10": 10, "cifar100": 100, "stl10": 10, "clevr_counts": 8}
# template counts of clip-rocket's templates.json (commit ebd9e58); 1 for every other dataset
TEMPLATE_COUNTS = {"imagenet": 80, "cifar10": 18, "cifar100": 18, "ucf101_frames": 48, "caltech101": 34,
                   "resisc45": 18, "cars": 8, "dtd": 8, "country211": 5, "gtsrb": 3, "eurosat": 3, "aircraft": 2,
                   "stl10": 2}
# Chinese-CLIP's zeroshot_evaluation.py: own lists for these, its 183 generic templates for the other ELEVATER sets
ZH_TEMPLATE_COUNTS = {"aircraft": 100, "food101": 21, "flowers": 32, "eurosat": 24, "resisc45": 24, "country211": 4}
ELEVATER = ["caltech101", "cifar10", "cifar100", "country211", "dtd", "eurosat", "aircraft", "food101", "gtsrb",
            "hateful_memes", "kitti_distance", "mnist", "flowers", "pets", "patch_camelyon", "rendered_sst2",
            "resisc45", "cars", "fer2013", "voc2007"]
EUROSAT_ZH = ["一年生作物地", "森林", "灌木地", "公路", "工业建筑", "牧场", "多年生作物地", "住宅建筑", "河流", "湖泊"]


# --------------------------------------------------------------------------- the data files
def test_every_catalog_downstream_set_has_english_labels_and_templates():
    assert sorted(DOWNSTREAM) == sorted(CLASS_COUNTS)
    for name in DOWNSTREAM:
        key = CATALOG[name].get("labels", name)
        assert key in LABELS and key in TEMPLATES, name
    assert set(DOWNSTREAM) <= set(eval_zeroshot.default_datasets("en"))


@pytest.mark.parametrize("name", sorted(CLASS_COUNTS))
def test_class_and_template_counts(name):
    names, templates = LABELS[name], TEMPLATES[name]
    assert len(names) == CLASS_COUNTS[name]
    for n in names:  # a name, or a non-empty list of synonyms
        assert all(isinstance(s, str) and s.strip() for s in ([n] if isinstance(n, str) else n)) and n
    assert len(templates) == TEMPLATE_COUNTS.get(name, 1)
    assert len(set(templates)) == len(templates)
    assert all(t.count("{}") == 1 for t in templates)


def test_clevr_counts_names_follow_the_catalog_label_order():
    order = CATALOG["clevr_counts"]["label_order"]
    assert LABELS["clevr_counts"] == [o.removeprefix("count_") for o in order]
    assert TEMPLATES["clevr_counts"][0].format(LABELS["clevr_counts"][0]) == "a photo of 10 objects."


def test_chinese_templates_of_the_elevater_sets():
    for name in ELEVATER:
        assert len(TEMPLATES[name + "-zh"]) == ZH_TEMPLATE_COUNTS.get(name, 183), name
        assert all(t.count("{}") == 1 for t in TEMPLATES[name + "-zh"])
    assert TEMPLATES["resisc45-zh"] == TEMPLATES["eurosat-zh"]
    assert len(LABELS["imagenet-zh"]) == 1000 and len(TEMPLATES["imagenet-zh"]) == 80
    assert not [k for k in LABELS if k.endswith("-zh") and k not in ("digits-zh", "imagenet-zh")]  # from the data


def test_chinese_templates_are_chinese_clips():
    cvinw = pytest.importorskip("cn_clip.eval.cvinw_zeroshot_templates")
    imagenet = pytest.importorskip("cn_clip.eval.imagenet_zeroshot_templates")
    wired = {"aircraft": cvinw.aircraft_templates, "food101": cvinw.food_templates,
             "flowers": cvinw.flower_templates, "eurosat": cvinw.eurosat_templates,
             "resisc45": cvinw.eurosat_templates, "country211": cvinw.country211_templates}
    for name in ELEVATER:
        assert TEMPLATES[name + "-zh"] == [t("{}") for t in wired.get(name, cvinw.openai_templates)], name
    assert TEMPLATES["imagenet-zh"] == [t("{}") for t in imagenet.openai_imagenet_template]
    assert LABELS["imagenet-zh"] == imagenet.imagenet_classnames


# --------------------------------------------------------------------------- stubs
class SpyTokenizer:
    """Records every prompt list; call k (one per class in zeroshot_classifier) gets token rows [k + 1, row + 1]."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        rows = torch.arange(1, len(prompts) + 1)
        return torch.stack([torch.full_like(rows, len(self.calls)), rows, torch.zeros_like(rows)], dim=1)  # (P, 3)

    @property
    def prompts(self):
        return [p for call in self.calls for p in call]


class TableModel:
    """A tiny model: text embedding = one-hot of the class (the tokenizer's call index) times 1 + the prompt's row,
    image embedding = `image_table[red byte]` of a solid-colour image (the byte read back through val_transform)."""

    embedding_heads = ("z",)

    def __init__(self, image_table: torch.Tensor):
        self.image_table = image_table  # (256, D)

    def encode_image(self, images, head="z"):
        red = images[:, 0].mean(dim=(1, 2)) * datasets.OPENAI_STD[0] + datasets.OPENAI_MEAN[0]  # (N,) in [0, 1]
        return self.image_table[(red * 255).round().long()]  # (N, D)

    def encode_text(self, tokens, head="z"):
        dim = self.image_table.shape[1]
        return torch.nn.functional.one_hot(tokens[:, 0] - 1, dim).float() * (1 + tokens[:, 1:2].float())  # (P, D)


def make_folder(root, classes: list[list[int]]) -> None:
    """root/cNN/iK.png: one 8x8 solid image per red byte, class folders in label order."""
    for c, codes in enumerate(classes):
        os.makedirs(root / f"c{c:02d}", exist_ok=True)
        for code in codes:
            Image.new("RGB", (8, 8), (code, 40, 90)).save(root / f"c{c:02d}" / f"i{code}.png")


def similarities_of(model, tokenizer, name, root, names, templates):
    """The similarities evaluate_dataset scores, recomputed with the building blocks on the same test split."""
    reader = readers.build_reader(name, "test", data_root=str(root))
    loader = torch.utils.data.DataLoader(datasets.ClassificationDataset(reader, datasets.val_transform(8)),
                                         batch_size=7)
    return eval_zeroshot.zeroshot_similarities(model, tokenizer, names, templates, loader, torch.device("cpu"))


# --------------------------------------------------------------------------- class embedding
def test_class_embedding_normalises_each_prompt_then_the_mean():
    vectors = {"a cat.": [3.0, 4.0, 0.0], "the cat!": [0.0, 0.0, 2.0],  # norms 5 and 2
               "a dog.": [10.0, 0.0, 0.0], "the dog!": [0.0, 0.5, 0.0], "a puppy.": [0.0, 0.0, 7.0],
               "the puppy!": [0.0, 3.0, 4.0]}
    order = list(vectors)

    class Tok:
        def __call__(self, prompts):
            return torch.tensor([[order.index(p) + 1, 0] for p in prompts])  # (P, 2), a padding column

    class Model:
        def encode_text(self, tokens, head="z"):
            assert tokens.shape[1] == 1  # the padding column was trimmed
            return torch.tensor([vectors[order[i - 1]] for i in tokens[:, 0].tolist()])

    got = eval_zeroshot.zeroshot_classifier(Model(), Tok(), ["cat", ["dog", "puppy"]], ["a {}.", "the {}!"],
                                            torch.device("cpu"))
    # cat: mean of (0.6, 0.8, 0) and (0, 0, 1) = (0.3, 0.4, 0.5), norm sqrt(0.5)
    # dog/puppy: mean of (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0.6, 0.8) = (0.25, 0.4, 0.45), norm sqrt(0.425)
    expected = torch.tensor([[0.3, 0.4, 0.5], [0.25, 0.4, 0.45]])
    expected /= torch.tensor([[math.sqrt(0.5)], [math.sqrt(0.425)]])
    assert torch.allclose(got, expected, atol=1e-6)
    # averaging the raw embeddings instead would give (1.5, 2, 1)/|.| = (0.56, 0.74, 0.37) for cat
    assert not torch.allclose(got[0], torch.tensor([1.5, 2.0, 1.0]) / math.sqrt(7.25), atol=1e-2)


# --------------------------------------------------------------------------- anchor metrics end to end
def test_mean_per_class_dataset_through_evaluate_dataset(tmp_path):
    # pets: 37 classes; class 0 has 4 images, all right; the images of classes 1 and 2 are predicted as each other
    classes = [[1, 2, 3, 4]] + [[5 + c] for c in range(36)]
    make_folder(tmp_path / "downstream" / "pets" / "test", classes)
    table = torch.zeros(256, 37)
    for c, codes in enumerate(classes):
        for code in codes:
            table[code, {1: 2, 2: 1}.get(c, c)] = 1.0
    model, tokenizer = TableModel(table), SpyTokenizer()
    out = eval_zeroshot.evaluate_dataset(model, tokenizer, "pets", "en", 8, torch.device("cpu"), str(tmp_path),
                                         batch_size=16)
    assert out["metric"] == "mean_per_class" and out["labels"] == "pets" and out["num_images"] == 40
    # per-class recall: 1 (class 0), 0, 0, 34 x 1 -> 35/37; top-1 over images: 38/40
    assert out["score_z"] == pytest.approx(100 * 35 / 37)
    assert out["acc1_z"] == pytest.approx(95.0)
    assert tokenizer.calls[0] == ["a photo of a Abyssinian, a type of pet."]
    sims, targets = similarities_of(model, SpyTokenizer(), "pets", tmp_path, LABELS["pets"], TEMPLATES["pets"])
    assert out["score_z"] == pytest.approx(eval_zeroshot.dataset_metric(sims["z"], targets, "mean_per_class"))


def hateful_memes_folder(tmp_path):
    """hateful_memes dev split: class 0 at angles 0.1, 0.9, class 1 at 0.5, 1.2 (image embedding (cos, sin))."""
    classes = [[10, 11], [12, 13]]
    make_folder(tmp_path / "downstream" / "hateful_memes" / "dev", classes)
    table = torch.zeros(256, 2)
    for code, angle in zip([10, 11, 12, 13], [0.1, 0.9, 0.5, 1.2]):
        table[code] = torch.tensor([math.cos(angle), math.sin(angle)])
    return table


def test_roc_auc_dataset_through_evaluate_dataset(tmp_path):
    model = TableModel(hateful_memes_folder(tmp_path))
    out = eval_zeroshot.evaluate_dataset(model, SpyTokenizer(), "hateful_memes", "en", 8, torch.device("cpu"),
                                         str(tmp_path))
    # score sin - cos rises with the angle: positives 0.5, 1.2 against negatives 0.1, 0.9 -> 3 of 4 pairs ranked right
    assert out["metric"] == "roc_auc" and out["score_z"] == pytest.approx(75.0)
    assert out["acc1_z"] == pytest.approx(50.0)  # class 1 predicted above 45 degrees: 0.9 and 1.2
    sims, targets = similarities_of(model, SpyTokenizer(), "hateful_memes", tmp_path, LABELS["hateful_memes"],
                                    TEMPLATES["hateful_memes"])
    assert out["score_z"] == pytest.approx(eval_zeroshot.dataset_metric(sims["z"], targets, "roc_auc"))


def test_roc_auc_with_a_tiny_clip_model(tmp_path):
    import models

    hateful_memes_folder(tmp_path)
    torch.manual_seed(0)
    model = models.build_model(models.parse_model_name("CLIP_VITT16_CLIP"), image_size=32, embed_dim=16,
                               text_layers=1).eval()
    tokenizer = datasets.build_tokenizer("bpe", 77)
    out = eval_zeroshot.evaluate_dataset(model, tokenizer, "hateful_memes", "en", 32, torch.device("cpu"),
                                         str(tmp_path))
    reader = readers.build_reader("hateful_memes", "test", data_root=str(tmp_path))
    loader = torch.utils.data.DataLoader(datasets.ClassificationDataset(reader, datasets.val_transform(32)))
    sims, targets = eval_zeroshot.zeroshot_similarities(model, tokenizer, LABELS["hateful_memes"],
                                                        TEMPLATES["hateful_memes"], loader, torch.device("cpu"))
    assert out["metric"] == "roc_auc" and out["num_images"] == 4
    assert out["score_z"] == pytest.approx(eval_zeroshot.dataset_metric(sims["z"], targets, "roc_auc"), abs=1e-4)
    assert out["acc1_z"] == pytest.approx(eval_zeroshot.topk_accuracy(sims["z"], targets)["acc1"], abs=1e-4)


# --------------------------------------------------------------------------- Chinese class names from the data
def eurosat_folder(tmp_path, names=EUROSAT_ZH):
    make_folder(tmp_path / "downstream" / "eurosat" / "val", [[20 + c] for c in range(10)])
    path = tmp_path / "downstream" / "eurosat" / "label_cn.txt"
    path.write_text("\n".join(names) + "\n\n", encoding="utf-8")  # a trailing blank line is tolerated
    table = torch.zeros(256, 10)
    table[torch.arange(20, 30), torch.arange(10)] = 1.0
    return str(path), TableModel(table)


def test_chinese_model_uses_label_cn_txt_of_the_dataset_folder(tmp_path):
    path, model = eurosat_folder(tmp_path)
    tokenizer = SpyTokenizer()
    out = eval_zeroshot.evaluate_dataset(model, tokenizer, "eurosat", "zh", 8, torch.device("cpu"), str(tmp_path))
    assert out["labels"] == path and out["num_images"] == 10 and out["acc1_z"] == 100.0
    assert tokenizer.prompts == [t.format(n) for n in EUROSAT_ZH for t in TEMPLATES["eurosat-zh"]]
    assert tokenizer.prompts[0] == "一张一年生作物地的卫星照片"
    # an English model on the same folder keeps labels.json's names
    tokenizer = SpyTokenizer()
    out = eval_zeroshot.evaluate_dataset(model, tokenizer, "eurosat", "en", 8, torch.device("cpu"), str(tmp_path))
    assert out["labels"] == "eurosat" and tokenizer.calls[0][0] == "a centered satellite photo of annual crop land."
    # the default zh datasets: those with Chinese names (a label_cn.txt under this data root) and zh templates
    assert "eurosat" in eval_zeroshot.default_datasets("zh", str(tmp_path))
    assert "eurosat" not in eval_zeroshot.default_datasets("zh", str(tmp_path / "elsewhere"))
    # one evaluation per stored dataset, in the model's language: digits-zh (not digits too), imagenet-cn
    zh = eval_zeroshot.default_datasets("zh")
    assert {"imagenet-cn", "digits-zh"} <= set(zh) and not {"imagenet", "digits"} & set(zh)
    assert {"imagenet", "digits"} <= set(eval_zeroshot.default_datasets("en"))
    assert "cifar10" not in eval_zeroshot.default_datasets("zh")  # English names only: not a default for zh


def test_class_name_files_wrong_count_blank_line_and_english_label_txt(tmp_path):
    path, model = eurosat_folder(tmp_path, EUROSAT_ZH[:9])
    with pytest.raises(readers.DatasetError, match="10 classes but .*label_cn.txt lists 9"):
        eval_zeroshot.evaluate_dataset(model, SpyTokenizer(), "eurosat", "zh", 8, torch.device("cpu"), str(tmp_path))
    with open(path, "w", encoding="utf-8") as f:
        f.write("森林\n\n河流\n")
    with pytest.raises(readers.DatasetError, match="label_cn.txt:2: blank line"):
        eval_zeroshot.read_class_names(path)
    # label.txt gives English names when labels.json lacks the dataset
    (tmp_path / "downstream" / "eurosat" / "label.txt").write_text("a\nb\n", encoding="utf-8")
    labels = {k: v for k, v in LABELS.items() if k != "eurosat"}
    got = eval_zeroshot.class_names_and_templates("eurosat", CATALOG["eurosat"], "en", str(tmp_path), labels,
                                                  TEMPLATES)
    assert got.names == ["a", "b"] and got.templates == TEMPLATES["eurosat"] and got.language == "en"
    with pytest.raises(readers.DatasetError, match="no class names"):
        eval_zeroshot.class_names_and_templates("muge", CATALOG["muge"], "zh", str(tmp_path))


# --------------------------------------------------------------------------- Chinese-CLIP's table (ELEVATER folders)
# OFA-Sys/Chinese-CLIP Results.md zero-shot table (commit 31863c7) column -> catalog entry; ELEVATER_all.zip folder
# of each elevater-* entry
TABLE_74 = {"CIFAR10": "elevater-cifar10", "CIFAR100": "elevater-cifar100", "DTD": "elevater-dtd",
            "EuroSAT": "elevater-eurosat", "FER": "elevater-fer2013", "FGVC": "elevater-aircraft",
            "KITTI": "elevater-kitti_distance", "MNIST": "elevater-mnist", "PC": "elevater-patch_camelyon",
            "VOC": "elevater-voc2007", "ImageNet": "imagenet-cn"}
ELEVATER_FOLDERS = {"elevater-cifar10": "cifar-10", "elevater-cifar100": "cifar-100", "elevater-dtd": "dtd",
                    "elevater-eurosat": "eurosat_clip", "elevater-fer2013": "fer-2013",
                    "elevater-aircraft": "fgvc-aircraft-2013b-variants102", "elevater-kitti_distance": "kitti-distance",
                    "elevater-mnist": "mnist", "elevater-patch_camelyon": "patch-camelyon",
                    "elevater-voc2007": "voc-2007-classification"}
CIFAR100_ZH = ["苹果", "水族馆鱼", "宝贝", "熊", "海狸", "床", "蜜蜂", "甲虫", "自行车", "瓶子", "碗", "男孩"]


def test_elevater_catalog_entries_cover_the_chinese_clip_table(tmp_path):
    elevater = {n: e for n, e in CATALOG.items() if n.startswith("elevater-")}
    assert sorted(elevater) == sorted(ELEVATER_FOLDERS) == sorted(set(TABLE_74.values()) - {"imagenet-cn"})
    for name, entry in elevater.items():
        assert (entry["format"], entry["language"], entry["metric"], entry["eval_transform"]) == \
            ("imagefolder", "zh", "top1", "squash"), name
        assert entry["path"] == "elevater/" + ELEVATER_FOLDERS[name]
        assert readers.split_name(name, entry, "test") == "test"
        assert "labels" not in entry, name  # names from label_cn.txt only; ImageFolderReader uses the folder names
        assert len(TEMPLATES[entry["templates"] + "-zh"]) == ZH_TEMPLATE_COUNTS.get(entry["templates"], 183), name
        # no label_cn.txt: an error, never SLIP's labels.json names (ELEVATER's class lists and order differ)
        for language in ("zh", "en"):
            with pytest.raises(readers.DatasetError, match="no class names"):
                eval_zeroshot.class_names_and_templates(name, entry, language, str(tmp_path))
    imagenet = eval_zeroshot.class_names_and_templates("imagenet-cn", CATALOG["imagenet-cn"], "zh")
    assert imagenet.source == "imagenet-zh" and imagenet.templates == TEMPLATES["imagenet-zh"]
    assert CATALOG["imagenet-cn"]["eval_transform"] == "squash" and CATALOG["imagenet-cn"]["metric"] == "top1"
    assert "imagenet-cn" not in eval_zeroshot.default_datasets("en")


def test_eval_transform_squash_keeps_the_whole_image_centre_crop_does_not():
    image = Image.new("RGB", (16, 8), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 4, 8))  # the left quarter red
    squash = eval_zeroshot.eval_transform("elevater-dtd", CATALOG["elevater-dtd"], 8)(image)
    crop = eval_zeroshot.eval_transform("dtd", CATALOG["dtd"], 8)(image)
    assert squash.shape == crop.shape == (3, 8, 8)
    assert squash[0, :, 0].min() > 1 and crop[0, :, 0].max() < -1  # red column 0: kept by squash, cropped away
    with pytest.raises(readers.DatasetError, match="unknown eval_transform 'crop'"):
        eval_zeroshot.eval_transform("x", {"eval_transform": "crop"}, 8)


def elevater_folder(root, name, names, codes_per_class=1, size=(8, 8), ext="png"):
    """An ELEVATER_all.zip-style dataset at its catalog path: test/<id>/ (ids 0-9 for up to 10 classes, else
    zero-padded 000...) of `ext` images, label_cn.txt, label.txt and an index.json that is not read; returns the
    folder."""
    folder = root / CATALOG[name]["path"]
    width = 1 if len(names) <= 10 else 3
    for c in range(len(names)):
        os.makedirs(folder / "test" / f"{c:0{width}d}")
        for k in range(codes_per_class):
            code = 30 + c * codes_per_class + k
            image = Image.new("RGB", size, (code, 40, 90))
            image.paste((code, 200, 10), (0, 0, size[0] // 4, size[1]))  # a left band centre cropping drops
            image.save(folder / "test" / f"{c:0{width}d}" / f"{k}.{ext}")
    (folder / "label_cn.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (folder / "label.txt").write_text("\n".join(f"class {c}" for c in range(len(names))) + "\n", encoding="utf-8")
    (folder / "index.json").write_text("not json: ELEVATER's submission order is never read", encoding="utf-8")
    return folder


def test_elevater_folder_through_evaluate_dataset(tmp_path, monkeypatch):
    folder = elevater_folder(tmp_path, "elevater-cifar100", CIFAR100_ZH, codes_per_class=2)
    table = torch.zeros(256, 12)
    table[torch.arange(30, 54), torch.arange(24) // 2] = 1.0  # image code -> its folder's class
    model, tokenizer, used = TableModel(table), SpyTokenizer(), []
    squash, val = datasets.squash_transform, datasets.val_transform
    monkeypatch.setattr(datasets, "squash_transform", lambda size: used.append(("squash", size)) or squash(size))
    monkeypatch.setattr(datasets, "val_transform", lambda size: used.append(("center_crop", size)) or val(size))
    out = eval_zeroshot.evaluate_dataset(model, tokenizer, "elevater-cifar100", "zh", 8, torch.device("cpu"),
                                         str(tmp_path))
    assert out["labels"] == str(folder / "label_cn.txt") and out["metric"] == "top1" and out["num_images"] == 24
    assert out["score_z"] == out["acc1_z"] == 100.0  # targets follow the folder order, class c = line c
    assert tokenizer.prompts == [t.format(n) for n in CIFAR100_ZH for t in TEMPLATES["cifar100-zh"]]
    assert tokenizer.prompts[0] == "苹果的照片" and used == [("squash", 8)]
    reader = readers.build_reader("elevater-cifar100", "test", data_root=str(tmp_path))
    assert [reader.label(i) for i in range(len(reader))] == [int(os.path.basename(os.path.dirname(p)))
                                                              for p, _ in reader.samples]
    # the same entry without eval_transform falls back to SLIP's resize + centre crop
    catalog = {**CATALOG, "elevater-cifar100": {k: v for k, v in CATALOG["elevater-cifar100"].items()
                                                if k != "eval_transform"}}
    monkeypatch.setattr(readers, "load_catalog", lambda: catalog)
    eval_zeroshot.evaluate_dataset(model, SpyTokenizer(), "elevater-cifar100", "zh", 8, torch.device("cpu"),
                                   str(tmp_path))
    assert used == [("squash", 8), ("center_crop", 8)]
    # a default dataset of a Chinese model where its folder exists, never of an English one
    assert "elevater-cifar100" in eval_zeroshot.default_datasets("zh", str(tmp_path))
    assert "elevater-cifar10" not in eval_zeroshot.default_datasets("zh", str(tmp_path))
    assert "elevater-cifar100" not in eval_zeroshot.default_datasets("en", str(tmp_path))


def test_elevater_folder_with_a_tiny_cnclip_model(tmp_path, monkeypatch):
    import models

    names = ["愤怒", "厌恶", "恐惧", "高兴", "悲伤", "惊讶", "中性"]  # 7 classes: folders 0-6
    elevater_folder(tmp_path, "elevater-fer2013", names, codes_per_class=2, size=(48, 32), ext="jpg")
    torch.manual_seed(0)
    model = models.build_model(models.parse_model_name("CNCLIP_VITT16_CLIP"), image_size=32, embed_dim=16,
                               text_model="BERT-tiny-chinese").eval()
    tokenizer = datasets.build_tokenizer("bert", 52)
    got = []
    similarities = eval_zeroshot.zeroshot_similarities
    monkeypatch.setattr(eval_zeroshot, "zeroshot_similarities", lambda *a: got.append(similarities(*a)) or got[-1])
    out = eval_zeroshot.evaluate_dataset(model, tokenizer, "elevater-fer2013", "zh", 32, torch.device("cpu"),
                                         str(tmp_path))
    reader = readers.build_reader("elevater-fer2013", "test", data_root=str(tmp_path))

    def sims_with(transform):
        loader = torch.utils.data.DataLoader(datasets.ClassificationDataset(reader, transform), batch_size=5)
        return similarities(model, tokenizer, names, TEMPLATES["fer2013-zh"], loader, torch.device("cpu"))

    (squashed, targets), (cropped, _) = sims_with(datasets.squash_transform(32)), sims_with(
        datasets.val_transform(32))
    assert torch.equal(got[0][1], targets) and targets.tolist() == [c for c in range(7) for _ in range(2)]
    assert torch.allclose(got[0][0]["z"], squashed["z"], atol=1e-5)
    assert not torch.allclose(got[0][0]["z"], cropped["z"], atol=1e-3)  # the 48x32 images: squash != crop
    assert out["num_images"] == 14 and out["metric"] == "top1"
    assert out["acc1_z"] == pytest.approx(eval_zeroshot.topk_accuracy(squashed["z"], targets)["acc1"])


# --------------------------------------------------------------------------- what eval_zeroshot.py says it did
def tiny_clip_checkpoint(tmp_path) -> str:
    import models

    torch.manual_seed(0)
    model = models.build_model(models.parse_model_name("CLIP_VITT16_CLIP"), image_size=32, embed_dim=16,
                               text_layers=1)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "args": {"model": "CLIP_VITT16_CLIP", "image_size": 32, "embed_dim": 16,
                                                      "transformer_layers": 1}}, path)
    return str(path)


def test_every_dataset_is_evaluated_and_the_failures_are_listed(tmp_path, capsys):
    """--datasets cifar10,hateful_memes,eurosat: cifar10 is not on disk, one hateful_memes image is corrupt, eurosat
    runs. The table shows eurosat, the failures are listed with their reasons, the JSON keeps both, and the exit
    status is non-zero (it once stopped at cifar10 and discarded everything else)."""
    make_folder(tmp_path / "downstream" / "eurosat" / "val", [[20 + c] for c in range(10)])
    hateful_memes_folder(tmp_path)
    (tmp_path / "downstream" / "hateful_memes" / "dev" / "c01" / "i12.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ckpt = tiny_clip_checkpoint(tmp_path)
    with pytest.raises(SystemExit, match="eval_zeroshot: 2 of 3 datasets failed: cifar10, hateful_memes"):
        eval_zeroshot.main(["--resume", ckpt, "--datasets", "cifar10,hateful_memes,eurosat", "--data-root",
                            str(tmp_path), "--output-dir", str(tmp_path / "zs")])
    out = capsys.readouterr().out
    table, failed = out.split("failed (2 of 3):")
    assert "| eurosat | top1 |" in table and "cifar10 |" not in table and "hateful_memes |" not in table
    assert re.search(r"- cifar10: DatasetError: dataset 'cifar10' .* not found", failed)
    assert re.search(r"- hateful_memes: CorruptSample: hateful_memes\[2\] \(.*c01/i12.png\): undecodable image", failed)
    written = json.loads((tmp_path / "zs" / "zeroshot_checkpoint.json").read_text())
    assert list(written["results"]) == ["eurosat"] and written["results"]["eurosat"]["num_images"] == 10
    assert sorted(written["failures"]) == ["cifar10", "hateful_memes"]


def test_duplicate_class_names_warn_for_shipped_lists_and_fail_for_a_datasets_own_file(tmp_path, caplog):
    """Two classes with one name after the normalisation the prompts see (lower case, whitespace) get identical
    prompts: one can never be predicted. labels.json's ImageNet lists (kept as published) warn, naming the classes;
    a dataset's own label_cn.txt with a repeated line is an error naming the lines."""
    names = EUROSAT_ZH[:2] + [" 森林 "] + EUROSAT_ZH[3:]  # line 3 repeats line 2
    path, model = eurosat_folder(tmp_path, names)
    with pytest.raises(readers.DatasetError, match=r"label_cn.txt:3: class 2 '森林' repeats line 2 \(class 1"):
        eval_zeroshot.evaluate_dataset(model, SpyTokenizer(), "eurosat", "zh", 8, torch.device("cpu"), str(tmp_path))
    assert eval_zeroshot.duplicate_classes(LABELS["imagenet"]) == [[657, 744], [836, 837]]
    assert eval_zeroshot.duplicate_classes(LABELS["imagenet-zh"]) == [[836, 837]]
    assert eval_zeroshot.duplicate_classes(["Cat", ["dog", "puppy"], "cat ", ["puppy", "Dog"], "cow"]) == \
        [[0, 2], [1, 3]]
    # ImageNet's shipped names (what evaluate_dataset warns with before it evaluates)
    with caplog.at_level("WARNING", logger="clip_lab"):
        eval_zeroshot.warn_duplicate_classes("imagenet", eval_zeroshot.class_names_and_templates(
            "imagenet", CATALOG["imagenet"], "en"))
        eval_zeroshot.warn_duplicate_classes("imagenet-cn", eval_zeroshot.class_names_and_templates(
            "imagenet-cn", CATALOG["imagenet-cn"], "zh"))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert "imagenet (labels.json 'imagenet'): classes 657/744 share the name 'missile'" in warnings[0]
    assert "classes 836/837 share the name 'sunglasses'" in warnings[1] and "kept as-is" in warnings[1]
    assert "imagenet-cn (labels.json 'imagenet-zh'): classes 836/837 share the name '太阳镜'" in warnings[2]


def test_non_finite_class_embeddings_and_similarities_stop_zero_shot(tmp_path):
    """readers.NonFiniteError (a ValueError) naming the dataset, the head and the first class or image."""
    _, model = eurosat_folder(tmp_path)

    class NanText(TableModel):
        def encode_text(self, tokens, head="z"):
            out = super().encode_text(tokens, head)
            return out * float("nan") if int(tokens[0, 0]) == 4 else out  # the 4th class

    class NanImages(TableModel):
        def encode_image(self, images, head="z"):
            out = super().encode_image(images, head)
            out[1] = float("inf")
            return out

    def run(model):
        return eval_zeroshot.evaluate_dataset(model, SpyTokenizer(), "eurosat", "en", 8, torch.device("cpu"),
                                              str(tmp_path))

    with pytest.raises(ValueError, match=r"eurosat: 1 of 10 class embeddings of head z are not finite "
                                                     r"\(first: class highway or road\)"):
        run(NanText(model.image_table))
    with pytest.raises(ValueError, match=r"eurosat: 1 of 10 images' similarities of head z are not finite "
                                                     r"\(first: image 1\)"):
        run(NanImages(model.image_table))
