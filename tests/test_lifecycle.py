"""The experiment folder as a database record (issue: trustworthy experiment lifecycle): a finished experiment is
never written again, one process owns a folder (a lock), files are written atomically, the summary says how the run
ended, nothing from the command line reaches the shell or leaves the output root; and the lab's loop end to end on
the real Slurm (a 2 x 2 sweep through run.sh, a requeue, the re-run that skips what finished, report.py)."""
from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from conftest import TINY_RUN
from test_launch import REPO, commit_all, job_of, make_repo, run_sh, slurm, wait_for  # noqa: F401 (fixture)

import engine
import experiment
import launch
import losses
import main
import report
import run_with_submitit as rws

SMALL = TINY_RUN + ["--batch-size", "64"]  # synthetic: 256 samples = 4 steps per epoch


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def summary_of(exp) -> dict:
    return json.loads((exp / "summary.json").read_text())


def spawn_main(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# --------------------------------------------------------------------------- §1 finished, status, ledger
def test_a_finished_experiment_is_left_untouched(tmp_path, capsys):
    """Re-running a finished experiment's command prints `already finished: <folder> (<metric>)`, returns its summary
    and writes nothing: today it re-wrote summary.json with no metrics and report.py lost the column."""
    argv = SMALL + ["--output-dir", str(tmp_path), "--name", "done"]
    first = main.main(argv)
    exp = tmp_path / "done"
    assert first["status"] == "finished" and first["step"] == first["total_steps"] == 4 and "mean_recall" in first
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in exp.iterdir() if p.is_file()}
    capsys.readouterr()
    again = main.main(argv + ["--max-steps", "100", "--workers", "1"])  # resume-neutral flags may differ
    assert again == first
    assert capsys.readouterr().out.strip() == f"already finished: {exp} (mean_recall {first['mean_recall']:.2f})"
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in exp.iterdir() if p.is_file()}
    assert after == before  # not a byte, not a timestamp
    proc = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *argv], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("already finished: ")


def test_summary_says_stopped_and_a_max_steps_stop_evaluates(tmp_path):
    """--max-steps: `stopped`, with the metrics of the evaluation run at the stop (not with --eval-freq 0); the
    checkpoint holds them, so a resume that ends without evaluating keeps them; the end: `finished`."""
    base = SMALL + ["--output-dir", str(tmp_path)]
    stopped = main.main(base + ["--name", "s", "--max-steps", "2"])
    assert (stopped["status"], stopped["step"], stopped["total_steps"], stopped["metrics_step"]) == \
        ("stopped", 2, 4, 2)
    assert "--max-steps 2" in stopped["reason"] and "mean_recall" in stopped
    assert load(tmp_path / "s" / "checkpoint.pt")["metrics"]["mean_recall"] == stopped["mean_recall"]
    records = [json.loads(line) for line in open(tmp_path / "s" / "log.txt", encoding="utf-8")]
    assert records[-1]["type"] == "eval" and records[-1]["global_step"] == 2 and "test_mean_recall" in records[-1]
    again = main.main(base + ["--name", "s", "--max-steps", "2"])  # nothing to do: same state, same metrics
    assert again["status"] == "stopped" and again["mean_recall"] == stopped["mean_recall"]
    finished = main.main(base + ["--name", "s"])
    assert finished["status"] == "finished" and finished["reason"] is None and finished["metrics_step"] == 4

    quiet = main.main(base + ["--name", "q", "--max-steps", "2", "--eval-freq", "0"])
    assert quiet["status"] == "stopped" and quiet["metrics_step"] is None and "mean_recall" not in quiet
    assert main.main(base + ["--name", "q", "--eval-freq", "0"])["metrics_step"] == 4  # the end always evaluates


