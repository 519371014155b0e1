"""Pretrained-weight compatibility: reference models (open_clip for the OpenAI layout, the cn-clip wheel's
model code for Chinese-CLIP) with random weights, saved in their native formats, loaded into ours; the
image and text features must agree to 1e-5 in fp32."""
import os

import pytest
import torch

import datasets
import models
import readers
import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def open_clip_model(vision: dict, embed_dim: int = 32):
    """A small OpenAI-layout CLIP from open_clip (QuickGELU, as OpenAI's checkpoints)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=embed_dim, vision_cfg=CLIPVisionCfg(**vision), text_cfg=CLIPTextCfg(width=64, heads=1,
                 layers=2), quick_gelu=True).eval()
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def cn_clip_model(vision_layers, vision_width: int, patch, image_size: int, embed_dim: int = 32):
    """A small Chinese-CLIP model from the cn-clip wheel (its own BERT and towers), BERT-tiny-chinese text."""
    cn_model = pytest.importorskip("cn_clip.clip.model")
    torch.manual_seed(0)
    cfg = models.BERT_CONFIGS["BERT-tiny-chinese"]
    model = cn_model.CLIP(embed_dim=embed_dim, image_resolution=image_size, vision_layers=vision_layers,
                          vision_width=vision_width, vision_patch_size=patch, vocab_size=21128,
                          text_attention_probs_dropout_prob=0.1, text_hidden_act="gelu", text_hidden_dropout_prob=0.1,
                          text_hidden_size=cfg["hidden_size"], text_initializer_range=0.02,
                          text_intermediate_size=cfg["intermediate_size"], text_max_position_embeddings=512,
                          text_num_attention_heads=cfg["num_attention_heads"],
                          text_num_hidden_layers=cfg["num_hidden_layers"], text_type_vocab_size=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours(name: str, **kwargs):
    torch.manual_seed(1)
    return models.build_model(models.parse_model_name(name), **kwargs).eval()


EN = ["a photo of a cat", "a red car on the street", "two dogs"]
ZH = ["一张猫的照片", "街上的红色汽车", "两只狗在草地上奔跑"]


def assert_same_features(ref_img, ref_txt, model, images, tokens):
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
    assert (img - ref_img).abs().max() <= TOL
    assert (txt - ref_txt).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["vit", "rn50"])
def test_openai_state_dict_matches_open_clip(tmp_path, arch):
    vision = dict(layers=12, width=192, patch_size=16, image_size=32) if arch == "vit" else \
        dict(layers=(3, 4, 6, 3), width=64, image_size=64)
    embed = 32 if arch == "vit" else 1024
    ref = open_clip_model(vision, embed)
    path = tmp_path / "openai.pt"
    torch.save(ref.state_dict(), path)
    config = weights.infer_config(weights.read_state_dict(str(path)))
    assert config["name"] == ("CLIP_VITT16_CLIP" if arch == "vit" else "CLIP_RN50_CLIP")
    model = ours(config["name"], **config["kwargs"])
    weights.load_weights(model, str(path))
    images = torch.randn(2, 3, vision["image_size"], vision["image_size"])
    tokens = datasets.BpeTokenizer(77)(EN)
    with torch.no_grad():
        ref_img, ref_txt = ref.encode_image(images), ref.encode_text(tokens)
    assert_same_features(ref_img, ref_txt, model, images, tokens)
    assert torch.equal(model.logit_scale, ref.logit_scale.detach())
    # the reverse layout gives back the reference's own keys and values
    back = weights.ours_to_openai(model.state_dict())
    ref_sd = {k: v for k, v in ref.state_dict().items() if k != "attn_mask"}
    assert set(back) == set(ref_sd)
    assert all(torch.equal(back[k], ref_sd[k]) for k in ref_sd)


def test_torchscript_archive_read_without_running_it(tmp_path):
    ref = open_clip_model(dict(layers=12, width=192, patch_size=16, image_size=32))
    path = str(tmp_path / "ViT-T-16.pt")
    torch.jit.script(ref).save(path)
    sd = weights.read_torchscript_state_dict(path)
    ref_sd = ref.state_dict()
    assert {k for k in sd if k != "attn_mask"} == set(ref_sd) - {"attn_mask"}
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd if k != "attn_mask")
    # the converter writes a plain state_dict that loads with weights_only=True
    out = str(tmp_path / "plain.pt")
    weights.main(["convert-openai", path, out])
    plain = torch.load(out, weights_only=True)
    assert all(torch.equal(plain[k], ref_sd[k]) for k in ref_sd if k != "attn_mask")
    model = ours("CLIP_VITT16_CLIP", image_size=32, embed_dim=32, text_width=64, text_heads=1, text_layers=2)
    weights.load_weights(model, path)
    images, tokens = torch.randn(2, 3, 32, 32), datasets.BpeTokenizer(77)(EN)
    with torch.no_grad():
        assert_same_features(ref.encode_image(images), ref.encode_text(tokens), model, images, tokens)


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
    import pickle
    import zipfile

    path = tmp_path / "evil.pt"
    payload = pickle.dumps(os.system)  # a pickle that would call os.system on a plain torch.load
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/constants.pkl", pickle.dumps(()))
    with pytest.raises(weights.WeightsError, match="posix.system|os.system|without running"):
        weights.read_state_dict(str(path))


class _RunsTouch:
    """Unpickling this runs `touch marker`: weights_only=True must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def corrupt_files(tmp_path) -> dict[str, str]:
    """{kind: path} of files no checkpoint reader may accept: a pickle naming os.system, a torch.save cut in
    half, text, a safetensors file cut short, a shard index that is not JSON."""
    from safetensors.torch import save_file

    torch.save({"model": {"w": torch.ones(2)}, "hook": _RunsTouch(str(tmp_path / "pwned"))}, tmp_path / "unsafe.pt")
    torch.save({"model": {"w": torch.ones(64, 64)}}, tmp_path / "good.pt")
    whole = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    save_file({"w": torch.ones(64)}, str(tmp_path / "good.safetensors"))
    whole = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:-8])
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "model.safetensors.index.json").write_text('{"weight_map": {"w": "a.safe')
    return {kind: str(tmp_path / name) for kind, name in [("unsafe", "unsafe.pt"), ("truncated", "truncated.pt"),
                                                          ("text", "text.pt"), ("safetensors", "cut.safetensors"),
                                                          ("shard index", "shards")]}


