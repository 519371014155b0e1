"""Model registry, tiny forward passes, large towers on the meta device, text trimming, attention, checkpointing."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import datasets
import main
import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_NAMES = ["CLIP_VITB16_CLIP", "CLIP_R50_CLIP", "CNCLIP_VITB16_CLIP", "CNCLIP_VITH14_CLIP", "CLIP_VITT16_CLIP",
             "CNCLIP_VITT16_CLIP"]
TINY = ["CLIP_VITT16_CLIP", "CNCLIP_VITT16_CLIP"]


def param_count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def build_tiny(name: str, **overrides):
    kwargs = dict(image_size=32, text_layers=1 if name.startswith("CLIP_") else None)
    kwargs.update(overrides)
    return models.build_model(models.parse_model_name(name), **kwargs)


def tokenizer_of(name: str):
    spec = models.parse_model_name(name)
    return datasets.build_tokenizer(spec.base.tokenizer, spec.base.context_length)


CAPTIONS = {"CLIP": ["a photo of the number seven.", "a blurry photo of a small handwritten digit zero, please"],
            "CNCLIP": ["数字七的照片", "一张模糊的手写数字零的小照片"]}


# --------------------------------------------------------------------------- registry
def test_every_listed_name_parses_and_doc_names_are_listed():
    names = models.list_models()
    assert len(names) == len(set(names)) >= len(DOC_NAMES)
    for name in names:
        spec = models.parse_model_name(name)
        assert (spec.name, f"{spec.base.name}_{spec.backbone.name}_{spec.objective.name}") == (name, name)
    assert set(DOC_NAMES) <= set(names)


def test_list_models_pattern_is_case_insensitive():
    assert models.list_models("cnclip_*") == [n for n in models.list_models() if n.startswith("CNCLIP_")]
    assert models.list_models("*_vitt16_clip") == ["CLIP_VITT16_CLIP", "CNCLIP_VITT16_CLIP"]


@pytest.mark.parametrize("bad,suggestion", [("CLIP_VITB61_CLIP", "CLIP_VITB16_CLIP"),
                                            ("CNCLIP_VITH14_CLPI", "CNCLIP_VITH14_CLIP"),
                                            ("CLIP_VIT16_CLIP", "CLIP_VITT16_CLIP")])
def test_unknown_name_raises_with_close_match(bad, suggestion):
    with pytest.raises(models.ModelNameError, match="Did you mean") as info:
        models.parse_model_name(bad)
    assert suggestion in str(info.value) and "--list-models" in str(info.value)


def test_list_models_cli_prints_only_matching_names():
    out = subprocess.run([sys.executable, "main.py", "--list-models", "CNCLIP*"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == models.list_models("CNCLIP*")
    assert out and all(n.startswith("CNCLIP_") for n in out) and "CNCLIP_VITB16_CLIP" in out


@pytest.mark.parametrize("argv,needle", [
    (["--model", "CLIP_VITB16_CLPI"], "Did you mean: CLIP_VITB16_CLIP"),
    (["--model", "CLIP_VITT16_CLIP", "--text-model", "RBT3-chinese"], "--text-model 'RBT3-chinese'"),
    (["--model", "CNCLIP_VITT16_CLIP", "--text-model", "transformer"], "RoBERTa-wwm-ext-base-chinese"),
])
def test_invalid_model_flags_fail_at_parse_time(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main.parse_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_valid_text_model_choice_is_used():
    args = main.parse_args(["--model", "CNCLIP_VITT16_CLIP", "--text-model", "RBT3-chinese"])
    assert args.text_model == "RBT3-chinese"
    with torch.device("meta"):
        model = models.build_model(models.parse_model_name(args.model), **main.model_kwargs(args))
    assert model.text.bert.config.num_hidden_layers == 3 and model.text.width == 768


# --------------------------------------------------------------------------- tiny models run
@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_shapes_unit_norm_and_logit_scale(name):
    torch.manual_seed(0)
    model = build_tiny(name).eval()
    spec = models.parse_model_name(name)
    tokens = tokenizer_of(name)(CAPTIONS[spec.base.name])
    assert tokens.shape == (2, spec.base.context_length)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), tokens)
    D = spec.backbone.embed_dim
    assert out["image_embed"].shape == out["text_embed"].shape == (2, D)
    assert out["image_embed"].dtype == out["text_embed"].dtype == torch.float32
    torch.testing.assert_close(out["image_embed"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_embed"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert model.visual.patch_embed.img_size == (32, 32)


@pytest.mark.parametrize("name", TINY)
def test_embed_dim_override(name):
    model = build_tiny(name, embed_dim=64).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), tokenizer_of(name)("x"))
    assert out["image_embed"].shape == (1, 64)


def test_clamp_logit_scale_to_zero_and_ln100():
    model = build_tiny("CLIP_VITT16_CLIP")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 2.0


# --------------------------------------------------------------------------- large models on meta
# Reference counts. Chinese-CLIP (reference/chinese_clip.md §2.3: model card, and the ELEVATER json for ViT-B-16
# exactly: 188,262,913 parameters, 86,192,640 visual incl. projection): RN50 77M / 38M / 39M, ViT-B-16 188M / 86M /
# 102M, ViT-L-14 406M / 304M / 102M, ViT-L-14-336 407M, ViT-H-14 958M / 632M / 326M. OpenAI CLIP (its notebook's
# "Model parameters", the same in open_clip): RN50 102,007,137, ViT-B/32 151,277,313, ViT-B/16 149,620,737,
# ViT-L/14 427,616,513, ViT-L/14@336 427,944,193. R50 is timm's resnet50 as in clip-rocket (23.5M backbone + the
# 2048->embed projection), which no reference counts; its bounds are this model's own.
LARGE = {  # name: (total, visual incl. projection, text incl. projection): exact int, or (lo, hi) in millions
    "CNCLIP_VITB16_CLIP": (188_262_913, 86_192_640, (101.5, 102.5)),
    "CNCLIP_RN50_CLIP": ((76.5, 77.5), (37.5, 38.5), (38.5, 39.5)),
    "CNCLIP_VITL14_CLIP": ((405.5, 406.5), (303.5, 304.5), (101.5, 102.5)),
    "CNCLIP_VITL14336_CLIP": ((406.5, 407.5), (303.5, 304.5), (101.5, 102.5)),
    "CNCLIP_VITH14_CLIP": ((957.5, 958.5), (631.5, 632.5), (325.5, 326.5)),
    "CLIP_RN50_CLIP": (102_007_137, (38.0, 38.5), (63.5, 63.8)),
    "CLIP_VITB32_CLIP": (151_277_313, (87.5, 88.0), (63.3, 63.5)),
    "CLIP_VITB16_CLIP": (149_620_737, 86_192_640, (63.3, 63.5)),
    "CLIP_VITL14_CLIP": (427_616_513, (303.9, 304.1), (123.5, 123.7)),
    "CLIP_VITL14336_CLIP": (427_944_193, (304.2, 304.4), (123.5, 123.7)),
    "CLIP_R50_CLIP": ((89, 90), (25.5, 25.7), (63.6, 63.8)),
    "CNCLIP_R50_CLIP": ((64, 64.5), (25.5, 25.7), (38.5, 39)),
}


def _check(count: int, expected) -> None:
    if isinstance(expected, int):
        assert count == expected
    else:
        assert expected[0] <= count / 1e6 <= expected[1], f"{count / 1e6:.2f}M not in {expected}"


@pytest.mark.parametrize("name", sorted(set(models.list_models()) - set(TINY)))
def test_large_models_build_on_meta(name):
    spec = models.parse_model_name(name)
    with torch.device("meta"):
        model = models.build_model(spec)
    assert all(p.is_meta for p in model.parameters())
    if spec.backbone.projected:  # OpenAI's RN50: the attention pool projects to embed_dim itself
        assert isinstance(model.image_projection, torch.nn.Identity) and spec.backbone.width == spec.backbone.embed_dim
    else:
        assert model.image_projection.weight.shape == (spec.backbone.embed_dim, spec.backbone.width)
    if spec.objective.name != "CLIP":  # other objectives add heads; their recipes' tests check them
        return
    total = param_count(model)
    visual = param_count(model.visual, model.image_projection)
    text = param_count(model.text, model.text_projection)
    assert total == visual + text + 1  # + logit_scale
    if name in LARGE:
        for count, expected in zip((total, visual, text), LARGE[name]):
            _check(count, expected)
    if "VITS16MOCO" in name:
        assert model.visual.blocks[0].attn.num_heads == 12
    elif "VITS16" in name:
        assert model.visual.blocks[0].attn.num_heads == 6


# --------------------------------------------------------------------------- padding trimming is exact
def test_clip_text_trimming_matches_full_context():
    torch.manual_seed(0)
    text = models.CLIPTextTransformer(width=64, heads=4, layers=2).eval()
    tokens = tokenizer_of("CLIP_VITT16_CLIP")(CAPTIONS["CLIP"])  # (2, 77): lengths differ, lots of padding
    with torch.no_grad():
        batch = text(tokens)
        alone = torch.cat([text(tokens[i:i + 1]) for i in range(2)])  # each trimmed to its own length
        # untrimmed reference: every block over all 77 positions
        x = text.token_embedding(tokens) + text.positional_embedding
        for block in text.resblocks:
            x = block(x)
        full = text.ln_final(x)[torch.arange(2), tokens.argmax(dim=-1)]
    torch.testing.assert_close(batch, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-5)


def test_bert_text_trimming_matches_full_context():
    torch.manual_seed(0)
    text = models.BertTextTower("BERT-tiny-chinese").eval()
    tokens = tokenizer_of("CNCLIP_VITT16_CLIP")(CAPTIONS["CNCLIP"])  # (2, 52), [PAD]=0 on the right
    assert (tokens[:, -1] == 0).all()
    with torch.no_grad():
        batch = text(tokens)
        alone = torch.cat([text(tokens[i:i + 1]) for i in range(2)])
        full = text.bert(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state[:, 0]
        longer = text(F.pad(tokens, (0, 20)))  # extra trailing padding changes nothing
    torch.testing.assert_close(batch, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(longer, full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- attention
def naive_attention(q, k, v, causal):
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(dim=-1) @ v.double()).to(q.dtype)


class _Forbidden:
    """Stands in for xformers.ops: any use on CPU fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"xformers.{name} used on CPU")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_is_sdpa_never_xformers(causal, dtype, monkeypatch):
    monkeypatch.setattr(models, "xops", _Forbidden())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g).to(dtype) for _ in range(3))
    out = models.multi_head_attention(q, k, v, causal=causal)
    assert out.shape == (2, 3, 7, 16) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal), **tol)


