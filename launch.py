"""One commit -> one experiment: the Python half of `run.sh` (sweep expansion, names, snapshots, ledger).

`bash run.sh <run_with_submitit.py|main.py> [flags] [--dry-run]` checks the git tree and calls
`launch.py --repo R --commit SHA --dirty 0|1 <script> [flags]`, which:
1. expands sweep syntax: a comma list in a flag value (`--seed 0,10,50 --epochs 25,32`) becomes one experiment per
   combination, named `<name>_seed0_epochs25` ... (flags in NO_SWEEP keep their commas);
2. names each experiment `--name` (default `<model>_<short commit>`) + the sweep suffix, in `<output-dir>/<name>/`;
3. refuses an experiment folder made from another commit, with other flags, in use by a live process or with a
   job still queued or running; the same commit and flags resume it; finished experiments are skipped (said);
4. exports the commit with `git archive` into `<experiment>/code/` (ALLOW_DIRTY: the working-tree diff is applied
   and kept as `dirty.diff`), records `commit.txt` and `command.txt` (experiment.record_provenance), and runs the
   script from that snapshot with CLIP_LAB_COMMIT exported (run_with_submitit.py: one job, or one Slurm job array
   for a sweep);
5. appends one line per experiment to `<output-dir>/ledger.jsonl` (name, commit, command, job ids, time, table) as
   it is submitted (Slurm) or started (main.py), one atomic append each.
No argument is ever passed through a shell: values with spaces, quotes and commas (outside sweeps) stay intact.
This module imports no torch (experiment.py neither), so report.py can use `expand_sweep`, `read_repro`, `job_states`
and `read_ledger`.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import experiment

log = logging.getLogger("clip_lab.launch")

# flags whose values may contain commas that are not sweeps (a --dataset list is a weighted mixture)
NO_SWEEP = frozenset({"--name", "--comment", "--tags", "--resume", "--pretrained", "--job-dir", "--table",
                      "--constraint", "--data-root", "--output-dir", "--partition", "--account", "--qos",
                      "--dataset", "--dataset-weights"})
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "RESIZING", "SUSPENDED", "PREEMPTED")


# --------------------------------------------------------------------------- argv helpers
def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag V` or `flag=V` in argv, else None."""
    value = None
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(flag + "="):
            value = tok[len(flag) + 1:]
    return value


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with every `flag V` / `flag=V` removed and `flag value` appended."""
    out, skip = [], False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == flag:
            skip = i + 1 < len(argv)
            continue
        if tok.startswith(flag + "="):
            continue
        out.append(tok)
    return out + [flag, value]


def _suffix_value(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", value)


def expand_sweep(argv: list[str]) -> list[tuple[list[str], str]]:
    """[(argv of one combination, name suffix)]: every comma list in a flag value is one sweep axis.

    `--seed 0,10 --epochs 25,32` -> 4 combinations, suffixes `_seed0_epochs25`, `_seed0_epochs32`, ...
    (cartesian product in command-line order). Without commas: [(argv, "")].
    """
    axes: list[tuple[int, str, list[str], str]] = []  # (position, flag, values, "=" form prefix)
    flag = None
    for i, tok in enumerate(argv):
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            flag = name
            if eq and "," in value and name not in NO_SWEEP:
                axes.append((i, name, value.split(","), name + "="))
            continue
        if flag is not None and "," in tok and flag not in NO_SWEEP:
            values = tok.split(",")
            if any(v == "" for v in values):
                raise SystemExit(f"sweep {flag} {tok!r}: empty value in the comma list")
            axes.append((i, flag, values, ""))
    if not axes:
        return [(list(argv), "")]
    out = []
    for combo in itertools.product(*(values for _, _, values, _ in axes)):
        new = list(argv)
        suffix = ""
        for (pos, name, _, prefix), value in zip(axes, combo):
            new[pos] = prefix + value
            suffix += f"_{name.lstrip('-')}{_suffix_value(value)}"
        out.append((new, suffix))
    return out


def read_repro(path: str) -> list[dict]:
    """Commands of repro_exps.txt: [{table, line (number), script, argv}] for every `bash run.sh` line.

    `# table: NAME` starts a group; other `#` lines and blank lines are comments; a trailing backslash continues
    a line. A command line must look like `bash run.sh <script> [flags]`; anything else is an error naming the line.
    """
    out, table, pending, start = [], None, "", 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for no, raw in enumerate(lines, 1):
        line = raw.strip()
        if not pending:
            start = no
            if not line:
                continue
            if line.startswith("#"):
                m = re.match(r"#\s*table:\s*(\S+)", line)
                if m:
                    table = m.group(1)
                continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        tokens = shlex.split(pending + line)
        pending = ""
        if tokens[:2] != ["bash", "run.sh"] or len(tokens) < 3:
            raise SystemExit(f"{path}:{start}: expected 'bash run.sh <script> [flags]', got {line[:80]!r}")
        out.append({"table": table, "line": start, "script": tokens[2], "argv": tokens[3:]})
    return out


def job_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: Slurm state} from sacct (squeue as fallback); {} where Slurm is not installed."""
    ids = [str(j) for j in job_ids if j]
    if not ids or shutil.which("sacct") is None:
        return {}
    states: dict[str, str] = {}
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=30).stdout
        for row in out.splitlines():
            jid, _, state = row.partition("|")
            states[jid.strip()] = state.split()[0] if state.strip() else "UNKNOWN"
        missing = [j for j in ids if j not in states]
        if missing and shutil.which("squeue"):
            out = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(missing)], capture_output=True,
                                 text=True, timeout=30).stdout
            for row in out.splitlines():
                jid, _, state = row.partition("|")
                states[jid.strip()] = state.strip()
    except (OSError, subprocess.SubprocessError):
        return states
    return states