class FailAt(losses.CLIPLoss):
    """CLIPLoss that raises on its `n`-th call (a bug, a dead disk...)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.count = n, 0

    def forward(self, outputs):
        self.count += 1
        if self.count == self.n:
            raise RuntimeError("boom at the third step")
        return super().forward(outputs)


def test_summary_says_failed_with_the_reason_and_the_last_metrics(tmp_path, monkeypatch):
    base = SMALL + ["--output-dir", str(tmp_path), "--name", "f", "--epochs", "2"]
    main.main(base + ["--max-steps", "4"])  # one epoch, evaluated
    monkeypatch.setattr(losses, "build_criterion", lambda *a: FailAt(3))
    experiment.PREEMPTED.set()  # an earlier run in this process was preempted (the submitit trainer's flag)
    with pytest.raises(RuntimeError, match="boom"):
        main.main(base)
    summary = summary_of(tmp_path / "f")
    assert summary["status"] == "failed" and summary["reason"] == "RuntimeError: boom at the third step"
    assert summary["step"] == 6 and summary["metrics_step"] == 4 and "mean_recall" in summary  # nothing lost


def test_a_nonfinite_stop_says_stopped(tmp_path, monkeypatch):
    from test_train import NaNAt

    monkeypatch.setattr(losses, "build_criterion", lambda *a: NaNAt({2}))
    with pytest.raises(engine.NonFiniteStop):
        main.main(SMALL + ["--output-dir", str(tmp_path), "--name", "nan"])
    summary = summary_of(tmp_path / "nan")
    assert summary["status"] == "stopped" and "non-finite loss at step 1" in summary["reason"]


@pytest.mark.slow
def test_run_sh_sweep_skips_finished_runs_and_ledgers_each_start(tmp_path):
    """The same run.sh line again: finished experiments are skipped (named), the others run. Each run's ledger
    line is written when it starts, so a run that fails does not take the lines of those before it along."""
    repo = make_repo(str(tmp_path / "repo"))
    root = tmp_path / "exps"
    line = SMALL + ["--output-dir", str(root), "--name", "SW", "--max-steps", "4", "--epochs", "1,2"]
    out = run_sh(repo, "main.py", *line)  # epochs 1: finished at step 4 of 4; epochs 2: stopped at 4 of 8
    assert out.returncode == 0, out.stderr[-3000:]
    assert [summary_of(root / n)["status"] for n in ("SW_epochs1", "SW_epochs2")] == ["finished", "stopped"]
    done = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "SW_epochs1").iterdir() if p.is_file()}
    out = run_sh(repo, "main.py", *line)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipping 1 finished experiment(s): SW_epochs1" in out.stdout
    assert "launching 1 of 2: SW_epochs2" in out.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "SW_epochs1").iterdir() if p.is_file()} == done
    assert [e["name"] for e in launch.read_ledger(str(root))] == ["SW_epochs1", "SW_epochs2", "SW_epochs2"]

    # a sweep whose second run fails: the first run's ledger line stays, the failing one is there too
    out = run_sh(repo, "main.py", *(SMALL + ["--output-dir", str(root), "--name", "BAD", "--max-steps", "1",
                                             "--batch-size", "64,4096"]))
    assert out.returncode == 1 and "failed (exit 1)" in out.stderr
    names = [e["name"] for e in launch.read_ledger(str(root))]
    assert names[-2:] == ["BAD_batch-size64", "BAD_batch-size4096"]
    assert summary_of(root / "BAD_batch-size64")["status"] == "stopped"


# --------------------------------------------------------------------------- §2 one folder, one run
def test_a_second_process_on_a_live_folder_fails_at_once_and_a_dead_holder_frees_it(tmp_path):
    """Two starters: the second fails at once naming the holder (pid, host, start time) and writes nothing; when
    the holder dies (SIGKILL, as a preempted node), the kernel frees the lock and the folder resumes."""
    argv = SMALL + ["--output-dir", str(tmp_path), "--name", "busy", "--epochs", "1000", "--save-every-steps", "1"]
    holder = spawn_main(argv)
    exp = tmp_path / "busy"
    try:
        wait_for(lambda: (exp / "checkpoint.pt").exists(), 240, "the holder's first checkpoint")
        log_before = (exp / "train.log").read_text()
        with pytest.raises(SystemExit) as info:
            main.main(argv)
        message = str(info.value)
        assert message.startswith(f"{exp} is in use by pid {holder.pid} on ") and " since 20" in message
        assert "model CLIP_VITT16_CLIP" not in (exp / "train.log").read_text()[len(log_before):]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    step = load(exp / "checkpoint.pt")["step"]
    resumed = main.main(argv[:-4] + ["--epochs", "1000", "--max-steps", str(step + 1)])
    assert resumed["step"] == step + 1 and resumed["status"] == "stopped"


def test_a_checkpoint_written_under_other_flags_is_not_resumed(tmp_path):
    base = SMALL + ["--output-dir", str(tmp_path), "--max-steps", "1"]
    main.main(base + ["--name", "a"])
    with pytest.raises(SystemExit, match=r"checkpoint .*a/checkpoint.pt was written by a run with other flags "
                                         r"\(--lr 0\.001 -> 0\.002\).*--pretrained"):
        main.main(base + ["--name", "b", "--lr", "2e-3", "--resume", str(tmp_path / "a" / "checkpoint.pt")])
    assert not (tmp_path / "b" / "args.json").exists()
    # the same rule as args.json: a checkpoint in the folder whose args.json was lost is checked too
    (tmp_path / "a" / "args.json").unlink()
    with pytest.raises(SystemExit, match="other flags"):
        main.main(base + ["--name", "a", "--lr", "2e-3"])
    assert main.main(base + ["--name", "c", "--resume", str(tmp_path / "a" / "checkpoint.pt"),
                             "--max-steps", "2"])["step"] == 2  # same flags: a resume


def test_a_failed_first_start_does_not_claim_the_name(tmp_path):
    """A wrong --pretrained fails before args.json is written, so the corrected command starts; nothing is left
    that a later start would trip on (no summary, no args.json)."""
    base = SMALL + ["--output-dir", str(tmp_path), "--name", "x", "--max-steps", "1"]
    with pytest.raises((OSError, RuntimeError, ValueError)):
        main.main(base + ["--pretrained", str(tmp_path / "no-such-weights.pt")])
    assert not (tmp_path / "x" / "args.json").exists() and not (tmp_path / "x" / "summary.json").exists()
    assert main.main(base)["step"] == 1


def test_args_json_survives_a_kill_while_it_is_rewritten(tmp_path, monkeypatch):
    """A start killed while it rewrites args.json (here: interrupted in the middle of serialising it) leaves the
    previous args.json whole, so the folder still resumes; today the file was truncated first (0 bytes)."""
    base = SMALL + ["--output-dir", str(tmp_path), "--name", "k"]
    main.main(base + ["--max-steps", "1"])
    before = (tmp_path / "k" / "args.json").read_text()
    real_dump, real_dumps = json.dump, json.dumps

    def torn_dump(obj, fp, **kw):
        if isinstance(obj, dict) and "accum_mode" in obj:
            fp.write(real_dumps(obj, **kw)[:100])
            raise KeyboardInterrupt
        return real_dump(obj, fp, **kw)

    def torn_dumps(obj, **kw):
        if isinstance(obj, dict) and "accum_mode" in obj:
            raise KeyboardInterrupt
        return real_dumps(obj, **kw)

    monkeypatch.setattr(json, "dump", torn_dump)
    monkeypatch.setattr(json, "dumps", torn_dumps)
    with pytest.raises(KeyboardInterrupt):
        main.main(base + ["--max-steps", "2"])
    monkeypatch.undo()
    assert (tmp_path / "k" / "args.json").read_text() == before
    assert main.main(base + ["--max-steps", "2"])["step"] == 2


def test_atomic_file_keeps_the_old_file_when_a_write_dies(tmp_path):
    path = tmp_path / "f.json"
    experiment.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(KeyboardInterrupt):
        with experiment.atomic_file(str(path)) as f:
            f.write(b'{"a": 2, "b"')
            raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["f.json"]


def test_leftover_temporary_checkpoints_are_removed_at_start(tmp_path):
    base = SMALL + ["--output-dir", str(tmp_path), "--name", "t"]
    main.main(base + ["--max-steps", "1"])
    leftover = tmp_path / "t" / ".tmp_k1ll3d.pt"
    leftover.write_bytes(b"\0" * 4096)  # what a kill during torch.save leaves
    main.main(base + ["--max-steps", "2"])
    assert not leftover.exists() and not glob.glob(str(tmp_path / "t" / ".tmp_*"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs of a given size mounted on a fresh folder (root only; skipped where mounting is not permitted)."""
    mounts = []

    def make(size_bytes: int):
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, tiny_disk):
    """A disk with room for one checkpoint but not for the temporary copy of the next: the error is
    `No space left on device while writing <path>` (today a C++ enforce message without a path) and the previous
    checkpoint loads as it was; no temporary file is left."""
    main.main(SMALL + ["--output-dir", str(tmp_path / "probe"), "--name", "p", "--max-steps", "1", "--eval-freq", "0"])
    size = (tmp_path / "probe" / "p" / "checkpoint.pt").stat().st_size
    disk = tiny_disk(int(size * 1.5))
    base = SMALL + ["--output-dir", str(disk), "--name", "d", "--eval-freq", "0"]
    main.main(base + ["--max-steps", "1"])
    ckpt = disk / "d" / "checkpoint.pt"
    before = ckpt.read_bytes()
    with pytest.raises(OSError) as info:
        main.main(base + ["--max-steps", "2"])
    assert f"No space left on device while writing {ckpt}" in str(info.value)
    assert ckpt.read_bytes() == before and load(ckpt)["step"] == 1
    assert not glob.glob(str(disk / "d" / ".tmp_*"))


