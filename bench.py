"""Benchmarks: `python bench.py <subcommand> [flags]`; results go to BENCHMARKS.md by hand.

Each subcommand is a function registered with `@subcommand(name, add_args)`; it prints a Markdown
table and returns a dict (also written as JSON with --json PATH). Speed and memory are measured
here, never in unit tests. Subcommands compare against the peer implementation side by side in one
process (open_clip for training, the Chinese-CLIP pipeline for data and retrieval).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import gc
import importlib.util
import io
import json
import math
import os
import pickle
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

import readers
import utils

SUBCOMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable[[argparse.ArgumentParser], None]]] = {}


def subcommand(name: str, add_args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register `fn(args) -> dict` as `python bench.py <name>` with its flags from `add_args(parser)`."""

    def wrap(fn):
        SUBCOMMANDS[name] = (fn, add_args)
        return fn

    return wrap


def machine_line() -> str:
    """One line naming the machine, for BENCHMARKS.md."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (f"{platform.node()} | {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads"
            f" | {dev} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys -> a Markdown table (floats to 3 significant digits)."""
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser("CLIP Lab benchmarks")
    parser.add_argument("--json", default=None, help="also write the result dict to this JSON file")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name))
    args = parser.parse_args(argv)
    print(f"machine: {machine_line()}")
    result = SUBCOMMANDS[args.command][0](args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


# --------------------------------------------------------------------------- subcommands below


# --------------------------------------------------------------------------- train
# Realistic captions (8-20 BPE tokens with [SOT]/[EOT]); both implementations get the same token tensor.
TRAIN_CAPTIONS = (
    "a photo of a dog running on the beach",
    "two people riding bicycles down a busy city street at night",
    "a red double decker bus parked next to a brick building",
    "a plate of pasta with tomato sauce and fresh basil leaves",
    "a small kitten sleeping on a wooden chair",
    "an aerial view of a river winding through green hills and farmland",
    "a man in a blue jacket holding an umbrella in the rain",
    "a close up of a yellow flower",
    "children playing football in a park on a sunny afternoon",
    "a bowl of fruit on a kitchen table",
    "a snowy mountain peak under a clear blue sky with a few clouds",
    "a woman reading a book on a train",
    "an old wooden boat tied to a dock on a calm lake at sunset",
    "a laptop and a cup of coffee on a desk",
    "a group of zebras grazing in the savanna",
    "a street market with stalls selling vegetables, spices and colourful fabrics",
)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="CLIP_VITT16_CLIP", help="our model name (models.list_models())")
    p.add_argument("--batch-size", type=int, default=64, help="samples per optimizer step")
    p.add_argument("--image-size", type=int, default=64, help="input resolution of both implementations")
    p.add_argument("--embed-dim", type=int, default=None, help="joint embedding size (default: backbone preset)")
    p.add_argument("--text-width", type=int, default=None, help="CLIP text width (default: backbone preset)")
    p.add_argument("--text-heads", type=int, default=None, help="CLIP text heads (default: backbone preset)")
    p.add_argument("--transformer-layers", type=int, default=None, help="CLIP text depth (default: preset)")
    p.add_argument("--context-length", type=int, default=None, help="token context (default: the base's)")
    p.add_argument("--vision-layers", type=int, default=None,
                   help="bench only: keep the first N ViT blocks of our tower (4 reproduces the issue's 13M "
                        "open_clip reference); the open_clip peer always gets our depth")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--update-freq", type=int, default=4,
                   help="k of the exact-accumulation measurement (micro-batch = batch-size / k)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32, or bf16 autocast")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-peer", action="store_true", help="skip the open_clip side-by-side")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models (after the FLOP count; the warm-up steps absorb compilation)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory measurements (one fresh subprocess per configuration)")
    p.add_argument("--no-accum", action="store_true",
                   help="skip the exact-accumulation measurement (k micro-batches vs 1, fresh subprocesses)")
    p.add_argument("--patch-dropout", type=float, default=0.0,
                   help="lever: also time our step with FLIP patch dropout P (same weights, interleaved) and report "
                        "the speed-up over P = 0 (ViT backbones)")
    p.add_argument("--levers", action="store_true",
                   help="also measure the speed/memory levers side by side and print their table: FLIP patch dropout "
                        "(--patch-dropout, 0.5 unless given), --compile with --text-bucket vs eager (our step, same "
                        "weights, interleaved) and chunked vs gathered SigLIP loss memory (--siglip-*)")
    p.add_argument("--text-bucket", type=int, default=16,
                   help="the compile lever's token bucket (main.py --text-bucket): its tokens are trimmed to a "
                        "multiple of this, eager's to the exact length")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile lever (aot_eager: graphs without code generation)")
    _add_siglip_memory_args(p, 4096)
    p.add_argument("--matmul-size", type=int, default=None,
                   help="n of the n x n matmul timed for the peak (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--matmul-seconds", type=float, default=1.0, help="how long to repeat that matmul (best time)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the random images")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _truncate_vit(model: torch.nn.Module, layers: int) -> None:
    """Keep the first `layers` transformer blocks of a timm ViT image tower (bench-only depth override)."""
    blocks = getattr(model.visual, "blocks", None)
    if blocks is None or layers > len(blocks):
        raise SystemExit(f"--vision-layers {layers}: the image tower has {len(blocks or [])} ViT blocks")
    model.visual.blocks = blocks[:layers]


def _open_clip_peer(ours: torch.nn.Module, image_size: int) -> tuple[torch.nn.Module | None, str]:
    """open_clip's CLIP built from a config dict with OUR dimensions (ViT + CLIP text transformer), or a reason."""
    from open_clip.model import CLIP as OpenClipCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    import models

    vis, txt = ours.visual, ours.text
    if not hasattr(vis, "blocks") or not isinstance(txt, models.CLIPTextTransformer):
        return None, "no open_clip peer for this model (needs a timm ViT image tower and the CLIP text tower)"
    width, heads = vis.embed_dim, vis.blocks[0].attn.num_heads
    vision_cfg = CLIPVisionCfg(layers=len(vis.blocks), width=width, head_width=width // heads,
                               mlp_ratio=vis.blocks[0].mlp.fc1.out_features / width,
                               patch_size=vis.patch_embed.patch_size[0], image_size=image_size)
    text_cfg = CLIPTextCfg(context_length=txt.context_length, vocab_size=txt.token_embedding.num_embeddings,
                           width=txt.width, heads=txt.resblocks[0].heads, layers=len(txt.resblocks))
    peer = OpenClipCLIP(ours.image_projection.out_features, vision_cfg=vision_cfg, text_cfg=text_cfg,
                        quick_gelu=True, output_dict=True)
    return peer, ""


def _build_ours(spec, args: argparse.Namespace, patch_dropout: float = 0.0) -> torch.nn.Module:
    """Our model at the bench's dimensions (and --vision-layers depth)."""
    import models

    model = models.build_model(spec, image_size=args.image_size, embed_dim=args.embed_dim,
                               text_width=args.text_width, text_heads=args.text_heads,
                               text_layers=args.transformer_layers, context_length=args.context_length,
                               patch_dropout=patch_dropout)
    if args.vision_layers:
        _truncate_vit(model, args.vision_layers)
    return model


