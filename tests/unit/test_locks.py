"""Stage-folder locks: a live holder refuses a second driver in one line; a gone one is taken over."""

import json
import os
import subprocess
import sys
import time

import pytest

from cai_ray import locks
from cai_ray.config import ConfigError, load_config


def _lock(folder):
    return json.loads((folder / locks.NAME).read_text())


def test_second_holder_refused_naming_host_pid_and_start(tmp_path):
    with locks.hold(tmp_path / "stage"):
        info = _lock(tmp_path / "stage")
        assert info["pid"] == os.getpid() and info["boot_id"] and info["heartbeat"] >= info["started"]
        with locks.hold(tmp_path / "stage"):  # re-entrant in one process
            pass
        assert (tmp_path / "stage" / locks.NAME).exists()
        # Another process on the same folder: one line naming the holder.
        code = (f"from cai_ray import locks; from pathlib import Path\n"
                f"with locks.hold(Path({str(tmp_path / 'stage')!r})): pass")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        last = done.stderr.strip().splitlines()[-1]
        assert f"is in use by another cai-ray driver (host {info['host']} pid {os.getpid()}" in last
        assert "started 20" in last and "heartbeat" in last
    assert not (tmp_path / "stage" / locks.NAME).exists(), "released on exit"


def test_stale_locks_are_taken_over_with_a_note(tmp_path, capsys):
    folder = tmp_path / "stage"
    folder.mkdir()
    now = time.time()
    # Same machine, a pid that is not running: stale at once, whatever its heartbeat says.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / locks.NAME).write_text(json.dumps({**locks._record("t1"), "pid": dead.pid, "proc_start": "0"}))
    with locks.hold(folder):
        assert _lock(folder)["pid"] == os.getpid()
    assert f"process {dead.pid} on this machine is gone" in capsys.readouterr().out
    # Another host (shared filesystem): only the heartbeat tells; fresh is held, old is stale.
    other = {**locks._record("t2"), "host": "node-7", "boot_id": "another-machine", "pid": 1,
             "ray_job": "raysubmit_abc"}
    (folder / locks.NAME).write_text(json.dumps({**other, "heartbeat": now - 5}))
    with pytest.raises(RuntimeError, match=r"host node-7 pid 1, Ray job raysubmit_abc, started .* heartbeat 5s ago"):
        locks.acquire(folder, lease_s=60)
    (folder / locks.NAME).write_text(json.dumps({**other, "heartbeat": now - 600}))
    with locks.hold(folder, lease_s=60):
        pass
    assert "no heartbeat for 600s (runtime.lock_lease_s=60)" in capsys.readouterr().out
    # Half-written by a holder killed at once: unreadable, taken over.
    (folder / locks.NAME).write_text("{\"host")
    with locks.hold(folder):
        pass
    assert "the lock file is unreadable" in capsys.readouterr().out


def test_heartbeat_is_refreshed_while_held(tmp_path):
    with locks.hold(tmp_path, lease_s=0.2):
        first = _lock(tmp_path)["heartbeat"]
        time.sleep(0.3)
        assert _lock(tmp_path)["heartbeat"] > first


@pytest.mark.parametrize("key", ["runtime.stop_timeout_s", "runtime.lock_lease_s"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_new_runtime_keys_must_be_positive(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}={value}(\.0)? must be > 0$"):
        load_config(None, ["model.path=x", f"{key}={value}"])
