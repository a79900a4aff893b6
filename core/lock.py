"""One process at a time per run directory: an exclusive lock on ``RUN/.lock``.

Why: two ``megaclass`` processes on one run directory destroy each other's work — each deletes
the other's temporary files as stale, overwrites its checkpoints and markers. So every command
that writes a run directory first takes this lock, and a second one is refused with one message
naming the holder (host, pid, since when, command) and exit status 2 (docs/reliability.md,
"One run per run directory").

How:

- ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``RUN/.lock`` (a file that is never replaced or
  deleted). The kernel releases it when the holder dies, however it dies, so a lock left by a
  killed run is simply taken over.
- ``RUN/.lock.json``, the holder record (host, pid, start time, command, a random token and a
  heartbeat refreshed every :data:`HEARTBEAT_S` seconds), written after the flock is held. It
  names the holder in the refusal, and it covers file systems whose locks do not reach other
  hosts (NFS mounted with ``local_lock``, Lustre with ``localflock``) or that have none (the
  flock call fails; the record alone then decides): a record from another host whose heartbeat
  still moves is a live holder, one whose heartbeat stopped for :data:`STALE_AFTER_S` seconds is
  stale and taken over with a warning.
- Reentrant within a process: ``megaclass run`` takes the lock and the stages it calls
  in-process take it again without deadlocking (a count per run directory).
- Training ranks started by the holder (``train.nproc > 1``: torchrun or the deepspeed launcher
  as a child) inherit the holder's right through ``MEGACLASS_LOCK_TOKEN`` and each hold a shared
  lock on ``RUN/.lock.ranks`` while they live. A new holder waits (up to :data:`RANKS_WAIT_S`)
  until no rank holds it: ranks of a killed run checkpoint on their way out, and a new run must
  not delete that checkpoint's temporary files under them.
- Under an external launcher (torchrun/srun started by the user or Slurm: ``RANK`` or
  ``SLURM_PROCID`` set) rank 0 takes the lock for the training stage and the other ranks do
  not, so two Slurm jobs on one run directory cannot both train.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaclass.core.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
"""The file that is flock()ed; created once, never replaced or removed."""
RECORD_NAME = ".lock.json"
"""The holder record, replaced atomically; removed when the holder releases the lock."""
RANKS_NAME = ".lock.ranks"
"""Shared-locked by every training rank started by the holder, for as long as it runs."""
TOKEN_ENV = "MEGACLASS_LOCK_TOKEN"
"""``<token>@<run dir>``: set by the holder for the training ranks it launches."""
RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
"""Environment variables through which a launcher gives a process its rank."""

HEARTBEAT_S = 30.0
"""How often the holder refreshes the heartbeat in its record."""
STALE_AFTER_S = 150.0
"""A record from another host whose heartbeat has not moved for this long is stale."""
RANKS_WAIT_S = 120.0
"""How long a new holder waits for the ranks of an earlier holder to exit (checkpointing)."""

# flock() errors meaning "this file system has no (working) flock", not "somebody holds it"
_FLOCK_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


class RunDirLockedError(UserError, RuntimeError):
    """The run directory is locked by another process; the message names it."""


@dataclass(frozen=True)
class Holder:
    """The holder record of ``RUN/.lock.json``."""

    host: str
    pid: int
    started: float
    command: str
    token: str
    heartbeat: float

    def describe(self) -> str:
        """``pid 123 on host h since 2025-01-02 03:04:05 UTC (megaclass run c.yaml)``."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        cmd = self.command if len(self.command) <= 200 else self.command[:197] + "..."
        return f"pid {self.pid} on host {self.host} since {when} ({cmd})"


def read_holder(root: str | Path) -> Holder | None:
    """The holder record of run directory ``root``; None when absent or not a valid record.

    The file lies in a shared folder, so it is read as plain JSON and every field is checked:
    a foreign or torn file counts as no record.
    """
    path = Path(root) / RECORD_NAME
    try:
        raw = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    try:
        rec = Holder(
            host=str(raw["host"]).replace("\n", " "),
            pid=int(raw["pid"]),
            started=float(raw["started"]),
            command=str(raw.get("command", "")).replace("\n", " "),
            token=str(raw["token"]),
            heartbeat=float(raw.get("heartbeat", raw["started"])),
        )
    except (KeyError, TypeError, ValueError):
        return None
    return rec if rec.pid > 0 else None


