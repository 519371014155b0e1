"""Training end to end: exact accumulation, 2-process gloo, resume, checkpoints, folder layout, failures, wandb."""
import glob
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from PIL import Image

import engine
import eval_zeroshot
import losses
import main
import models
import readers
import registry
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT_KEYS = {"model", "optimizer", "scaler", "epoch", "step", "step_in_epoch", "rng", "args", "commit"}


def flag(argv: list[str], name: str, value: str) -> list[str]:
    """argv with `name` set to `value` (replaced when present, appended otherwise)."""
    argv = list(argv)
    if name in argv:
        argv[argv.index(name) + 1] = value
        return argv
    return argv + [name, value]


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return env


def run_subprocess(argv: list[str], launcher: list[str] | None = None, timeout: int = 300) -> None:
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "main.py")] + argv
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def assert_same_tensors(a: dict, b: dict, atol: float, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol, msg=lambda m, key=key: f"{key}: {m}")


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# AdamW's first step moves a parameter by lr * g / (|g| + eps): with the default eps 1e-8 that is lr * sign(g), so
# parameters whose true gradient is zero (e.g. the key bias of attention, to which softmax is invariant) move by
# +-lr on the sign of fp32 summation noise. A large eps makes the step a smooth function of the gradient, so
# "same gradient" shows as "same parameters" at 1e-5.
EPS = "1e-2"


def assert_grads_close(a: dict, b: dict) -> None:
    """Same per-parameter gradients up to fp32 summation order (elements far below the tensor's scale may
    differ relatively more)."""
    for ga, gb in zip(grads_of(a), grads_of(b), strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5 * float(gb.abs().max()))