def test_timm_attention_replacement_matches_timm():
    """The SDPA-routed ViT attention gives timm's own attention output with the same weights."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    ours = models.vit_tiny16(32).eval()
    ours.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 65, 192)
    with torch.no_grad():
        torch.testing.assert_close(ours.blocks[0].attn(x), ref.blocks[0].attn(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("name", TINY)
def test_checkpoint_grad_gives_same_gradients(name):
    args = main.parse_args(["--model", name, "--checkpoint-grad"])
    assert main.model_kwargs(args)["checkpoint_grad"] is True
    torch.manual_seed(0)
    plain = build_tiny(name).train()
    ckpt = build_tiny(name, checkpoint_grad=True).train()
    ckpt.load_state_dict(plain.state_dict())
    tokens = tokenizer_of(name)(CAPTIONS[models.parse_model_name(name).base.name])
    images = torch.randn(2, 3, 32, 32)

    calls = {}
    # transformers checkpoints a layer's forward (its own hooks stay outside), so hook a submodule there
    first_text_block = (ckpt.text.resblocks[0] if hasattr(ckpt.text, "resblocks")
                        else ckpt.text.bert.encoder.layer[0].attention)
    for key, module in (("visual", ckpt.visual.blocks[0]), ("text", first_text_block)):
        module.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))

    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks (the BERT tower has dropout)
        out = model(images, tokens)
        loss = (out["image_embed"] @ out["text_embed"].t() * out["logit_scale"]).logsumexp(dim=1).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls == {"visual": 2, "text": 2}  # each checkpointed block re-entered in the backward pass
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["CLIP_VITT16_CLIP", "CNCLIP_VITT16_CLIP"])
def test_host_side_padding_trim_is_exact_for_both_text_towers(name, monkeypatch):
    """models.trim_padding (applied on the host before the GPU) drops only all-padding columns: the text
    features equal those of the full context, for CLIP BPE (causal, EOT) and Chinese BERT (masked pad)."""
    torch.manual_seed(0)
    spec = models.parse_model_name(name)
    model = models.build_model(spec, image_size=32, text_layers=1).eval()
    tokenizer = datasets.build_tokenizer(spec.base.tokenizer, spec.base.context_length)
    tokens = tokenizer(["a photo of the number seven", "零", "一张数字七的照片 with some more words"])  # (3, L)
    trimmed = models.trim_padding(tokens)
    assert trimmed.shape[1] < tokens.shape[1] and (trimmed[:, -1] != 0).any()
    assert torch.equal(trimmed, tokens[:, :trimmed.shape[1]]) and not tokens[:, trimmed.shape[1]:].any()
    with torch.no_grad():
        ours = model.encode_text(trimmed)
        monkeypatch.setattr(models, "_trimmed_length", lambda t, length_of: t.shape[-1])  # as on CUDA: no trim
        full_context = model.encode_text(tokens)
    torch.testing.assert_close(ours, full_context, atol=1e-5, rtol=1e-5)
    # (..., L) layouts too: CL2L's (B, 1+A, L) token tensors
    assert models.trim_padding(tokens[:, None].repeat(1, 3, 1)).shape == (3, 3, trimmed.shape[1])


# --------------------------------------------------------------------------- FLIP patch dropout
def patch_drop_io(model, images):
    """(input, output) of the image tower's patch-dropout step (tokens after the position embedding)."""
    seen = []
    handle = model.visual.patch_drop.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    try:
        model.encode_image(images)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["CLIP_VITT16_CLIP", "CNCLIP_VITT16_CLIP"])