def _train_setup(args: argparse.Namespace, device: torch.device, with_peer: bool) -> dict:
    """Both models, their AdamW optimizers and losses, and one batch of random images + real captions."""
    from open_clip.loss import ClipLoss as OpenClipLoss

    import datasets
    import engine
    import losses
    import models

    spec = models.parse_model_name(args.model)
    torch.manual_seed(args.seed)
    ours = _build_ours(spec, args)
    peer, why = _open_clip_peer(ours, args.image_size) if with_peer else (None, "--no-peer")
    tokenizer = datasets.build_tokenizer(spec.base.tokenizer, args.context_length or spec.base.context_length)
    captions = [TRAIN_CAPTIONS[i % len(TRAIN_CAPTIONS)] for i in range(args.batch_size)]
    tokens = tokenizer(captions)  # (B, L) the same ids for both implementations
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(args.seed))  # (B, 3, H, W)
    ns = argparse.Namespace(accum_mode="exact", precision=args.precision, compile=args.compile)
    setup = {
        "spec": spec, "ns": ns, "batch": (images.to(device), tokens.to(device)), "host_tokens": tokens,
        "ours": ours.to(device).train(), "criterion": losses.CLIPLoss(),
        "scaler": torch.amp.GradScaler(device.type, enabled=False), "peer_reason": why, "peer": None,
    }
    # the same optimizer for both: AdamW, open_clip's defaults for ViT CLIP, no decay on gains/biases/embeddings
    opt = dict(lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    setup["opt_ours"] = torch.optim.AdamW(engine.param_groups(setup["ours"], 0.2), **opt)
    if peer is not None:
        setup["peer"] = peer.to(device).train()
        setup["peer_loss"] = OpenClipLoss()
        setup["opt_peer"] = torch.optim.AdamW(engine.param_groups(setup["peer"], 0.2), **opt)
    return setup


def _patch_dropout_setup(s: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """`s` with our model rebuilt with --patch-dropout (the same weights, its own AdamW): the FLIP lever."""
    import engine

    model = _build_ours(s["spec"], args, args.patch_dropout)
    model.load_state_dict(s["ours"].state_dict())
    model.to(device).train()
    opt = torch.optim.AdamW(engine.param_groups(model, 0.2), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    return {**s, "ours": model, "opt_ours": opt, "peer": None}


def _compile_lever_setup(s: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """`s` with a copy of our model (same weights, its own AdamW) whose tokens are trimmed to --text-bucket and that
    runs compiled (compiled later, after the FLOP count): the compile lever."""
    import copy

    import engine

    model = copy.deepcopy(s["ours"])
    opt = torch.optim.AdamW(engine.param_groups(model, 0.2), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    return {**s, "ours": model, "opt_ours": opt, "peer": None, "text_bucket": args.text_bucket,
            "ns": argparse.Namespace(**{**vars(s["ns"]), "compile": True})}


def _compile_models(s: dict) -> None:
    """torch.compile ours and the peer in place (nn.Module.compile), as main.py --compile does."""
    for key in ("ours", "peer"):
        if s[key] is not None:
            s[key].compile()


def _ours_step(s: dict, device: torch.device, k: int = 1, optimizer_step: bool = True,
               keep_grads: bool = False) -> None:
    """One training step of our trainer: engine.forward_backward over k micro-batches (+ AdamW step, clamp).

    keep_grads: zero the gradient buffers instead of freeing them (memory measurement)."""
    import engine
    import models

    images = s["batch"][0]
    # as main.py's loop: each micro-batch's tokens lose their padding columns on the host, then move
    tokens = [models.trim_padding(t, s.get("text_bucket", 1)).to(device, non_blocking=True)
              for t in s["host_tokens"].chunk(k)]
    micro = list(zip(images.chunk(k), tokens))
    s["opt_ours"].zero_grad(set_to_none=not keep_grads)
    engine.forward_backward(s["ours"], s["criterion"], micro, engine.StepConfig.from_args(s["ns"], device),
                            s["scaler"])
    if optimizer_step:
        s["opt_ours"].step()
        s["ours"].clamp_logit_scale()


def _peer_step(s: dict, device: torch.device, optimizer_step: bool = True, keep_grads: bool = False) -> None:
    """The same step in open_clip: forward, ClipLoss, backward, AdamW step, logit-scale clamp."""

    images, tokens = s["batch"]
    s["opt_peer"].zero_grad(set_to_none=not keep_grads)
    with utils.autocast(s["ns"].precision, device):
        out = s["peer"](images, tokens)
        loss = s["peer_loss"](out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    if optimizer_step:
        _peer_optimizer_step(s)


def _peer_optimizer_step(s: dict) -> None:
    """open_clip's end of a step: AdamW, then the logit scale clamped to [0, ln 100]."""
    s["opt_peer"].step()
    with torch.no_grad():
        s["peer"].logit_scale.clamp_(0, math.log(100))


def _peer_accum_step(s: dict, device: torch.device, k: int, optimizer_step: bool = False) -> None:
    """open_clip's `--accum-freq k` scheme (open_clip_train's train_one_epoch) on the peer:
    k no-grad forwards cache the features, then each micro-batch is re-run with grad against the cached
    others, its loss backpropagated: 2k forwards + k backwards (4/3 of one step), then (optimizer_step) the
    AdamW step and clamp. Every backward here keeps the logit-scale graph; it is a timing peer, not a trainer."""

    images, tokens = s["batch"]
    micro = list(zip(images.chunk(k), tokens.chunk(k)))
    s["opt_peer"].zero_grad(set_to_none=True)
    with torch.no_grad(), utils.autocast(s["ns"].precision, device):
        cached = [s["peer"](*batch) for batch in micro]
    for j, batch in enumerate(micro):
        with utils.autocast(s["ns"].precision, device):
            out = s["peer"](*batch)
            feats = {key: torch.cat([c[key] for c in cached[:j]] + [out[key]] + [c[key] for c in cached[j + 1:]])
                     for key in ("image_features", "text_features")}
            loss = s["peer_loss"](feats["image_features"], feats["text_features"], out["logit_scale"])
        loss.backward()
    if optimizer_step:
        _peer_optimizer_step(s)


def _train_flops(step: Callable[[], None]) -> float:
    """Model FLOPs (forward + loss + backward; the optimizer's elementwise work is not counted) of one step."""
    from torch.utils.flop_counter import FlopCounterMode

    import engine

    engine.register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def _rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> Callable[[], int]:
    """Give freed heap back to the OS (malloc_trim) and reset the peak-RSS high-water mark through
    /proc/self/clear_refs (Linux >= 4.0); returns the reader of the peak since then, in bytes (getrusage's
    ru_maxrss, the peak since the process started, where clear_refs is not writable)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return lambda: _rss_bytes("VmHWM")
    except OSError:
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_child(config: str) -> None:
    """Run in a fresh process: one warm-up step, then the activation memory of one forward + loss + backward.

    Baseline = memory after set-up and one full warm-up step (weights, AdamW state, batch, and the
    gradient buffers, zeroed but kept); the measured region is forward + loss + backward (for ours,
    engine.forward_backward with cfg["k"] micro-batches), so the difference is activation memory.
    CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs, else getrusage ru_maxrss) minus baseline
    RSS after malloc_trim; CUDA: max_memory_allocated minus memory_allocated. Prints one JSON line.
    """
    cfg = json.loads(config)
    torch.set_num_threads(cfg["threads"])
    args = argparse.Namespace(**cfg["args"])
    device = torch.device(cfg["device"])
    s = _train_setup(args, device, with_peer=cfg["impl"] == "open_clip")
    if args.compile:
        _compile_models(s)
    if cfg["impl"] == "open_clip":
        step = lambda: _peer_step(s, device, optimizer_step=False, keep_grads=True)  # noqa: E731
        _peer_step(s, device)  # warm-up: allocates the AdamW state and the gradient buffers
    else:
        step = lambda: _ours_step(s, device, cfg["k"], optimizer_step=False, keep_grads=True)  # noqa: E731
        _ours_step(s, device, cfg["k"])
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        read_peak = _reset_cpu_peak()
        base = _rss_bytes("VmRSS")
        step()
        peak = read_peak()
    print(json.dumps({"base_mb": base / 2**20, "peak_mb": peak / 2**20, "act_mb": (peak - base) / 2**20}))


def _run_child(entry: str, args: argparse.Namespace, device: torch.device, impl: str, k: int) -> dict:
    """bench.<entry>(config) in a fresh interpreter (one implementation, nothing else run before it there);
    returns the JSON line it prints last."""
    cfg = {"args": {key: v for key, v in vars(args).items() if key not in ("func", "json")}, "impl": impl,
           "k": k, "device": str(device), "threads": torch.get_num_threads()}
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", f"import sys, bench; bench.{entry}(sys.argv[1])",
                           json.dumps(cfg)], cwd=here, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{entry} ({impl}, k={k}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_memory(args: argparse.Namespace, device: torch.device, impl: str, k: int) -> dict:
    """`_memory_child` in a fresh interpreter, so that no other configuration's peak leaks in."""
    return _run_child("_memory_child", args, device, impl, k)


def _accum_child(config: str) -> None:
    """Run in a fresh process holding one implementation (as a training run does): its training step at k
    micro-batches and at 1 (same total batch), with and without the AdamW step, interleaved rounds.
    In the parent, after the other implementation's steps, glibc's allocator state made our k=4 step
    ~10 % slower (k=1 unchanged): measured in-process it would time the neighbour too. Prints the times."""
    cfg = json.loads(config)
    torch.set_num_threads(cfg["threads"])
    args = argparse.Namespace(**cfg["args"])
    device, k = torch.device(cfg["device"]), cfg["k"]
    s = _train_setup(args, device, with_peer=cfg["impl"] == "open_clip")
    if args.compile:
        _compile_models(s)
    if cfg["impl"] == "open_clip":
        fns = {"k1": lambda: _peer_step(s, device),
               f"k{k}": lambda: _peer_accum_step(s, device, k, optimizer_step=True),
               "fb_k1": lambda: _peer_step(s, device, optimizer_step=False),
               f"fb_k{k}": lambda: _peer_accum_step(s, device, k)}
    else:
        fns = {"k1": lambda: _ours_step(s, device, 1), f"k{k}": lambda: _ours_step(s, device, k),
               "fb_k1": lambda: _ours_step(s, device, 1, optimizer_step=False),
               f"fb_k{k}": lambda: _ours_step(s, device, k, optimizer_step=False)}
    for _ in range(max(args.warmup, 1)):
        for fn in fns.values():
            fn()
    print(json.dumps(_interleaved_times(fns, args.steps, device)))


def _interleaved_times(fns: dict[str, Callable[[], None]], steps: int, device: torch.device) -> dict[str, list]:
    """Wall time of each function in each of `steps` rounds, run interleaved (a, b, a, b, ...)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _paired_ratio(times: dict[str, list], num: str, den: str) -> float:
    """Median over rounds of time[num] / time[den] measured back to back: a slow spell of the machine hits
    both sides of a pair, where a ratio of medians would take it as a difference."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


@subcommand("train", _add_train_args)
def bench_train(args: argparse.Namespace) -> dict:
    """Training step of our CLIP vs open_clip's at the same dims, batch and precision; FLOPs/MFU; accumulation.

    Reports samples/s, step time, activation memory, FLOPs per sample (FlopCounterMode over one step),
    MFU against a matmul peak measured in the same run, and the cost of exact gradient accumulation
    (engine.forward_backward with k micro-batches vs one batch) in time per sample and activation memory.
    """
    import engine

    if args.batch_size % args.update_freq:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by --update-freq {args.update_freq}")
    if args.levers and args.compile:
        raise SystemExit("--levers times compiled against eager: drop --compile")
    if args.levers and not args.patch_dropout:
        args.patch_dropout = 0.5
    device = utils.resolve_device(args.device)
    if args.precision == "bf16" and device.type == "cpu":
        print("note: bf16 autocast on CPU; the matmul peak is still measured in fp32")
    load_before = os.getloadavg()
    s = _train_setup(args, device, with_peer=not args.no_peer)
    B, k = args.batch_size, args.update_freq
    impls = {"ours": lambda: _ours_step(s, device)}
    step_models = {"ours": s["ours"]}
    pd_name = f"ours_patch_dropout_{args.patch_dropout:g}"
    if args.patch_dropout:
        s_pd = _patch_dropout_setup(s, args, device)
        impls[pd_name], step_models[pd_name] = (lambda: _ours_step(s_pd, device)), s_pd["ours"]
    if s["peer"] is not None:
        impls["open_clip"], step_models["open_clip"] = (lambda: _peer_step(s, device)), s["peer"]
    if args.levers:
        s_c = _compile_lever_setup(s, args, device)
        impls[COMPILE_LEVER], step_models[COMPILE_LEVER] = (lambda: _ours_step(s_c, device)), s_c["ours"]
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    flops = {name: _train_flops(fn) / B for name, fn in impls.items()}
    if args.compile:
        _compile_models(s)
        if args.patch_dropout:
            s_pd["ours"].compile()
    if args.levers:
        engine.compile_model(s_c["ours"], args.text_bucket, s["host_tokens"].shape[-1], args.compile_backend)
    for _ in range(args.warmup):
        for fn in impls.values():
            fn()
    step_times = _interleaved_times(impls, args.steps, device)
    step_s = {name: statistics.median(t) for name, t in step_times.items()}

    # exact accumulation, k micro-batches vs 1, same total batch: the training step as a run pays it (with the
    # AdamW step, what open_clip's batch_time covers) and forward_backward alone (fb_), each implementation in
    # its own fresh process (`_accum_child`)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the children need the memory this process's allocator keeps cached
    accum_times = {} if args.no_accum else _run_child("_accum_child", args, device, "ours", k)
    if s["peer"] is not None and not args.no_accum:
        accum_times.update({f"open_clip_{name}": t for name, t in
                            _run_child("_accum_child", args, device, "open_clip", k).items()})
    accum_s = {name: statistics.median(t) for name, t in accum_times.items()}

    peak_dtype = torch.bfloat16 if (args.precision == "bf16" and device.type == "cuda") else torch.float32
    peak = engine.matmul_peak_flops(device, peak_dtype, args.matmul_size or (8192 if device.type == "cuda" else 2048),
                             args.matmul_seconds)
    load_after = os.getloadavg()

    mem: dict[str, dict] = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # (the matmul peak's buffers)
    if not args.no_memory:
        mem["ours"] = _measure_memory(args, device, "ours", 1)
        mem[f"ours_k{k}"] = _measure_memory(args, device, "ours", k)
        if s["peer"] is not None:
            mem["open_clip"] = _measure_memory(args, device, "open_clip", 1)

    rows, result = [], {
        "machine": machine_line(), "device": str(device), "threads": torch.get_num_threads(),
        "load_avg_1min_before": load_before[0], "load_avg_1min_after": load_after[0],
        "model": args.model, "batch_size": B, "image_size": args.image_size, "precision": args.precision,
        "compile": args.compile,
        "peer": "open_clip_torch" if s["peer"] is not None else s["peer_reason"],
        "peak_matmul_gflops": peak / 1e9, "peak_matmul_dtype": str(peak_dtype).replace("torch.", ""),
    }
    for name in impls:
        model = step_models[name]
        sps = B / step_s[name]
        row = {"impl": name, "params_M": count(model), "step_s": step_s[name], "samples_per_s": sps,
               "train_GFLOP_per_sample": flops[name] / 1e9, "achieved_GFLOP_s": sps * flops[name] / 1e9,
               "MFU": sps * flops[name] / peak}
        if name in mem:
            row.update(peak_mem_MB=mem[name]["peak_mb"], act_mem_MB=mem[name]["act_mb"])
        rows.append(row)
        result.update({f"{key}_{name}": v for key, v in row.items() if key != "impl"})
    if "open_clip" in impls:
        result["throughput_ratio"] = step_s["open_clip"] / step_s["ours"]
    if args.patch_dropout:  # paired per round, as the accumulation ratios
        result.update(patch_dropout=args.patch_dropout,
                      patch_dropout_speedup=_paired_ratio(step_times, "ours", pd_name))
    print(f"train: {args.model} batch {B} at {args.image_size}px {args.precision} on {device} "
          f"({torch.get_num_threads()} threads, load {load_before[0]:.2f} -> {load_after[0]:.2f}); "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s ({result['peak_matmul_dtype']})")
    print(markdown_table(rows))
    if args.patch_dropout:
        print(f"patch dropout {args.patch_dropout:g}: step {result['patch_dropout_speedup']:.3f}x faster "
              "(median of per-round ratios; the issue expects >= 1.6x at 0.5 for VITB16 at 224 px)")
    if "throughput_ratio" in result:
        print(f"ours / open_clip throughput: {result['throughput_ratio']:.3f} (target >= 1.0 on CPU)")
    if args.levers:
        result.update(_levers_table(args, result, step_times))
    if args.no_accum:
        return result
    result.update({"accum_k": k, "train_step_s_k1": accum_s["k1"], f"train_step_s_k{k}": accum_s[f"k{k}"],
                   "accum_time_per_sample_ratio": _paired_ratio(accum_times, f"k{k}", "k1"),
                   "forward_backward_s_k1": accum_s["fb_k1"], f"forward_backward_s_k{k}": accum_s[f"fb_k{k}"],
                   "accum_fb_time_ratio": _paired_ratio(accum_times, f"fb_k{k}", "fb_k1")})
    if "open_clip_k1" in accum_s:
        result["open_clip_accum_time_per_sample_ratio"] = _paired_ratio(accum_times, f"open_clip_k{k}",
                                                                        "open_clip_k1")
        result["open_clip_accum_fb_time_ratio"] = _paired_ratio(accum_times, f"open_clip_fb_k{k}",
                                                                "open_clip_fb_k1")
    if mem:
        result.update({"act_mem_MB_k1": mem["ours"]["act_mb"], f"act_mem_MB_k{k}": mem[f"ours_k{k}"]["act_mb"],
                       "accum_act_mem_ratio": mem[f"ours_k{k}"]["act_mb"] / max(mem["ours"]["act_mb"], 1e-9)})
    # engine.forward_backward does 2k-1 forwards + k backwards (backward ~ 2 forwards): its compute floor
    result["accum_compute_floor"] = (4 * k - 1) / (3 * k)
    accum = {"k": k, "step_s_k1": accum_s["k1"], f"step_s_k{k}": accum_s[f"k{k}"],
             "time_ratio (<=1.35)": result["accum_time_per_sample_ratio"],
             "fb_only_ratio": result["accum_fb_time_ratio"], "fb_floor": result["accum_compute_floor"]}
    if "open_clip_accum_time_per_sample_ratio" in result:
        accum["open_clip_scheme_ratio"] = result["open_clip_accum_time_per_sample_ratio"]
        accum["open_clip_fb_only"] = result["open_clip_accum_fb_time_ratio"]
    if mem:
        accum.update({"act_MB_k1": result["act_mem_MB_k1"], f"act_MB_k{k}": result[f"act_mem_MB_k{k}"],
                      "mem_ratio (<=0.4)": result["accum_act_mem_ratio"]})
    print(markdown_table([accum]))
    return result


COMPILE_LEVER = "ours_compiled_text_bucket"


def _levers_table(args: argparse.Namespace, result: dict, step_times: dict[str, list]) -> dict:
    """The levers side by side (`bench.py train --levers`): FLIP patch dropout and compile-with-buckets as step
    speed-ups over our eager step (median of per-round ratios, interleaved in this process), chunked SigLIP as the
    loss-memory ratio to the gathered form (`_siglip_loss_memory`, fresh gloo processes); prints the table and
    returns its figures."""
    pd_name = f"ours_patch_dropout_{args.patch_dropout:g}"
    out = {"compile_text_bucket": args.text_bucket, "compile_backend": args.compile_backend,
           "compile_speedup": _paired_ratio(step_times, "ours", COMPILE_LEVER)}
    rows = [{"lever": f"FLIP --patch-dropout {args.patch_dropout:g}", "measure": "train step (s)",
             "without": result["step_s_ours"], "with": result[f"step_s_{pd_name}"],
             "ratio": result["patch_dropout_speedup"], "reads": "speed-up"},
            {"lever": f"--compile ({args.compile_backend}) + --text-bucket {args.text_bucket}",
             "measure": "train step (s)", "without": result["step_s_ours"], "with": result[f"step_s_{COMPILE_LEVER}"],
             "ratio": out["compile_speedup"], "reads": "speed-up"}]
    if args.siglip_global_batch:
        gathered, chunked = _siglip_loss_memory(args)
        ratio = chunked["loss_mem_MB"] / max(gathered["loss_mem_MB"], 1e-9)
        out.update(siglip_loss_mem_MB_gathered=gathered["loss_mem_MB"],
                   siglip_loss_mem_MB_chunked=chunked["loss_mem_MB"], siglip_chunked_mem_ratio=ratio)
        rows.append({"lever": f"--siglip-chunked, N {args.siglip_global_batch} on {args.siglip_ranks} ranks",
                     "measure": "loss memory (MB)", "without": gathered["loss_mem_MB"], "with": chunked["loss_mem_MB"],
                     "ratio": out["siglip_chunked_mem_ratio"], "reads": "memory ratio"})
    print(markdown_table(rows))
    return out


# --------------------------------------------------------------------------- data
def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=96, help="images per store (1024x768 mosaics of real photographs)")
    p.add_argument("--image-size", type=int, default=224, help="training crop size")
    p.add_argument("--resize", type=int, default=256, help="short side of the pre-resized store (build_lmdb --resize)")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median images/s is reported")
    p.add_argument("--batch-size", type=int, default=8, help="DataLoader batch size")
    p.add_argument("--data-dir", default=None, help="where to build the stores (default: a temporary folder)")


def _bench_photos(n: int, seed: int = 0) -> list[bytes]:
    """n distinct 1024x768 JPEGs (quality 90): 2x2 mosaics of random crops of real photographs at native
    resolution (scikit-image and scikit-learn samples), so the entropy is that of real photos."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(a) for a in load_sample_images().images]
    sources += [Image.fromarray(getattr(skdata, k)()[..., :3]) for k in
                ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")]
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        canvas = Image.new("RGB", (1024, 768))
        for x, y in ((0, 0), (512, 0), (0, 384), (512, 384)):
            src = sources[rng.randint(len(sources))]
            w, h = min(512, src.width), min(384, src.height)
            left, top = rng.randint(src.width - w + 1), rng.randint(src.height - h + 1)
            tile = src.crop((left, top, left + w, top + h))
            if rng.rand() < 0.5:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas.paste(tile.resize((512, 384), Image.Resampling.BICUBIC) if tile.size != (512, 384) else tile, (x, y))
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _cnclip_train_transform(image_size: int, min_scale: float):
    """Chinese-CLIP's training transform (its `_build_transform` without --use-augment): PIL RandomResizedCrop
    (bicubic), RGB, ToTensor, Normalize; the crop scale set to ours so both resample the same crops."""
    from torchvision import transforms as T

    import datasets

    crop = T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, T.ToTensor(), T.Normalize(datasets.OPENAI_MEAN, datasets.OPENAI_STD)])


class _CnClipStyleReader(torch.utils.data.Dataset):
    """What Chinese-CLIP's LMDBDataset does per sample (OFA-Sys/Chinese-CLIP cn_clip/training/data.py, commit
    31863c7): environments opened in __init__, pairs unpickled, `imgs` value decoded utf-8 + urlsafe base64, PIL
    open (full decode), transform."""

    def __init__(self, lmdb_dir: str, transform) -> None:
        import lmdb

        opts = dict(readonly=True, create=False, lock=False, readahead=False, meminit=False)
        self.env_pairs = lmdb.open(os.path.join(lmdb_dir, "pairs"), **opts)
        self.env_imgs = lmdb.open(os.path.join(lmdb_dir, "imgs"), **opts)
        self.txn_pairs, self.txn_imgs = self.env_pairs.begin(buffers=True), self.env_imgs.begin(buffers=True)
        self.n = int(self.txn_pairs.get(b"num_samples").tobytes().decode("utf-8"))
        self.transform = transform

    def close(self) -> None:
        self.env_pairs.close()
        self.env_imgs.close()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        image_id, _, _ = pickle.loads(self.txn_pairs.get(str(index % self.n).encode("utf-8")).tobytes())
        b64 = self.txn_imgs.get(str(image_id).encode("utf-8")).tobytes().decode("utf-8", errors="ignore")
        image = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
        return self.transform(image.convert("RGB"))


class _OurReaderImages(torch.utils.data.Dataset):
    """Our LmdbReader (lazy per-process env, draft decode) + the transform: the image half of ImageTextDataset."""

    def __init__(self, reader, transform) -> None:
        self.reader, self.transform = reader, transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.reader.read(index)[0])


def _images_per_s(dataset, workers: int, batch_size: int) -> float:
    """Steady-state images/s of a DataLoader pass (timing starts after the first batch, so worker start-up and
    the first decode are excluded)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch[0] if isinstance(batch, (list, tuple)) else batch)  # (images, texts, ...) or images
    return n / (time.perf_counter() - t0)


class _InMemoryImages(torch.utils.data.Dataset):
    """The raw bound: the same decode (readers.decode_image with draft) + transform over bytes in memory."""

    def __init__(self, blobs: list[bytes], transform, draft: int | None) -> None:
        self.blobs, self.transform, self.draft = blobs, transform, draft

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> torch.Tensor:

        return self.transform(readers.decode_image(self.blobs[index], f"image {index}", self.draft))


class _WdsImages(torch.utils.data.IterableDataset):
    """The image half of our wds path, as `_OurReaderImages` is of the LMDB one: WdsReader's records (webdataset's
    tar iterator over the memory-mapped shard) -> decode (draft) -> transform; shards split over the workers."""

    def __init__(self, urls: list[str], transform, draft: int) -> None:
        super().__init__()
        self.reader, self.transform = readers.WdsReader(urls, "bench"), transform
        self.reader.draft = draft

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in range(w, self.reader.num_shards, n):
            for record in self.reader.records(shard):
                yield self.transform(self.reader.decode(record)[0])


BENCH_CAPTION = "a photo of a mosaic"


def _write_bench_shards(folder: str, blobs: list[bytes], per_shard: int) -> list[str]:
    """The photos as img2dataset-layout tar shards (`<key>.jpg` = the stored bytes, `.txt`, `.json`) + _stats.json."""
    import os

    from webdataset import TarWriter

    import build_wds

    os.makedirs(folder, exist_ok=True)
    urls, sizes = [], {}
    for k in range(0, len(blobs), per_shard):
        urls.append(os.path.join(folder, f"{k // per_shard:05d}.tar"))
        with TarWriter(urls[-1], encoder=False, mtime=build_wds.MTIME) as tar:  # as build_wds.py writes them
            for i in range(k, min(k + per_shard, len(blobs))):
                tar.write({"__key__": f"{i:09d}", "jpg": blobs[i], "txt": BENCH_CAPTION.encode(),
                           "json": json.dumps({"caption": BENCH_CAPTION}).encode()})
        sizes[os.path.basename(urls[-1])] = min(per_shard, len(blobs) - k)
    with open(os.path.join(folder, readers.STATS_FILE), "w", encoding="utf-8") as f:
        json.dump({"num_samples": len(blobs), "shards": sizes}, f)
    return urls


def _loader_images_per_s(loader, skip_first: bool = False) -> float:
    """images/s of one pass of a streaming loader, by default its first batch included: open_clip's sample shuffle
    buffer (initial 1,000) reads every shard of a worker before its first batch, ours one shard at a time, so
    timing after the first batch would leave the tar reading out of open_clip's time only. `skip_first` times
    after the first batch, as `_images_per_s` (for a loader that reads record by record)."""
    it, n = iter(loader), 0
    if skip_first:
        next(it)
    t0 = time.perf_counter()
    for batch in it:
        n += len(batch)
    return n / (time.perf_counter() - t0)


def _our_wds_loader(urls: list[str], transform, tokenizer, draft: int, workers: int, batch_size: int):
    """Our training path over the shards: WdsReader (draft decode) -> StreamDataset (shuffle buffer, seeded
    composition with the caption tokenised, stream positions) -> DataLoader."""
    from torch.utils.data import DataLoader

    import datasets

    total, sizes = readers.shard_stats(urls)
    reader = readers.WdsReader(urls, "bench", num_samples=total, shard_sizes=sizes)
    reader.draft = draft
    composer = datasets.ImageTextDataset(None, transform, tokenizer)
    stream = datasets.StreamDataset(datasets.stream_sources([reader], composer, 0), [1.0], batch_size, total,
                                    workers=workers)
    stream.set_epoch(0)
    return DataLoader(stream, batch_size=batch_size, num_workers=workers)


@contextlib.contextmanager
def _open_clip_on_webdataset_1():
    """open_clip_train 3.3's `tarfile_to_samples_nothrow` predates webdataset's per-shard EOF marker (0.2.96+: its
    `group_by_keys_nothrow` raises KeyError 'fname' on it; open_clip issue #935, webdataset issue #384). Within the
    block its `tar_file_expander` is webdataset's with `eof_value=None`, the fix proposed there; nothing else of
    the peer changes. Forked DataLoader workers inherit it, so iterate inside the block."""
    import functools

    import open_clip_train.data as oc_data
    from webdataset import tariterators

    original = oc_data.tar_file_expander
    oc_data.tar_file_expander = functools.partial(tariterators.tar_file_expander, eof_value=None)
    try:
        yield
    finally:
        oc_data.tar_file_expander = original


def _open_clip_wds_loader(urls: list[str], transform, tokenizer, workers: int, batch_size: int):
    """open_clip's own training pipeline, `open_clip_train.data.get_wds_dataset` (shard shuffle, split by worker,
    sample shuffle, full `pilrgb` decode, the transform, the tokenizer, batching); iterate it inside
    `_open_clip_on_webdataset_1()`."""
    from open_clip_train.data import get_wds_dataset

    ns = argparse.Namespace(train_data="::".join(urls), val_data=None, train_num_samples=readers.shard_stats(urls)[0],
                            dataset_resampled=False, train_data_upsampling_factors=None, seed=0,
                            batch_size=batch_size, world_size=1, workers=workers)
    return get_wds_dataset(ns, transform, is_train=True, tokenizer=tokenizer).dataloader


def _wds_time_breakdown(urls: list[str], transform, tokenizer, draft: int) -> dict[str, float]:
    """Where the time of one sample goes on our wds path, in ms per image, one process: reading the tar records,
    decoding (draft), the transform, the tokenizer, seeding the sample's RNGs, and the whole path (the rest:
    shuffle buffer, positions, and decode/transform slower when interleaved than in bulk)."""
    import datasets

    reader = readers.WdsReader(urls, "bench")
    reader.draft = draft
    t0 = time.perf_counter()
    records = [r for k in range(len(urls)) for r in reader.records(k)]
    n, t_read = len(records), time.perf_counter() - t0
    t0 = time.perf_counter()
    images = [reader.decode(r)[0] for r in records]
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    for image in images:
        transform(image)
    t_transform = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        tokenizer(BENCH_CAPTION)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):  # a sample's seed and its seeded block (RNG states saved and restored: the main process)
        with datasets.seeded(datasets.sample_seed(0, 0, i, 0, 0, 0, i)):
            pass
    t_seed = time.perf_counter() - t0
    composer = datasets.ImageTextDataset(None, transform, tokenizer)
    total, sizes = readers.shard_stats(urls)
    reader = readers.WdsReader(urls, "bench", num_samples=total, shard_sizes=sizes)
    reader.draft = draft
    stream = datasets.StreamDataset(datasets.stream_sources([reader], composer, 0), [1.0], 1, total)
    stream.set_epoch(0)
    t0 = time.perf_counter()
    count = sum(1 for _ in stream)
    t_all = time.perf_counter() - t0
    ms = {"read tar records": t_read, "decode (draft)": t_decode, "transform": t_transform, "tokenize": t_tok,
          "seed RNGs": t_seed}
    out = {k: 1000 * v / n for k, v in ms.items()}
    out["whole stream path"] = 1000 * t_all / count
    out["rest"] = out["whole stream path"] - sum(out[k] for k in ms)
    return out


@subcommand("data", _add_data_args)
def bench_data(args: argparse.Namespace) -> dict:
    """images/s of decode + training transform at 224: our LMDB reader and our wds stream (full-size and
    pre-resized JPEGs, 0/1/2 workers), the raw in-memory bound, a Chinese-CLIP-style reader and open_clip's
    webdataset pipeline over the same tar shards, interleaved over --rounds."""
    import build_lmdb
    import datasets

    torch.set_num_threads(1)  # per-core numbers: one decode thread per process
    workers = [int(w) for w in args.workers.split(",")]
    tmp = tempfile.TemporaryDirectory() if args.data_dir is None else None
    root = args.data_dir or tmp.name
    photos = _bench_photos(args.images)
    with open(os.path.join(root, "train_imgs.tsv"), "w") as f:
        f.writelines(f"{i}\t{base64.b64encode(p).decode()}\n" for i, p in enumerate(photos))
    with open(os.path.join(root, "train_texts.jsonl"), "w") as f:
        f.writelines(json.dumps({"text_id": i, "text": "一张照片", "image_ids": [i]}) + "\n"
                     for i in range(len(photos)))
    stores = {"full": os.path.join(root, "full"), f"resized{args.resize}": os.path.join(root, "resized")}
    build_lmdb.main(["--data-dir", root, "--splits", "train", "--lmdb-dir", stores["full"]])
    build_lmdb.main(["--data-dir", root, "--splits", "train", "--lmdb-dir", stores[f"resized{args.resize}"],
                     "--resize", str(args.resize)])
    transform = datasets.train_transform(args.image_size, 0.5)
    peer_transform = _cnclip_train_transform(args.image_size, 0.5)
    draft = datasets.draft_size(args.image_size, 0.5)
    tokenizer = datasets.BpeTokenizer(77)  # open_clip's SimpleTokenizer: both wds pipelines tokenise the caption
    shards = {}
    for store, folder in stores.items():  # the LMDB's stored JPEG bytes, as tar shards
        reader = readers.LmdbReader([os.path.join(folder, "train")], name=store)
        shards[store] = _write_bench_shards(os.path.join(root, f"wds-{store}"),
                                            [reader.image_bytes(i) for i in range(len(reader))],
                                            max(1, args.images // 8))
    readers.close_lmdb()
    runs: dict[tuple[str, str, int], list[float]] = {}
    wds_reader, ours_wds = "ours: WdsReader + draft (images)", "ours: wds StreamDataset (training path)"
    open_clip_wds = "open_clip get_wds_dataset"
    for _ in range(args.rounds):
        for store, folder in stores.items():
            reader = readers.LmdbReader([os.path.join(folder, "train")], name=store)
            reader.draft = draft
            blobs = [reader.image_bytes(i) for i in range(len(reader))]
            runs.setdefault((store, "raw bound (bytes in memory)", 0), []).append(
                _images_per_s(_InMemoryImages(blobs, transform, draft), 0, args.batch_size))
            for w in workers:
                ours = _OurReaderImages(reader, transform)
                runs.setdefault((store, "ours: LmdbReader + draft", w), []).append(
                    _images_per_s(ours, w, args.batch_size))
                readers.close_lmdb()  # py-lmdb opens an environment once per process
                peer = _CnClipStyleReader(os.path.join(folder, "train"), peer_transform)
                runs.setdefault((store, "Chinese-CLIP-style reader", w), []).append(
                    _images_per_s(peer, w, args.batch_size))
                peer.close()
                runs.setdefault((store, wds_reader, w), []).append(_loader_images_per_s(torch.utils.data.DataLoader(
                    _WdsImages(shards[store], transform, draft), batch_size=args.batch_size, num_workers=w), True))
                runs.setdefault((store, ours_wds, w), []).append(_loader_images_per_s(
                    _our_wds_loader(shards[store], transform, tokenizer, draft, w, args.batch_size)))
                with _open_clip_on_webdataset_1():
                    runs.setdefault((store, open_clip_wds, w), []).append(_loader_images_per_s(
                        _open_clip_wds_loader(shards[store], transform, tokenizer, w, args.batch_size)))
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = [{"store": s, "reader": r, "workers": w, "images/s": v, "images/s per worker": v / max(w, 1)}
            for (s, r, w), v in med.items()]
    print(markdown_table(rows))
    small, ours, raw, peer = f"resized{args.resize}", "ours: LmdbReader + draft", "raw bound (bytes in memory)", \
        "Chinese-CLIP-style reader"
    def ratio(num: tuple, den: tuple) -> float:  # median of the rounds' paired ratios
        return _paired_ratio(runs, num, den)

    ratios = {"ours / raw bound (full, 0 workers)": ratio(("full", ours, 0), ("full", raw, 0)),
              f"ours / raw bound ({small}, 0 workers)": ratio((small, ours, 0), (small, raw, 0)),
              "ours / Chinese-CLIP-style (full 1024x768, 0 workers)": ratio(("full", ours, 0), ("full", peer, 0)),
              f"ours / Chinese-CLIP-style ({small}, 0 workers)": ratio((small, ours, 0), (small, peer, 0)),
              f"ours {small} / ours full (0 workers)": ratio((small, ours, 0), ("full", ours, 0))}
    targets = {"ours / raw bound (full, 0 workers)": 0.9, f"ours / raw bound ({small}, 0 workers)": 0.9,
               "ours / Chinese-CLIP-style (full 1024x768, 0 workers)": 2.5,
               f"ours / Chinese-CLIP-style ({small}, 0 workers)": 1.0, f"ours {small} / ours full (0 workers)": 2.0}
    for store in stores:
        key = f"ours WdsReader / raw bound ({store}, 0 workers)"
        ratios[key], targets[key] = ratio((store, wds_reader, 0), (store, raw, 0)), 0.9
        key = f"ours wds training path / raw bound ({store}, 0 workers)"  # + seeding, tokenizer, positions
        ratios[key], targets[key] = ratio((store, ours_wds, 0), (store, raw, 0)), None
        for w in workers:
            key = f"ours wds / open_clip wds ({store}, {w} workers)"
            ratios[key], targets[key] = ratio((store, ours_wds, w), (store, open_clip_wds, w)), 1.0
    print()
    print(markdown_table([{"ratio": k, "measured": v, "target": "—" if targets[k] is None else f">= {targets[k]}",
                           "met": "—" if targets[k] is None else v >= targets[k]} for k, v in ratios.items()]))
    breakdown = {store: _wds_time_breakdown(urls, transform, tokenizer, draft) for store, urls in shards.items()}
    print()
    print(markdown_table([{"store": store, **{f"{k} (ms/img)": v for k, v in b.items()}}
                          for store, b in breakdown.items()]))
    if tmp is not None:
        tmp.cleanup()
    return {"rows": rows, "ratios": ratios, "wds_ms_per_image": breakdown, "images": args.images,
            "rounds": args.rounds, "load_average": os.getloadavg()}


# --------------------------------------------------------------------------- retrieval (issue 4)
def _add_retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=30588, help="gallery size (MUGE validation: 30,588)")
    p.add_argument("--queries", type=int, default=5008, help="text queries (MUGE validation: 5,008)")
    p.add_argument("--dim", type=int, default=512, help="feature dimension")
    p.add_argument("--gt-per-query", type=int, default=6, help="ground-truth images per query (MUGE: ~6)")
    p.add_argument("--skip-reference", action="store_true", help="do not run the Chinese-CLIP pipeline (~3-4 min)")
    p.add_argument("--extract-batches", type=int, default=3, help="VITB16 batches timed for the extract throughput")
    p.add_argument("--extract-batch-size", type=int, default=32, help="images per VITB16 extract batch")
    p.add_argument("--extract-workers", type=int, default=None,
                   help="DataLoader workers of the timed `extract` tool path (default: extract's own, min(4, cores))")
    p.add_argument("--workdir", default=None, help="keep the feature/prediction files here (default: a temp dir)")


_CUDA_SHIM = ("import runpy, sys, torch; torch.Tensor.cuda = lambda self, *a, **k: self; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _timed_process(cmd: list[str]) -> float:
    """Wall seconds of a whole child process (imports included); raises with its output on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


@subcommand("retrieval", _add_retrieval_args)
def bench_retrieval(args: argparse.Namespace) -> dict:
    """MUGE-validation-scale text->image top-10 + scoring: ours (eval_retrieval.py topk/score, .npy features)
    vs Chinese-CLIP's make_topk_predictions.py + evaluation.py (jsonl features), as whole processes; plus
    the bare matmul+top-k floor and VITB16 extract throughput (the extract tool on an LMDB, and the model alone)."""
    import numpy as np

    import eval_retrieval

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = args.workdir or tmp.name
    os.makedirs(work, exist_ok=True)
    rng = np.random.RandomState(0)
    img = rng.randn(args.images, args.dim).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.randn(args.queries, args.dim).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    img_ids = rng.permutation(np.arange(100000, 100000 + 4 * args.images))[:args.images].astype(np.int64)
    txt_ids = np.arange(args.queries, dtype=np.int64) + 1
    paths = {k: os.path.join(work, k) for k in ("img.npy", "txt.npy", "gt.jsonl", "ours.jsonl", "ours.json",
                                                   "ref.jsonl", "ref.json", "img.jsonl", "txt.jsonl")}
    t0 = time.perf_counter()
    eval_retrieval.save_features(paths["img.npy"], img_ids, img, "image_id")
    eval_retrieval.save_features(paths["txt.npy"], txt_ids, txt, "text_id")
    with open(paths["gt.jsonl"], "w", encoding="utf-8") as f:
        for t in txt_ids.tolist():
            gt = rng.choice(img_ids, args.gt_per_query, replace=False).tolist()
            f.write(json.dumps({"text_id": t, "text": f"query {t}", "image_ids": gt}) + "\n")
    print(f"wrote features and ground truth in {time.perf_counter() - t0:.1f} s to {work}")

    py = sys.executable
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "eval_retrieval.py")
    rows = []
    ours_topk = _timed_process([py, script, "topk", "--image-feats", paths["img.npy"], "--text-feats",
                                paths["txt.npy"], "--output", paths["ours.jsonl"]])
    ours_score = _timed_process([py, script, "score", paths["gt.jsonl"], paths["ours.jsonl"], paths["ours.json"],
                                 "--strict"])
    rows.append({"pipeline": "ours: topk (.npy) + score", "topk_s": ours_topk, "score_s": ours_score,
                 "total_s": ours_topk + ours_score})
    ours_jsonl = _timed_process([py, script, "topk", "--image-feats", paths["img.jsonl"], "--text-feats",
                                 paths["txt.jsonl"], "--output", os.path.join(work, "ours_from_jsonl.jsonl")])
    rows.append({"pipeline": "ours: topk (their jsonl features) + score", "topk_s": ours_jsonl,
                 "score_s": ours_score, "total_s": ours_jsonl + ours_score})
    floor_code = ("import sys, numpy as np, torch; q = torch.from_numpy(np.load(sys.argv[1])); "
                  "g = torch.from_numpy(np.load(sys.argv[2])); (q @ g.t()).topk(10, dim=1)")
    floor_process = _timed_process([py, "-c", floor_code, paths["txt.npy"], paths["img.npy"]])
    rows.append({"pipeline": "bare process: import torch, load, matmul, topk", "topk_s": floor_process,
                 "score_s": 0.0, "total_s": floor_process})

    # in-process compute: our chunked, tie-stable NumPy top-k vs one torch matmul + topk
    q, g = torch.from_numpy(txt), torch.from_numpy(img)
    compute = {"ours": [], "floor": []}
    for _ in range(3):
        t0 = time.perf_counter()
        eval_retrieval.topk_indices(txt, img, 10)
        compute["ours"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        (q @ g.t()).topk(10, dim=1)
        compute["floor"].append(time.perf_counter() - t0)
    ours_c, floor_c = min(compute["ours"]), min(compute["floor"])

    ref = None
    if not args.skip_reference:
        spec = importlib.util.find_spec("cn_clip")
        if spec is None:
            raise SystemExit("bench retrieval: the reference needs `pip install --no-deps cn_clip==1.6.0` "
                             "(setup.sh does it), or pass --skip-reference")
        cn_eval = os.path.join(os.path.dirname(spec.origin), "eval")
        # their script calls .cuda(); on a CPU machine the shim makes it a no-op, the script is otherwise as is
        ref_topk = _timed_process([py, "-c", _CUDA_SHIM, os.path.join(cn_eval, "make_topk_predictions.py"),
                                   "--image-feats", paths["img.jsonl"], "--text-feats", paths["txt.jsonl"],
                                   "--top-k", "10", "--eval-batch-size", "32768", "--output", paths["ref.jsonl"]])
        ref_score = _timed_process([py, os.path.join(cn_eval, "evaluation.py"), paths["gt.jsonl"],
                                    paths["ref.jsonl"], paths["ref.json"]])
        rows.append({"pipeline": "Chinese-CLIP: make_topk_predictions + evaluation", "topk_s": ref_topk,
                     "score_s": ref_score, "total_s": ref_topk + ref_score})
        with open(paths["ours.jsonl"]) as a, open(paths["ref.jsonl"]) as b:
            same = sum(x == y for x, y in zip(a, b))
        with open(paths["ours.json"]) as a, open(paths["ref.json"]) as b:
            ref = {"identical_prediction_lines": same, "queries": args.queries,
                   "same_score_json": json.load(a) == json.load(b)}
    print(markdown_table(rows))
    print()
    summary = [{"measure": "in-process top-k compute: ours (chunked, stable ties) s", "value": ours_c},
               {"measure": "in-process floor: one matmul + topk s", "value": floor_c},
               {"measure": "ours / floor (target <= 1.5)", "value": ours_c / floor_c}]
    if ref is not None:
        summary += [{"measure": "end to end speed-up vs Chinese-CLIP (target >= 30)",
                     "value": rows[-1]["total_s"] / rows[0]["total_s"]},
                    {"measure": f"prediction lines identical to theirs (of {args.queries})",
                     "value": ref["identical_prediction_lines"]},
                    {"measure": "score JSON identical", "value": str(ref["same_score_json"])}]

    extract_rows, extract = _extract_throughput(args)
    summary += extract_rows
    print(markdown_table(summary))
    if tmp is not None:
        tmp.cleanup()
    return {"rows": rows, "summary": summary, **extract, "load_average": os.getloadavg()}


def _extract_throughput(args: argparse.Namespace) -> tuple[list[dict], dict[str, float]]:
    """VITB16 (random weights) image-feature extraction at 224 px, images/s, two numbers per precision (fp32,
    and bf16 autocast on CUDA):
    - tool: `eval_retrieval.extract_image_features`, i.e. `eval_retrieval.py extract` after the checkpoint is
      loaded, on an LMDB of batches x batch-size 1024x768 photo JPEGs built by build_lmdb: LMDB read, JPEG
      decode and squash transform in --extract-workers DataLoader processes, the model, L2 normalisation,
      features back on the CPU (worker start-up included, as in a real run);
    - model only: `encode_image` on random pixels already on the device (the data path's ceiling).
    Returns (table rows, {"extract_tool_images_per_s[_bf16]", "extract_model_only_images_per_s[_bf16]"})."""
    import build_lmdb
    import eval_retrieval
    import models

    model = models.build_model(models.parse_model_name("CLIP_VITB16_CLIP")).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    n, batches = args.extract_batch_size, args.extract_batches
    workers = eval_retrieval.default_workers() if args.extract_workers is None else args.extract_workers
    pixels = torch.randn(n, 3, 224, 224, device=device)
    tmp = tempfile.TemporaryDirectory()
    with open(os.path.join(tmp.name, "bench_imgs.tsv"), "w") as f:
        f.writelines(f"{i}\t{base64.b64encode(p).decode()}\n" for i, p in enumerate(_bench_photos(n * batches)))
    with open(os.path.join(tmp.name, "bench_texts.jsonl"), "w") as f:
        f.writelines(json.dumps({"text_id": i, "text": "一张照片", "image_ids": [i]}) + "\n"
                     for i in range(n * batches))
    build_lmdb.main(["--data-dir", tmp.name, "--splits", "bench", "--lmdb-dir", os.path.join(tmp.name, "lmdb")])
    imgs = os.path.join(tmp.name, "lmdb", "bench", "imgs")
    rows, values = [], {}
    for precision in ["fp32"] + (["bf16"] if device.type == "cuda" else []):
        suffix = "" if precision == "fp32" else f"_{precision}"
        with torch.no_grad(), utils.autocast(precision, device):
            model.encode_image(pixels)  # warm-up (kernel selection)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(batches):
                model.encode_image(pixels)
            _sync(device)
        values[f"extract_model_only_images_per_s{suffix}"] = n * batches / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids, _ = eval_retrieval.extract_image_features(model, imgs, 224, device, n, workers=workers,
                                                       precision=precision)
        values[f"extract_tool_images_per_s{suffix}"] = len(ids) / (time.perf_counter() - t0)
        where = f"VITB16 image feature extraction, {precision}, {device.type}, batch {n}"
        rows += [{"measure": f"{where}, tool: eval_retrieval extract on an LMDB of {n * batches} 1024x768 JPEGs, "
                             f"{workers} workers (images/s)", "value": values[f"extract_tool_images_per_s{suffix}"]},
                 {"measure": f"{where}, model only: encode_image on random pixels (images/s)",
                  "value": values[f"extract_model_only_images_per_s{suffix}"]}]
    readers.close_lmdb(imgs)
    tmp.cleanup()
    return rows, values


# --------------------------------------------------------------------------- objectives (issue 6)
OBJECTIVE_MODELS = ["CLIP_{bb}_CLIP", "CL2L_{bb}_CL2L", "CL2L_{bb}_BARLIP", "CL2L_{bb}_SIAMLIP", "CL2L_{bb}_BYOLIP",
                    "CL2L_{bb}_SWALIP", "CLIP_{bb}_SWALIPV1", "CLIP_{bb}_SIGLIP"]


def _add_objectives_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="VITT16", help="vision backbone shared by every objective")
    p.add_argument("--batch-size", type=int, default=32, help="per-step batch of every objective")
    p.add_argument("--image-size", type=int, default=96, help="weak and strong view resolution")
    p.add_argument("--transformer-layers", type=int, default=None, help="text depth (default: backbone preset)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per objective (after 1 warm-up)")
    p.add_argument("--models", nargs="*", default=None, help="model names (default: every objective at --backbone)")
    p.add_argument("--augment-samples", type=int, default=64, help="samples timed through the CL2L data pipeline")
    p.add_argument("--source-size", type=int, default=256, help="side of the synthetic source images (PIL)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _add_siglip_memory_args(p, 8192)


def _add_siglip_memory_args(p: argparse.ArgumentParser, global_batch: int) -> None:
    p.add_argument("--siglip-global-batch", type=int, default=global_batch,
                   help="global batch N of the SigLIP loss-memory measurement, gathered vs --siglip-chunked (0: skip)")
    p.add_argument("--siglip-ranks", type=int, default=4, help="gloo ranks (CPU processes) sharing that batch")
    p.add_argument("--siglip-dim", type=int, default=512, help="embedding width of that measurement")


def _run_ranks(target: str, config: dict, world: int) -> list[dict]:
    """`bench.<target>(json config)` on `world` fresh gloo processes on this machine; their printed JSON lines, in
    rank order. RuntimeError with their stderr when one fails."""
    with socket.socket() as sock:  # a free port for this process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # a fixed mmap threshold: blocks >= 128 KiB go back to the OS when freed, so RSS follows the live tensors
    # (glibc's dynamic threshold keeps the ring's freed 16 MB blocks in the heap: 216 MB instead of 60 at 4 ranks)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", f"import sys, bench; bench.{target}(sys.argv[1])",
                               json.dumps(config)], cwd=here, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{target} {config} failed:\n" + "\n".join(err[-2000:] for _, err in outs))
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def _siglip_loss_rank(config: str) -> None:
    """One gloo rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment): the memory of one SigLIP loss
    forward + backward on random unit features of B = N / world rows, gathered (`SIGLIPLoss` with
    all_gather_with_grad) or chunked (`ChunkedSIGLIPLoss` with ring_shift_with_grad), after one warm-up call
    (gloo buffers, lazy imports). Prints {"base_mb", "peak_mb", "loss_mb" = peak - base, "loss"} (peak RSS)."""
    import gc

    import torch.distributed as dist
    import torch.nn.functional as F

    import losses
    import utils

    cfg = json.loads(config)
    torch.set_num_threads(1)
    utils.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    B, D = cfg["global_batch"] // world, cfg["dim"]
    outputs = {"image_embed": F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_(),
               "text_embed": F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_(),
               "logit_scale": torch.tensor(10.0, requires_grad=True),
               "logit_bias": torch.tensor(-10.0, requires_grad=True)}
    criterion = (losses.ChunkedSIGLIPLoss(utils.ring_shift_with_grad, world) if cfg["chunked"]
                 else losses.SIGLIPLoss(utils.all_gather_with_grad, rank))

    def step() -> float:
        loss = criterion(outputs)["loss"]
        loss.backward()
        return float(loss.detach())

    step()
    for t in outputs.values():
        t.grad = None
    gc.collect()
    dist.barrier()
    read_peak = _reset_cpu_peak()
    base = _rss_bytes("VmRSS")
    loss = step()
    peak = read_peak()
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"base_mb": base / 2**20, "peak_mb": peak / 2**20, "loss_mb": (peak - base) / 2**20,
                      "loss": loss}))


def _siglip_loss_memory(args: argparse.Namespace) -> list[dict]:
    """`_siglip_loss_rank` on --siglip-ranks fresh processes, gathered then chunked; one row per form with the
    largest per-rank loss memory, and the (B, N) vs (B, B) fp32 logit matrix one rank holds."""
    world, N = args.siglip_ranks, args.siglip_global_batch
    if N % world:
        raise SystemExit(f"--siglip-global-batch {N} is not divisible by --siglip-ranks {world}")
    rows = []
    for chunked in (False, True):
        ranks = _run_ranks("_siglip_loss_rank", {"global_batch": N, "dim": args.siglip_dim, "chunked": chunked}, world)
        B = N // world
        rows.append({"form": "chunked (ring)" if chunked else "gathered", "global_batch": N, "ranks": world,
                     "local_batch": B, "logits_MB": B * (B if chunked else N) * 4 / 2**20,
                     "loss_mem_MB": max(r["loss_mb"] for r in ranks), "peak_MB": max(r["peak_mb"] for r in ranks),
                     "mean_loss": sum(r["loss"] for r in ranks) / world})
    return rows


def _objective_flags(name: str, args: argparse.Namespace) -> list[str]:
    """The paper's recipe flags at bench size (projector sizes as clip-rocket's defaults)."""
    flags = ["--model", name, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
    if args.transformer_layers:
        flags += ["--transformer-layers", str(args.transformer_layers)]
    if name.startswith("CL2L_"):
        flags += ["--separate-proj", "--text-augment", "--label-smoothing", "0.0" if "SWALIP" in name else "0.1"]
    return flags


def _objective_child(config: str) -> None:
    """Fresh process: build one objective, 1 warm-up + `steps` timed optimizer steps on random inputs of the
    dataset's layout; prints {"step_s": median, "peak_mb", "base_mb"} (CUDA: max_memory_allocated; CPU: peak
    RSS via VmHWM reset by /proc/self/clear_refs, base = RSS after the warm-up step)."""
    import engine
    import losses
    import main as trainer
    import models
    import registry

    cfg = json.loads(config)
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    args = trainer.parse_args(cfg["flags"])
    spec = models.parse_model_name(args.model)
    model = models.build_from_config(registry.config_from_flags(vars(args)), args.checkpoint_grad).to(device)
    criterion = losses.build_criterion(spec, args, utils.DistEnv(device=device))
    optimizer = torch.optim.AdamW(engine.param_groups(model, args.wd), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    B, S, A = args.batch_size, args.image_size, registry.num_augs(spec, args)
    tokens = torch.randint(1, 4000, (B, 1 + A, 77) if spec.objective.num_augs else (B, 77))
    tokens[..., 20] = 49407
    batch = (torch.randn(B, 3, S, S), tokens) + ((torch.randn(B, A, 3, S, S),) if spec.objective.num_augs else ())
    batch = tuple(t.to(device) for t in batch)

    step_config = engine.StepConfig.from_args(args, device)

    def step(i: int) -> None:
        engine.forward_backward(model, criterion, [batch], step_config, scaler)
        model.before_optimizer_step(i)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        model.after_optimizer_step(i + 1, 100)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(0)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        read_peak = lambda: torch.cuda.max_memory_allocated(device)  # noqa: E731
    else:
        read_peak = _reset_cpu_peak()
        base = _rss_bytes("VmRSS")
    times = []
    for i in range(cfg["steps"]):
        t0 = time.perf_counter()
        step(i + 1)
        times.append(time.perf_counter() - t0)
    peak = read_peak()
    print(json.dumps({"step_s": statistics.median(times), "peak_mb": peak / 2**20, "base_mb": base / 2**20}))


def _augment_rate(args: argparse.Namespace) -> dict:
    """Samples/s of one process (= one DataLoader worker) through the CL2L sample pipeline: weak view,
    2 strong views, weak + 2 strong texts (stop words, one EDA op incl. WordNet synonyms), BPE tokens."""
    import datasets
    import main as trainer
    import models

    trainer_args = trainer.parse_args(_objective_flags(f"CL2L_{args.backbone}_CL2L", args))
    spec = models.parse_model_name(trainer_args.model)
    reader = readers.SyntheticReader(args.augment_samples, image_size=args.source_size)
    tokenizer = datasets.build_tokenizer("bpe", 77)
    dataset = datasets.build_train_dataset(spec, trainer_args, reader, args.image_size, tokenizer)
    dataset[(0, 0)]  # warm caches (WordNet is loaded by build_train_dataset)
    t0 = time.perf_counter()
    for i in range(args.augment_samples):
        dataset[(i, i)]
    rate = args.augment_samples / (time.perf_counter() - t0)
    image_only = datasets.MultiViewDataset(reader, datasets.train_transform(args.image_size), tokenizer,
                                           strong_transforms=datasets.strong_view_transforms(2, args.image_size))
    t0 = time.perf_counter()
    for i in range(args.augment_samples):
        image_only[(i, i)]
    return {"samples_per_s_per_worker": rate,
            "image_only_samples_per_s": args.augment_samples / (time.perf_counter() - t0)}


@subcommand("objectives", _add_objectives_args)
def bench_objectives(args: argparse.Namespace) -> dict:
    """Step time and peak memory of every objective relative to CLIP at one backbone and batch, and the
    CL2L augmentation pipeline's samples/s per worker against the CL2L step's appetite."""
    device = utils.resolve_device(args.device)
    names = args.models or [m.format(bb=args.backbone) for m in OBJECTIVE_MODELS]
    here = os.path.dirname(os.path.abspath(__file__))
    load_before = os.getloadavg()[0]
    rows = []
    for name in names:
        cfg = {"flags": _objective_flags(name, args), "steps": args.steps, "device": str(device),
               "threads": torch.get_num_threads()}
        proc = subprocess.run([sys.executable, "-c", "import sys, bench; bench._objective_child(sys.argv[1])",
                               json.dumps(cfg)], cwd=here, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append({"model": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
    ref = next((r for r in rows if r["model"].endswith("_CLIP") and r["model"].startswith("CLIP_")), rows[0])
    table = [{"model": r["model"], "step_s": r["step_s"], "step_vs_clip": r["step_s"] / ref["step_s"],
              "samples_per_s": args.batch_size / r["step_s"], "peak_mb": r["peak_mb"],
              "peak_vs_clip": r["peak_mb"] / ref["peak_mb"]} for r in rows]
    aug = _augment_rate(args)
    cl2l = next((r for r in table if r["model"].endswith("_CL2L")), None)
    siglip = _siglip_loss_memory(args) if args.siglip_global_batch else []
    load_after = os.getloadavg()[0]
    print(f"backbone {args.backbone}, batch {args.batch_size}, {args.image_size} px, device {device}, "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    print(markdown_table(table))
    feed = None
    if cl2l is not None:
        feed = 2 * aug["samples_per_s_per_worker"] / cl2l["samples_per_s"]
        print(f"\nCL2L pipeline: {aug['samples_per_s_per_worker']:.1f} samples/s per worker "
              f"({aug['image_only_samples_per_s']:.1f} without text augmentation); the CL2L step consumes "
              f"{cl2l['samples_per_s']:.1f} samples/s: 2 workers supply {feed:.2f}x what it needs")
    ratio = siglip[1]["loss_mem_MB"] / max(siglip[0]["loss_mem_MB"], 1e-9) if siglip else None
    if siglip:
        print(f"\nSigLIP loss forward + backward, peak RSS per rank over the warm baseline ({args.siglip_ranks} gloo "
              f"CPU ranks, {args.siglip_dim}-d features): chunked / gathered = {ratio:.3f}")
        print(markdown_table(siglip))
    return {"device": str(device), "batch_size": args.batch_size, "image_size": args.image_size,
            "backbone": args.backbone, "load_average": [load_before, load_after], "rows": table, **aug,
            "two_worker_feed_ratio": feed, "siglip_loss_memory": siglip, "siglip_chunked_memory_ratio": ratio}


# --------------------------------------------------------------------------- fsdp (issue 15)
def _add_fsdp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="CLIP_VITB16_CLIP", help="model name (default: ViT-B/16, 150 M parameters)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--ranks", type=int, default=2, help="gloo CPU ranks")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up step")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])


def _local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _fsdp_rank(config: str) -> None:
    """One gloo rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment) training `flags`' model as main.py
    does, under DDP or `fsdp.shard_model`: one warm-up step (AdamW's state exists after it), then `steps` timed
    steps. Prints {"params_mb", "adam_mb"} (the parameters and AdamW moments this rank holds), "base_mb" (RSS after
    the warm-up), "peak_mb" (peak RSS over the timed steps) and "step_s" (median)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import engine
    import fsdp
    import losses
    import main as trainer
    import models
    import registry

    cfg = json.loads(config)
    torch.set_num_threads(1)
    utils.init_process_group("gloo")
    env = utils.DistEnv(dist.get_rank(), dist.get_world_size(), 0, torch.device("cpu"))
    args = trainer.parse_args(cfg["flags"])
    spec = models.parse_model_name(args.model)
    torch.manual_seed(0)
    model = models.build_from_config(registry.config_from_flags(vars(args)))
    model = fsdp.shard_model(model, args.precision) if cfg["fsdp"] else model
    wrapped = model if cfg["fsdp"] else DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(engine.param_groups(model, args.wd), lr=1e-4)
    criterion, scaler = losses.build_criterion(spec, args, env), torch.amp.GradScaler("cpu", enabled=False)
    step_config, state = engine.StepConfig.from_args(args, env.device), engine.RunState()
    g = torch.Generator().manual_seed(env.rank)
    tokens = torch.randint(1, 4000, (args.batch_size, 77), generator=g)
    tokens[:, 20] = 49407  # end of text: 21 tokens
    batch = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g), tokens)

    def step() -> None:
        engine.forward_backward(wrapped, criterion, [batch], step_config, scaler)
        engine.optimizer_step(wrapped, optimizer, scaler, state, 100)
        state.step += 1

    step()
    held = {"params_mb": _local_bytes(model.parameters()) / 2**20,
            "adam_mb": _local_bytes(v for s in optimizer.state.values() for v in s.values()
                                    if torch.is_tensor(v) and v.ndim) / 2**20}
    gc.collect()
    dist.barrier()
    read_peak = _reset_cpu_peak()
    base = _rss_bytes("VmRSS")
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = read_peak()
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({**held, "base_mb": base / 2**20, "peak_mb": peak / 2**20, "step_s": statistics.median(times)}))