def launcher_rank() -> int | None:
    """This process's rank as a launcher gave it (RANK, SLURM_PROCID, …); None without one."""
    for var in RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.strip():
            try:
                return int(value)
            except ValueError:
                return None
    return None


def default_command() -> str:
    """This process's command line, for the holder record."""
    argv = list(sys.argv) or ["python"]
    name = Path(argv[0]).name or argv[0]
    if name == "__main__.py" or name.endswith(".py"):
        name = f"python {argv[0]}"
    return " ".join([name, *(shlex.quote(a) for a in argv[1:])])


# --------------------------------------------------------------------------------------
# The exclusive lock
# --------------------------------------------------------------------------------------


class RunLock:
    """The exclusive lock of one run directory, held by this process.

    Obtained from :func:`acquire` (or the context managers below); reentrant through a count.
    """

    def __init__(self, root: Path, fd: int, flocked: bool, command: str) -> None:
        self.root = root
        self.fd = fd
        self.flocked = flocked
        self.count = 1
        self.holder = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.time(),
            command=command,
            token=secrets.token_hex(16),
            heartbeat=time.time(),
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.holder.token

    def env_value(self) -> str:
        """The value of :data:`TOKEN_ENV` for the training ranks this holder launches."""
        return f"{self.token}@{self.root}"

    def write_record(self) -> None:
        """(Re)write ``RUN/.lock.json`` atomically, with a fresh heartbeat.

        Not through core.atomic: its ``.tmp-*`` names are what the report stage deletes as
        stale in the run root, and the heartbeat runs while stages do that.
        """
        rec = {**self.holder.__dict__, "heartbeat": time.time()}
        final = self.root / RECORD_NAME
        part = self.root / f"{RECORD_NAME}.{os.getpid()}.part"
        with open(part, "w") as f:
            f.write(json.dumps(rec, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, final)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                now = read_holder(self.root)
                if now is not None and now.token != self.token:
                    log.error(
                        "%s: the lock record now names %s; this process (pid %d) lost the run "
                        "directory lock (it was suspended longer than %.0f s?)",
                        self.root,
                        now.describe(),
                        os.getpid(),
                        STALE_AFTER_S,
                    )
                    return
                self.write_record()
            except OSError as e:  # a full or unreachable disk: keep going, say so
                log.warning("%s: could not refresh the lock heartbeat: %s", self.root, e)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="megaclass-lock", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the heartbeat, remove the record (if still ours) and release the flock."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            now = read_holder(self.root)
            mine = now is not None and now.token == self.token
            if mine and os.getpid() == self.holder.pid:  # not in a forked child: it shares
                (self.root / RECORD_NAME).unlink(missing_ok=True)  # the parent's lock
        except OSError:
            pass
        finally:
            os.close(self.fd)  # closing the last descriptor releases the flock


_HELD: dict[str, RunLock] = {}
_HELD_GUARD = threading.Lock()


def _key(root: str | Path) -> str:
    return os.path.realpath(root)


def held(root: str | Path) -> RunLock | None:
    """The lock of ``root`` if this process holds it."""
    with _HELD_GUARD:
        return _HELD.get(_key(root))


def acquire(root: str | Path, command: str | None = None) -> RunLock:
    """Take the exclusive lock of run directory ``root`` (created if missing), or raise
    :class:`RunDirLockedError` naming the holder. Reentrant: a process that holds it gets the
    same lock back (and must :func:`release` it as often)."""
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    key = _key(path)
    with _HELD_GUARD:
        lk = _HELD.get(key)
        if lk is not None:
            lk.count += 1
            return lk
        lk = _acquire_new(Path(key), command or default_command())
        _HELD[key] = lk
        return lk


def release(lk: RunLock) -> None:
    """Undo one :func:`acquire`; the last one releases the lock."""
    with _HELD_GUARD:
        lk.count -= 1
        if lk.count > 0:
            return
        _HELD.pop(_key(lk.root), None)
    lk.close()


@contextlib.contextmanager
def exclusive(root: str | Path, command: str | None = None) -> Iterator[RunLock]:
    """``with exclusive(run_dir):`` hold the run directory's lock for the block."""
    lk = acquire(root, command)
    try:
        yield lk
    finally:
        release(lk)


def _acquire_new(root: Path, command: str) -> RunLock:
    for stray in root.glob(f"{RECORD_NAME}.*.part"):  # a record write cut by a kill
        with contextlib.suppress(OSError):
            if not _pid_alive(_part_pid(stray)):
                stray.unlink()
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        flocked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLockedError(_busy_message(root, _current_holder(root))) from None
        except OSError as e:
            if e.errno not in _FLOCK_UNSUPPORTED:
                raise
            flocked = False
            log.warning(
                "%s: this file system does not support flock (%s); the holder record "
                "%s alone guards the run directory",
                root,
                e.strerror,
                RECORD_NAME,
            )
        previous = read_holder(root)
        if previous is not None:
            _check_previous(root, previous, flocked)
        lk = RunLock(root, fd, flocked, command)
        lk.write_record()
        if not flocked:  # no flock: two starters may both have got here; the last write wins
            time.sleep(0.2)
            now = read_holder(root)
            if now is None or now.token != lk.token:
                raise RunDirLockedError(_busy_message(root, now))
        try:
            _wait_for_ranks(root, previous)
        except BaseException:
            with contextlib.suppress(OSError):
                (root / RECORD_NAME).unlink()
            raise
        lk.start_heartbeat()
        return lk
    except BaseException:
        os.close(fd)
        raise


def _part_pid(p: Path) -> int:
    try:
        return int(p.name.split(".")[-2])
    except (IndexError, ValueError):
        return 0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _current_holder(root: Path, patience_s: float = 1.0) -> Holder | None:
    """The record of the process that holds the flock now. A holder writes its record just
    after taking the flock, so for a moment the file may be missing or still name the previous
    (dead) holder: wait up to ``patience_s`` for a live one."""
    deadline = time.monotonic() + patience_s
    while True:
        rec = read_holder(root)
        fresh = rec is not None and (rec.host != socket.gethostname() or _pid_alive(rec.pid))
        if fresh or time.monotonic() > deadline:
            return rec
        time.sleep(0.05)


def _busy_message(root: Path, holder: Holder | None) -> str:
    if holder is None:
        who = "another process (its holder record is not written yet or unreadable)"
    else:
        who = holder.describe()
        if holder.host != socket.gethostname():
            who += f", last heartbeat {max(0.0, time.time() - holder.heartbeat):.0f} s ago"
        elif not _pid_alive(holder.pid):
            who += (
                f"; pid {holder.pid} has exited but a process it started still holds the lock "
                "(it ends soon, or stop it)"
            )
    return (
        f"run directory {root} is in use by {who}. Two runs on one run directory would delete "
        "each other's files: wait for it to finish, or stop it, then start again (or use "
        "another run_dir)."
    )


def _check_previous(root: Path, prev: Holder, flocked: bool) -> None:
    """A record survived its holder's flock (or there is no flock): decide if it is stale."""
    here = socket.gethostname()
    if prev.host == here:
        if not flocked and prev.pid != os.getpid() and _pid_alive(prev.pid):
            raise RunDirLockedError(
                _busy_message(root, prev)
                + f" (Without file locks the record decides: if pid {prev.pid} is no megaclass "
                f"process, remove {root / RECORD_NAME}.)"
            )
        log.warning("%s: taking over the lock left by %s (not running)", root, prev.describe())
        return
    # Another host: alive while its heartbeat moves. Watch it for up to STALE_AFTER_S.
    age = time.time() - prev.heartbeat
    wait = max(0.0, min(STALE_AFTER_S, STALE_AFTER_S - age))
    if wait > 0:
        log.warning(
            "%s: the lock record names %s; waiting up to %.0f s to see whether it is alive",
            root,
            prev.describe(),
            wait,
        )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.05, HEARTBEAT_S / 4)))
        now = read_holder(root)
        if now is None:
            return  # released meanwhile
        if now.token != prev.token or now.heartbeat != prev.heartbeat:
            why = (
                " (this file system's locks do not reach across hosts, so the record decided)"
                if flocked
                else ""
            )
            raise RunDirLockedError(_busy_message(root, now) + why)
    log.warning(
        "%s: taking over the lock left by %s (no heartbeat for %.0f s)",
        root,
        prev.describe(),
        time.time() - prev.heartbeat,
    )