def test_patch_dropout_keeps_the_class_token_and_drops_the_right_number_of_patches(name):
    """64 px / 16 = 16 patch tokens; p = 0.5 keeps the class token and 8 distinct patches of each image's own,
    in training only; p = 0.3 keeps int(16 * 0.7) = 11."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    for p, kept in ((0.5, 8), (0.3, 11)):
        model = build_tiny(name, image_size=64, patch_dropout=p).train()
        tokens, out = patch_drop_io(model, images)
        assert tokens.shape[1] == 1 + 16 and out.shape == (4, 1 + kept, tokens.shape[2])
        assert torch.equal(out[:, 0], tokens[:, 0])  # the class token, first and unchanged
        picks = []
        for b in range(4):  # every kept token is one of this image's patch tokens, none twice
            match = (out[b, 1:, None, :] == tokens[b, None, 1:, :]).all(-1)  # (kept, 16)
            assert (match.sum(1) == 1).all() and (match.sum(0) <= 1).all()
            picks.append(match.float().argmax(1).sort().values)
        assert any(not torch.equal(picks[0], other) for other in picks[1:])  # a mask per image, not per batch
        model.eval()
        tokens, out = patch_drop_io(model, images)
        assert torch.equal(out, tokens)


def test_patch_dropout_leaves_evaluation_and_the_weights_unchanged():
    torch.manual_seed(0)
    plain = build_tiny("CLIP_VITT16_CLIP").eval()
    torch.manual_seed(0)
    dropped = build_tiny("CLIP_VITT16_CLIP", patch_dropout=0.75).eval()
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # loads either way: no new parameters
    for key, value in plain.state_dict().items():
        assert torch.equal(value, dropped.state_dict()[key]), key
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenizer_of("CLIP_VITT16_CLIP")(CAPTIONS["CLIP"] + ["a digit"])
    with torch.no_grad():
        a, b = plain(images, tokens), dropped(images, tokens)
    assert torch.equal(a["image_embed"], b["image_embed"]) and torch.equal(a["text_embed"], b["text_embed"])
    dropped.train()
    with torch.no_grad():
        assert not torch.allclose(dropped(images, tokens)["image_embed"], a["image_embed"])


def test_patch_dropout_needs_a_vit_backbone():
    with pytest.raises(models.ModelNameError, match="patch dropout needs a ViT backbone; R50 has no patch tokens"):
        build_tiny("CLIP_R50_CLIP", patch_dropout=0.5)
    with pytest.raises(ValueError, match=r"patch_dropout must be in \[0, 1\), got 1.0"):
        build_tiny("CLIP_VITT16_CLIP", patch_dropout=1.0)
    assert main.model_kwargs(main.parse_args(["--patch-dropout", "0.25"]))["patch_dropout"] == 0.25