@subcommand("fsdp", _add_fsdp_args)
def bench_fsdp(args: argparse.Namespace) -> dict:
    """Per-rank memory and step time of `--fsdp` (fully_shard per block and tower) against DDP, on --ranks gloo
    CPU processes of one thread each, same model, batch and seed: what sharding saves of the parameters and AdamW
    state each rank holds, and what its all-gathers cost in time."""
    flags = ["--model", args.model, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
             "--precision", args.precision, "--device", "cpu"]
    load_before, rows = os.getloadavg()[0], []
    for sharded in (False, True):
        ranks = _run_ranks("_fsdp_rank", {"flags": flags, "fsdp": sharded, "steps": args.steps}, args.ranks)
        rows.append({"impl": "fsdp" if sharded else "ddp", **{k: max(r[k] for r in ranks) for k in ranks[0]}})
    ddp, fsdp_row = rows
    ratios = {k: fsdp_row[k] / ddp[k] for k in ("params_mb", "adam_mb", "peak_mb", "step_s")}
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size} per rank, {args.precision}, {args.ranks} "
          f"gloo CPU ranks of 1 thread; per rank, the largest of the ranks (load {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f})")
    print(markdown_table(rows))
    print("fsdp / ddp: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size, "ranks": args.ranks,
            "precision": args.precision, "rows": rows, "fsdp_over_ddp": ratios}


