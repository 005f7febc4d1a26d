"""Small helpers the test files share: the CLI as a subprocess, free loopback ports, JSONL files, and
whether Ray Train has registered a checkpoint."""

import json
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cai(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    """``python -m cai_ray ARGS`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "cai_ray", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, **kw)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1. All sockets stay open until every port is chosen:
    ports taken one by one can repeat, and Ray refuses two components on one port."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def has_checkpoint(snapshot: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint in ``snapshot``
    (``checkpoint_manager_snapshot.json``): one whose files are uploaded but not yet registered is
    not restored, and a resume starts from the one before."""
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):
        return False  # being written