def _wait_for_ranks(root: Path, prev: Holder | None) -> None:
    """Wait until no training rank of an earlier holder runs (they hold RUN/.lock.ranks)."""
    fd = os.open(root / RANKS_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + RANKS_WAIT_S
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno in _FLOCK_UNSUPPORTED:
                    return
                raise
            whose = prev.describe() if prev is not None else "an earlier run"
            if time.monotonic() > deadline:
                raise RunDirLockedError(
                    f"run directory {root}: training ranks started by {whose} are still "
                    f"running after {RANKS_WAIT_S:.0f} s (they hold {root / RANKS_NAME}); "
                    "stop them, then start again"
                )
            if not said:
                log.warning(
                    "%s: waiting up to %.0f s for the training ranks started by %s to exit",
                    root,
                    RANKS_WAIT_S,
                    whose,
                )
                said = True
            time.sleep(0.25)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# Which lock a process takes
# --------------------------------------------------------------------------------------

_RANK_HOLDS: dict[str, int] = {}


def _flock_held_elsewhere(root: Path) -> bool | None:
    """Whether some process holds RUN/.lock (None: this file system has no flock)."""
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError as e:
        if e.errno in _FLOCK_UNSUPPORTED:
            return None
        raise
    finally:
        os.close(fd)


def _hold_as_rank(root: Path, token: str) -> None:
    """Check that the process that launched this rank still holds the lock; then take a shared
    lock on RUN/.lock.ranks for the rest of this process's life (the kernel drops it at exit).
    """
    key = _key(root)
    if key in _RANK_HOLDS:
        return
    rec = read_holder(root)
    alive = _flock_held_elsewhere(root)
    if alive is None:  # no flock: the record and the pid decide
        alive = rec is not None and (rec.host != socket.gethostname() or _pid_alive(rec.pid))
    if rec is None or rec.token != token or not alive:
        by = f" (the lock is now held by {rec.describe()})" if rec and rec.token != token else ""
        raise RunDirLockedError(
            f"run directory {root}: the run that started this training rank no longer holds "
            f"its lock{by}; this rank does not train (unset {TOKEN_ENV} to start ranks by hand)"
        )
    fd = os.open(root / RANKS_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + 60.0
    while True:  # a starter probes the file with a brief exclusive lock: retry past it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RunDirLockedError(f"{root / RANKS_NAME}: cannot take the rank lock") from None
            time.sleep(0.05)
        except OSError as e:
            if e.errno not in _FLOCK_UNSUPPORTED:
                os.close(fd)
                raise
            break
    _RANK_HOLDS[key] = fd


@contextlib.contextmanager
def for_process(root: str | Path, command: str | None = None) -> Iterator[Any]:
    """Hold what this process must hold to write run directory ``root`` for the block.

    - a training rank launched by the lock's holder (:data:`TOKEN_ENV` names this run
      directory): no exclusive lock (the holder has it), but the shared rank lock, after
      checking that the holder still holds the lock;
    - a rank other than 0 of an external launcher: nothing (rank 0 holds the lock);
    - otherwise (a command, a driver, rank 0): the exclusive lock, reentrantly.

    Yields the :class:`RunLock` where this process holds the exclusive lock, else None.
    """
    path = Path(root)
    inherited = os.environ.get(TOKEN_ENV, "")
    token, _, where = inherited.partition("@")
    if token and where and path.exists() and _key(where) == _key(path):
        _hold_as_rank(Path(_key(path)), token)
        yield None
        return
    rank = launcher_rank()
    if rank is not None and rank != 0:
        yield None
        return
    with exclusive(path, command) as lk:
        yield lk