def test_every_reader_names_a_bad_file_without_advising_weights_only_false(tmp_path):
    """utils.load_checkpoint (resume) and weights.read_state_dict (pretrained, eval, export) are one weights_only
    reader: a bad file is a CheckpointError naming it, nothing in it runs, and torch's advice to retry with
    weights_only=False (wrong for a corrupt file, unsafe for an untrusted one) is not repeated."""
    import utils

    for kind, path in corrupt_files(tmp_path).items():
        readers_of_kind = [weights.read_state_dict] + ([utils.load_checkpoint] if path.endswith(".pt") else [])
        for read in readers_of_kind:
            with pytest.raises(utils.CheckpointError) as info:
                read(path)
            message = str(info.value)
            assert os.path.basename(path) in message and "weights_only=False" not in message, (kind, message)
            assert "\n" not in message, (kind, message)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(utils.CheckpointError, match=r"unsafe\.pt.*posix\.system.*corrupt, truncated or holds objects"):
        utils.load_checkpoint(str(tmp_path / "unsafe.pt"))


@pytest.mark.parametrize("kind", ["unsafe", "truncated"])
def test_eval_clis_refuse_a_bad_checkpoint_in_one_line(tmp_path, kind, capsys):
    """eval_zeroshot.py and eval_retrieval.py extract end with one line naming the file, not a traceback."""
    import eval_retrieval
    import eval_zeroshot

    path = corrupt_files(tmp_path)[kind]
    with pytest.raises(SystemExit) as info:
        eval_zeroshot.main(["--resume", path, "--device", "cpu", "--output-dir", str(tmp_path / "out")])
    assert str(info.value).startswith(f"eval_zeroshot: cannot load checkpoint '{path}'"), info.value
    with pytest.raises(SystemExit) as info:
        eval_retrieval.main(["extract", "--pretrained", path, "--device", "cpu", "--text-data", path,
                             "--output-dir", str(tmp_path / "out")])
    assert str(info.value).startswith(f"extract: cannot load checkpoint '{path}'"), info.value
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("arch", ["vit", "rn50"])
def test_cnclip_checkpoint_matches_cn_clip_and_exports_back(tmp_path, arch):
    if arch == "vit":
        ref = cn_clip_model(12, 192, 16, 32)
        size, name, embed = 32, "CNCLIP_VITT16_CLIP", 32
    else:
        ref = cn_clip_model([3, 4, 6, 3], 64, None, 64, embed_dim=1024)
        size, name, embed = 64, "CNCLIP_RN50_CLIP", 1024
    path = tmp_path / "epoch_latest.pt"
    torch.save({"epoch": 3, "step": 735, "name": "muge_finetune",
                "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    config = weights.infer_config(weights.read_state_dict(str(path)))
    kwargs = config["kwargs"]
    assert config["name"] == name and kwargs["text_model"] == "BERT-tiny-chinese" and kwargs["embed_dim"] == embed
    model = ours(config["name"], **config["kwargs"])
    weights.load_weights(model, str(path))
    images = torch.randn(2, 3, size, size)
    tokens = datasets.BertTokenizer(52)(ZH)
    with torch.no_grad():
        ref_img, ref_txt = ref.encode_image(images), ref.encode_text(tokens)
    assert_same_features(ref_img, ref_txt, model, images, tokens)

    # reverse export: Chinese-CLIP's own code loads it strictly and gives the same features
    ckpt = tmp_path / "ours.pt"
    torch.save({"model": model.state_dict(), "epoch": 1, "step": 7, "args": {"name": "mine"}}, ckpt)
    out = tmp_path / "cn.pt"
    weights.export_cnclip(str(ckpt), str(out))
    exported = torch.load(out, weights_only=True)
    assert (exported["epoch"], exported["step"], exported["name"]) == (1, 7, "mine")
    assert all(k.startswith("module.") for k in exported["state_dict"])
    with torch.no_grad():
        for p in ref.parameters():  # scramble, then restore from the export only
            p.normal_()
    ref.load_state_dict({k.removeprefix("module."): v for k, v in exported["state_dict"].items()}, strict=True)
    with torch.no_grad():
        assert (ref.encode_image(images) - ref_img).abs().max() <= TOL
        assert (ref.encode_text(tokens) - ref_txt).abs().max() <= TOL


def test_muge_baseline_init_roberta_text_and_openai_vision(tmp_path):
    """A RoBERTa `pytorch_model.bin` (bert.* + pooler + MLM head) into the text tower and an OpenAI CLIP
    checkpoint's vision tower into the image side, as the MUGE baseline initialises."""
    from transformers import BertConfig, BertForPreTraining

    cfg = models.BERT_CONFIGS["BERT-tiny-chinese"]
    torch.manual_seed(2)
    bert = BertForPreTraining(BertConfig(vocab_size=21128, **cfg)).eval()
    bert_dir = tmp_path / "chinese-roberta"
    bert.save_pretrained(bert_dir, safe_serialization=False)
    openai = open_clip_model(dict(layers=12, width=192, patch_size=16, image_size=32))
    clip_path = tmp_path / "ViT-T-16.state_dict.pt"
    torch.save(openai.state_dict(), clip_path)
    model = ours("CNCLIP_VITT16_CLIP", image_size=32, embed_dim=32, text_model="BERT-tiny-chinese")
    loaded = weights.load_weights(model, f"{clip_path},{bert_dir}")
    assert loaded[str(bert_dir)] == ["text"] and loaded[str(clip_path)] == ["image_projection", "logit_scale", "vision"]
    images, tokens = torch.randn(2, 3, 32, 32), datasets.BertTokenizer(52)(ZH)
    with torch.no_grad():
        assert (model.encode_image(images) - openai.encode_image(images)).abs().max() <= TOL
        mask = (tokens != 0).long()
        cls = bert.bert(input_ids=tokens, attention_mask=mask).last_hidden_state[:, 0]
        assert (model.text(tokens) - cls).abs().max() <= TOL


def test_roberta_pytorch_model_bin_with_tf_layernorm_names(tmp_path):
    """An older Chinese RoBERTa `pytorch_model.bin` (torch.save of the state_dict, as TF-converted checkpoints
    ship: LayerNorm.gamma/beta, the pooler and the MLM/NSP heads), as a folder and as the file itself."""
    import re

    from transformers import BertConfig, BertForPreTraining

    cfg = models.BERT_CONFIGS["BERT-tiny-chinese"]
    torch.manual_seed(3)
    bert = BertForPreTraining(BertConfig(vocab_size=21128, **cfg)).eval()
    with torch.no_grad():  # LayerNorms away from their 1/0 initialisation, so a skipped one would show
        for name, p in bert.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    sd = {re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", k)): v
          for k, v in bert.state_dict().items()}
    assert any(k.endswith("LayerNorm.gamma") for k in sd) and not any(k.endswith("LayerNorm.weight") for k in sd)
    assert any(k.startswith("bert.pooler.") for k in sd) and any(k.startswith("cls.") for k in sd)
    folder = tmp_path / "chinese-roberta-wwm-ext"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    tokens = datasets.BertTokenizer(52)(ZH)
    with torch.no_grad():
        cls = bert.bert(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state[:, 0]
    for source in (folder, folder / "pytorch_model.bin"):
        model = ours("CNCLIP_VITT16_CLIP", image_size=32, embed_dim=32, text_model="BERT-tiny-chinese")
        assert weights.load_weights(model, str(source)) == {str(source): ["text"]}
        with torch.no_grad():
            assert (model.text(tokens) - cls).abs().max() <= TOL


def test_fp16_torchscript_archive_loads_as_fp32(tmp_path):
    """OpenAI's released archives are fp16 TorchScript: the HalfStorage tensors are read exactly, loaded into
    fp32 weights, and give the features of the reference with its weights rounded to fp16 (to 1e-5), within
    fp16 rounding of the fp32 reference."""
    import copy

    ref = open_clip_model(dict(layers=12, width=192, patch_size=16, image_size=32))
    half = copy.deepcopy(ref).half()
    path = str(tmp_path / "ViT-T-16.pt")
    torch.jit.script(half).save(path)
    sd = weights.read_torchscript_state_dict(path)
    half_sd = half.state_dict()
    assert sd["visual.conv1.weight"].dtype == torch.float16
    assert all(torch.equal(sd[k], half_sd[k]) for k in half_sd if k != "attn_mask")
    model = ours("CLIP_VITT16_CLIP", image_size=32, embed_dim=32, text_width=64, text_heads=1, text_layers=2)
    weights.load_weights(model, path)
    assert model.visual.pos_embed.dtype == torch.float32
    rounded = half.float()
    images, tokens = torch.randn(2, 3, 32, 32), datasets.BpeTokenizer(77)(EN)
    with torch.no_grad():
        assert_same_features(rounded.encode_image(images), rounded.encode_text(tokens), model, images, tokens)
        img, fp32_img = model.encode_image(images), ref.encode_image(images)
        assert 0 < (img - fp32_img).abs().max() <= 1e-2 * fp32_img.abs().max()


def test_openai_into_cnclip_ignores_text_side_with_a_message_and_refuses_unknown_vision_keys(tmp_path, caplog):
    """The MUGE baseline init takes an OpenAI checkpoint's vision tower only: its text tower (and unknown
    non-vision keys) are ignored and listed in the log; an unknown vision key is an error, as in any load."""
    openai = open_clip_model(dict(layers=12, width=192, patch_size=16, image_size=32))
    sd = openai.state_dict()
    sd["text_extra.weight"] = torch.zeros(3)
    path = tmp_path / "openai.pt"
    torch.save(sd, path)
    model = ours("CNCLIP_VITT16_CLIP", image_size=32, embed_dim=32, text_model="BERT-tiny-chinese")
    n_text = sum(1 for k in weights.to_ours(sd) if k.startswith(("text.", "text_projection", "unexpected:text")))
    with caplog.at_level("INFO", logger="clip_lab"):
        assert weights.load_weights(model, str(path))[str(path)] == ["image_projection", "logit_scale", "vision"]
    assert f"ignored {n_text} text-side keys" in caplog.text and n_text == 30
    sd["visual.extra_head.weight"] = torch.zeros(2)
    torch.save(sd, path)
    with pytest.raises(weights.WeightsError, match=r"unexpected keys \(1\): \['visual.extra_head.weight'\]"):
        weights.load_weights(model, str(path))


def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path):
    ref = open_clip_model(dict(layers=12, width=192, patch_size=16, image_size=32))
    sd = ref.state_dict()
    del sd["visual.transformer.resblocks.3.mlp.c_fc.weight"]
    sd["visual.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    model = ours("CLIP_VITT16_CLIP", image_size=32, embed_dim=32, text_width=64, text_heads=1, text_layers=2)
    with pytest.raises(weights.WeightsError) as err:
        weights.load_weights(model, str(path))
    msg = str(err.value)
    assert "visual.blocks.3.mlp.fc1.weight" in msg and "visual.extra_head.weight" in msg and "broken.pt" in msg
    # a checkpoint of another size is refused with the shapes named
    small = ours("CLIP_VITT16_CLIP", image_size=32, embed_dim=16, text_width=64, text_heads=1, text_layers=2)
    torch.save(small.state_dict(), path)
    with pytest.raises(weights.WeightsError, match="shape mismatches"):
        weights.load_weights(model, str(path))


def test_position_embeddings_resized_for_another_resolution(tmp_path):
    ref = open_clip_model(dict(layers=12, width=192, patch_size=16, image_size=32))
    path = tmp_path / "openai.pt"
    torch.save(ref.state_dict(), path)
    model = ours("CLIP_VITT16_CLIP", image_size=64, embed_dim=32, text_width=64, text_heads=1, text_layers=2)
    weights.load_weights(model, str(path))
    pos = model.visual.pos_embed
    assert pos.shape == (1, 17, 192)
    assert torch.equal(pos[0, 0], ref.visual.positional_embedding[0])
    grid = pos[0, 1:].reshape(4, 4, 192)
    old = ref.visual.positional_embedding[1:].reshape(2, 2, 192)
    # align_corners=True keeps the corner tokens exactly
    assert torch.allclose(grid[0, 0], old[0, 0], atol=1e-6) and torch.allclose(grid[3, 3], old[1, 1], atol=1e-6)


@pytest.mark.slow
def test_finetune_recipe_from_cnclip_checkpoint(tmp_path, muge_sample_root):
    """main.py --pretrained <Chinese-CLIP .pt> --freeze-vision --use-augment on the MUGE-format sample: the image
    tower keeps the released weights, the text tower trains, and --evaluate reports recall over the pool."""
    import argparse

    import timm.data.auto_augment

    import eval_retrieval
    import main

    ref = cn_clip_model(12, 192, 16, 32)
    path = tmp_path / "clip_cn_tiny.pt"
    torch.save({"epoch": 0, "step": 0, "name": "tiny", "state_dict": {"module." + k: v for k, v in
                                                                     ref.state_dict().items()}}, path)
    flags = ["--model", "CNCLIP_VITT16_CLIP", "--text-model", "BERT-tiny-chinese", "--embed-dim", "32",
             "--image-size", "32", "--dataset", "muge-sample", "--data-root", muge_sample_root, "--pretrained",
             str(path), "--freeze-vision", "--use-augment", "--lr", "5e-5", "--wd", "0.001", "--warmup-steps", "1",
             "--batch-size", "8", "--workers", "0", "--epochs", "1", "--output-dir", str(tmp_path / "exp")]
    main.main(flags + ["--name", "ft", "--max-steps", "2"])
    state = torch.load(tmp_path / "exp" / "ft" / "checkpoint.pt", weights_only=True)["model"]
    released = weights.cnclip_to_ours(torch.load(path, weights_only=True)["state_dict"])
    vision = [k for k in released if k.startswith(("visual.", "image_projection."))]
    assert vision and all(torch.equal(state[k], released[k]) for k in vision)
    text = [k for k in released if k.startswith("text.bert.encoder")]
    assert any(not torch.equal(state[k], released[k]) for k in text)
    args = main.parse_args(flags)
    dataset = datasets.build_train_dataset(models.parse_model_name(args.model), args, readers.SyntheticReader(4),
                                       32, datasets.build_tokenizer("bert", 52))
    assert any(isinstance(t, timm.data.auto_augment.AutoAugment) for t in dataset.transform.transforms)
    assert isinstance(args, argparse.Namespace) and args.warmup_steps == 1
    summary = main.main(flags + ["--name", "eval", "--evaluate"])
    reader = readers.build_reader("muge-sample", "test", data_root=muge_sample_root)
    pairs = eval_retrieval.reader_pairs(reader)
    assert summary["pool_images"] == len({p[0] for p in pairs}) and summary["pool_texts"] == len({p[1] for p in pairs})
    assert 0 <= summary["text_to_image_R@1"] <= summary["text_to_image_R@10"] <= 100


CNCLIP_RELEASED = [("RN50", "RBT3-chinese", "RN50"), ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese", "VITB16"),
                   ("ViT-L-14", "RoBERTa-wwm-ext-base-chinese", "VITL14"),
                   ("ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese", "VITL14336"),
                   ("ViT-H-14", "RoBERTa-wwm-ext-large-chinese", "VITH14")]


@pytest.mark.parametrize("vision,text,backbone", CNCLIP_RELEASED)
def test_every_released_cnclip_configuration_maps_key_for_key(vision, text, backbone):
    """Chinese-CLIP's own model code with its shipped JSON configs, built on the meta device (shapes only):
    every key maps onto our CNCLIP model with the same shape, the architecture is inferred, and back."""
    import json

    cn_model = pytest.importorskip("cn_clip.clip.model")
    folder = os.path.join(os.path.dirname(cn_model.__file__), "model_configs")
    info = {}
    for name in (vision, text):
        with open(os.path.join(folder, name + ".json"), encoding="utf-8") as f:
            info.update(json.load(f))
    if isinstance(info["vision_layers"], str):  # "[3,4,6,3]" in RN50.json
        info["vision_layers"] = [int(x) for x in info["vision_layers"].strip("[]").split(",")]
    with torch.device("meta"):
        ref = {"module." + k: v for k, v in cn_model.CLIP(**info).state_dict().items()}
        converted = weights.cnclip_to_ours(ref)
        config = weights.infer_config(converted)
        target = models.build_model(models.parse_model_name(f"CNCLIP_{backbone}_CLIP"), text_model=text).state_dict()
    assert config["name"] == f"CNCLIP_{backbone}_CLIP" and config["kwargs"]["text_model"] == text
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in target.items()}
    back = weights.ours_to_cnclip(target)
    assert {k: tuple(v.shape) for k, v in back.items()} == \
        {k: tuple(v.shape) for k, v in ref.items() if "bert.pooler" not in k}


@pytest.mark.parametrize("name,ours_name", [("RN50", "CLIP_RN50_CLIP"), ("ViT-B-32", "CLIP_VITB32_CLIP"),
                                            ("ViT-B-16", "CLIP_VITB16_CLIP"), ("ViT-L-14", "CLIP_VITL14_CLIP")])
def test_every_openai_configuration_maps_key_for_key(name, ours_name):
    """open_clip's OpenAI-layout configs (the released OpenAI checkpoints' keys), on the meta device."""
    import open_clip

    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, device="meta").state_dict()
        converted = weights.openai_to_ours(ref)
        config = weights.infer_config(converted)
        target = models.build_model(models.parse_model_name(ours_name)).state_dict()
    assert config["name"] == ours_name
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in target.items()}
    assert set(weights.ours_to_openai(target)) == set(ref) - {"attn_mask"}


