"""One commit -> one experiment: the Python half of `run.sh` (sweep expansion, names, snapshots, ledger).

`bash run.sh <run_with_submitit.py|main.py> [flags] [--dry-run]` checks the git tree and calls
`launch.py --repo R --commit SHA --dirty 0|1 <script> [flags]`, which:
1. expands sweep syntax: a comma list in a flag value (`--seed 0,10,50 --epochs 25,32`) becomes one experiment per
   combination, named `<name>_seed0_epochs25` ... (flags in NO_SWEEP keep their commas);
2. names each experiment `--name` (default `<model>_<short commit>`) + the sweep suffix, in `<output-dir>/<name>/`;
3. refuses an experiment folder made from another commit; the same commit and flags resume it;
4. exports the commit with `git archive` into `<experiment>/code/` (ALLOW_DIRTY: the working-tree diff is applied
   and kept as `dirty.diff`), writes `commit.txt` and `command.txt`, and runs the script from that snapshot with
   CLIP_LAB_COMMIT exported (run_with_submitit.py: one job, or one Slurm job array for a sweep);
5. appends one line per experiment to `<output-dir>/ledger.jsonl` (name, commit, command, job ids, time, table).
No argument is ever passed through a shell: values with spaces, quotes and commas (outside sweeps) stay intact.
This module imports no torch, so report.py can use `expand_sweep`, `read_repro` and `job_states`.
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


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------- the launch
def run(repo: str, commit: str, dirty: bool, script: str, argv: list[str], cwd: str) -> list[dict]:
    """Plan, check, snapshot and launch every experiment of one run.sh command; returns the ledger entries."""
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
        model = flag_value(argv, "--model") or rws.get_args_parser().get_default("model")
        base = flag_value(argv, "--name") or f"{model}_{commit[:8]}"
        exps = []
        for sub_argv, suffix in expand_sweep(argv):
            exp_argv = set_flag(set_flag(sub_argv, "--name", base + suffix), "--output-dir", root)
            if script == "main.py":
                args = main.parse_args(exp_argv)
            else:
                args = rws.prepare(exp_argv)["args"]
            exp_dir = main.experiment_dir(args)
            exps.append({"name": base + suffix, "exp_dir": exp_dir, "argv": exp_argv, "args": args,
                         "command": shlex.join(["bash", "run.sh", script, *exp_argv])})
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
            _write_text(os.path.join(e["exp_dir"], "commit.txt"), commit_id + "\n")
            if not os.path.exists(os.path.join(e["exp_dir"], "command.txt")):
                _write_text(os.path.join(e["exp_dir"], "command.txt"), e["command"] + "\n")
        os.environ["CLIP_LAB_COMMIT"] = commit_id
        job_ids: list[str | None] = []
        if script == "main.py":
            for e in exps:
                code = os.path.join(e["exp_dir"], "code")
                rc = subprocess.run([sys.executable, "main.py", *e["argv"]], cwd=code).returncode
                if rc:
                    raise SystemExit(f"main.py failed (exit {rc}) for {e['exp_dir']}")
                job_ids.append(None)
        else:
            os.chdir(os.path.join(exps[0]["exp_dir"], "code"))  # the job's cwd: `python -m submitit...` imports here
            try:
                job_ids = [j["job_id"] for j in rws.launch([e["argv"] for e in exps])]
            finally:
                os.chdir(cwd)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entries = []
    with open(os.path.join(root, "ledger.jsonl"), "a", encoding="utf-8") as f:
        for e, jid in zip(exps, job_ids):
            entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "name": e["name"], "exp_dir": e["exp_dir"],
                     "commit": commit_id, "script": script, "command": e["command"], "job_ids": [jid] if jid else [],
                     "table": getattr(e["args"], "table", None), "tags": getattr(e["args"], "tags", []),
                     "dirty": bool(diff)}
            f.write(json.dumps(entry) + "\n")
            entries.append(entry)
    return entries


def check_experiments(exps: list[dict], commit_id: str, root: str) -> None:
    """Refuse an experiment folder from another commit, with other flags, or with a job still queued/running."""
    import main  # the snapshot's (on sys.path)

    ledger = read_ledger(root)
    for e in exps:
        path = os.path.join(e["exp_dir"], "commit.txt")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = f.readline().strip()
            if old != commit_id:
                raise SystemExit(f"experiment {e['name']!r} ({e['exp_dir']}) was launched from commit {old}; this "
                                 f"tree is at {commit_id}. One commit -> one experiment: use another --name.")
        main.check_folder_owner(e["exp_dir"], e["args"])
        ids = [j for entry in ledger if entry.get("exp_dir") == e["exp_dir"] for j in entry.get("job_ids", [])]
        live = {j: s for j, s in job_states(ids[-1:]).items() if s in LIVE_STATES}
        if live:
            raise SystemExit(f"experiment {e['name']!r} still has job(s) {live} queued or running; "
                             "wait or scancel before resuming it")


def read_ledger(root: str) -> list[dict]:
    """Entries of <root>/ledger.jsonl (empty when there is none)."""
    path = os.path.join(root, "ledger.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