def grads_of(ckpt: dict) -> list[torch.Tensor]:
    """AdamW's first moment after one step is (1 - beta1) * gradient: the step's gradient, per parameter."""
    state = ckpt["optimizer"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


# --------------------------------------------------------------------------- exact gradient accumulation
def test_exact_accumulation_equals_big_batch_and_naive_differs(tmp_path):
    base = flag(TINY_RUN, "--lr", "1e-3") + ["--output-dir", str(tmp_path), "--max-steps", "1",
                                             "--warmup-epochs", "0", "--eps", EPS]
    runs = {"k4": ("8", "4", "exact"), "k1": ("32", "1", "exact"), "naive": ("8", "4", "naive")}
    ckpt = {}
    for name, (batch_size, update_freq, mode) in runs.items():
        argv = flag(base, "--batch-size", batch_size) + ["--update-freq", update_freq, "--accum-mode", mode]
        summary = main.main(argv + ["--name", name])
        assert summary["step"] == 1
        ckpt[name] = load(tmp_path / name / "checkpoint.pt")
    # one optimizer step from the same init on the same 32 samples: same gradient, same parameters
    assert_grads_close(ckpt["k4"], ckpt["k1"])
    assert_same_tensors(ckpt["k4"]["model"], ckpt["k1"]["model"], atol=1e-5)
    # naive accumulation (4 separate contrastive batches of 8) is another objective
    assert max_abs_diff(ckpt["naive"]["model"], ckpt["k1"]["model"]) > 1e-4
    rel = max(float((gn - g1).abs().max() / g1.abs().max()) for gn, g1 in
              zip(grads_of(ckpt["naive"]), grads_of(ckpt["k1"])))
    assert rel > 0.05


def test_exact_accumulation_adds_sparse_embedding_grads_into_a_dense_grad():
    """Each micro-batch backward of exact accumulation hands the token embedding a sparse gradient (only the
    rows its tokens used), added into a dense `.grad` equal to the one-batch gradient; the flag is reset."""
    torch.manual_seed(0)
    model = models.build_model(models.parse_model_name("CLIP_VITT16_CLIP"), image_size=32, text_layers=1)
    images, tokens = torch.randn(8, 3, 32, 32), torch.randint(1, 1000, (8, 77))
    ns = main.parse_args(["--accum-mode", "exact"])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    embedding = model.text.token_embedding
    incoming = []  # layout of each gradient the embedding's backward produces, before accumulation
    embedding.weight.register_hook(lambda g: incoming.append(g.layout))
    step = engine.StepConfig.from_args(ns, torch.device("cpu"))
    engine.forward_backward(model, losses.CLIPLoss(), list(zip(images.chunk(4), tokens.chunk(4))), step, scaler)
    assert incoming == [torch.sparse_coo] * 4 and embedding.weight.grad.layout == torch.strided
    assert not embedding.sparse
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    incoming.clear()
    engine.forward_backward(model, losses.CLIPLoss(), [(images, tokens)], step, scaler)
    assert incoming == [torch.strided]  # k = 1: the plain dense path
    for name, p in model.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_compile_trains_like_eager_with_the_same_checkpoint_keys(tmp_path, monkeypatch):
    """--compile (inductor on CPU here; CUDA on a GPU machine) under exact accumulation: the same parameters
    after two steps as eager, and a checkpoint an eager run loads (no `_orig_mod.` prefixes)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # not the shared /tmp cache
    base = TINY_RUN + ["--output-dir", str(tmp_path), "--max-steps", "2", "--warmup-epochs", "0", "--eps", EPS,
                       "--update-freq", "2", "--batch-size", "4"]
    main.main(base + ["--name", "compiled", "--compile"])
    main.main(base + ["--name", "eager"])
    compiled, eager = load(tmp_path / "compiled" / "checkpoint.pt"), load(tmp_path / "eager" / "checkpoint.pt")
    assert_same_tensors(compiled["model"], eager["model"], atol=1e-5)


# --------------------------------------------------------------------------- 2-process gloo
@pytest.mark.slow
def test_two_process_gloo_equals_one_process_double_batch(tmp_path):
    base = flag(TINY_RUN, "--lr", "1e-3") + ["--output-dir", str(tmp_path), "--max-steps", "1",
                                             "--warmup-epochs", "0", "--eps", EPS, "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_subprocess(flag(base, "--batch-size", "8") + ["--name", "ddp"], launcher=torchrun)
    main.main(flag(base, "--batch-size", "16") + ["--name", "single"])
    ddp, single = load(tmp_path / "ddp" / "checkpoint.pt"), load(tmp_path / "single" / "checkpoint.pt")
    assert_grads_close(ddp, single)
    assert_same_tensors(ddp["model"], single["model"], atol=1e-5)
    train = [r for r in log_records(tmp_path / "ddp" / "log.txt") if r["type"] == "train"]
    assert train[-1]["global_step"] == 1 and train[-1]["samples_per_s"] > 0


def test_two_process_gloo_with_exact_accumulation_equals_one_process(tmp_path):
    """2 ranks x 2 micro-batches x 4 == 1 process x 16, over two steps: the temperature's gradient must reach
    DDP's synchronised backward (a second step would fail or diverge otherwise)."""
    base = flag(TINY_RUN, "--lr", "1e-3") + ["--output-dir", str(tmp_path), "--max-steps", "2",
                                             "--warmup-epochs", "0", "--eps", EPS, "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_subprocess(flag(base, "--batch-size", "4") + ["--update-freq", "2", "--name", "ddp"], launcher=torchrun)
    main.main(flag(base, "--batch-size", "16") + ["--name", "single"])
    ddp, single = load(tmp_path / "ddp" / "checkpoint.pt"), load(tmp_path / "single" / "checkpoint.pt")
    assert ddp["step"] == single["step"] == 2
    assert_same_tensors(ddp["model"], single["model"], atol=2e-5)


@pytest.mark.slow
def test_two_process_chunked_siglip_with_exact_accumulation_equals_one_process(tmp_path):
    """--siglip-chunked under DDP: the ring's point-to-point sends and their backward (the text blocks' gradients
    going home) run inside DDP's synchronised backward, twice per step with exact accumulation; 2 ranks x 2
    micro-batches x 4 give the parameters of one process x 16 with the gathered loss after two steps."""
    base = flag(flag(TINY_RUN, "--model", "CLIP_VITT16_SIGLIP"), "--lr", "1e-3") + \
        ["--output-dir", str(tmp_path), "--max-steps", "2", "--warmup-epochs", "0", "--eps", EPS, "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_subprocess(flag(base, "--batch-size", "4") + ["--update-freq", "2", "--siglip-chunked", "--name", "ring"],
                   launcher=torchrun)
    main.main(flag(base, "--batch-size", "16") + ["--name", "single"])
    ring, single = load(tmp_path / "ring" / "checkpoint.pt"), load(tmp_path / "single" / "checkpoint.pt")
    assert ring["step"] == single["step"] == 2
    assert_same_tensors(ring["model"], single["model"], atol=2e-5)


def log_records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_logged_loss_is_the_global_batch_value_on_any_number_of_ranks(tmp_path):
    """The loss (and its parts) in log.txt is the global batch's: 1 process x 8 and 2 gloo ranks x 4 log the same
    numbers (today rank 0's half: 2.1395 vs 2.2474 for the same weights and data)."""
    base = TINY_RUN + ["--output-dir", str(tmp_path), "--max-steps", "2", "--warmup-epochs", "0", "--eps", EPS,
                       "--device", "cpu", "--eval-freq", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_subprocess(flag(base, "--batch-size", "4") + ["--name", "ddp"], launcher=torchrun)
    main.main(flag(base, "--batch-size", "8") + ["--name", "single"])
    ddp, single = ([r for r in log_records(tmp_path / n / "log.txt") if r["type"] == "train"]
                   for n in ("ddp", "single"))
    assert [r["global_step"] for r in ddp] == [r["global_step"] for r in single] == [1, 2]
    for a, b in zip(ddp, single):
        for key in ("loss", "clip_loss", "clip_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["global_step"], key)
    assert all(r["tflops_per_s"] > 0 and r["mfu"] > 0 for r in ddp)  # per device, averaged in the same all-reduce


def test_eval_freq_does_not_change_the_trained_weights(tmp_path):
    """Validation must not draw from the training run's RNG: the Chinese tower's dropout masks (BERT-tiny) are the
    same whether the digits zero-shot validation runs after every epoch or every second one."""
    base = flag(TINY_CN, "--batch-size", "64") + ["--epochs", "2", "--output-dir", str(tmp_path), "--val-dataset",
                                                  "digits"]
    main.main(base + ["--name", "every", "--eval-freq", "1"])
    main.main(base + ["--name", "second", "--eval-freq", "2"])
    every, second = load(tmp_path / "every" / "checkpoint.pt"), load(tmp_path / "second" / "checkpoint.pt")
    assert every["step"] == second["step"] == 8
    assert_same_tensors(every["model"], second["model"], atol=0)


# --------------------------------------------------------------------------- resume
@pytest.mark.slow
@pytest.mark.parametrize("model,dataset,extra", [("CLIP_VITT16_CLIP", "synthetic", []),
                                                 ("CNCLIP_VITT16_CLIP", "synthetic-zh", []),
                                                 ("CLIP_VITT16_CLIP", "synthetic", ["--patch-dropout", "0.5",
                                                                                    "--image-size", "64"])],
                         ids=["clip", "cnclip", "clip-patch-dropout"])
def test_resume_after_process_exit_is_identical(tmp_path, model, dataset, extra):
    """8 steps straight == 4 steps, process exit, automatic resume from the folder, 4 more steps.

    The CNCLIP tower has dropout and --patch-dropout draws a patch mask per image from the same per-rank torch
    stream, so this also checks that the RNG state is restored exactly."""
    base = flag(flag(TINY_RUN, "--model", model), "--dataset", dataset) + ["--output-dir", str(tmp_path)] + extra
    run_subprocess(base + ["--name", "straight", "--max-steps", "8"])
    run_subprocess(base + ["--name", "resumed", "--max-steps", "4"])
    half = load(tmp_path / "resumed" / "checkpoint.pt")
    assert (half["step"], half["step_in_epoch"], half["epoch"]) == (4, 4, 0)
    run_subprocess(base + ["--name", "resumed", "--max-steps", "8"])  # same folder: resumes from checkpoint.pt
    straight, resumed = load(tmp_path / "straight" / "checkpoint.pt"), load(tmp_path / "resumed" / "checkpoint.pt")
    assert resumed["step"] == straight["step"] == 8
    assert_same_tensors(resumed["model"], straight["model"], atol=1e-6)
    for a, b in zip(grads_of(resumed), grads_of(straight)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    steps = [r["global_step"] for r in log_records(tmp_path / "resumed" / "log.txt") if r["type"] == "train"]
    assert steps == list(range(1, 9))  # the resumed run continued the log where it stopped


@pytest.mark.slow
def test_resume_with_update_freq_continues_at_the_right_micro_batch(tmp_path):
    """--update-freq 2: 4 steps straight == 2 steps, process exit, resume, 2 more. The sampler resumes at micro-batch
    step_in_epoch * update_freq (at step_in_epoch it would replay micro-batches 2-3 and change the weights)."""
    base = TINY_RUN + ["--output-dir", str(tmp_path), "--update-freq", "2", "--batch-size", "4"]
    run_subprocess(base + ["--name", "straight", "--max-steps", "4"])
    run_subprocess(base + ["--name", "resumed", "--max-steps", "2"])
    half = load(tmp_path / "resumed" / "checkpoint.pt")
    assert (half["step"], half["step_in_epoch"], half["epoch"]) == (2, 2, 0)
    run_subprocess(base + ["--name", "resumed", "--max-steps", "4"])
    straight, resumed = load(tmp_path / "straight" / "checkpoint.pt"), load(tmp_path / "resumed" / "checkpoint.pt")
    assert resumed["step"] == straight["step"] == 4
    assert_same_tensors(resumed["model"], straight["model"], atol=1e-6)
    for a, b in zip(grads_of(resumed), grads_of(straight)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_rank_resume_continues_each_ranks_own_random_stream(tmp_path):
    """2 gloo ranks, CNCLIP (dropout in the BERT tower): the ranks draw their own dropout masks, the checkpoint
    holds both RNG states, and 4 steps straight == 2 steps, exit, resume, 2 steps."""
    base = flag(flag(TINY_RUN, "--model", "CNCLIP_VITT16_CLIP"), "--dataset", "synthetic-zh") + \
        ["--output-dir", str(tmp_path), "--device", "cpu", "--batch-size", "4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_subprocess(base + ["--name", "straight", "--max-steps", "4"], launcher=torchrun)
    run_subprocess(base + ["--name", "resumed", "--max-steps", "2"], launcher=torchrun)
    half = load(tmp_path / "resumed" / "checkpoint.pt")
    assert half["step"] == 2 and len(half["rng"]) == 2
    assert not torch.equal(half["rng"][0]["torch"], half["rng"][1]["torch"])  # two streams, not one copied
    run_subprocess(base + ["--name", "resumed", "--max-steps", "4"], launcher=torchrun)
    straight, resumed = load(tmp_path / "straight" / "checkpoint.pt"), load(tmp_path / "resumed" / "checkpoint.pt")
    assert resumed["step"] == straight["step"] == 4
    assert_same_tensors(resumed["model"], straight["model"], atol=1e-6)


def test_restore_rng_takes_this_ranks_state_or_reseeds_on_another_world_size(caplog):
    states = []
    for rank in range(2):
        utils.seed_all(utils.rank_seed(7, rank))
        states.append(utils.capture_rng_state())
    utils.restore_rng(states, rank=1, world_size=2, seed=7, step=5)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])
    with caplog.at_level(logging.WARNING):
        utils.restore_rng(states, rank=1, world_size=4, seed=7, step=5)  # resumed on 4 ranks
    assert "not a bitwise continuation" in caplog.text
    assert torch.initial_seed() == utils.rank_seed(7, 1, 5) != utils.rank_seed(7, 0, 5)


def test_folder_of_another_run_is_refused(tiny_run_args):
    main.main(tiny_run_args + ["--name", "owner", "--max-steps", "1"])
    with pytest.raises(SystemExit, match=r"belongs to another run.*--lr 0\.001 -> 0\.002"):
        main.main(flag(tiny_run_args, "--lr", "2e-3") + ["--name", "owner", "--max-steps", "2"])


# --------------------------------------------------------------------------- checkpoint + folder layout
def test_full_epoch_writes_experiment_folder_and_safe_checkpoints(tiny_run_args, tmp_path):
    argv = flag(tiny_run_args, "--batch-size", "32") + ["--name", "layout", "--print-freq", "4"]
    summary = main.main(argv)
    exp = tmp_path / "experiments" / "layout"
    names = set(os.listdir(exp))
    assert {"args.json", "command.txt", "commit.txt", "log.txt", "train.log", "checkpoint.pt", "checkpoint_best.pt",
            "summary.json"} <= names
    assert not [n for n in names if n.startswith(".tmp_")]  # atomic writes leave no temporary files
    args = json.load(open(exp / "args.json", encoding="utf-8"))
    assert args["model"] == "CLIP_VITT16_CLIP" and args["batch_size"] == 32
    assert (exp / "commit.txt").read_text().strip() == summary["commit"]
    assert "main.py" in (exp / "command.txt").read_text() or "pytest" in (exp / "command.txt").read_text()
    records = [json.loads(line) for line in open(exp / "log.txt", encoding="utf-8")]
    train = [r for r in records if r["type"] == "train"]
    assert [r["global_step"] for r in train] == [4, 8]
    assert {"loss", "clip_loss", "clip_acc", "lr", "logit_scale", "samples_per_s", "memory_mb"} <= train[0].keys()
    epoch = [r for r in records if r["type"] == "epoch"]
    assert len(epoch) == 1 and epoch[0]["global_step"] == 8 and "test_mean_recall" in epoch[0]
    on_disk = json.load(open(exp / "summary.json", encoding="utf-8"))
    assert on_disk["epoch"] == 1 and on_disk["step"] == 8 and 0 <= on_disk["mean_recall"] <= 100
    assert on_disk["best_metric"] == pytest.approx(on_disk["mean_recall"])
    assert on_disk["val_dataset"] == "synthetic"  # the default: the test split of --dataset, evaluated per epoch
    for name in ("checkpoint.pt", "checkpoint_best.pt"):
        ckpt = load(exp / name)  # weights_only=True: nothing but tensors and plain containers
        assert CKPT_KEYS <= ckpt.keys()
        assert (ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]) == (1, 8, 0)
        assert ckpt["args"]["model"] == "CLIP_VITT16_CLIP" and ckpt["commit"] == summary["commit"]
        assert len(ckpt["rng"]) == 1 and {"python", "numpy", "torch"} <= ckpt["rng"][0].keys()  # one per rank
    # logit_scale is clamped after every step and never decayed
    assert 0 <= float(ckpt["model"]["logit_scale"]) <= torch.log(torch.tensor(100.0))


def test_pretrained_weights_are_loaded(tiny_run_args, tmp_path):
    model = models.build_model(models.parse_model_name("CLIP_VITT16_CLIP"), image_size=32, text_layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0123) if p.ndim else p.fill_(1.5)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    # lr 0 everywhere: the step leaves the weights as loaded
    argv = tiny_run_args + ["--name", "pre", "--pretrained", str(tmp_path / "weights.pt"), "--max-steps", "1",
                            "--lr", "0", "--lr-start", "0", "--lr-end", "0"]
    main.main(argv)
    ckpt = load(tmp_path / "experiments" / "pre" / "checkpoint.pt")
    assert_same_tensors(ckpt["model"], model.state_dict(), atol=0)


# --------------------------------------------------------------------------- non-finite loss
class NaNAt(losses.CLIPLoss):
    """CLIPLoss whose loss is NaN on the given forward calls (1-based)."""

    def __init__(self, calls: set[int]) -> None:
        super().__init__()
        self.calls, self.count = calls, 0

    def forward(self, outputs):
        self.count += 1
        out = super().forward(outputs)
        if self.count in self.calls:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_loss_dumps_batch_and_stops(tiny_run_args, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "build_criterion", lambda *a: NaNAt({3}))
    with pytest.raises(SystemExit) as info:
        main.main(tiny_run_args + ["--name", "nan"])
    message = str(info.value)
    path = str(tmp_path / "experiments" / "nan" / "nonfinite_step2.pt")
    assert "non-finite loss at step 2" in message and path in message and "--max-nonfinite" in message
    dump = load(path)
    images, tokens = dump["batch"]
    assert images.shape == (8, 3, 32, 32) and dump["step"] == 2
    # the micro-batch as the model saw it: tokens trimmed on the host to their longest caption
    assert tokens.shape[0] == 8 and tokens.shape[1] < 77 and (tokens[:, -1] != 0).any()
    assert torch.isnan(dump["loss"]["loss"])


def test_max_nonfinite_skips_and_the_epoch_completes(tiny_run_args, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "build_criterion", lambda *a: NaNAt({3}))
    argv = flag(tiny_run_args, "--batch-size", "32") + ["--name", "skip", "--max-nonfinite", "1"]
    summary = main.main(argv)
    assert summary["epoch"] == 1 and summary["step"] == 8  # the skipped step consumed its batch, no update
    assert "mean_recall" in summary  # the epoch ended normally and was evaluated
    ckpt = load(tmp_path / "experiments" / "skip" / "checkpoint.pt")
    assert ckpt["nonfinite"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not glob.glob(str(tmp_path / "experiments" / "skip" / "nonfinite_*"))


def test_nonfinite_skip_with_exact_accumulation(tiny_run_args, tmp_path, monkeypatch):
    """With --update-freq 2 the NaN shows up in the recompute pass; the step is skipped cleanly."""
    monkeypatch.setattr(losses, "build_criterion", lambda *a: NaNAt({4}))
    summary = main.main(tiny_run_args + ["--name", "skipk", "--max-nonfinite", "1", "--update-freq", "2",
                                         "--max-steps", "3"])
    assert summary["step"] == 3


# --------------------------------------------------------------------------- bad input
def test_unknown_model_fails_at_parse_time_with_suggestion(tiny_run_args, capsys):
    with pytest.raises(SystemExit) as info:
        main.main(flag(tiny_run_args, "--model", "CLIP_VITT61_CLIP"))
    assert info.value.code == 2
    assert "Did you mean: CLIP_VITT16_CLIP" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["--dataset", "--val-dataset"])
def test_unknown_dataset_lists_catalog_names(tiny_run_args, tmp_path, capsys, key):
    with pytest.raises(SystemExit) as info:
        main.main(flag(tiny_run_args, key, "digitz"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'digitz'" in err and "dataset_catalog.json" in err and "'digits'" in err and "'synthetic'" in err
    assert not os.path.exists(tmp_path / "experiments")  # refused before any folder is written


def test_corrupt_checkpoint_gives_clear_error(tiny_run_args, tmp_path):
    main.main(tiny_run_args + ["--name", "good", "--max-steps", "1"])
    good = tmp_path / "experiments" / "good" / "checkpoint.pt"
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError, match=r"cannot load checkpoint .*truncated\.pt.*corrupt"):
        main.main(tiny_run_args + ["--name", "other", "--resume", str(bad)])


def test_pretrained_with_wrong_keys_lists_them(tiny_run_args, tmp_path):
    state = models.build_model(models.parse_model_name("CLIP_VITT16_CLIP"), image_size=32, text_layers=1).state_dict()
    state.pop("visual.norm.weight")
    state["visual.extra_head.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "bad_keys.pt")
    with pytest.raises(RuntimeError) as info:
        main.main(tiny_run_args + ["--name", "keys", "--pretrained", str(tmp_path / "bad_keys.pt")])
    msg = str(info.value)
    assert "bad_keys.pt" in msg and "missing keys (1): ['visual.norm.weight']" in msg
    assert "unexpected keys (1): ['visual.extra_head.weight']" in msg


def test_resume_checkpoint_with_wrong_keys_lists_them(tiny_run_args, tmp_path):
    main.main(tiny_run_args + ["--name", "src", "--max-steps", "1"])
    ckpt = load(tmp_path / "experiments" / "src" / "checkpoint.pt")
    ckpt["model"].pop("text_projection.weight")
    ckpt["model"]["text.extra.bias"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(RuntimeError) as info:
        main.main(tiny_run_args + ["--name", "dst", "--resume", str(tmp_path / "edited.pt")])
    msg = str(info.value)
    assert "edited.pt" in msg and "missing keys (1): ['text_projection.weight']" in msg
    assert "unexpected keys (1): ['text.extra.bias']" in msg


def test_resume_from_bare_state_dict_is_refused(tiny_run_args, tmp_path):
    state = models.build_model(models.parse_model_name("CLIP_VITT16_CLIP"), image_size=32, text_layers=1).state_dict()
    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(RuntimeError, match="not a CLIP Lab training checkpoint.*--pretrained"):
        main.main(tiny_run_args + ["--name", "bare", "--resume", str(tmp_path / "weights.pt")])


# --------------------------------------------------------------------------- validation set
TINY_CN = flag(flag(TINY_RUN, "--model", "CNCLIP_VITT16_CLIP"), "--dataset", "synthetic-zh") + \
    ["--text-model", "BERT-tiny-chinese"]


def write_cc3m(root, n: int = 16) -> str:
    """A tiny cc3m-format data root (cc3m/cc3m_train.npy + cc3m/images/<id>.jpg, as the catalog entry expects)."""
    os.makedirs(root / "cc3m" / "images")
    rng = np.random.RandomState(0)
    records = np.empty(n, dtype=object)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "cc3m" / "images" / f"{i}.jpg")
        records[i] = {"image_id": f"{i}.jpg", "captions": [f"a photo of thing number {i}"]}
    np.save(root / "cc3m" / "cc3m_train.npy", records, allow_pickle=True)
    return str(root)


def test_validation_set_is_resolved_from_flags_and_catalog(capsys):
    """--val-dataset; else --dataset with a test split; else the catalog's val_dataset (ImageNet for the
    train-only web sets); `none` skips validation. Every catalog dataset resolves to a set with a test split."""
    def resolved(*argv):
        return main.validation_dataset_name(main.parse_args(list(argv)))

    assert resolved() == "digits" and resolved("--dataset", "muge") == "muge"
    for train_only in ("cc3m", "cc12m", "yfcc15m", "merged-29m"):
        assert not main.has_test_split(train_only) and resolved("--dataset", train_only) == "imagenet"
    assert resolved("--dataset", "cc3m", "--val-dataset", "digits") == "digits"
    assert resolved("--dataset", "cc3m", "--val-dataset", "none") is None
    for name in readers.load_catalog():
        assert main.has_test_split(resolved("--dataset", name)), name
    for argv, message in [(["--val-dataset", "cc3m"], "validation set 'cc3m' (--val-dataset): dataset 'cc3m' has "
                                                      "no test split"),
                          (["--val-dataset", "none", "--evaluate"], "--evaluate with --val-dataset none")]:
        with pytest.raises(SystemExit):
            main.parse_args(argv)
        assert message in capsys.readouterr().err


def test_train_only_dataset_checks_its_validation_set_before_the_first_step(tmp_path):
    """cc3m has no test split: it validates on ImageNet, whose absence fails at start (no step, no checkpoint),
    naming the set and the way out; --val-dataset none trains a whole epoch without validation."""
    root = write_cc3m(tmp_path / "data")
    base = flag(TINY_RUN, "--dataset", "cc3m") + ["--data-root", root, "--output-dir", str(tmp_path / "exp")]
    with pytest.raises(readers.DatasetError, match=r"validation set 'imagenet' of --dataset 'cc3m' cannot be read: "
                                                    r"dataset 'imagenet' .*not found.*--val-dataset none"):
        main.main(base + ["--name", "default"])
    assert not os.path.exists(tmp_path / "exp" / "default" / "log.txt")  # no step was logged
    assert not os.path.exists(tmp_path / "exp" / "default" / "checkpoint.pt")
    summary = main.main(base + ["--name", "none", "--val-dataset", "none"])
    assert (summary["epoch"], summary["step"], summary["val_dataset"], summary["best_metric"]) == (1, 2, None, None)
    exp = tmp_path / "exp" / "none"
    assert os.path.exists(exp / "checkpoint.pt") and not os.path.exists(exp / "checkpoint_best.pt")
    epoch = [r for r in map(json.loads, open(exp / "log.txt", encoding="utf-8")) if r["type"] == "epoch"]
    assert len(epoch) == 1 and not [k for k in epoch[0] if k.startswith("test_")]


def test_per_epoch_validation_equals_eval_zeroshot_in_the_models_language(tmp_path, monkeypatch):
    """A Chinese model validated on `digits` after a whole epoch: eval_zeroshot.evaluate_dataset with the
    digits-zh prompts, the same numbers as `eval_zeroshot.py --resume` on the epoch's checkpoint; retrieval too."""
    calls, seen_readers = [], []

    def spy(*args, **kwargs):
        seen_readers.append(kwargs.get("reader"))
        result = evaluate_dataset(*args, **kwargs)
        calls.append(result)
        return result

    evaluate_dataset = eval_zeroshot.evaluate_dataset
    monkeypatch.setattr(eval_zeroshot, "evaluate_dataset", spy)
    argv = flag(TINY_CN, "--batch-size", "64") + ["--output-dir", str(tmp_path), "--name", "cn",
                                                  "--val-dataset", "digits"]
    summary = main.main(argv)
    assert summary["epoch"] == 1 and summary["val_dataset"] == "digits"
    assert len(calls) == 1 and calls[0]["labels"] == "digits-zh"
    assert seen_readers[0] is not None  # the test split opened at start, not listed again every epoch
    offline = eval_zeroshot.main(["--resume", str(tmp_path / "cn" / "checkpoint.pt"), "--datasets", "digits",
                                  "--output-dir", str(tmp_path / "offline"), "--device", "cpu"])["digits"]
    assert offline["labels"] == "digits-zh"
    for key in ("score_z", "acc1_z", "acc5_z"):
        assert summary[key] == pytest.approx(offline[key], abs=1e-9), key
    assert summary["best_metric"] == pytest.approx(summary["score_z"])
    assert {"mean_recall", "image_to_text_R@1"} <= summary.keys()  # retrieval on the digits captions stays
    assert not {"metric", "labels", "num_images"} & summary.keys()  # only evaluate_dataset's float metrics


def test_a_set_without_class_names_gets_retrieval_metrics_only(muge_sample_root, tmp_path):
    """muge-sample has no class names: validation is the pool retrieval of its test split, no zero-shot keys."""
    summary = main.main(TINY_CN + ["--dataset", "muge-sample", "--data-root", muge_sample_root, "--evaluate",
                                   "--output-dir", str(tmp_path)])
    assert summary["val_dataset"] == "muge-sample" and {"mean_recall", "pool_images"} <= summary.keys()
    assert not [k for k in summary if k.startswith(("acc", "score"))]


# --------------------------------------------------------------------------- wandb
def offline_runs(exp) -> list[tuple[str, str]]:
    """(run id, display name) of every offline wandb run in an experiment folder, oldest first."""
    from test_launch import read_wandb_offline

    out = []
    for folder in sorted(glob.glob(str(exp / "wandb" / "offline-run-*"))):
        records = read_wandb_offline(glob.glob(os.path.join(folder, "run-*.wandb"))[0])
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert folder.endswith("-" + run.run_id)
        out.append((run.run_id, run.display_name))
    return out


def test_wandb_run_id_is_unique_per_experiment_and_kept_on_resume(tiny_run_args, tmp_path, monkeypatch):
    """Real wandb, offline. The id is generated once per experiment and stored in the folder (and checkpoint):
    the same name under two output roots, or `a:b` vs `a-b`, are two wandb runs (today they merged into one, the
    id being the folder's basename); a resume continues the run; the display name is the experiment name."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    one, two = tmp_path / "root1", tmp_path / "root2"
    for root, name in ((one, "wb"), (two, "wb"), (one, "a:b"), (one, "a-b")):
        main.main(flag(TINY_RUN, "--output-dir", str(root)) + ["--name", name, "--max-steps", "1", "--wandb",
                                                               "--eval-freq", "0"])
    runs = {(str(root), name): offline_runs(root / name) for root, name in ((one, "wb"), (two, "wb"), (one, "a:b"),
                                                                           (one, "a-b"))}
    assert len({run_id for (run_id, _), in runs.values()}) == 4  # four experiments, four wandb runs
    ids = {}
    for (root, name), ((run_id, display),) in runs.items():
        assert display == name
        assert open(os.path.join(root, name, "wandb_id.txt"), encoding="utf-8").read().strip() == run_id
        assert load(os.path.join(root, name, "checkpoint.pt"))["wandb_id"] == run_id
        ids[(root, name)] = run_id
    main.main(flag(TINY_RUN, "--output-dir", str(one)) + ["--name", "wb", "--max-steps", "2", "--wandb",
                                                          "--eval-freq", "0"])
    assert offline_runs(one / "wb") == [(ids[(str(one), "wb")], "wb")] * 2  # the resume continued the run


def test_a_catalog_entry_sets_flag_defaults_that_given_flags_override(monkeypatch, capsys):
    """`python main.py` trains the digits demo in-process (0 workers: on 2 cores workers take the compute threads'
    cores) and validates at the end: the entry's "defaults"; flags on the command line win, other sets keep the
    parser's defaults, and a default naming no flag fails at parse time naming the entry."""
    demo = main.parse_args([])
    assert (demo.dataset, demo.workers, demo.image_size) == ("digits", 0, None)  # image size: the entry's 16 px
    assert demo.eval_freq == demo.epochs  # validation once, at the end
    assert vars(main.parse_args(["--workers", "2", "--eval-freq", "1"])) == {**vars(demo), "workers": 2, "eval_freq": 1}
    synthetic = main.parse_args(["--dataset", "synthetic"])
    assert (synthetic.workers, synthetic.eval_freq) == (2, 1)
    catalog = readers.load_catalog()
    catalog["digits"] = {**catalog["digits"], "defaults": {"eval_frequency": 5}}
    monkeypatch.setattr(readers, "load_catalog", lambda path=None: catalog)
    with pytest.raises(SystemExit):
        main.parse_args([])
    assert "entry 'digits': 'defaults' names no flag: ['eval_frequency']" in capsys.readouterr().err


# --------------------------------------------------------------------------- the embedded default learns
# Short schedule: 5 epochs of batch 32 (225 steps, 30-45 s on 2 cores), lr 5e-4. Measured acc1_z after it:
# CLIP on digits 71% and 85% (seeds 1, 2); the Chinese tower learns more slowly (39% and 53%), so its bar is
# lower; the test's seed 0 passes both. Chance is 10%. The full default (10 epochs of batch 64) reaches 95.5%.
@pytest.mark.slow
@pytest.mark.parametrize("model,dataset,bar", [("CLIP_VITT16_CLIP", "digits", 50),
                                               ("CNCLIP_VITT16_CLIP", "digits-zh", 30)])
def test_digits_short_schedule_beats_chance(tmp_path, model, dataset, bar):
    summary = main.main(["--model", model, "--dataset", dataset, "--output-dir", str(tmp_path), "--workers", "0",
                         "--epochs", "5", "--batch-size", "32", "--lr", "5e-4", "--warmup-epochs", "0.5",
                         "--print-freq", "1000"])
    assert summary["acc1_z"] >= bar, summary
    assert summary["acc5_z"] >= summary["acc1_z"]
    assert {"image_to_text_R@1", "image_to_text_R@10", "text_to_image_R@5", "mean_recall"} <= summary.keys()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_logits(tiny_run_args, tmp_path, precision):
    """bf16/fp16 autocast runs on CPU too; embeddings and logits stay fp32; fp16 checkpoints its GradScaler."""
    summary = main.main(tiny_run_args + ["--name", precision, "--precision", precision, "--max-steps", "2"])
    assert summary["step"] == 2
    ckpt = load(tmp_path / "experiments" / precision / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert ("scale" in ckpt["scaler"]) == (precision == "fp16")
    args = main.parse_args(tiny_run_args + ["--precision", precision])
    model = models.build_from_config(registry.config_from_flags(vars(args)))
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 400, (4, 77))
    tokens[:, 5] = 49407
    with utils.autocast(args.precision, torch.device("cpu")):
        out = model(images, tokens)
        assert model.encode_text(tokens).dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
        loss = losses.CLIPLoss()(out)
    assert out["image_embed"].dtype == out["text_embed"].dtype == loss["loss"].dtype == torch.float32


def test_folder_checkpoint_wins_over_a_stale_resume_flag(tiny_run_args, tmp_path):
    """A restarted job that still carries --resume OLD continues from the folder's newer checkpoint.pt."""
    main.main(tiny_run_args + ["--name", "old", "--max-steps", "1"])
    old = str(tmp_path / "experiments" / "old" / "checkpoint.pt")
    main.main(tiny_run_args + ["--name", "run", "--resume", old, "--max-steps", "3"])
    summary = main.main(tiny_run_args + ["--name", "run", "--resume", old, "--max-steps", "4"])
    assert summary["step"] == 4  # resumed at 3 from the folder, not at 1 from --resume


def test_freeze_vision_keeps_batchnorm_in_eval_even_after_modules_are_swapped():
    model = models.build_model(models.parse_model_name("CLIP_R50_CLIP"), image_size=32, text_layers=1)
    engine.freeze_vision(model)
    old_bn = model.visual.bn1
    model.visual.bn1 = torch.nn.BatchNorm2d(old_bn.num_features)  # a new module on the same parameters,
    model.visual.bn1.weight, model.visual.bn1.bias = old_bn.weight, old_bn.bias  # as SyncBN conversion does
    model.train()
    model.encode_image(torch.randn(2, 3, 32, 32))
    norms = [m for m in model.visual.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert not any(p.requires_grad for p in model.visual.parameters())