def test_whole_clip_source_must_bring_projections_and_partial_loads_warn(tmp_path, caplog):
    model = ours("CLIP_VITT16_CLIP", image_size=32, embed_dim=32, text_width=64, text_heads=1, text_layers=2)
    sd = model.state_dict()
    sd.pop("text_projection.weight")  # a whole CLIP (vision + text) without one projection
    torch.save(sd, tmp_path / "no_proj.pt")
    with pytest.raises(weights.WeightsError, match=r"missing keys \(1\): \['text_projection.weight'\]"):
        weights.load_weights(model, str(tmp_path / "no_proj.pt"))
    vision_only = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    torch.save(vision_only, tmp_path / "vision.pt")
    with caplog.at_level("WARNING", logger="clip_lab"):
        assert weights.load_weights(model, str(tmp_path / "vision.pt")) == {str(tmp_path / "vision.pt"): ["vision"]}
    assert "random initialisation: image_projection, text, text_projection" in caplog.text


def _spy_load_model_for_eval(monkeypatch) -> dict:
    """Record what the eval scripts' weights.load_model_for_eval returns (model, spec, info)."""
    seen: dict = {}
    real = weights.load_model_for_eval

    def spy(**kwargs):
        seen["model"], seen["spec"], seen["info"] = real(**kwargs)
        return seen["model"], seen["spec"], seen["info"]

    monkeypatch.setattr(weights, "load_model_for_eval", spy)
    return seen


