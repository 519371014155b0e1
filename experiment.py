"""The experiment folder as a database record: names, atomic writes, the owner's lock, status and provenance.

An experiment folder (`<output-dir>/<name>/`) is written atomically, owned by one process at a time (an
exclusive `fcntl.flock` on its `lock` file, released by the kernel when the process dies), never written again
once finished, and says how its last run ended in `summary.json`'s `status`:
- `finished`: the run reached the end of its schedule (its checkpoint's step equals the schedule's last step);
- `stopped`: it stopped early and can resume (`--max-steps`, preemption or timeout, a non-finite loss, Ctrl-C);
- `failed`: an error ended it (the summary's `reason` says which);
- `evaluated`: `--evaluate` measured a model without training it.
main.py drives the lifecycle (and engine.py raises `RunStopped`); launch.py (sweeps skip finished experiments,
refuse folders in use) and report.py (status, flags) read the same rules from here. Imports no torch, so the
launcher and the report stay light.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time

log = logging.getLogger("clip_lab")

LOCK_FILE = "lock"
FINISHED, STOPPED, FAILED, EVALUATED = "finished", "stopped", "failed", "evaluated"
STATUSES = (FINISHED, STOPPED, FAILED, EVALUATED)
# flags that may change between a run and its resume without making it another run (args.json and the
# checkpoint's stored args are compared without them)
RESUME_NEUTRAL_ARGS = frozenset({
    "name", "resume", "workers", "print_freq", "device", "wandb", "wandb_project", "max_steps", "eval_freq",
    "save_every_steps", "output_dir", "evaluate", "data_root", "table", "tags", "max_bad_samples",
    "max_image_pixels", "peak_tflops", "fsdp"})
WANDB_ID_FILE = "wandb_id.txt"
# set by run_with_submitit.Trainer.checkpoint() when Slurm preempts the job or its time runs out: submitit then exits
# the process (SystemExit) and requeues the job, and the run's summary says `stopped`, not `failed`
PREEMPTED = threading.Event()
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UMASK = os.umask(0o022)  # read the process umask (os.umask only reads by setting) and put it back
os.umask(_UMASK)


# --------------------------------------------------------------------------- names
def control_character_error(flag: str, value) -> str | None:
    """'<flag> ...: control character ...' when `value` (a string reaching an sbatch script or a file name) holds a
    character below U+0020 or U+007F: a newline would end an `#SBATCH` line and run the rest as a command."""
    if not isinstance(value, str):
        return None
    m = _CONTROL.search(value)
    if m is None:
        return None
    return (f"{flag} {value!r}: control character U+{ord(m.group()):04X} at position {m.start()} is not allowed "
            "(it would reach the sbatch script or a file name)")


def name_error(name: str) -> str | None:
    """Why `name` is not an experiment name, or None: a name is one path component inside --output-dir (not
    empty, not `.` or `..`, no `/`, no control character)."""
    if name == "" or name in (".", "..") or "/" in name or os.path.isabs(name):
        return (f"--name {name!r}: an experiment name is one folder name inside --output-dir (no '/', not '.' "
                "or '..', not empty)")
    return control_character_error("--name", name)


# --------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_file(path: str):
    """A binary file that becomes `path` only when the block ends without an error: written to a temporary
    `.tmp_*` file in the same folder, flushed to disk, then `os.replace`d, so a reader (or a kill mid-write)
    never sees a half file. A full disk raises OSError(ENOSPC) "No space left on device while writing <path>"
    and leaves the previous `path` as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1], dir=folder)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets the permissions open() would give it
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(path):  # a sharded checkpoint (--fsdp) there before: a file cannot replace a directory
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    except Exception as exc:
        if _disk_full(exc):
            raise OSError(errno.ENOSPC, f"No space left on device while writing {path}") from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` or what caused it is ENOSPC/EDQUOT (torch.save wraps the file's OSError in a RuntimeError)."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_text_atomic(path: str, text: str) -> None:
    """UTF-8 text through `atomic_file`."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def write_json_atomic(path: str, obj: dict) -> None:
    """Indented JSON through `atomic_file` (NaN/Infinity as Python's json writes them)."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: str) -> dict | None:
    """The JSON object in `path`; None when it is absent, and None with a warning naming the file when it is
    not a JSON object (torn or blank)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s), ignored", path, exc)
        return None
    if not isinstance(obj, dict):
        log.warning("%s: not a JSON object, ignored", path)
        return None
    return obj


def read_jsonl(path: str, what: str = "line") -> list[dict]:
    """The JSON objects of a JSON-lines file (log.txt, ledger.jsonl); a torn or blank line (a writer killed
    mid-line) is skipped with a warning naming file:line."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("%s:%d: torn or blank %s skipped", path, no, what)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                log.warning("%s:%d: not a JSON object, skipped", path, no)
    return records


def temporary_dir(path: str) -> str:
    """A new empty `.tmp_<name>-*` directory beside `path` (permissions as os.makedirs gives), for `replace_dir`."""
    tmp = tempfile.mkdtemp(prefix=f".tmp_{os.path.basename(path)}-", dir=os.path.dirname(os.path.abspath(path)))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    return tmp


def replace_dir(tmp: str, path: str) -> None:
    """Put the complete directory (or file) `tmp` at `path` (a sharded checkpoint), replacing what is there.
    POSIX cannot rename over a non-empty directory, so the old one is first renamed to `.old_<name>` beside it,
    then `tmp` to `path`, then the old one is deleted; a process killed between the two renames leaves
    `.old_<name>` and no `path`, which `remove_stale_temporaries` renames back (nothing is lost)."""
    old = os.path.join(os.path.dirname(os.path.abspath(path)), ".old_" + os.path.basename(path))
    _remove_path(old)
    if os.path.lexists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    _remove_path(old)


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def remove_stale_temporaries(exp_dir: str) -> list[str]:
    """Delete the `.tmp_*` files and directories a killed atomic write left (checkpoint-sized each), and put back
    a `.old_<name>` that `replace_dir` moved aside when `<name>` is missing (else delete it); returns the paths
    removed. Only the folder's owner may call it (a live writer's temporary file would go too)."""
    removed = []
    for name in sorted(os.listdir(exp_dir)) if os.path.isdir(exp_dir) else []:
        path = os.path.join(exp_dir, name)
        if name.startswith(".old_") and not os.path.lexists(os.path.join(exp_dir, name.removeprefix(".old_"))):
            os.rename(path, os.path.join(exp_dir, name.removeprefix(".old_")))
            log.warning("restored %s, moved aside by a write that was killed", path)
        elif name.startswith((".tmp_", ".old_")):
            _remove_path(path)
            removed.append(path)
    if removed:
        log.warning("removed %d temporary file(s) left by a killed write: %s", len(removed), removed)
    return removed


# --------------------------------------------------------------------------- how a run ended
class RunStopped(SystemExit):
    """Ends a run that can simply resume (its summary says `stopped`), e.g. engine.NonFiniteStop."""


def end_status(exc: BaseException) -> tuple[str, str]:
    """(status, reason) of a run that an exception ended: `stopped` when it can simply resume (preemption or
    timeout, a RunStopped such as too many non-finite losses, Ctrl-C), else `failed`."""
    if PREEMPTED.is_set():
        return STOPPED, "preempted or timed out (the job is requeued)"
    if isinstance(exc, RunStopped):
        return STOPPED, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return STOPPED, "interrupted (KeyboardInterrupt)"
    detail = exc.code if isinstance(exc, SystemExit) else exc
    return FAILED, f"{type(exc).__name__}: {detail}"


def completed_status(step: int, total_steps: int, evaluate_only: bool, max_steps: int | None) -> tuple[str, str | None]:
    """(status, reason) of a run that returned normally: `finished` at the schedule's end; `evaluated` for
    --evaluate of an untrained model; else `stopped` (by --max-steps, or --evaluate of a partial run)."""
    if step >= total_steps:
        return FINISHED, None
    if evaluate_only:
        return (EVALUATED, None) if step == 0 else (STOPPED, f"evaluated at step {step} of {total_steps} (--evaluate)")
    return STOPPED, f"--max-steps {max_steps} reached at step {step} of {total_steps}"


# --------------------------------------------------------------------------- ownership
class FolderInUse(SystemExit):
    """Another live process holds the experiment folder's lock."""


class FolderLock:
    """An exclusive `fcntl.flock` on `<exp_dir>/lock`, held while a process runs there. The file says who holds
    it (`pid host start-time`); the kernel releases the lock when that process dies, so a requeued job (whose old
    process is gone) takes it again at once."""

    def __init__(self, exp_dir: str) -> None:
        self.exp_dir, self.path, self.fd = exp_dir, os.path.join(exp_dir, LOCK_FILE), None

    def acquire(self) -> FolderLock:
        """Take the lock or raise FolderInUse("<folder> is in use by pid N on HOST since T")."""
        os.makedirs(self.exp_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = _holder(self.exp_dir, fd)
            os.close(fd)
            raise FolderInUse(message) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(exp_dir: str, fd: int) -> str:
    """`<folder> is in use by pid N on HOST since T`, from the lock file open at `fd`."""
    pid, host, since = (os.pread(fd, 4096, 0).decode("utf-8", "replace").split() + ["?", "?", "?"])[:3]
    return f"{exp_dir} is in use by pid {pid} on {host} since {since}"


def in_use(exp_dir: str) -> str | None:
    """FolderInUse's message when a live process holds `exp_dir`, else None. Writes nothing (a finished folder is
    left as it is): the lock is tried on a read-only descriptor and released at once."""
    try:
        fd = os.open(os.path.join(exp_dir, LOCK_FILE), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(exp_dir, fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the record
def flags_diff(old: dict, new: dict, defaults: dict) -> dict[str, tuple]:
    """{flag: (old value, new value)} of the flags that make `old` and `new` (args.json-style dicts) two different
    runs: every flag but RESUME_NEUTRAL_ARGS; a flag `old` does not have (added to the parser since) counts only
    when `new` sets it away from its default."""
    keys = (set(old) | set(new)) - RESUME_NEUTRAL_ARGS
    return {k: (old.get(k), new.get(k)) for k in sorted(keys)
            if old.get(k) != new.get(k) and (k in old or new.get(k) != defaults.get(k))}


def describe_diff(diff: dict[str, tuple]) -> str:
    """`--lr 0.001 -> 0.002, --seed 0 -> 1`."""
    return ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in diff.items())


def record_provenance(exp_dir: str, commit: str, command: str) -> None:
    """The one writer of `commit.txt` and `command.txt`: the commit and the command that created the experiment,
    written once (run.sh's launcher writes them at submission, main.py when it creates a folder by itself)."""
    os.makedirs(exp_dir, exist_ok=True)
    for name, text in (("commit.txt", commit), ("command.txt", command)):
        path = os.path.join(exp_dir, name)
        if not os.path.exists(path):
            write_text_atomic(path, text + "\n")


def wandb_run_id(exp_dir: str, from_checkpoint: str | None = None) -> str:
    """The experiment's wandb run id, generated once (wandb's `generate_id()`) and kept in `<exp_dir>/wandb_id.txt`
    (main.py also stores it in every checkpoint): a resume or requeue continues the same wandb run, and two
    experiments never share one, whatever their names (`a:b` and `a-b`, or one name under two output roots).
    `from_checkpoint`: the id the folder's own checkpoint holds, used when the file is gone."""
    path = os.path.join(exp_dir, WANDB_ID_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
    except FileNotFoundError:
        run_id = ""
    if not run_id:
        from wandb.sdk.lib.runid import generate_id  # wandb's own run-id generator (8 base-36 characters)

        run_id = from_checkpoint or generate_id()
        write_text_atomic(path, run_id + "\n")
    return run_id


def read_commit(exp_dir: str) -> str | None:
    """The first line of commit.txt, or None."""
    try:
        with open(os.path.join(exp_dir, "commit.txt"), encoding="utf-8") as f:
            return f.readline().strip()
    except FileNotFoundError:
        return None


def finished_summary(exp_dir: str) -> dict | None:
    """summary.json of a finished experiment (status `finished`: main.py writes it only when the checkpoint's step
    reached the schedule's end), else None."""
    summary = read_json(os.path.join(exp_dir, "summary.json"))
    return summary if summary is not None and summary.get("status") == FINISHED else None


def headline_metric(metrics: dict) -> tuple[str, float] | None:
    """(name, value) of the number a run is judged by: the zero-shot anchor metric of head z (top-1 for most
    sets, mean per class for pets...), else top-1, else the mean retrieval recall; None without one."""
    for key in ("score_z", "acc1_z", "mean_recall"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    return None


def describe_result(summary: dict) -> str:
    """`acc1_z 94.40` (the headline metric of a summary), or `no validation metric`."""
    metric = headline_metric(summary)
    if metric is None:
        return "no validation metric"
    return f"{metric[0]} {metric[1]:.2f}" if math.isfinite(metric[1]) else f"{metric[0]} {metric[1]}"