# --------------------------------------------------------------------------- snapshot
def export_snapshot(repo: str, commit: str, dest: str, diff: bytes | None) -> None:
    """`git archive <commit>` extracted into dest (plus the working-tree diff applied, when dirty)."""
    tar = subprocess.run(["git", "-C", repo, "archive", "--format=tar", commit], capture_output=True, check=True).stdout
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    if diff:
        with open(os.path.join(dest, "dirty.diff"), "wb") as f:
            f.write(diff)
        subprocess.run(["git", "apply", "--whitespace=nowarn", "dirty.diff"], cwd=dest, check=True)


# --------------------------------------------------------------------------- the launch
def run(repo: str, commit: str, dirty: bool, script: str, argv: list[str], cwd: str) -> list[dict]:
    """Plan, check, snapshot and launch every experiment of one run.sh command that has not finished yet; returns
    the ledger entries of those launched."""
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    diff = subprocess.run(["git", "-C", repo, "diff", "HEAD", "--binary"], capture_output=True,
                          check=True).stdout if dirty else None
    commit_id = commit + (f"-dirty{hashlib.sha1(diff).hexdigest()[:8]}" if diff else "")
    root = os.path.join(cwd, flag_value(argv, "--output-dir") or "experiments")
    staging = tempfile.mkdtemp(prefix="clip_lab_snapshot_")
    try:
        export_snapshot(repo, commit, staging, diff)
        sys.path.insert(0, staging)  # parse with the snapshot's parser, not the working tree's
        rws = importlib.import_module("run_with_submitit")
        main = importlib.import_module("main")
        exps = plan(argv, script, commit, root, rws, main)
        exps = skip_finished(exps)  # first: a finished run's job may still be tearing down (RUNNING in Slurm)
        if not exps:
            return []
        check_experiments(exps, commit_id, root)
        if dry_run:
            log.info("dry run: %d experiment(s) from commit %s, nothing written or submitted", len(exps), commit_id)
            if script == "main.py":
                for e in exps:
                    log.info("experiment %s\n  folder: %s\n  python main.py %s", e["name"], e["exp_dir"],
                             shlex.join(e["argv"]))
            else:
                rws.launch([e["argv"] for e in exps], dry_run=True)
            return []
        for e in exps:
            code = os.path.join(e["exp_dir"], "code")
            if not os.path.exists(code):
                shutil.copytree(staging, code, symlinks=True)
            experiment.record_provenance(e["exp_dir"], commit_id, e["command"])
        os.environ["CLIP_LAB_COMMIT"] = commit_id
        if script == "main.py":
            return [start_main(e, root, commit_id, diff) for e in exps]
        os.chdir(os.path.join(exps[0]["exp_dir"], "code"))  # the job's cwd: `python -m submitit...` imports here
        try:
            jobs = rws.launch([e["argv"] for e in exps])
        finally:
            os.chdir(cwd)
        by_dir = {j["exp_dir"]: j["job_id"] for j in jobs}
        return [append_ledger(root, ledger_entry(e, commit_id, script, [by_dir[e["exp_dir"]]], diff))
                for e in exps if e["exp_dir"] in by_dir]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def plan(argv: list[str], script: str, commit: str, root: str, rws, main) -> list[dict]:
    """One {name, exp_dir, argv, args, command} per sweep combination, parsed by the snapshot's parser."""
    model = flag_value(argv, "--model") or rws.get_args_parser().get_default("model")
    base = flag_value(argv, "--name") or f"{model}_{commit[:8]}"
    exps = []
    for sub_argv, suffix in expand_sweep(argv):
        exp_argv = set_flag(set_flag(sub_argv, "--name", base + suffix), "--output-dir", root)
        args = main.parse_args(exp_argv) if script == "main.py" else rws.prepare(exp_argv)["args"]
        exps.append({"name": base + suffix, "exp_dir": main.experiment_dir(args), "argv": exp_argv, "args": args,
                     "command": shlex.join(["bash", "run.sh", script, *exp_argv])})
    return exps