def test_eval_retrieval_extract_with_pretrained_cnclip_checkpoint(tmp_path, muge_sample_root, monkeypatch):
    """`eval_retrieval.py extract --pretrained <Chinese-CLIP .pt>` on the muge-sample LMDB and texts: the model
    and context length 52 are inferred, and the features are Chinese-CLIP's own (its model, its tokenizer and
    text preprocessing, the squash transform) to 1e-5."""
    import json
    from io import BytesIO

    from cn_clip.clip import tokenize
    from cn_clip.eval.data import _preprocess_text
    from PIL import Image

    import eval_retrieval

    ref = cn_clip_model(12, 192, 16, 32)
    pt = tmp_path / "clip_cn_vit-t-16.pt"
    torch.save({"epoch": 2, "step": 40, "name": "tiny", "state_dict": {"module." + k: v for k, v in
                                                                      ref.state_dict().items()}}, pt)
    data = os.path.join(muge_sample_root, "muge-sample")
    seen = _spy_load_model_for_eval(monkeypatch)
    out = tmp_path / "feats"
    assert eval_retrieval.main(["extract", "--pretrained", str(pt), "--image-data",
                                os.path.join(data, "lmdb", "valid", "imgs"), "--text-data",
                                os.path.join(data, "valid_texts.jsonl"), "--output-dir", str(out), "--device", "cpu",
                                "--workers", "0"]) == 0
    assert seen["spec"].name == "CNCLIP_VITT16_CLIP"
    assert seen["info"]["context_length"] == 52 and seen["info"]["image_size"] == 32
    img_ids, img = eval_retrieval.load_features(str(out / "features.img_feat.npy"))
    txt_ids, txt = eval_retrieval.load_features(str(out / "features.txt_feat.npy"))
    records = list(eval_retrieval.iter_image_records(os.path.join(data, "lmdb", "valid", "imgs")))
    assert img_ids.tolist() == [i for i, _ in records]
    transform = datasets.squash_transform(32)
    pixels = torch.stack([transform(Image.open(BytesIO(raw))) for _, raw in records])
    lines = [json.loads(line) for line in open(os.path.join(data, "valid_texts.jsonl"), encoding="utf-8")]
    assert txt_ids.tolist() == [r["text_id"] for r in lines]
    tokens = tokenize([_preprocess_text(r["text"]) for r in lines], context_length=52)
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(ref.encode_image(pixels), dim=-1).numpy()
        ref_txt = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1).numpy()
    assert abs(img - ref_img).max() <= TOL and abs(txt - ref_txt).max() <= TOL


