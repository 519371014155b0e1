"""--fsdp (FSDP2 on CPU with gloo, 2 ranks): equal to DDP under exact accumulation, sharded checkpoints that resume
2 -> 2 and 2 -> 1 exactly, evaluation and weights reading them, the atomic directory swap and the safe metadata."""
import os
import pickle
import sys

import pytest
import torch
from conftest import TINY_RUN, run_gloo_ranks
from test_train import EPS, assert_same_tensors, flag, load, log_records, run_subprocess

import engine
import eval_zeroshot
import experiment
import fsdp
import main
import models
import weights

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def base_args(out) -> list[str]:
    """2 ranks x 2 micro-batches x 4 per optimizer step, exact accumulation."""
    return flag(TINY_RUN, "--batch-size", "4") + ["--output-dir", str(out), "--update-freq", "2", "--warmup-epochs",
                                                  "0", "--eps", EPS, "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-step runs on 2 gloo ranks: `ddp`, `fsdp` (validated on synthetic at its stop), and `resumed` (--fsdp,
    1 step, process exit, resumed from its sharded checkpoint.pt to step 2)."""
    out = tmp_path_factory.mktemp("fsdp_runs")
    base = base_args(out)
    run_subprocess(base + ["--name", "ddp", "--max-steps", "2", "--eval-freq", "0"], launcher=TORCHRUN)
    run_subprocess(base + ["--name", "fsdp", "--max-steps", "2", "--fsdp"], launcher=TORCHRUN)
    return out


def test_fsdp_equals_ddp_with_exact_accumulation_and_writes_a_sharded_checkpoint(runs):
    """FSDP2 (reduce-scatter of the accumulated unsharded gradients, 0-dim temperature all-reduced apart) gives the
    parameters of DDP after two exactly accumulated steps; checkpoint.pt is a complete DCP directory."""
    ckpt = runs / "fsdp" / "checkpoint.pt"
    assert sorted(os.listdir(ckpt)) == [".metadata", "__0_0.distcp", "__1_0.distcp", fsdp.STATE_FILE]
    assert not [n for n in os.listdir(runs / "fsdp") if n.startswith((".tmp_", ".old_"))]
    assert fsdp.is_sharded_checkpoint(str(runs / "fsdp" / "checkpoint_best.pt"))  # validated: the best copy
    sharded, ddp = fsdp.read_checkpoint(str(ckpt)), load(runs / "ddp" / "checkpoint.pt")
    assert sharded["step"] == ddp["step"] == 2 and len(sharded["rng"]) == 2
    assert sharded["model_config"] == ddp["model_config"] and "optimizer" not in sharded
    assert_same_tensors(sharded["model"], ddp["model"], atol=2e-6)
    train = [r for r in log_records(runs / "fsdp" / "log.txt") if r["type"] == "train"]
    ddp_train = [r for r in log_records(runs / "ddp" / "log.txt") if r["type"] == "train"]
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in ddp_train], abs=1e-5)


def plain_state(path: str) -> tuple[dict, dict]:
    """(model state_dict, optimizer state_dict) of sharded checkpoint `path` loaded into a plain model and AdamW
    in this process (no process group)."""
    ckpt = fsdp.read_checkpoint(path)
    model = models.build_from_config(ckpt["model_config"])
    optimizer = torch.optim.AdamW(engine.param_groups(model, 0.1))
    fsdp.load_sharded(path, model, optimizer, ckpt["param_groups"])
    return model.state_dict(), optimizer.state_dict()


@pytest.mark.slow
def test_fsdp_resume_two_ranks_to_two_ranks_is_exact(runs):
    """2 steps straight == 1 step, exit, resume from the sharded checkpoint on 2 ranks, 1 step (parameters, AdamW
    moments and the log)."""
    base = base_args(runs) + ["--name", "resumed", "--fsdp", "--eval-freq", "0"]
    run_subprocess(base + ["--max-steps", "1"], launcher=TORCHRUN)
    run_subprocess(base + ["--max-steps", "2"], launcher=TORCHRUN)
    (model_a, optim_a), (model_b, optim_b) = (plain_state(str(runs / n / "checkpoint.pt")) for n in ("resumed", "fsdp"))
    assert_same_tensors(model_a, model_b, atol=0)
    assert optim_a["param_groups"] == optim_b["param_groups"]
    for i, state in optim_b["state"].items():
        assert_same_tensors(optim_a["state"][i], state, atol=0)
    steps = [r["global_step"] for r in log_records(runs / "resumed" / "log.txt") if r["type"] == "train"]
    assert steps == [1, 2]


def test_fsdp_checkpoint_resumes_in_one_plain_process_like_the_ddp_one(runs, tmp_path):
    """2 ranks -> 1 process without --fsdp (and without a process group): the sharded checkpoint loads whole
    (parameters and AdamW state bitwise those the ranks saved) and the run goes on as from DDP's checkpoint.pt."""
    model_state, optim_state = plain_state(str(runs / "fsdp" / "checkpoint.pt"))
    assert_same_tensors(model_state, fsdp.read_checkpoint(str(runs / "fsdp" / "checkpoint.pt"))["model"], atol=0)
    assert {int(s["step"]) for s in optim_state["state"].values()} == {2}
    base = base_args(tmp_path) + ["--max-steps", "3", "--eval-freq", "0"]
    main.main(base + ["--name", "from_fsdp", "--resume", str(runs / "fsdp" / "checkpoint.pt")])
    main.main(base + ["--name", "from_ddp", "--resume", str(runs / "ddp" / "checkpoint.pt")])
    from_fsdp, from_ddp = load(tmp_path / "from_fsdp" / "checkpoint.pt"), load(tmp_path / "from_ddp" / "checkpoint.pt")
    assert from_fsdp["step"] == from_ddp["step"] == 3
    assert_same_tensors(from_fsdp["model"], from_ddp["model"], atol=1e-5)