# --------------------------------------------------------------------------- §3 inputs that reach the shell
@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", ".", "..", "", "a\nb"])
def test_an_experiment_name_is_one_folder_inside_the_output_root(tmp_path, name, capsys):
    root = tmp_path / "root"
    with pytest.raises(SystemExit) as info:
        main.main(SMALL + ["--output-dir", str(root), "--name", name])
    assert "--name" in str(info.value) and "\n" not in str(info.value).replace(repr(name), "")
    assert not os.listdir(tmp_path)  # nothing written, inside or outside the root


@pytest.mark.parametrize("flag", ["--comment", "--name", "--partition", "--job-dir", "--account", "--qos",
                                  "--constraint", "--output-dir"])
def test_a_control_character_never_reaches_the_sbatch_script(tmp_path, flag, caplog):
    """`--comment "x\\nrm -rf ~"` ended the #SBATCH line and ran the rest in the batch script."""
    value = "x\nrm -rf ~" if flag != "--output-dir" else str(tmp_path / "a\rb")
    argv = TINY_RUN + ["--ngpus", "0", "--output-dir", str(tmp_path), flag, value]
    with pytest.raises(SystemExit) as info:
        rws.launch([argv], dry_run=True)
    assert str(info.value).startswith(f"{flag} ") and "control character U+00" in str(info.value)
    assert "rm -rf" not in caplog.text  # no script was printed
    assert not os.listdir(tmp_path)