def skip_finished(exps: list[dict]) -> list[dict]:
    """The experiments that have not finished; the finished ones are named and left untouched."""
    done = [e for e in exps if experiment.finished_summary(e["exp_dir"]) is not None]
    todo = [e for e in exps if e not in done]
    if done:
        log.info("skipping %d finished experiment(s): %s", len(done), ", ".join(e["name"] for e in done))
        log.info("launching %d of %d: %s", len(todo), len(exps), ", ".join(e["name"] for e in todo) or "none")
    return todo


def start_main(e: dict, root: str, commit_id: str, diff: bytes | None) -> dict:
    """Run main.py from the experiment's snapshot (its ledger line first); a failure ends the sweep."""
    entry = append_ledger(root, ledger_entry(e, commit_id, "main.py", [], diff))
    rc = subprocess.run([sys.executable, "main.py", *e["argv"]], cwd=os.path.join(e["exp_dir"], "code")).returncode
    if rc:
        raise SystemExit(f"main.py failed (exit {rc}) for {e['exp_dir']}")
    return entry


def ledger_entry(e: dict, commit_id: str, script: str, job_ids: list[str], diff: bytes | None) -> dict:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "name": e["name"], "exp_dir": e["exp_dir"],
            "commit": commit_id, "script": script, "command": e["command"], "job_ids": job_ids,
            "table": getattr(e["args"], "table", None), "tags": getattr(e["args"], "tags", []), "dirty": bool(diff)}


def append_ledger(root: str, entry: dict) -> dict:
    """Append `entry` to <root>/ledger.jsonl as one line in one write(2) on an O_APPEND descriptor: launchers
    running at once never interleave, and a later failure never loses the lines written before it."""
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, "ledger.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode("utf-8"))
    finally:
        os.close(fd)
    return entry


def check_experiments(exps: list[dict], commit_id: str, root: str) -> None:
    """Refuse an experiment folder from another commit, with other flags, in use by a live process, or with a job
    still queued or running."""
    import main  # the snapshot's (on sys.path)

    ledger = read_ledger(root)
    for e in exps:
        old = experiment.read_commit(e["exp_dir"])
        if old is not None and old != commit_id:
            raise SystemExit(f"experiment {e['name']!r} ({e['exp_dir']}) was launched from commit {old}; this "
                             f"tree is at {commit_id}. One commit -> one experiment: use another --name.")
        main.check_folder_free(e["exp_dir"], e["args"])
        ids = [j for entry in ledger if entry.get("exp_dir") == e["exp_dir"] for j in entry.get("job_ids", [])]
        live = {j: s for j, s in job_states(ids[-1:]).items() if s in LIVE_STATES}
        if live:
            raise SystemExit(f"experiment {e['name']!r} still has job(s) {live} queued or running; "
                             "wait or scancel before resuming it")


def read_ledger(root: str) -> list[dict]:
    """Entries of <root>/ledger.jsonl (empty when there is none); a torn or blank line is skipped with a warning
    naming the file and line."""
    path = os.path.join(root, "ledger.jsonl")
    return experiment.read_jsonl(path, "ledger line") if os.path.exists(path) else []


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("launch.py (called by run.sh)")
    p.add_argument("--repo", required=True, help="git repository to snapshot")
    p.add_argument("--commit", required=True, help="commit to export (run.sh: HEAD)")
    p.add_argument("--dirty", default="0", choices=["0", "1"], help="1: apply and store the working-tree diff")
    p.add_argument("script", choices=["run_with_submitit.py", "main.py"], help="what to run from the snapshot")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's flags (sweep syntax allowed), --dry-run")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    run(os.path.abspath(ns.repo), ns.commit, ns.dirty == "1", ns.script, ns.args, os.getcwd())


if __name__ == "__main__":
    cli()