@pytest.mark.slow
def test_fsdp_composes_with_compile_and_checkpoint_grad(runs, monkeypatch):
    """--fsdp --compile --checkpoint-grad (inductor on CPU; ~2 min on 2 busy cores): the parameters of the eager
    --fsdp run after two exactly accumulated steps."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(runs / "inductor"))  # not the shared /tmp cache
    run_subprocess(base_args(runs) + ["--name", "compiled", "--max-steps", "2", "--eval-freq", "0", "--fsdp",
                                      "--compile", "--checkpoint-grad"], launcher=TORCHRUN, timeout=600)
    compiled, eager = (fsdp.read_checkpoint(str(runs / n / "checkpoint.pt")) for n in ("compiled", "fsdp"))
    assert_same_tensors(compiled["model"], eager["model"], atol=1e-6)


def test_eval_and_weights_read_a_sharded_checkpoint(runs, tmp_path):
    """weights.load_model_for_eval and eval_zeroshot.py take the DCP directory as they take checkpoint.pt: the same
    model and zero-shot numbers as the DDP run's file."""
    ckpt, ddp = str(runs / "fsdp" / "checkpoint.pt"), str(runs / "ddp" / "checkpoint.pt")
    model, spec, info = weights.load_model_for_eval(resume=ckpt, device="cpu")
    reference, _, _ = weights.load_model_for_eval(resume=ddp, device="cpu")
    assert info["checkpoint"]["step"] == 2 and info["image_size"] == 32
    assert_same_tensors(model.state_dict(), reference.state_dict(), atol=2e-6)
    results = [eval_zeroshot.main(["--resume", path, "--datasets", "digits", "--output-dir", str(tmp_path / name)])
               for name, path in (("fsdp", ckpt), ("ddp", ddp))]
    assert results[0]["digits"]["acc1_z"] == pytest.approx(results[1]["digits"]["acc1_z"], abs=0.3)
    record = weights.export(ckpt, "open_clip", str(tmp_path / "open_clip"))  # `weights.py export` too
    assert (record["source_model"], record["step"]) == ("CLIP_VITT16_CLIP", 2)


def test_fsdp_without_a_distributed_launch_is_refused(tiny_run_args):
    with pytest.raises(SystemExit, match="--fsdp needs a distributed launch"):
        main.main(tiny_run_args + ["--fsdp", "--max-steps", "1"])


