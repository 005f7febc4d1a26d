"""The terminal shows our lines; everything else (Python, C level, child processes) goes to the log."""

import subprocess
import sys
import textwrap
from pathlib import Path

from cai_ray import console

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, time
    from pathlib import Path
    from cai_ray import console

    console.capture(Path(sys.argv[1]), "demo")
    console.say("ours: start")
    print("ours: a table a stage prints")
    sys.stderr.write("lib: python stderr\\n")
    logging.getLogger("lib").warning("lib: logging")
    os.write(1, b"lib: fd 1\\n")
    os.write(2, b"lib: fd 2\\n")
    subprocess.run(["echo", "lib: child process"])
    bar = console.progress("demo", total=4, unit="rows")
    for _ in range(4):
        bar.advance(1)
        time.sleep(0.05)
    bar.done()
    console.error("cai-ray: error: demo")
    console.release()
    print("ours: after release")
""")


def test_capture_keeps_our_lines_on_the_terminal_and_the_rest_in_the_log(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[:2] == ["ours: start", "ours: a table a stage prints"]
    assert out[2].startswith("  demo: 4/4 rows") and out[-1] == "ours: after release"
    assert len(out) == 4, out
    assert done.stderr == "cai-ray: error: demo\n"
    (log,) = (tmp_path / "logs").glob("demo-*.log")
    text = log.read_text()
    for line in ("lib: python stderr", "lib: logging", "lib: fd 1", "lib: fd 2", "lib: child process",
                 "ours: start", "ours: a table a stage prints", "demo: 4/4 rows", "cai-ray: error: demo"):
        assert line in text, line
    assert "after release" not in text


def test_progress_text_rate_and_eta():
    bar = console.progress("sft", total=10, unit="steps")
    try:
        assert "0/10 steps  starting" in bar.text()
        bar.update(2)
        bar.started, bar.first, bar.last, bar.count = 90.0, (100.0, 2), 108.0, 6
        line = bar.text()  # 4 steps in 8 s after the first one seen: start-up left out
        assert "6/10 steps  0.5 steps/s" in line and line.endswith("ETA 0:08")
        bar.first, bar.last = (100.0, 2), 102.0  # too short to tell: no rate, no ETA
        assert "6/10 steps  " in bar.text() and "/s" not in bar.text() and "ETA" not in bar.text()
        assert "6/10 steps  0.5 steps/s" in bar.text(final=True)  # the end line: the plain average
        bar.update(3)  # never backwards
        assert bar.count == 6
    finally:
        bar.done()


def test_stage_lines_name_the_output_and_stop_bars_on_failure(capsys):
    with console.stage("generate", "demo-generate") as shown:
        shown["result"] = {"chains": 4, "pairs": 3, "rejects": 1, "error_rate": 0.25, "output": "/x/generate/ab"}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "== demo-generate"
    assert "chains 4; pairs 3; rejects 1; error_rate 0.25 -> /x/generate/ab" in lines[1]
    try:
        with console.stage("sft", "demo-sft"):
            bar = console.progress("sft", total=5, unit="steps")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert bar._stop.is_set() and "demo-sft failed after" in capsys.readouterr().out
