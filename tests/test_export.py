"""Taking models out (weights.py export): tiny models of ours, exported to an OpenAI CLIP state_dict, an open_clip
folder, a transformers CLIPModel/ChineseCLIPModel folder and a Chinese-CLIP .pt, loaded by the target library's own
loader; image and text features equal ours to 1e-5 in fp32. Every export reads back through --pretrained, refuses
with its reasons where the architecture does not fit, and CLIP_benchmark scores the open_clip export as
eval_zeroshot.py does on the same images and templates."""
import json
import os

import pytest
import torch

import datasets
import models
import readers
import registry
import weights

TOL = 1e-5
EN = ["a photo of a cat", "a red car on the street", "two dogs"]
ZH = ["一张猫的照片", "街上的红色汽车", "两只狗在草地上奔跑"]


def random_picture():
    """A 50x70 noise picture: resized to 32 its long side is 44, an even crop margin (transformers' processors put an
    odd margin's extra pixel on the other side than torchvision's CenterCrop)."""
    from PIL import Image

    torch.manual_seed(5)
    return Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name, **flags) -> (path, model): a CLIP Lab checkpoint of a tiny `name` (args as main.py stores
    them: image_size 32, embed_dim 32, a 64-wide 1-head 1-layer CLIP text tower unless flags say otherwise) with
    non-trivial norms and biases, so that a wrong mapping cannot hide; built once per module."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("checkpoints")

    def make(name: str, **flags) -> tuple[str, torch.nn.Module]:
        args = {"model": name, "name": "tiny-run", "image_size": 32, "embed_dim": 32, **flags}
        if not name.startswith("CNCLIP"):
            args = {"text_width": 64, "text_heads": 1, "transformer_layers": 1, **args}
        key = json.dumps(args, sort_keys=True)
        if key not in cache:
            torch.manual_seed(0)
            model = models.build_from_config(registry.config_from_flags(args)).eval()
            with torch.no_grad():
                for param_name, p in model.named_parameters():
                    if param_name.endswith("bias") or "norm" in param_name or "ln_" in param_name:
                        p.add_(0.1 * torch.randn_like(p))
            path = folder / f"{len(cache)}-{name}.pt"
            torch.save({"model": model.state_dict(), "args": args, "commit": "0123abc", "epoch": 2, "step": 40}, path)
            cache[key] = (str(path), model)
        return cache[key]

    return make


def features(model, images, tokens, head: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images, head=head), model.encode_text(tokens, head=head)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    diff = float((got - want).abs().max())
    assert diff <= TOL, diff


def assert_reads_back(out: str, images, tokens, img, txt) -> None:
    """--pretrained OUT (eval scripts: the architecture from the export record) gives the same features."""
    model, spec, info = weights.load_model_for_eval(pretrained=out, device="cpu")
    back_img, back_txt = features(model, images, tokens)
    assert_close(back_img, img)
    assert_close(back_txt, txt)