@pytest.mark.slow
def test_fsdp_fp16_equals_ddp_fp16(tmp_path):
    """--precision fp16: FSDP with fp32 all-gathers under the same fp16 autocast as DDP gives DDP's parameters and
    loss-scaler state after two exactly accumulated steps (fp16 all-gathered parameters overflowed the first step)."""
    base = base_args(tmp_path) + ["--precision", "fp16", "--max-steps", "2", "--eval-freq", "0"]
    run_subprocess(base + ["--name", "ddp"], launcher=TORCHRUN)
    run_subprocess(base + ["--name", "fsdp", "--fsdp"], launcher=TORCHRUN)
    sharded = fsdp.read_checkpoint(str(tmp_path / "fsdp" / "checkpoint.pt"))
    ddp = load(tmp_path / "ddp" / "checkpoint.pt")
    assert sharded["step"] == ddp["step"] == 2 and sharded["scaler"] == ddp["scaler"]
    assert sharded["scaler"]["scale"] > 0
    assert_same_tensors(sharded["model"], ddp["model"], atol=1e-6)


def _overflow_on_rank_0(rank: int, world: int) -> dict:
    """One fp16 step of a sharded tiny model in which only rank 0's shard of one gradient overflows."""
    import losses
    import registry
    import utils

    torch.manual_seed(0)
    model = fsdp.shard_model(models.build_from_config(registry.config_from_flags(vars(main.parse_args(TINY_RUN)))),
                             "fp16")
    optimizer = torch.optim.AdamW(engine.param_groups(model, 0.1), lr=1e-3)  # as main.py builds them
    scaler = torch.amp.GradScaler("cpu")
    tokens = torch.randint(1, 400, (2, 77))
    tokens[:, 5] = 49407
    with utils.autocast("fp16", torch.device("cpu")):
        out = model(torch.randn(2, 3, 32, 32), tokens)
    scaler.scale(losses.CLIPLoss()(out)["loss"]).backward()
    if rank == 0:
        model.visual.blocks[0].attn.qkv.weight.grad.to_local()[0, 0] = float("inf")
    local = lambda p: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()  # noqa: E731
    before = [local(p) for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    return {"stepped": any(not torch.equal(b, local(p)) for b, p in zip(before, model.parameters())),
            "scale": scaler.get_scale()}


def test_fsdp_fp16_ranks_skip_an_overflowed_step_together(tmp_path):
    """Each rank unscales only its gradient shards: when one shard overflows, every rank must skip the step (and
    halve the scale), or the model becomes a mixture of stepped and unstepped shards. GradScaler's check on the
    DTensor gradients is all-reduced (DTensor's dispatch), given main.py's optimizer groups (fsdp.mixed_precision)."""
    ranks = run_gloo_ranks(_overflow_on_rank_0, 2, tmp_path)
    assert ranks == [{"stepped": False, "scale": 32768.0}] * 2


def test_replace_dir_keeps_the_old_checkpoint_until_the_new_one_is_in_place(tmp_path):
    """The swap of a checkpoint directory: a kill between its two renames leaves `.old_<name>`, which the folder's
    next owner renames back; a killed write's `.tmp_*` directory is deleted."""
    final = tmp_path / "checkpoint.pt"
    final.mkdir()
    (final / "a").write_text("old")
    new = experiment.temporary_dir(str(final))
    assert os.path.basename(new).startswith(".tmp_checkpoint.pt-")
    open(os.path.join(new, "a"), "w").write("new")
    experiment.replace_dir(new, str(final))
    assert (final / "a").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    # killed after the first rename: only the moved-aside copy and a complete temporary directory are left
    os.rename(final, tmp_path / ".old_checkpoint.pt")
    os.makedirs(tmp_path / ".tmp_checkpoint.pt-x")
    removed = experiment.remove_stale_temporaries(str(tmp_path))
    assert removed == [str(tmp_path / ".tmp_checkpoint.pt-x")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"] and (final / "a").read_text() == "new"
    # a file replaces a directory (a run without --fsdp resuming an --fsdp checkpoint in its own folder)
    with experiment.atomic_file(str(final)) as f:
        f.write(b"file")
    assert final.read_bytes() == b"file" and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


class _Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_sharded_checkpoint_metadata_with_a_foreign_global_is_refused(tmp_path):
    """DCP's `.metadata` is a pickle: a crafted one naming os.system is refused before anything runs."""
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    torch.save({"step": 1}, ckpt / fsdp.STATE_FILE)
    with pytest.raises(RuntimeError, match=r"\.metadata.*refusing to unpickle the global (os|posix)\.system"):
        fsdp.read_checkpoint(str(ckpt))
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
