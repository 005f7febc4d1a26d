"""One driver per stage folder: a lease file the holder keeps fresh.

``hold(folder)`` creates ``folder/.lock`` with O_EXCL (atomic on local disks and on NFSv3+),
recording who holds it: host, pid, start time, the Ray job id when there is one, and a
heartbeat that a thread of the holder rewrites every ``lease_s / 4`` seconds.  A second
driver on the folder refuses in one line naming the holder.

A lock is stale, and is taken over with a note, when its holder is gone:
- on the same machine (same boot id), its pid is not running or is another process now
  (the process start time differs): known at once, e.g. after ``kill -9``;
- anywhere else (another node on a shared filesystem, where a pid means nothing), its
  heartbeat is older than ``runtime.lock_lease_s``.

Take-over renames the stale file aside first; of two drivers racing for one stale lock only
one rename succeeds, and the loser sees the winner's fresh lock.  Clocks across hosts must
agree to well within the lease (NTP does that).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from cai_ray import console

NAME = ".lock"
DEFAULT_LEASE_S = 120.0
# Folders this process holds (re-entrant: a pipeline may pass through a folder twice).
_held: dict[Path, int] = {}
_mutex = threading.Lock()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _started(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (tells a reused pid apart), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _record(token: str) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
            "proc_start": _started(os.getpid()), "started": now, "heartbeat": now, "token": token,
            "ray_job": os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID")}


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: a holder killed while writing its first bytes


def stale(info: dict, lease_s: float, now: Optional[float] = None) -> Optional[str]:
    """Why ``info``'s holder is gone, or None while it may still be alive."""
    if not info:
        return "the lock file is unreadable"
    now = time.time() if now is None else now
    if info.get("boot_id") and info["boot_id"] == _boot_id():
        if _started(int(info["pid"])) != info.get("proc_start"):
            return f"process {info['pid']} on this machine is gone"
        return None
    age = now - float(info.get("heartbeat", 0))
    return f"no heartbeat for {age:.0f}s (runtime.lock_lease_s={lease_s:g})" if age > lease_s else None


def describe(info: dict, now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info.get("started", 0))))
    job = f", Ray job {info['ray_job']}" if info.get("ray_job") else ""
    return (f"host {info.get('host')} pid {info.get('pid')}{job}, started {start}, "
            f"heartbeat {now - float(info.get('heartbeat', 0)):.0f}s ago")


def _create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def _take_over(path: Path, info: dict) -> bool:
    """Move the stale lock aside; False when another driver moved or replaced it first."""
    aside = path.with_name(f"{NAME}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read(aside) != info:  # renamed someone's fresh lock: put it back (link never overwrites)
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def acquire(folder: Path, lease_s: float = DEFAULT_LEASE_S) -> dict:
    """Take ``folder``'s lock or raise RuntimeError naming its live holder; returns our record."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / NAME
    record = _record(secrets.token_hex(8))
    for _ in range(5):
        if _create(path, record):
            return record
        info = _read(path)
        if info is None:
            continue  # released between our two calls
        why = stale(info, lease_s)
        if why is None:
            raise RuntimeError(f"{folder} is in use by another cai-ray driver ({describe(info)}); wait for it "
                               f"to finish or stop it (a holder that stops refreshing is taken over after "
                               f"runtime.lock_lease_s={lease_s:g}s)")
        if _take_over(path, info):
            console.say(f"   taking over the stale lock of {folder} ({describe(info)}): {why}")
    raise RuntimeError(f"{path}: could not take the lock (other drivers keep taking it)")


def _refresh(path: Path, record: dict, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        current = _read(path)
        if not current or current.get("token") != record["token"]:
            console.say(f"   warning: the lock of {path.parent} was taken over by {describe(current or {})}")
            return
        record["heartbeat"] = time.time()
        tmp = path.with_name(f"{NAME}.{record['token']}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)


@contextmanager
def hold(folder: Path, lease_s: float = DEFAULT_LEASE_S) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, refreshing its heartbeat; re-entrant in one process.

    Every stage takes its folder's lock here (``runtime.lock_lease_s``) before writing in it."""
    folder = Path(folder).resolve()
    with _mutex:
        if folder in _held:
            _held[folder] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _mutex:
                _held[folder] -= 1
        return
    record = acquire(folder, lease_s)
    with _mutex:
        _held[folder] = 1
    stop = threading.Event()
    path = folder / NAME
    beat = threading.Thread(target=_refresh, args=(path, record, lease_s / 4, stop), daemon=True,
                            name=f"lock-{folder.name}")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with _mutex:
            del _held[folder]
        if (_read(path) or {}).get("token") == record["token"]:
            path.unlink(missing_ok=True)