def read_record(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


RN50 = {"image_size": 64, "embed_dim": 1024}  # the attention pool projects to 1024 dims itself


def test_openai_export_loads_with_openai_loader(tmp_path, checkpoint):
    """`--format openai`: a state_dict that open_clip's OpenAI loader (clip.load's build_model: the architecture
    inferred from the keys) builds; it casts the weights to fp16 as OpenAI ships them (features within that rounding),
    and the same file read at full precision by open_clip's strict load_checkpoint gives our features to 1e-5. The
    record sits beside it; --pretrained reads it back. (RN50's OpenAI keys: test_weights.py and the open_clip
    export below.)"""
    import open_clip

    name, size = "CLIP_VITT16_CLIP", 32
    ckpt, model = checkpoint(name)
    out = str(tmp_path / "openai.pt")
    weights.main(["export", ckpt, "--format", "openai", "--out", out])
    ref = open_clip.load_openai_model(out, precision="fp32", device="cpu").eval()
    images, tokens = torch.randn(2, 3, size, size), datasets.BpeTokenizer(77)(EN)
    img, txt = features(model, images, tokens)
    with torch.no_grad():
        fp16_diff = (ref.encode_image(images) - img).abs().max()
        assert 0 < fp16_diff <= 1e-2 * img.abs().max()
    open_clip.load_checkpoint(ref, out)  # strict, no cast
    with torch.no_grad():
        assert_close(ref.encode_image(images), img)
        assert_close(ref.encode_text(tokens), txt)
    assert torch.equal(ref.logit_scale.detach(), model.logit_scale.detach())
    record = read_record(out + ".json")
    assert record["source"] == os.path.abspath(ckpt) and record["commit"] == "0123abc" and record["format"] == "openai"
    assert record["source_model"] == name and record["model"]["name"] == name and record["dropped"] == []
    assert (record["epoch"], record["step"]) == (2, 40)
    assert_reads_back(out, images, tokens, img, txt)


@pytest.mark.parametrize("name,size", [("CLIP_VITT16_SIGLIP", 32), ("CLIP_RN50_CLIP", 64), ("CLIP_R50_CLIP", 32)])
def test_open_clip_export_loads_with_create_model(tmp_path, checkpoint, name, size):
    """`--format open_clip`: a folder that open_clip.create_model(NAME, pretrained=PATH) loads after
    add_model_config (also as `local-dir:`), for our ViTs with SigLIP's logit_bias, OpenAI's RN50 and clip-rocket's
    timm R50 (open_clip's timm tower); its preprocessing is our eval transform. (A plain CLIP ViT: the CLIP_benchmark
    test.)"""
    import open_clip

    ckpt, model = checkpoint(name, **RN50 if name == "CLIP_RN50_CLIP" else {})
    out = str(tmp_path / "open_clip")
    config_name = f"tiny-{name.lower()}-{os.getpid()}"
    weights.main(["export", ckpt, "--format", "open_clip", "--out", out, "--name", config_name])
    assert sorted(os.listdir(out)) == sorted([f"{config_name}.json", "open_clip_config.json", "clip_lab_export.json",
                                              "open_clip_model.safetensors"])
    open_clip.add_model_config(out)
    ref = open_clip.create_model(config_name, pretrained=os.path.join(out, "open_clip_model.safetensors")).eval()
    images, tokens = torch.randn(2, 3, size, size), datasets.BpeTokenizer(77)(EN)
    img, txt = features(model, images, tokens)
    with torch.no_grad():
        assert_close(ref.encode_image(images), img)
        assert_close(ref.encode_text(tokens), txt)
    if name.endswith("SIGLIP"):
        assert torch.equal(ref.logit_bias.detach(), model.logit_bias.detach())
    local, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out)
    with torch.no_grad():
        assert_close(local.eval().encode_image(images), img)
    picture = random_picture()
    assert torch.equal(preprocess(picture), datasets.val_transform(size)(picture))
    assert read_record(os.path.join(out, "clip_lab_export.json"))["name"] == config_name
    assert_reads_back(out, images, tokens, img, txt)