# --------------------------------------------------------------------------- launch (issue 5)
def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="/tmp/clip_lab_bench_launch", help="experiments root (wiped first)")
    p.add_argument("--tasks", type=int, default=2, help="CPU tasks (gloo ranks) of the job")
    p.add_argument("--methods", default="usr2,scontrol",
                   help="how to interrupt: usr2 (= timeout signal, Trainer.checkpoint() requeues), "
                        "scontrol (`scontrol requeue`, SIGTERM, no checkpoint() call)")


def _train_steps(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["global_step"] for line in f if '"type": "train"' in line]


def _wait(predicate, timeout: float = 600.0, poll: float = 0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError("benchmark job did not progress")


@subcommand("launch", _add_launch_args)
def bench_launch(args: argparse.Namespace) -> dict:
    """Submit-to-first-step latency and the requeue gap (interrupt -> next optimizer step) on the local Slurm."""
    import run_with_submitit as rws

    shutil.rmtree(args.root, ignore_errors=True)
    rows = []
    for method in args.methods.split(","):
        name = f"bench_{method}"
        argv = ["--model", "CLIP_VITT16_CLIP", "--dataset", "digits", "--image-size", "32", "--transformer-layers",
                "1", "--batch-size", "8", "--workers", "0", "--print-freq", "1", "--save-every-steps", "2",
                "--max-steps", "100000", "--ngpus", "0", "--tasks-per-node", str(args.tasks), "--cpus-per-task", "1",
                "--timeout", "10", "--output-dir", args.root, "--name", name, "--cluster", "slurm"]
        log_path = os.path.join(args.root, name, "log.txt")
        t_submit = time.time()
        job = rws.launch([argv])[0]["job"]
        t_submitted = time.time()
        _wait(lambda: _train_steps(log_path))  # noqa: B023
        t_first = time.time()
        _wait(lambda: os.path.exists(os.path.join(args.root, name, "checkpoint.pt")) and len(_train_steps(log_path)) >= 4)  # noqa: B023,E501
        t_int = time.time()
        if method == "usr2":
            job._interrupt(timeout=True)
        else:
            subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True)
        state = lambda: subprocess.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%T"],  # noqa: E731,B023
                                       capture_output=True, text=True).stdout.strip()
        _wait(lambda: state() != "RUNNING", poll=0.1)  # noqa: B023  requeued: PENDING (cred_expire, scheduler)
        _wait(lambda: state() == "RUNNING", poll=0.1)  # noqa: B023  ... then running again
        t_slurm = time.time()
        events = os.path.join(args.root, name, "launch_events.jsonl")
        _wait(lambda: sum(1 for _ in open(events, encoding="utf-8")) >= 2, poll=0.1)  # noqa: B023
        t_restart = time.time()
        # the old attempt may log a few more steps before it is killed: count from the new attempt's start; it
        # re-logs from its checkpoint step, so any new line is its first optimizer step
        n_restart = len(_train_steps(log_path))
        _wait(lambda: len(_train_steps(log_path)) > n_restart)  # noqa: B023
        t_next = time.time()
        job.cancel()
        rows.append({"method": method, "job": str(job.job_id), "sbatch_s": t_submitted - t_submit,
                     "submit_to_first_step_s": t_first - t_submit, "slurm_requeue_to_running_s": t_slurm - t_int,
                     "requeue_to_python_start_s": t_restart - t_int, "requeue_gap_s": t_next - t_int,
                     "load_avg_1min": os.getloadavg()[0]})
    print(markdown_table(rows))
    return {"tasks": args.tasks, "rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
