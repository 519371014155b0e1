"""Launch path: sweep expansion, run.sh (one commit -> one experiment), run_with_submitit.py on a real Slurm
(2 gloo ranks, requeue/resume, job arrays, cancel), the golden sbatch text, repro_exps.txt, report.py, wandb offline.

The Slurm tests need a running slurmctld/slurmd/slurmdbd (scripts/ci_slurm.sh, which .ci/run starts as root). They
skip where there is no Slurm and no root to start it; with CI=true they fail instead of skipping.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import engine
import launch
import main
import models
import report
import run_with_submitit as rws

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden", "sbatch_nodes4_ngpus8.txt")
SLURM_TINY = ["--model", "CLIP_VITT16_CLIP", "--dataset", "digits", "--image-size", "32", "--transformer-layers", "1",
              "--batch-size", "8", "--workers", "0", "--print-freq", "1", "--ngpus", "0", "--cpus-per-task", "1",
              "--timeout", "10"]


# --------------------------------------------------------------------------- helpers
def read_wandb_offline(path: str) -> list:
    """Records of an offline `run-<id>.wandb` file (LevelDB log format: 7-byte W&B header, 32 KiB blocks of
    [crc32 u32, length u16, type u8] chunks; FULL=1, FIRST=2, MIDDLE=3, LAST=4), parsed as wandb protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B", f"{path}: not a wandb transaction log"
    records, buf, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def wandb_history(records: list) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def make_repo(dest: str) -> str:
    """A throw-away git repo holding this working tree's tracked files, committed (run.sh needs a clean tree)."""
    files = subprocess.run(["git", "-C", REPO, "ls-files", "-z"], capture_output=True, check=True).stdout
    for rel in files.decode().split("\0"):
        src = os.path.join(REPO, rel)
        if rel and os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    git = ["git", "-C", dest, "-c", "user.email=ci@clip-lab", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q", dest], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "snapshot for tests"], check=True)
    return dest


def commit_all(repo: str, message: str) -> None:
    git = ["git", "-C", repo, "-c", "user.email=ci@clip-lab", "-c", "user.name=ci"]
    subprocess.run(git + ["commit", "-qam", message], check=True)


def run_sh(repo: str, *args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CLIP_LAB_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", os.path.join(repo, "run.sh"), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or repo, timeout=300)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(str(tmp_path_factory.mktemp("repo")))


# --------------------------------------------------------------------------- process group lifetime
_RANK_SCRIPT = r"""
import ast, importlib, json, os, sys
import torch, torch.distributed as dist
import utils

env = utils.init_distributed("cpu")
x = torch.ones(2, 3, requires_grad=True)
utils.all_gather_with_grad(x).sum().backward()
tree = ast.parse(open("fsdp.py", encoding="utf-8").read())  # the torch.distributed modules fsdp.py imports lazily
for node in ast.walk(tree):
    for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else []):
        if name.startswith("torch.distributed."):
            importlib.import_module(name)
dist.barrier()
dist.destroy_process_group()
tasks = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(json.dumps({"rank": env.rank, "grad": x.grad.tolist(), "threads": tasks}))
"""


def test_process_group_ends_with_destroy_after_gather_and_fsdp_imports(tmp_path):
    """A gloo group outliving destroy_process_group leaves its threads running into interpreter exit, which can
    abort a finished rank (SIGABRT, "terminate called without an active exception"; 6 of 20 two-rank runs of
    bench.py's SigLIP memory check). A torch.distributed module first imported after init_process_group
    (torch.distributed.nn for the gather, fsdp/checkpoint for --fsdp) kept it alive: after our gather and every
    torch.distributed import fsdp.py makes, destroy_process_group must leave no gloo or store thread."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT], cwd=REPO, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    for out, _ in outs:
        rank = json.loads(out.strip().splitlines()[-1])
        assert rank["grad"] == [[2.0] * 3] * 2  # the gather's backward sums both ranks' gradients
        assert [t for t in rank["threads"] if "gloo" in t or "tcpstore" in t] == [], rank


# --------------------------------------------------------------------------- sweep syntax, repro file, golden
def test_expand_sweep_is_a_cartesian_product_named_by_values():
    argv = ["--model", "M", "--epochs", "25,32", "--comment", "a, b", "--seed=0,10,50", "--tags", "x,y"]
    out = launch.expand_sweep(argv)
    assert [s for _, s in out] == [f"_epochs{e}_seed{s}" for e in (25, 32) for s in (0, 10, 50)]
    assert out[0][0] == ["--model", "M", "--epochs", "25", "--comment", "a, b", "--seed=0", "--tags", "x,y"]
    assert out[-1][0][3] == "32" and out[-1][0][6] == "--seed=50"
    assert launch.expand_sweep(["--lr", "1e-3"]) == [(["--lr", "1e-3"], "")]
    with pytest.raises(SystemExit, match="empty value"):
        launch.expand_sweep(["--seed", "0,,1"])
    assert launch.set_flag(["--name", "a", "--x", "1", "--name=b"], "--name", "c") == ["--x", "1", "--name", "c"]
    assert launch.flag_value(["--name", "a", "--name=b"], "--name") == "b"


def test_repro_exps_parse_with_the_real_parser_and_models_are_registered():
    cmds = launch.read_repro(os.path.join(REPO, "repro_exps.txt"))
    tables = [c["table"] for c in cmds]
    paper = [c for c in cmds if c["table"].startswith(("main_", "noncontrastive_"))]
    assert len(paper) == 22, "the 22 commands of clip-rocket's repro_exps.txt"
    for needed in ("cnclip_finetune", "ablation_label_smoothing", "ablation_text_augment", "ablation_separate_proj",
                   "ablation_num_augs", "ablation_accumulation"):
        assert needed in tables
    registered = set(models.list_models("*"))
    names = []
    for c in cmds:
        assert c["script"] == "run_with_submitit.py", f"line {c['line']}"
        assert launch.flag_value(c["argv"], "--table") == c["table"], f"line {c['line']}: --table != header"
        for argv, suffix in launch.expand_sweep(c["argv"]):
            rws.get_args_parser().parse_args(argv)  # every flag known to the launcher parser
            _, main_argv = rws.split_argv(argv)
            args = main.parse_args(main_argv)  # model name, recipe and dataset validation
            assert args.model in registered, f"line {c['line']}: {args.model} not registered"
            names.append(launch.flag_value(c["argv"], "--name") + suffix)
    assert len(names) == len(set(names)), "experiment names must be unique"
    sweeps = [c for c in cmds if len(launch.expand_sweep(c["argv"])) > 1]
    assert any(launch.flag_value(c["argv"], "--accum-mode") == "exact,naive" for c in sweeps)


def test_cnclip_finetune_lines_follow_chinese_clip_recipe():
    """muge_finetune_vit-b-16_rbt-base.sh: lr 5e-5, wd 0.001, 100 warm-up steps then cosine to 0, AdamW (0.9, 0.98)
    eps 1e-6, 52 tokens, global batch 1024 (128 x 8 GPUs), 3 epochs: MUGE's 245 steps per epoch give 735 steps."""
    cmds = [c for c in launch.read_repro(os.path.join(REPO, "repro_exps.txt")) if c["table"] == "cnclip_finetune"]
    assert {launch.flag_value(c["argv"], "--dataset") for c in cmds} == {"muge", "flickr30k-cn"}
    for c in cmds:
        launcher_args = rws.get_args_parser().parse_args(c["argv"])
        args = main.parse_args(rws.split_argv(c["argv"])[1])
        assert (args.lr, args.wd, args.warmup_steps, args.lr_end, args.eps) == (5e-5, 1e-3, 100, 0.0, 1e-6)
        assert tuple(args.betas) == (0.9, 0.98) and args.context_length == 52 and args.epochs == 3
        assert args.batch_size * launcher_args.nodes * launcher_args.ngpus == 1024
        assert args.use_augment and args.pretrained
        schedule = engine.cosine_schedule(args.lr, args.lr_start, args.lr_end, 3 * 245, args.warmup_steps)
        assert int(schedule.argmax()) == 100 and schedule[100] == pytest.approx(5e-5)
        assert (np.diff(schedule[:101]) > 0).all() and (np.diff(schedule[100:]) <= 0).all()
        assert schedule[-1] == pytest.approx(0.0, abs=1e-8)


def test_read_repro_names_the_bad_line(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("# table: t\nbash run.sh main.py --seed 1\npython main.py --seed 2\n")
    with pytest.raises(SystemExit, match=r"r.txt:3: expected 'bash run.sh"):
        launch.read_repro(str(path))


def test_sbatch_text_for_4_nodes_x_8_gpus_matches_golden():
    la, rest = rws.split_argv(["--model", "CL2L_R50_CL2L", "--nodes", "4", "--ngpus", "8", "--use_volta32",
                               "--partition", "learnlab", "--comment", "CL2L R50 \"cc3m\", seed 0"])
    assert rest == ["--model", "CL2L_R50_CL2L"]
    text = rws.sbatch_text(la, "/checkpoint/lab/experiments/EXP/submitit/%j", "EXP", python="python")
    with open(GOLDEN, encoding="utf-8") as f:
        assert text == f.read()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
    array = rws.sbatch_text(la, "/x/%j", "EXP", python="python", array_size=3)
    assert "#SBATCH --array=0-2%3" in array
    cpu = rws.executor_parameters(rws.split_argv(["--ngpus", "0", "--tasks-per-node", "2"])[0], "n")
    assert cpu["tasks_per_node"] == 2 and "gpus_per_node" not in cpu and rws.MAX_NUM_TIMEOUT >= 10


@pytest.mark.slow
def test_trainer_resumes_the_folders_latest_checkpoint_not_a_pickled_path(tiny_run_args):
    """The requeue contract without Slurm (submitit's in-process debug executor): the job resolves the experiment
    folder's checkpoint.pt at start-up, even when the pickled flags carry a stale --resume."""
    main.main(tiny_run_args + ["--name", "t", "--max-steps", "1"])
    argv = tiny_run_args + ["--name", "t", "--max-steps", "2", "--resume", "/stale/checkpoint.pt", "--ngpus", "0",
                            "--cluster", "debug"]
    info = rws.launch([argv])[0]
    assert info["job"].result()["step"] == 2  # continued from step 1 of the folder's checkpoint
    events = [json.loads(line) for line in open(os.path.join(info["exp_dir"], "launch_events.jsonl"))]
    assert events[0]["resume_from"] == os.path.join(info["exp_dir"], "checkpoint.pt")
    trainer = rws.Trainer(rws.split_argv(argv)[1])
    resubmission = trainer.checkpoint()
    assert resubmission.function.argv == trainer.argv and resubmission.function is not trainer


# --------------------------------------------------------------------------- run.sh without Slurm
@pytest.mark.slow
def test_run_sh_refuses_a_dirty_tree_and_dry_run_writes_nothing(repo, tmp_path):
    root = tmp_path / "exps"
    comment = "it's a \"quoted\", spaced comment"
    out = run_sh(repo, "run_with_submitit.py", "--model", "CLIP_VITT16_CLIP", "--ngpus", "0", "--seed", "0,1",
                 "--comment", comment, "--output-dir", str(root), "--dry-run")
    assert out.returncode == 0, out.stderr
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for seed in (0, 1):
        assert f"CLIP_VITT16_CLIP_{commit[:8]}_seed{seed}" in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("#SBATCH --comment="))
    assert shlex.split(line.partition("=")[2]) == [comment]  # survives intact through the sbatch script
    assert "#SBATCH --array=0-1%2" in out.stdout
    assert not root.exists(), "--dry-run must not write"

    readme = os.path.join(repo, "README.md")
    original = open(readme, encoding="utf-8").read()
    with open(readme, "a", encoding="utf-8") as f:
        f.write("\nan uncommitted edit\n")
    try:
        out = run_sh(repo, "main.py", "--output-dir", str(root), "--dry-run")
        assert out.returncode == 1 and "uncommitted changes" in out.stderr and "ALLOW_DIRTY=1" in out.stderr
        assert not root.exists()
    finally:
        with open(readme, "w", encoding="utf-8") as f:
            f.write(original)


@pytest.mark.slow
def test_run_sh_main_snapshot_ledger_resume_and_commit_guard(repo, tmp_path):
    root = tmp_path / "exps"
    tiny = ["--model", "CLIP_VITT16_CLIP", "--dataset", "synthetic", "--image-size", "32", "--transformer-layers",
            "1", "--batch-size", "8", "--workers", "0", "--print-freq", "1", "--output-dir", str(root)]
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    # ALLOW_DIRTY: the working-tree diff is applied to the snapshot and stored beside it
    readme = os.path.join(repo, "README.md")
    original = open(readme, encoding="utf-8").read()
    with open(readme, "a", encoding="utf-8") as f:
        f.write("\nDIRTY-MARKER\n")
    out = run_sh(repo, "main.py", *tiny, "--name", "dirty", "--max-steps", "1", env={"ALLOW_DIRTY": "1"})
    with open(readme, "w", encoding="utf-8") as f:
        f.write(original)
    assert out.returncode == 0, out.stderr[-3000:]
    dirty = root / "dirty"
    assert (dirty / "commit.txt").read_text().startswith(head + "-dirty")
    assert "DIRTY-MARKER" in (dirty / "code" / "dirty.diff").read_text()
    assert "DIRTY-MARKER" in (dirty / "code" / "README.md").read_text()  # the snapshot runs what was in the tree
    assert json.loads((dirty / "summary.json").read_text())["commit"].startswith(head + "-dirty")

    # a clean run: snapshot of the commit, command.txt, arguments with spaces and quotes intact, ledger
    named = tiny + ["--name", "snap", "--tags", "two words", "it's \"quoted\", ok"]
    out = run_sh(repo, "main.py", *named, "--max-steps", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    exp = root / "snap"
    assert (exp / "commit.txt").read_text().strip() == head
    assert not (exp / "code" / ".git").exists() and (exp / "code" / "main.py").exists()
    expected = launch.set_flag(named + ["--max-steps", "1"], "--name", "snap")
    expected = launch.set_flag(expected, "--output-dir", str(root))
    assert (exp / "command.txt").read_text().strip() == shlex.join(["bash", "run.sh", "main.py", *expected])
    assert json.loads((exp / "args.json").read_text())["tags"] == ["two words", "it's \"quoted\", ok"]
    assert json.loads((exp / "summary.json").read_text())["commit"] == head  # CLIP_LAB_COMMIT reached main

    # same commit + same flags: resumes (--max-steps is not part of the experiment's identity)
    out = run_sh(repo, "main.py", *named, "--max-steps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in (exp / "train.log").read_text()
    assert torch.load(exp / "checkpoint.pt", weights_only=True)["step"] == 2
    ledger = launch.read_ledger(str(root))
    assert [e["name"] for e in ledger] == ["dirty", "snap", "snap"] and ledger[-1]["commit"] == head

    # a new commit: the same name is refused
    with open(readme, "a", encoding="utf-8") as f:
        f.write("\nnext commit\n")
    commit_all(repo, "next")
    out = run_sh(repo, "main.py", *named, "--max-steps", "3")
    assert out.returncode == 1 and "launched from commit" in out.stderr and "use another --name" in out.stderr
    assert torch.load(exp / "checkpoint.pt", weights_only=True)["step"] == 2


# --------------------------------------------------------------------------- report.py + wandb offline
@pytest.mark.slow
def test_report_names_metrics_by_the_validation_set_main_resolved():
    """A cc3m run validates on imagenet (its catalog 'val_dataset'): summary.json says so and report.py uses it."""
    exp = {"args": {"dataset": "cc3m", "val_dataset": None},
           "summary": {"dataset": "cc3m", "val_dataset": "imagenet", "acc1_z": 31.5, "step": 10}}
    assert report.metrics_of(exp, None) == {"imagenet/acc1_z": 31.5}
    exp["summary"].pop("val_dataset")  # runs from before the key existed: the flags
    assert report.metrics_of(exp, None) == {"cc3m/acc1_z": 31.5}


def test_report_tables_plots_and_wandb_offline(tmp_path):
    root = tmp_path / "exps"
    base = ["--model", "CLIP_VITT16_CLIP", "--dataset", "synthetic", "--image-size", "32", "--transformer-layers",
            "1", "--batch-size", "128", "--epochs", "1", "--workers", "0", "--print-freq", "1", "--output-dir",
            str(root), "--table", "ls"]  # synthetic: 256 samples = 2 steps, then the epoch-end evaluation
    runs = {"LS_label-smoothing0.0_seed0": ["--label-smoothing", "0.0", "--seed", "0", "--wandb", "--tags", "x y"],
            "LS_label-smoothing0.0_seed1": ["--label-smoothing", "0.0", "--seed", "1"],
            "LS_label-smoothing0.1_seed0": ["--label-smoothing", "0.1", "--seed", "0"]}
    for name, extra in runs.items():
        assert "mean_recall" in main.main(base + extra + ["--name", name])
    repro = tmp_path / "repro.txt"
    repro.write_text("# table: ls\nbash run.sh run_with_submitit.py --table ls --name LS "
                     "--label-smoothing 0.0,0.1,0.2 --seed 0,1\n")
    md = report.main(["--root", str(root), "--exps", str(repro), "--plot", str(tmp_path / "plots")])
    lines = [ln for ln in md.splitlines() if ln.startswith("| LS")]
    assert len(lines) == 3
    accs = [json.loads((root / n / "summary.json").read_text())["mean_recall"] for n in runs]
    mean0 = sum(accs[:2]) / 2
    std0 = torch.tensor(accs[:2], dtype=torch.float64).std().item()
    assert lines[0].startswith("| LS_label-smoothing0.0 (baseline) | 2/2 |")
    assert f"{mean0:.2f} ± {std0:.2f}" in lines[0]
    assert "1/2 (missing)" in lines[1] and f"{accs[2]:.2f} ({accs[2] - mean0:+.2f})" in lines[1]
    assert "0/2 (missing)" in lines[2] and "missing" in lines[2].split("|")[3]
    csv_text = report.main(["--root", str(root), "--exps", str(repro), "--format", "csv"])
    assert csv_text.splitlines()[0].startswith("table,experiment,baseline,done,runs,status")
    assert "\\begin{tabular}" in report.main(["--root", str(root), "--exps", str(repro), "--format", "latex"])
    for png in ("ls_curves.png", "ls_final.png"):
        with open(tmp_path / "plots" / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # (without the repro file the table comes from args.json's "table")
    assert "| LS_label-smoothing0.1 |" in report.main(["--root", str(root), "--exps", str(tmp_path / "none")])

    # wandb offline: the experiment's stored id, name = experiment name, group = table, tags, full config + commit,
    # global_step axis
    exp = root / "LS_label-smoothing0.0_seed0"
    run_id = (exp / "wandb_id.txt").read_text().strip()
    files = sorted(glob.glob(str(exp / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 1 and files[0].endswith(f"-{run_id}/run-{run_id}.wandb")
    recs = read_wandb_offline(files[0])
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id and run.display_name == exp.name and run.run_group == "ls"
    assert {"CLIP_VITT16_CLIP", "synthetic", "x y"} <= set(run.tags)
    config = {c.key: json.loads(c.value_json) for c in run.config.update}
    assert config["commit"] == json.loads((exp / "summary.json").read_text())["commit"]
    assert config["label_smoothing"] == 0.0 and config["output_dir"] == str(root) and config["table"] == "ls"
    steps = [h["global_step"] for h in wandb_history(recs) if "global_step" in h]
    assert steps[:2] == [1, 2]
    metrics = [r.metric for r in recs if r.WhichOneof("record_type") == "metric"]
    assert any(m.step_metric == "global_step" for m in metrics)


# --------------------------------------------------------------------------- real Slurm
def slurm_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    return acct and any(s.strip().rstrip("*") in ("idle", "mixed", "allocated") for s in out.splitlines())


@pytest.fixture(scope="module")
def slurm():
    """A running single-node Slurm with accounting: started with scripts/ci_slurm.sh when root; else skip (CI: fail)."""
    if not slurm_up() and os.geteuid() == 0:
        subprocess.run(["bash", os.path.join(REPO, "scripts", "ci_slurm.sh")], capture_output=True, timeout=600)
    if not slurm_up():
        why = "no running Slurm (sinfo/sacct) and " + ("scripts/ci_slurm.sh failed" if os.geteuid() == 0
                                                        else "not root, so scripts/ci_slurm.sh cannot start one")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the Slurm tests: {why}")
        pytest.skip(why)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_of(exp_dir: str, tasks: int = 1):
    import submitit

    info = [json.loads(line) for line in open(os.path.join(exp_dir, "jobs.jsonl"), encoding="utf-8")][-1]
    return submitit.SlurmJob(folder=info["submitit_folder"], job_id=info["job_id"], tasks=tuple(range(tasks))), info


def final_state(job_id: str) -> str:
    return wait_for(lambda: (s := launch.job_states([job_id]).get(job_id)) not in (None, *launch.LIVE_STATES) and s,
                    300, f"the end of job {job_id}", poll=1)


@pytest.fixture(scope="module")
def slurm_runs(slurm, repo, tmp_path_factory):
    """Submit, at once through run.sh: A (2 ranks, uninterrupted), B (same flags, to be interrupted), a 2-seed sweep."""
    root = str(tmp_path_factory.mktemp("slurm_exps"))
    steps = ["--tasks-per-node", "2", "--max-steps", "12", "--save-every-steps", "3", "--output-dir", root]
    cmds = {"A": SLURM_TINY + steps + ["--name", "A", "--wandb", "--table", "requeue"],
            "B": SLURM_TINY + steps + ["--name", "B", "--wandb", "--table", "requeue"],
            "sweep": SLURM_TINY + ["--max-steps", "2", "--seed", "0,1", "--output-dir", root, "--name", "S"]}
    env = {**os.environ, "CLIP_LAB_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}

    def start(key):
        return subprocess.Popen(["bash", os.path.join(repo, "run.sh"), "run_with_submitit.py", *cmds[key]], env=env,
                                cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    outs = {"B": start("B").communicate(timeout=300)}  # B first: it is interrupted while the others queue
    procs = {k: start(k) for k in ("A", "sweep")}
    outs.update({k: p.communicate(timeout=300) for k, p in procs.items()})
    assert all("submitted job" in o[0] for o in outs.values()), {k: o[1][-3000:] for k, o in outs.items()}
    return root, {k: o[0] for k, o in outs.items()}


@pytest.mark.slow
def test_slurm_requeued_job_resumes_to_the_same_parameters(slurm_runs):
    root, outs = slurm_runs
    b_dir = os.path.join(root, "B")
    job, info = job_of(b_dir)
    assert f"submitted job {info['job_id']}" in outs["B"] and info["stdout"] in outs["B"]
    wait_for(lambda: os.path.exists(os.path.join(b_dir, "checkpoint.pt")), 240, "B's first checkpoint")
    job._interrupt(timeout=True)  # = scancel --signal USR2: submitit calls Trainer.checkpoint() and requeues
    assert final_state(info["job_id"]) == "COMPLETED"
    events = [json.loads(line) for line in open(os.path.join(b_dir, "launch_events.jsonl"), encoding="utf-8")]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2, f"B finished before the interrupt landed, or was not requeued: {events}"
    assert starts[1]["resume_from"] == os.path.join(b_dir, "checkpoint.pt") and starts[1]["job_id"] == info["job_id"]
    log_text = open(os.path.join(b_dir, "train.log"), encoding="utf-8").read()
    assert "resumed from" in log_text and "preempted or timed out: requeueing" in log_text

    a_dir = os.path.join(root, "A")
    a_job, a_info = job_of(a_dir)
    assert final_state(a_info["job_id"]) == "COMPLETED"
    a = torch.load(os.path.join(a_dir, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(b_dir, "checkpoint.pt"), weights_only=True)
    assert a["step"] == b["step"] == 12
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    # the requeued attempt logged to the same wandb run id (the one stored in the folder), continuing global_step
    run_id = open(os.path.join(b_dir, "wandb_id.txt"), encoding="utf-8").read().strip()
    files = sorted(glob.glob(os.path.join(b_dir, "wandb", "offline-run-*", f"run-{run_id}.wandb")))
    assert len(files) == 2
    second = read_wandb_offline(files[1])
    assert next(r.run for r in second if r.WhichOneof("record_type") == "run").run_id == run_id
    steps = [h["global_step"] for h in wandb_history(second) if "global_step" in h]
    assert steps[0] > 1 and steps[-1] == 12


@pytest.mark.slow
def test_slurm_run_sh_two_gloo_ranks_complete_experiment_folder(slurm_runs):
    root, outs = slurm_runs
    exp = os.path.join(root, "A")
    job, info = job_of(exp, tasks=2)
    assert final_state(info["job_id"]) == "COMPLETED"
    assert len(job.results()) == 2  # one result per task: both ranks returned
    for name in ("code/main.py", "code/run_with_submitit.py", "commit.txt", "command.txt", "args.json",
                 "checkpoint.pt", "summary.json", "log.txt", "train.log", "launch_events.jsonl", "jobs.jsonl"):
        assert os.path.exists(os.path.join(exp, name)), name
    assert "2 rank(s) on cpu" in open(os.path.join(exp, "train.log"), encoding="utf-8").read()
    assert open(os.path.join(exp, "command.txt"), encoding="utf-8").read().startswith("bash run.sh run_with_submitit")
    assert os.path.exists(info["stdout"]) and "submitit" in open(info["stdout"], encoding="utf-8").read()
    ledger = {e["name"]: e for e in launch.read_ledger(root)}
    assert ledger["A"]["job_ids"] == [info["job_id"]] and ledger["A"]["table"] == "requeue"
    summary = json.load(open(os.path.join(exp, "summary.json"), encoding="utf-8"))
    assert summary["step"] == 12 and summary["commit"] == ledger["A"]["commit"]


@pytest.mark.slow
def test_slurm_sweep_runs_as_a_job_array(slurm_runs):
    root, _ = slurm_runs
    ledger = {e["name"]: e for e in launch.read_ledger(root)}
    ids = [ledger[f"S_seed{s}"]["job_ids"][0] for s in (0, 1)]
    array_id = ids[0].split("_")[0]
    assert ids == [f"{array_id}_0", f"{array_id}_1"]
    for seed, jid in zip((0, 1), ids):
        assert final_state(jid) == "COMPLETED"
        exp = os.path.join(root, f"S_seed{seed}")
        assert json.load(open(os.path.join(exp, "args.json"), encoding="utf-8"))["seed"] == seed
        assert json.load(open(os.path.join(exp, "summary.json"), encoding="utf-8"))["step"] == 2


@pytest.mark.slow
def test_slurm_one_dead_rank_ends_the_whole_job(slurm, tmp_path):
    """srun --kill-on-bad-exit: when one rank dies, its peer (sleeping here; in a run, waiting in a collective)
    is killed at once instead of holding the allocation until the process-group timeout."""
    la, _ = rws.split_argv(["--ngpus", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--mem-gb", "1",
                            "--timeout", "10", "--cluster", "slurm"])
    executor = rws.make_executor(la, str(tmp_path / "submitit"), "dead-rank")
    t0 = time.time()
    job = executor.submit(os.system, 'if [ "$SLURM_PROCID" = 1 ]; then kill -9 $PPID; fi; sleep 600')
    assert final_state(job.job_id) == "FAILED"
    assert time.time() - t0 < 120


@pytest.mark.slow
def test_slurm_cancelled_job_is_reported_cancelled(slurm, tmp_path):
    import submitit

    root = tmp_path / "exps"
    argv = SLURM_TINY + ["--max-steps", "100000", "--output-dir", str(root), "--name", "C", "--cluster", "slurm"]
    with pytest.raises(SystemExit, match="submission failed.*Invalid partition"):  # Slurm's own message
        rws.launch([argv + ["--partition", "no-such-partition"]])
    job = rws.launch([argv])[0]["job"]
    job.cancel()
    t0 = time.time()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    assert time.time() - t0 < 120
    assert launch.job_states([job.job_id])[job.job_id] == "CANCELLED"
    with open(root / "ledger.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"name": "C", "exp_dir": str(root / "C"), "job_ids": [job.job_id]}) + "\n")
    (root / "C").mkdir(exist_ok=True)
    (root / "C" / "args.json").write_text(json.dumps({"table": "t", "dataset": "digits"}))
    assert "0/1 (failed (cancelled))" in report.main(["--root", str(root), "--exps", str(tmp_path / "none")])