def test_hf_clip_export_loads_with_from_pretrained_and_its_own_tokenizer(tmp_path, checkpoint):
    """`--format hf` of a CLIP model: transformers' CLIPModel.from_pretrained (offline), with the tokenizer and image
    processor saved beside it; the text tower has 2 heads of 32, which the weights alone cannot tell (the record
    can: without it the architecture inferred from the weights gives other features)."""
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    ckpt, model = checkpoint("CLIP_VITT16_CLIP", text_heads=2)
    out = str(tmp_path / "hf")
    weights.main(["export", ckpt, "--format", "hf", "--out", out])
    ref = CLIPModel.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    images, tokens = torch.randn(2, 3, 32, 32), datasets.BpeTokenizer(77)(EN)
    hf_tokens = tokenizer(EN, padding="max_length", max_length=77, return_tensors="pt")
    mask = hf_tokens["attention_mask"].bool()
    assert torch.equal(hf_tokens["input_ids"][mask], tokens[mask])  # same ids; HF pads with <|endoftext|>
    img, txt = features(model, images, tokens)
    with torch.no_grad():
        assert_close(ref.get_image_features(pixel_values=images).pooler_output, img)
        assert_close(ref.get_text_features(**hf_tokens).pooler_output, txt)
    assert float(ref.logit_scale.detach()) == pytest.approx(float(model.logit_scale.detach()))
    picture = random_picture()
    pixels = CLIPProcessor.from_pretrained(out)(images=picture, return_tensors="pt")["pixel_values"][0]
    assert (pixels - datasets.val_transform(32)(picture)).abs().max() <= 1.01 / (255 * min(datasets.OPENAI_STD))
    assert_reads_back(out, images, tokens, img, txt)
    # a CNCLIP model takes the folder's vision tower (the MUGE baseline's init), the CLIP text side ignored
    cn = models.build_model(models.parse_model_name("CNCLIP_VITT16_CLIP"), image_size=32, embed_dim=32,
                            text_model="BERT-tiny-chinese").eval()
    assert weights.load_weights(cn, out) == {out: ["image_projection", "logit_scale", "vision"]}
    with torch.no_grad():
        assert_close(cn.encode_image(images), img)
    with pytest.raises(weights.WeightsError, match=r"holds CLIP_VITT16_CLIP \(its export record\), not --model "
                                                   r"CLIP_VITS16_CLIP"):
        weights.load_model_for_eval(pretrained=out, model_name="CLIP_VITS16_CLIP", device="cpu")
    record = os.path.join(out, "clip_lab_export.json")
    with open(record, "r+", encoding="utf-8") as f:  # a record cut short is named, not skipped
        f.truncate(len(f.read()) // 2)
    with pytest.raises(weights.WeightsError, match=r"clip_lab_export\.json: not an export record"):
        weights.load_model_for_eval(pretrained=out, device="cpu")
    os.remove(record)  # weights alone: width // 64 = 1 text head
    guessed, _, _ = weights.load_model_for_eval(pretrained=out, device="cpu")
    assert guessed.text.resblocks[0].heads == 1
    assert (features(guessed, images, tokens)[1] - txt).abs().max() > 1e-3




def test_hf_chinese_clip_export_with_bert_tokenizer(tmp_path, checkpoint):
    """`--format hf` of a CNCLIP model: ChineseCLIPModel.from_pretrained with its BERT tokenizer files (vocab.txt is
    our vocabulary); ChineseCLIP pools [CLS] then a linear projection, as ours, so the features match."""
    from transformers import AutoTokenizer, ChineseCLIPModel, ChineseCLIPProcessor

    ckpt, model = checkpoint("CNCLIP_VITT16_CLIP", text_model="BERT-tiny-chinese")
    out = str(tmp_path / "hf-cn")
    weights.main(["export", ckpt, "--format", "hf", "--out", out])
    ref = ChineseCLIPModel.from_pretrained(out).eval()
    with open(os.path.join(out, "vocab.txt"), "rb") as a, open(datasets.CHINESE_VOCAB, "rb") as b:
        assert a.read() == b.read()
    tokenizer = AutoTokenizer.from_pretrained(out)
    images, tokens = torch.randn(2, 3, 32, 32), datasets.BertTokenizer(52)(ZH)
    hf_tokens = tokenizer(ZH, padding="max_length", max_length=52, truncation=True, return_tensors="pt")
    assert torch.equal(hf_tokens["input_ids"], tokens)
    img, txt = features(model, images, tokens)
    with torch.no_grad():
        assert_close(ref.get_image_features(pixel_values=images).pooler_output, img)
        assert_close(ref.get_text_features(**hf_tokens).pooler_output, txt)
    picture = random_picture()
    pixels = ChineseCLIPProcessor.from_pretrained(out)(images=picture, return_tensors="pt")["pixel_values"][0]
    assert (pixels - datasets.squash_transform(32)(picture)).abs().max() <= 1.01 / (255 * min(datasets.OPENAI_STD))
    assert_reads_back(out, images, tokens, img, txt)
    # the training path (main.py --pretrained) takes the folder too, also saved in shards
    sharded = str(tmp_path / "hf-cn-sharded")
    ref.save_pretrained(sharded, max_shard_size="300KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    fresh = models.build_model(models.parse_model_name("CNCLIP_VITT16_CLIP"), image_size=32, embed_dim=32,
                               text_model="BERT-tiny-chinese").eval()
    assert weights.load_weights(fresh, sharded) == {sharded: ["image_projection", "logit_scale", "text",
                                                              "text_projection", "vision"]}
    assert_close(features(fresh, images, tokens)[0], img)
    assert_close(features(fresh, images, tokens)[1], txt)


def test_cnclip_format_and_the_old_subcommand(tmp_path, checkpoint):
    """`--format cnclip` = `export-cnclip`: a Chinese-CLIP .pt with the run's name and a record beside it; an
    existing output is never overwritten."""
    ckpt, model = checkpoint("CNCLIP_VITT16_CLIP", text_model="BERT-tiny-chinese")
    out = str(tmp_path / "cn.pt")
    weights.main(["export-cnclip", ckpt, out])
    payload = torch.load(out, weights_only=True)
    assert (payload["epoch"], payload["step"], payload["name"]) == (2, 40, "tiny-run")
    assert payload["state_dict"].keys() == weights.ours_to_cnclip(model.state_dict()).keys()
    assert read_record(out + ".json")["format"] == "cnclip"
    before = os.path.getmtime(out)
    with pytest.raises(SystemExit, match="exists; an export never overwrites"):
        weights.main(["export", ckpt, "--format", "cnclip", "--out", out])
    assert os.path.getmtime(out) == before


def test_cl2l_exports_its_global_pair_or_a_linear_h_head(tmp_path, checkpoint):
    """A CL2L model goes out as its global pair (head z) with the other heads listed as dropped; head h is
    exported when its l2l projectors are linear (with their own temperature), refused when they are MLPs."""
    import open_clip

    ckpt, model = checkpoint("CL2L_VITT16_CL2L", separate_proj=True, cl2l_img_proj_type="linear",
                             cl2l_txt_proj_type="linear")
    images, tokens = torch.randn(2, 3, 32, 32), datasets.BpeTokenizer(77)(EN)
    for head in ("z", "h"):
        out = str(tmp_path / f"open_clip-{head}")
        record = weights.export(ckpt, "open_clip", out, head=head, name=f"cl2l-{head}-{os.getpid()}")
        assert record["model"]["name"] == "CLIP_VITT16_CLIP" and record["source_model"] == "CL2L_VITT16_CL2L"
        kept = {"z": "image_projection", "h": "l2l_image_projection"}[head]
        assert kept not in record["dropped"] and {"l2l_image_projection", "image_projection"} - {kept} <= \
            set(record["dropped"])
        ref, _, _ = open_clip.create_model_and_transforms("local-dir:" + out)
        img, txt = features(model, images, tokens, head)
        with torch.no_grad():
            assert_close(ref.eval().encode_image(images), img)
            assert_close(ref.encode_text(tokens), txt)
        scale = model.l2l_logit_scale if head == "h" else model.logit_scale
        assert torch.equal(ref.logit_scale.detach(), scale.detach())
    spec = models.parse_model_name("CL2L_VITT16_CL2L")
    mlp = models.build_model(spec, image_size=32, embed_dim=32, text_width=64, text_heads=1, text_layers=1,
                             recipe=models.RecipeOptions(separate_proj=True, cl2l_hidden_dim=16))
    with pytest.raises(weights.WeightsError, match=r"head h of CL2L_VITT16_CL2L: l2l_image_projection is an MLP "
                                                   r"\(Linear-BatchNorm1d-ReLU.*export head z, the global pair"):
        weights.export_pair(mlp, spec, {"image_size": 32, "context_length": 77}, head="h")


REFUSALS = [
    ("CLIP_R50_CLIP", {}, "openai", "R50 is timm's ResNet-50 with global average pooling"),
    ("CLIP_R50_CLIP", {}, "hf", "transformers' CLIP vision towers are ViTs: use --format open_clip"),
    ("CLIP_RN50_CLIP", RN50, "hf", "RN50 is OpenAI's ModifiedResNet"),
    ("CNCLIP_VITT16_CLIP", {"text_model": "BERT-tiny-chinese"}, "openai", "its text tower is a Chinese BERT"),
    ("CNCLIP_VITT16_CLIP", {"text_model": "BERT-tiny-chinese"}, "open_clip", "text_cfg.hf_model_name"),
    ("CLIP_VITT16_CLIP", {}, "cnclip", "Chinese-CLIP's text tower is a BERT"),
    ("CLIP_VITT16_SIGLIP", {}, "openai", "SigLIP's logit_bias has no place in an OpenAI CLIP state_dict"),
    ("CLIP_VITT16_SIGLIP", {}, "hf", "SigLIP's logit_bias has no place in a transformers"),
    ("CLIP_VITS16MOCO_CLIP", {}, "openai", "its vision tower has 12 heads of width 32; OpenAI's loader derives "
                                           "width // 64 = 6 heads"),
    ("CL2L_VITT16_CL2L", {"clip_proj_type": "mlp", "clip_hidden_dim": 16}, "open_clip",
     "head z of CL2L_VITT16_CL2L: image_projection is an MLP"),
]


@pytest.mark.parametrize("name,flags,fmt,reason", REFUSALS)
def test_export_refuses_what_does_not_fit_and_says_why(tmp_path, checkpoint, name, flags, fmt, reason):
    ckpt, _ = checkpoint(name, **flags)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        weights.main(["export", ckpt, "--format", fmt, "--out", str(out)])
    assert str(err.value).startswith(f"weights.py export: {ckpt}: ") and reason in str(err.value)
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".json")