def test_dry_run_script_is_the_one_submitit_writes(tmp_path):
    """The dry-run's script comes from the executor a real submission uses (quoting of a folder with a space, the
    job name); the real-Slurm test compares it with the file sbatch got."""
    la, _ = rws.split_argv(["--ngpus", "0", "--cpus-per-task", "1", "--timeout", "10"])
    folder = str(tmp_path / "with space" / "submitit" / "%j")
    text = rws.sbatch_text(la, folder, "EXP")
    assert f"-u -m submitit.core._submit {shlex.quote(folder)}" in text and "#SBATCH --job-name=EXP" in text


# --------------------------------------------------------------------------- the lab's loop on real Slurm
def sweep_line(root: str) -> list[str]:
    return ["--model", "CLIP_VITT16_CLIP", "--dataset", "digits", "--image-size", "16", "--transformer-layers", "1",
            "--text-width", "64", "--text-heads", "1", "--embed-dim", "64",  # 8.7 M parameters, 2 x 2 steps
            "--batch-size", "512", "--epochs", "2", "--workers", "0", "--print-freq", "1", "--save-every-steps", "2",
            "--ngpus", "0", "--cpus-per-task", "1", "--timeout", "10", "--output-dir", root, "--name", "LS",
            "--table", "ls", "--label-smoothing", "0,0.1", "--seed", "0,1"]