def test_eval_zeroshot_with_pretrained_openai_state_dict(tmp_path, monkeypatch):
    """`eval_zeroshot.py --pretrained <OpenAI-layout state_dict> --datasets digits`: CLIP_VITT16_CLIP and context 77
    are inferred, and the accuracy equals the open_clip reference model's own zero-shot accuracy."""
    import json

    import eval_zeroshot

    ref = open_clip_model(dict(layers=12, width=192, patch_size=16, image_size=32))
    pt = tmp_path / "ViT-T-16.pt"
    torch.save(ref.state_dict(), pt)
    seen = _spy_load_model_for_eval(monkeypatch)
    results = eval_zeroshot.main(["--pretrained", str(pt), "--datasets", "digits", "--output-dir",
                                  str(tmp_path / "zs"), "--device", "cpu"])
    assert seen["spec"].name == "CLIP_VITT16_CLIP"
    assert seen["info"]["context_length"] == 77 and seen["info"]["image_size"] == 32
    written = json.loads((tmp_path / "zs" / "zeroshot_ViT-T-16.json").read_text())
    assert written["model"] == "CLIP_VITT16_CLIP" and written["pretrained"] == str(pt)

    class Reference(torch.nn.Module):  # open_clip's towers behind our encode_* signature (full 77 tokens)
        def encode_image(self, images, head="z"):
            return ref.encode_image(images)

        def encode_text(self, tokens, head="z"):
            return ref.encode_text(torch.nn.functional.pad(tokens, (0, 77 - tokens.shape[1])))

    loader = torch.utils.data.DataLoader(datasets.ClassificationDataset(readers.build_reader("digits", "test"),
                                                                        datasets.val_transform(32)), batch_size=256)
    classnames, templates = readers.load_labels_and_templates("digits")
    expect = eval_zeroshot.zeroshot_accuracy(Reference(), datasets.build_tokenizer("bpe", 77), classnames, templates,
                                             loader, torch.device("cpu"))
    assert results["digits"]["acc1_z"] == pytest.approx(expect["acc1_z"])
    assert results["digits"]["acc5_z"] == pytest.approx(expect["acc5_z"])