def test_vit_that_is_not_clips_is_refused_with_each_difference():
    """A ViT without ln_pre and with GELU is not OpenAI's ViT: every format names both differences."""
    spec = models.parse_model_name("CLIP_VITT16_CLIP")
    model = models.build_model(spec, image_size=32, embed_dim=32, text_layers=1).eval()
    model.visual.norm_pre = torch.nn.Identity()
    for block in model.visual.blocks:
        block.mlp.act = torch.nn.GELU()
    pair = weights.export_pair(model, spec, {"image_size": 32, "context_length": 77})
    for fmt in weights.EXPORT_FORMATS:
        reasons = weights.export_refusals(pair, fmt)
        assert "its ViT has no LayerNorm before the blocks (CLIP's ln_pre)" in reasons
        assert "its ViT has an MLP activation other than QuickGELU" in reasons


@pytest.mark.parametrize("backbone", ["VITS16", "VITB16", "VITB32", "VITL14", "VITL14336", "VITH14", "RN50"])
def test_every_registered_backbone_fits_open_clip_and_its_config_builds_our_shapes(backbone):
    """Full-size backbones on the meta device: no refusal for open_clip (nor for hf, for the ViTs), and open_clip's
    CLIP built from the exported config takes our keys with our shapes."""
    import open_clip

    name = f"CLIP_{backbone}_CLIP"
    spec = models.parse_model_name(name)
    with torch.device("meta"):
        model = models.build_model(spec)
        pair = weights.export_pair(model, spec, {"image_size": spec.backbone.image_size, "context_length": 77})
        ref = open_clip.CLIP(**weights.open_clip_config(pair))
    assert weights.export_refusals(pair, "open_clip") == []
    assert weights.export_refusals(pair, "hf") == ([] if backbone != "RN50" else
                                                   [r for r in weights.export_refusals(pair, "hf") if "RN50" in r])
    shapes = {k: tuple(v.shape) for k, v in weights.ours_to_open_clip(pair.state).items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    openai_ok = backbone != "VITH14"  # 16 heads of 80: OpenAI's loader would build 20
    assert (weights.export_refusals(pair, "openai") == []) == openai_ok


def patch_clip_benchmark_accuracy(monkeypatch) -> None:
    """CLIP_benchmark 1.6.2's zero-shot accuracy() calls float() on a 1-element array, which NumPy >= 2.4 refuses
    (LAION-AI/CLIP_benchmark#147, open): where it fails, the same top-k count with a 0-d sum instead."""
    from clip_benchmark.metrics import zeroshot_classification as zc

    try:
        zc.accuracy(torch.eye(2), torch.arange(2))
    except TypeError:
        def accuracy(output, target, topk=(1,)):
            correct = output.topk(max(topk), 1, True, True)[1].t() == target.view(1, -1)  # (k, N)
            return [float(correct[:k].float().sum()) / len(target) for k in topk]

        monkeypatch.setattr(zc, "accuracy", accuracy)


class DigitsSubset:
    """The first `n` images of the catalog's digits test split: a reader (read, label) for eval_zeroshot and a
    dataset with `classes` and `{c}` templates for CLIP_benchmark's converter (it fills templates with
    .format(c=name) where ours use .format(name))."""

    def __init__(self, n: int) -> None:
        self.reader = readers.build_reader("digits", "test")
        self.n = n
        self.classes, templates = readers.load_labels_and_templates("digits")
        self.templates = [t.replace("{}", "{c}") for t in templates]

    def __len__(self) -> int:
        return self.n

    def read(self, index: int):
        return self.reader.read(index)

    def label(self, index: int) -> int:
        return self.reader.label(index)

    def __getitem__(self, index: int):
        return self.read(index)[0], self.label(index)


def test_clip_benchmark_on_the_open_clip_export_matches_eval_zeroshot(tmp_path, checkpoint, monkeypatch):
    """CLIP_benchmark (`clip_benchmark eval`, its own CLI entry) on the open_clip export, with 100 digits written in
    its webdataset layout by its converter with our class names and templates: the same top-1/top-5 as
    eval_zeroshot's evaluate_dataset (what eval_zeroshot.py runs per dataset) on the same images, and its classifier
    and logits equal ours (x 100) to 1e-5 (fp32: --no_amp)."""
    import sys

    import open_clip
    from clip_benchmark import cli
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    import eval_zeroshot

    ckpt, model = checkpoint("CLIP_VITT16_CLIP")
    export = str(tmp_path / "open_clip")
    weights.export(ckpt, "open_clip", export)
    digits = DigitsSubset(100)
    ours = eval_zeroshot.evaluate_dataset(model, datasets.BpeTokenizer(77), "digits", "en", 32, torch.device("cpu"),
                                          reader=digits)
    root = str(tmp_path / "wds_digits")
    convert_dataset(digits, "test", root, transform=PIL_to_bytes("png"), verbose=False)
    patch_clip_benchmark_accuracy(monkeypatch)
    results, classifier = str(tmp_path / "clip_benchmark.json"), str(tmp_path / "classifier.pt")
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "eval", "--model", "local-dir:" + export, "--dataset",
                                      "wds/digits", "--dataset_root", root, "--task", "zeroshot_classification",
                                      "--no_amp", "--num_workers", "0", "--batch_size", "100", "--quiet",
                                      "--save_clf", classifier, "--output", results])
    cli.main()
    metrics = read_record(results)["metrics"]
    assert ours["num_images"] == 100 and 100 * metrics["acc1"] == pytest.approx(ours["acc1_z"])
    assert 100 * metrics["acc5"] == pytest.approx(ours["acc5_z"])

    # per class and per image: its classifier (C columns) is ours, its logits are 100 x our cosine similarities
    tokenizer = datasets.BpeTokenizer(77)
    templates = readers.load_labels_and_templates("digits")[1]
    cpu = torch.device("cpu")
    ours_classifier = eval_zeroshot.zeroshot_classifier(model, tokenizer, digits.classes, templates, cpu)
    assert_close(torch.load(classifier, weights_only=True).t(), ours_classifier)
    ref, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + export)
    bench = build_dataset("wds/digits", root=root, transform=preprocess, split="test")
    logits, labels = zc.run_classification(ref.eval(), ours_classifier.t(), torch.utils.data.DataLoader(
        bench.batched(100), batch_size=None), "cpu", amp=False)
    loader = torch.utils.data.DataLoader(datasets.ClassificationDataset(digits, datasets.val_transform(32)),
                                         batch_size=100)
    sims, ours_labels = eval_zeroshot.zeroshot_similarities(model, tokenizer, digits.classes, templates, loader, cpu)
    assert torch.equal(labels, ours_labels)
    assert_close(logits / 100, sims["z"])
