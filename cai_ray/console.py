"""What a person sees on the terminal, and where everything else goes.

Per stage the terminal shows one start line, one progress bar and one end
line; Ray, Ray Data/Train/Serve, DeepSpeed, vLLM, transformers and MLflow
write hundreds of lines from the driver, from C++ and from Ray workers.
``capture`` (called once by the CLI) sends all of that to
``{output_dir}/logs/COMMAND-TIME.log``:

- file descriptors 1 and 2 point at the log, so C-level output and child
  processes (raylet, GCS, a Serve proxy) write there;
- ``sys.stderr`` is the log, so Python logging, warnings and tqdm bars land there;
- ``sys.stdout`` stays on the terminal (a copy of the old fd 1), so the tables
  a stage prints still reach the user, and is copied into the log;
- Ray forwards worker output to the driver's ``sys.stdout``; ``route_worker_output``
  (called by ``runtime.init_ray``) sends it to the log instead.

``--verbose`` or ``CAI_RAY_VERBOSE=1`` leaves every stream alone.

Progress, one API for every stage (works with or without capture)::

    with console.progress("generate", total=len(todo), unit="rows") as bar:
        for batch in ...:
            bar.advance(batch.num_rows)  # from the loop that consumes results

Work running elsewhere (Ray Train ranks) passes ``poll=`` instead: a function
returning the count so far, called by the bar's ticker thread.  Evaluate hook:
wrap generation and judging the same way, e.g. ``progress("evaluate: base",
total=len(work), unit="responses")`` advanced per ``iter_batches`` batch (Ray
Data's ``take_all`` gives no progress), and ``unit="verdicts"`` for judging.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

VERBOSE_ENV = "CAI_RAY_VERBOSE"
# A plain progress line this often when the terminal is not a TTY (CI, pipes, Ray Jobs).
PLAIN_EVERY_S = float(os.environ.get("CAI_RAY_PROGRESS_EVERY", "10"))
TTY_EVERY_S = 0.5
# End-of-stage line: the few numbers a person checks first, per stage.
SUMMARY_KEYS = {
    "generate": ("chains", "pairs", "rejects", "error_rate"),
    "sft": ("steps", "final_loss", "tokens_per_s"),
    "dpo": ("steps", "final_loss", "tokens_per_s"),
    "evaluate": ("unreliable_arms", "invalid_comparisons"),
}

_lock = threading.RLock()


class _Capture:
    """The state of one captured command: the log, the terminal streams, the saved ones."""

    def __init__(self, path: Path):
        self.path = path
        self.log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        self.saved_fds = (os.dup(1), os.dup(2))
        self.saved_streams = (sys.stdout, sys.stderr)
        self.out = _terminal(sys.stdout, self.saved_fds[0])
        self.err = _terminal(sys.stderr, self.saved_fds[1])


def _terminal(stream, fd_copy: int):
    """The user's stream: rebuilt on the fd copy when it wrote to fd 1/2, else kept (pytest's capsys)."""
    try:
        real = stream.fileno() in (1, 2)
    except (AttributeError, ValueError, io.UnsupportedOperation):
        real = False
    if not real:
        return stream
    return open(os.dup(fd_copy), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="backslashreplace")


class _Tee(io.TextIOBase):
    """``sys.stdout`` while capturing: the terminal, with a copy in the log; a live bar is cleared first.

    Libraries keep references to it (Ray's colorama writes at exit), so after
    ``release`` it forwards to the stream it replaced.
    """

    def __init__(self, cap: _Capture):
        self.cap = cap

    def _streams(self) -> tuple:
        return (self.cap.out, self.cap.log) if _cap is self.cap else (self.cap.saved_streams[0],)

    def write(self, text: str) -> int:
        with _lock:
            _clear_bar()
            for stream in self._streams():
                stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self._streams():
            stream.flush()

    def isatty(self) -> bool:
        return self._streams()[0].isatty()

    @property
    def encoding(self):
        return getattr(self._streams()[0], "encoding", "utf-8")


_cap: Optional[_Capture] = None
_live: Optional["Progress"] = None  # the bar drawn on the last line of a TTY
_running: set = set()  # bars not done yet; a stage that fails stops its bars


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def capture(output_root: Path, command: str) -> Path:
    """Send library and worker output to a new log file; returns its path.  Undo with ``release``."""
    global _cap
    logs = Path(output_root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    cap = _Capture(path)
    os.dup2(cap.log.fileno(), 1)
    os.dup2(cap.log.fileno(), 2)
    sys.stdout, sys.stderr = _Tee(cap), cap.log
    # Ray Data reads this at import: its bars and periodic progress logs would only fill the log.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    _cap = cap
    return path


def release() -> None:
    """Give the process its streams back (the CLI calls this last; tests call main() in-process)."""
    global _cap
    if _cap is None:
        return
    cap, _cap = _cap, None
    sys.stdout.flush()
    cap.log.flush()
    sys.stdout, sys.stderr = cap.saved_streams
    for fd, target in zip(cap.saved_fds, (1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    for stream, saved in ((cap.out, cap.saved_streams[0]), (cap.err, cap.saved_streams[1])):
        if stream is not saved:
            stream.close()
    # The log stays open: logging handlers made during the command still hold it, and their
    # late lines (shutdown, atexit) belong there rather than in an error about a closed file.


def log_path() -> Optional[Path]:
    return _cap.path if _cap else None


def sink():
    """Where library output belongs right now: the log while capturing, else stderr."""
    return _cap.log if _cap else sys.stderr


def route_worker_output() -> None:
    """Send Ray's forwarded worker output (stdout included) to the log while capturing.

    Ray prints worker stdout to the driver's ``sys.stdout``, which is the terminal
    here; its dispatcher is internal API, so a Ray without it just leaves
    worker lines where Ray puts them.
    """
    if _cap is None:
        return
    try:
        from ray._private import ray_logging, worker
    except ImportError:
        return
    dispatcher = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    print_logs = getattr(worker, "print_worker_logs", None)
    if dispatcher is None or print_logs is None:
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", lambda data: print_logs(data, sink()))


def say(line: str) -> None:
    """One line for the user (and the log)."""
    with _lock:
        _clear_bar()
        print(line, file=sys.stdout, flush=True)


def error(line: str) -> None:
    """One line on the user's stderr (and the log)."""
    with _lock:
        _clear_bar()
        if _cap is not None:
            _cap.log.write(line + "\n")
            print(line, file=_cap.err, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _tty() -> bool:
    # A bar needs a terminal of its own: with --verbose, library lines would cut through it.
    return _cap is not None and _cap.out.isatty()


def _clear_bar() -> None:
    if _live is not None and _cap is not None:
        _cap.out.write("\r\x1b[K")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Count, rate and ETA of one piece of work; a live bar on a TTY, a plain line every few seconds otherwise."""

    def __init__(self, label: str, total: Optional[int], unit: str, poll: Optional[Callable[[], int]] = None):
        self.label, self.total, self.unit, self.poll = label, total, unit, poll
        self.count = 0
        self.started = self.last = time.monotonic()
        self.first: Optional[tuple[float, int]] = None  # (time, count) of the first progress: rate excludes start-up
        self.tty = _tty()
        self._printed: Optional[tuple[float, int]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name=f"progress-{label}", daemon=True)
        _running.add(self)
        self._thread.start()

    def advance(self, n: int = 1) -> None:
        self.update(self.count + n)

    def update(self, count: int) -> None:
        with _lock:
            if count <= self.count:
                return
            self.count, self.last = count, time.monotonic()
            if self.first is None:
                # The rate counts from the first progress seen: start-up and a resumed run's
                # earlier steps are not part of it.
                self.first = (self.last, count)

    def rate(self) -> Optional[float]:
        """Units per second from the first progress seen on, so start-up (Ray, actors, model loading)
        and a resumed run's earlier work stay out of it; None until that spans a few seconds."""
        if self.first is None:
            return None
        t0, n0 = self.first
        return (self.count - n0) / (self.last - t0) if self.last - t0 >= 5 and self.count > n0 else None

    def text(self, width: int = 80, final: bool = False) -> str:
        rate = self.rate()
        if rate is None and final and self.count:
            rate = self.count / max(self.last - self.started, 1e-6)  # all in one burst: the plain average
        count = f"{self.count}/{self.total}" if self.total else str(self.count)
        parts = [f"{count} {self.unit}"]
        if rate or not self.count:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate else "starting")
        parts.append(_duration(time.monotonic() - self.started))
        if rate and self.total and self.count < self.total:
            parts.append(f"ETA {_duration((self.total - self.count) / rate)}")
        tail = "  ".join(parts)
        if not self.tty:
            return f"  {self.label}: {tail}"
        room = max(10, min(30, width - len(self.label) - len(tail) - 10))
        filled = int(room * self.count / self.total) if self.total else 0
        return f"  {self.label} [{'#' * filled}{'-' * (room - filled)}] {tail}"[:width - 1]

    def _tick(self) -> None:
        every = TTY_EVERY_S if self.tty else min(PLAIN_EVERY_S, 2.0)
        while not self._stop.wait(every):
            self._poll()
            self._show()

    def _poll(self) -> None:
        if self.poll is None:
            return
        try:
            self.update(int(self.poll()))
        except Exception:  # a poll that fails (actor gone, timeout) only freezes the bar
            pass

    def _show(self) -> None:
        global _live
        with _lock:
            if self.tty:
                _live = self
                _cap.out.write("\r\x1b[K" + self.text(shutil.get_terminal_size().columns))
                _cap.out.flush()
                return
            now = time.monotonic()
            last_t, last_n = self._printed or (self.started, -1)
            if now - last_t >= PLAIN_EVERY_S and self.count != last_n:
                self._printed = (now, self.count)
                print(self.text(), file=sys.stdout, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.done()

    def done(self) -> None:
        """Stop the ticker and leave one final line (on the terminal and in the log)."""
        if self._stop.is_set():
            return
        global _live
        self._stop.set()
        self._thread.join()
        self._poll()
        with _lock:
            if _live is self:
                _clear_bar()
                _live = None
            self.tty = False
            print(self.text(final=True), file=sys.stdout, flush=True)


def progress(label: str, total: Optional[int], unit: str, poll: Optional[Callable[[], int]] = None) -> Progress:
    return Progress(label, total, unit, poll)


def _brief(key: str, value) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}"
    if isinstance(value, (list, tuple)):
        return f"{key} {', '.join(map(str, value)) or 'none'}"
    return f"{key} {value}"


@contextmanager
def stage(kind: str, name: str) -> Iterator[dict]:
    """Start line, then the end line: time taken, a few numbers and the output folder.

    The caller puts the stage's result dict into the yielded dict under "result".
    """
    say(f"== {name}")
    started = time.monotonic()
    holder: dict = {}
    try:
        yield holder
    except BaseException:
        for bar in list(_running):
            bar.done()
        say(f"   {name} failed after {_duration(time.monotonic() - started)}")
        raise
    result = holder.get("result") or {}
    numbers = [_brief(k, result[k]) for k in SUMMARY_KEYS.get(kind, ()) if result.get(k) is not None]
    where = f" -> {result['output']}" if result.get("output") else ""
    earlier = " (finished earlier, reused)" if result.get("skipped") else ""
    say(f"   done in {_duration(time.monotonic() - started)}{earlier}: {'; '.join(numbers) or 'ok'}{where}")


def remote_counter():
    """A counter any Ray process can set (e.g. a train rank on another node) and a bar can poll."""
    import ray

    return ray.remote(num_cpus=0)(_Counter).remote()


class _Counter:
    def __init__(self):
        self.value = 0

    def set(self, value: int) -> None:
        self.value = max(self.value, value)

    def get(self) -> int:
        return self.value