# --------------------------------------------------------------------------- checkpoints that describe their model
MOCO = dict(image_size=32, embed_dim=16, text_width=128, text_heads=2, text_layers=1)


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_vits16moco_weights_alone_ask_for_the_model_instead_of_six_heads(tmp_path):
    """VITS16MOCO (12 heads) has exactly the weight shapes of VITS16 (6 heads): bare weights cannot tell them
    apart, so --pretrained alone names both and asks for --model (it used to rebuild 6 heads silently); with
    --model, or with the description our checkpoints carry, the model is the 12-head one, feature for feature."""
    model = ours("CLIP_VITS16MOCO_CLIP", **MOCO)
    assert model.visual.blocks[0].attn.num_heads == 12
    images, tokens = torch.randn(2, 3, 32, 32), datasets.BpeTokenizer(77)(EN[:2])
    expect = _features(model, images, tokens)
    bare = tmp_path / "moco_weights.pt"
    torch.save({"model": model.state_dict()}, bare)
    with pytest.raises(weights.WeightsError, match="VITS16, VITS16MOCO.*--model.*CLIP_VITS16MOCO_CLIP"):
        weights.load_model_for_eval(pretrained=str(bare), device="cpu")
    chosen, spec, info = weights.load_model_for_eval(pretrained=str(bare), model_name="CLIP_VITS16MOCO_CLIP",
                                                     device="cpu")
    assert spec.backbone.name == "VITS16MOCO" and info["image_size"] == 32
    for got, want in zip(_features(chosen, images, tokens), expect):
        torch.testing.assert_close(got, want)
    described = tmp_path / "moco_checkpoint.pt"
    config = models.model_config(models.parse_model_name("CLIP_VITS16MOCO_CLIP"), **MOCO)
    torch.save({"model": model.state_dict(), "model_config": config}, described)
    rebuilt, spec, _ = weights.load_model_for_eval(pretrained=str(described), device="cpu")
    assert spec.name == "CLIP_VITS16MOCO_CLIP" and rebuilt.visual.blocks[0].attn.num_heads == 12
    for got, want in zip(_features(rebuilt, images, tokens), expect):
        torch.testing.assert_close(got, want)
    with pytest.raises(weights.WeightsError, match="holds CLIP_VITS16MOCO_CLIP, not --model CLIP_VITS16_CLIP"):
        weights.load_model_for_eval(pretrained=str(described), model_name="CLIP_VITS16_CLIP", device="cpu")