@pytest.mark.slow
@pytest.mark.usefixtures("slurm")
def test_lab_loop_sweep_requeue_rerun_and_report_on_slurm(tmp_path):
    """A 2 x 2 sweep (label smoothing x seed) on digits through run.sh as one job array: the dry run prints the
    script sbatch gets, each task is named after its experiment, one run is interrupted and requeued (its summary
    says `stopped` meanwhile) and finishes; the same run.sh line again submits nothing and changes nothing; report.py
    gives mean ± std per row, its plots, --list and --diff."""
    repo = make_repo(str(tmp_path / "repo"))
    root = str(tmp_path / "lab exps")  # a space: the dry run must quote the folder as submitit does
    line = sweep_line(root)
    dry = run_sh(repo, "run_with_submitit.py", *line, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    dry_script = dry.stdout.split("sbatch script:\n", 1)[1].rstrip("\n")
    out = run_sh(repo, "run_with_submitit.py", *line)
    assert out.returncode == 0, out.stderr[-3000:]
    names = [f"LS_label-smoothing{ls}_seed{s}" for ls in ("0", "0.1") for s in (0, 1)]
    jobs = {n: job_of(os.path.join(root, n))[1]["job_id"] for n in names}
    array = jobs[names[0]].split("_")[0]
    submitted = open(glob.glob(os.path.join(root, "submitit", array, f"{array}_submission.sh"))[0]).read()
    assert submitted.rstrip("\n") == dry_script

    def job_names() -> dict[str, str]:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,JobName", "-j", array], capture_output=True,
                             text=True).stdout
        return dict(row.split("|", 1) for row in out.splitlines() if "|" in row)

    wait_for(lambda: job_names() == {jobs[n]: n for n in names}, 60, "each array task named after its experiment")

    victim = os.path.join(root, names[3])
    job, _ = job_of(victim)
    wait_for(lambda: os.path.exists(os.path.join(victim, "checkpoint.pt")), 240, "the victim's first checkpoint")
    job._interrupt(timeout=True)  # USR2: submitit calls Trainer.checkpoint(), requeues, the process exits
    wait_for(lambda: (experiment.read_json(os.path.join(victim, "summary.json")) or {}).get("status") == "stopped"
             or experiment.finished_summary(victim), 120, "the interrupted run's summary")
    for n in names:
        wait_for(lambda n=n: experiment.finished_summary(os.path.join(root, n)), 300, f"{n} to finish", poll=1)
    # summary.json is not a run's last write: its "summary:" log line and the launcher's "end" event follow it
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip(),
             120, "every task's process to exit")
    events = [json.loads(x) for x in open(os.path.join(victim, "launch_events.jsonl"))]
    assert [e["event"] for e in events].count("start") == 2, events
    assert "preempted or timed out" in open(os.path.join(victim, "train.log")).read()

    frozen = {p: os.stat(p).st_mtime_ns for n in names for p in glob.glob(os.path.join(root, n, "*"))}
    ledger_before = launch.read_ledger(root)
    again = run_sh(repo, "run_with_submitit.py", *line)
    assert again.returncode == 0 and "skipping 4 finished experiment(s)" in again.stdout, again.stderr[-2000:]
    assert "submitted job" not in again.stdout and launch.read_ledger(root) == ledger_before
    assert {p: os.stat(p).st_mtime_ns for p in frozen} == frozen

    repro = tmp_path / "repro.txt"
    repro.write_text("# table: ls\n" + shlex.join(["bash", "run.sh", "run_with_submitit.py", *line]) + "\n")
    md = report.main(["--root", root, "--exps", str(repro), "--plot", str(tmp_path / "plots")])
    rows = [x for x in md.splitlines() if x.startswith("| LS")]
    values = {n: experiment.read_json(os.path.join(root, n, "summary.json"))["acc1_z"] for n in names}
    for row, pair in zip(rows, (names[:2], names[2:])):
        mean = sum(values[n] for n in pair) / 2
        std = torch.tensor([values[n] for n in pair], dtype=torch.float64).std().item()
        assert f"| 2/2 | {mean:.2f} ± {std:.2f}" in row
    assert rows[0].startswith("| LS_label-smoothing0 (baseline) |")
    assert sorted(os.listdir(tmp_path / "plots")) == ["ls_curves.png", "ls_final.png"]
    listing = report.main(["--root", root, "--list"])
    assert all(f"| {n} | finished | 4/4 |" in listing for n in names)
    diff = report.main(["--root", root, "--diff", names[0], names[3]])
    assert "--label-smoothing: 0.0 -> 0.1" in diff and "--seed: 0 -> 1" in diff
