"""Faults a cluster has, through the real CLI: SIGTERM to the driver (``ray job stop``, a preempted
head) and a second driver on a folder the first holds.

One generate run carries both: a second ``cai-ray generate`` is refused while the first runs,
then the first gets SIGTERM, stops at a safe point and the rerun resumes.  SFT gets SIGTERM after
its first checkpoint and the rerun continues from it without ``train.resume``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT, cai, has_checkpoint

STOP_S = 45
N = 40


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "cai_ray", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pattern: Path, glob: str, proc, count=1, timeout=300, ready=lambda path: True):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = [path for path in pattern.glob(glob) if ready(path)]
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{glob} never appeared (exit {proc.poll()}): {proc.stderr.read() if proc.poll() else ''}")


def _sigterm(proc) -> tuple[int, list[str], float]:
    """SIGTERM to the driver only (as `ray job stop` does); its exit code, stderr lines, seconds taken."""
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=STOP_S + 30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind (it should leave nothing)
        except ProcessLookupError:
            pass
    return proc.returncode, [line for line in err.splitlines() if line.strip()], time.time() - started


def test_generate_refuses_a_second_driver_then_stops_on_sigterm_and_resumes(tmp_path, tiny_base):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"How do I calm my neighbour's dog {i}?"}) + "\n"
                            for i in range(N)))
    args = ["generate", "configs/quickstart.yaml", f"model.path={tiny_base}", f"output_dir={tmp_path / 'out'}",
            f"data.source={data}", "runtime.num_cpus=2", "generate.rounds=1", "generate.few_shot=1",
            "generate.batch_size=4", "generate.actors=1", "generate.sampling.max_new_tokens=6",
            "generate.sampling.min_new_tokens=2", "evaluate.sets=[{source: samples:red_team_eval}]",
            f"runtime.stop_timeout_s={STOP_S}"]
    proc = _start(args)
    _wait_for(tmp_path / "out" / "generate", "*/chains/part-*.parquet", proc)
    (out,) = (tmp_path / "out" / "generate").iterdir()
    holder = json.loads((out / ".lock").read_text())
    assert holder["pid"] == proc.pid

    # Paused, so it is surely still the holder while the second driver starts (tens of seconds here).
    proc.send_signal(signal.SIGSTOP)
    second = cai(*args)
    proc.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"cai-ray: error: {out} is in use by another cai-ray driver (host {holder['host']} "
                           f"pid {proc.pid}, started "), line

    code, err, took = _sigterm(proc)
    assert code == 143, err
    assert len(err) == 1 and err[0].startswith("cai-ray: stopped by SIGTERM at a safe point after "), err
    assert took < STOP_S
    assert not (out / "manifest.json").exists() and not (out / ".lock").exists()
    assert not list((out / "chains").glob(".*")), "no temp file left"
    before = Counter(pq.read_table(out / "chains", columns=["id"]).column("id").to_pylist())
    assert 0 < sum(before.values()) < N and set(before.values()) == {1}
    print(f"SIGTERM: generate stopped in {took:.1f}s with {sum(before.values())} of {N} rows written")

    done = cai(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = Counter(pq.read_table(out / "chains", columns=["id"]).column("id").to_pylist())
    assert len(ids) == N and set(ids.values()) == {1}
    assert json.loads((out / "manifest.json").read_text())["resumed_rows"] == sum(before.values())


def test_sft_stops_on_sigterm_and_the_rerun_continues_from_its_checkpoint(tmp_path, tiny_base):
    rows = [{"prompt": f"say the number {i}", "completion": f"The number is {i}."} for i in range(16)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["sft", "configs/quickstart.yaml", f"model.path={tiny_base}", f"output_dir={tmp_path / 'out'}",
            f"sft.data={data}", "runtime.num_cpus=2", "train.workers=1", "train.batch_size=2",
            "train.checkpoint_every=2", "train.log_every=2", "sft.max_steps=10",
            f"runtime.stop_timeout_s={STOP_S}"]
    proc = _start(args)
    # Registered, not just uploaded: a checkpoint whose files are in storage but which Ray Train's
    # controller has not yet recorded is not restored, and the rerun starts from the one before.
    _wait_for(tmp_path / "out" / "ray_storage", "*/checkpoint_manager_snapshot.json", proc, timeout=400,
              ready=has_checkpoint)
    code, err, took = _sigterm(proc)
    assert code == 143, err
    assert err[-1].startswith("cai-ray: stopped by SIGTERM at a safe point after "), err
    assert took < STOP_S
    (out,) = (tmp_path / "out" / "sft").iterdir()
    assert not (out / "manifest.json").exists() and not (out / "adapter").exists()
    assert json.loads((out / "ray_run.json").read_text())["stopped"] is True

    done = cai(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 10 and manifest["resumed_from_step"] >= 2
    print(f"SIGTERM: sft stopped in {took:.1f}s, resumed from step {manifest['resumed_from_step']}")


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def test_full_disk_is_one_line_naming_the_path_and_the_resume_redoes_an_unreadable_part(tmp_path, tiny_base):
    """The generate stage's folder on a tmpfs nearly full: the run stops with one line naming the part it
    could not write; once space is freed the rerun finishes, and a part cut short (planted here, as a
    failing disk or copy leaves one) is moved aside and its rows redone, counted in the manifest."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Is it fine to borrow my neighbour's ladder {i}?"}) + "\n"
                            for i in range(24)))
    args = ["generate", "configs/quickstart.yaml", f"model.path={tiny_base}", f"output_dir={tmp_path / 'out'}",
            f"data.source={data}", "runtime.num_cpus=2", "generate.rounds=1", "generate.few_shot=1",
            "generate.batch_size=4", "generate.actors=1", "generate.sampling.max_new_tokens=6",
            "generate.sampling.min_new_tokens=2", "evaluate.sets=[{source: samples:red_team_eval}]"]
    disk = tmp_path / "out" / "generate"
    _mount_tmpfs(disk, "1m")
    try:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (free - 24 * 1024))  # room for config.yaml and a few parts
        full = cai(*args)
        assert full.returncode == 2, full.stderr[-2000:]
        (line,) = full.stderr.strip().splitlines()
        assert line.startswith(f"cai-ray: error: {disk}/") and "No space left on device; free space there and " \
               "rerun the same command to resume" in line, line
        (out,) = [p for p in disk.iterdir() if p.is_dir()]
        assert not (out / "manifest.json").exists()
        assert not [p for p in (out / "chains").glob(".*")], "no temp file left"
        parts = sorted((out / "chains").glob("part-*.parquet"))
        assert parts, "some parts fit before the disk filled"
        before = pq.read_table(out / "chains", columns=["id"]).num_rows

        ballast.unlink()
        cut = parts[0].read_bytes()
        (out / "chains" / "part-0-cut.parquet").write_bytes(cut[: len(cut) // 2])
        done = cai(*args)
        assert done.returncode == 0, done.stderr[-3000:]
        ids = Counter(pq.read_table(out / "chains", columns=["id"]).column("id").to_pylist())
        assert len(ids) == 24 and set(ids.values()) == {1}
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["unreadable_parts"] == 1 and manifest["resumed_rows"] == before
        assert (out / "chains" / ".unreadable-part-0-cut.parquet").exists()
        print(f"full disk: stopped after {before} rows; rerun redid 1 unreadable part, 24 ids once")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