def test_checkpoints_carry_their_model_and_older_ones_still_load(tiny_run_args, tmp_path):
    """main.py stores {"name", "kwargs"} of build_model (presets resolved, the recipe as a dict: JSON and
    weights_only-safe); the eval loader rebuilds from it. A checkpoint of the layout written before (the same
    payload without "model_config": its flags in "args" only) rebuilds the same model through the fallback."""
    import json

    import main

    flags = ["--model", "CLIP_VITT16_SIGLIP", "--clip-proj-type", "mlp", "--clip-hidden-dim", "24", "--embed-dim",
             "16", "--text-width", "64", "--text-heads", "2"]
    main.main(tiny_run_args + flags + ["--name", "described", "--max-steps", "1"])
    path = tmp_path / "experiments" / "described" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    config = ckpt["model_config"]
    assert json.loads(json.dumps(config)) == config
    assert config["name"] == "CLIP_VITT16_SIGLIP"
    assert {k: v for k, v in config["kwargs"].items() if k != "recipe"} == dict(
        image_size=32, embed_dim=16, text_model="transformer", text_width=64, text_heads=2, text_layers=1,
        context_length=77)
    assert config["kwargs"]["recipe"]["clip_proj_type"] == "mlp" and config["kwargs"]["recipe"]["clip_hidden_dim"] == 24
    old = tmp_path / "old_layout.pt"
    torch.save({k: v for k, v in ckpt.items() if k != "model_config"}, old)
    images, tokens = torch.randn(2, 3, 32, 32), datasets.BpeTokenizer(77)(EN[:2])
    new_model, new_spec, new_info = weights.load_model_for_eval(resume=str(path), device="cpu")
    old_model, old_spec, old_info = weights.load_model_for_eval(resume=str(old), device="cpu")
    assert old_info["config"] == config and old_spec == new_spec and old_info["image_size"] == 32
    assert type(old_model).__name__ == "SIGLIP" and isinstance(old_model.text_projection, torch.nn.Sequential)
    for got, want in zip(_features(old_model, images, tokens), _features(new_model, images, tokens)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(old_model.logit_bias, ckpt["model"]["logit_bias"])
