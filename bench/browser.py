"""What a person sees in MLflow's UI after a small sweep (a manual check, not part of CI).

Runs the quickstart's sweep on a tiny size list (tiny models built in code), starts
``cai-ray ui`` on a free port, and takes headless-Chromium screenshots of: the experiment as
it opens, the runs table, the chart view, one evaluate run (overview and artifacts), the
sweep parent's plot, and the judge traces people review: the evaluate run's review list and one
trace with a person's feedback on it (logged here through MLflow's assessments API, as the UI's
feedback control would).  Look at the PNGs it lists.  Needs Debian's ``chromium``
(``apt-get install chromium``).

    python bench/browser.py [--out /tmp/cai-ray-browser]

A rerun with the same --out reuses the finished sweep (stages resume) and only retakes the
screenshots.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The probe's flags for Chromium on this kind of machine (no network but loopback, root).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cai_ray(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cai_ray", *args], cwd=ROOT, text=True, **kwargs)


def sweep_overrides(out: Path) -> list[str]:
    models = out / "models"
    # terse: replies end at min_new_tokens, so every harm prompt gives a pair and both sizes train
    # (the random base model's replies are cut at max_new_tokens, and cut replies give no pairs).
    for flavour in ("terse", "chat"):
        if not (models / f"tiny-{flavour}" / "config.json").is_file():
            cai_ray("tiny-model", str(models / f"tiny-{flavour}"), "--flavour", flavour, check=True)
    return [f"output_dir={out / 'run'}", f"model.path={models / 'tiny-terse'}",
            f"judge.model.path={models / 'tiny-chat'}", "sweep.sizes=[4,16]", "sweep.seeds=[0,1]",
            "generate.rounds=1", "generate.sampling.max_new_tokens=8", "generate.sampling.min_new_tokens=3",
            "evaluate.sampling.min_new_tokens=4", "dpo.max_steps=2", "train.checkpoint_every=2"]


def start_ui(overrides: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """`cai-ray ui` in the background; returns it and the URLs it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "cai_ray", "ui", "configs/quickstart.yaml", *overrides,
                             "--port", str(free_port())], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline(), proc.stdout.readline()]  # the experiment, its evaluate runs only
    if not all("http://" in line for line in lines):
        proc.terminate()
        raise SystemExit(f"cai-ray ui did not start: {lines!r}")
    print("".join(lines), end="")
    return proc, ["http://" + line.split("http://", 1)[1].split()[0] for line in lines]


def pages(out: Path, printed: list[str]) -> dict[str, str]:
    """name -> URL of each page to shoot, found in the run's MLflow store."""
    import mlflow

    base, mode = printed[0].split("/#")[0], "?workflowType=machine_learning"
    client = mlflow.MlflowClient(f"sqlite:///{out / 'run' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cai_ray")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("stage") == "sweep")
    # A rerun's stages find their outputs finished and log nothing new: show one that did the work.
    evaluate = next(r for r in runs if r.data.tags.get("stage") == "evaluate" and r.data.tags.get("size") not in
                    (None, "0") and r.data.metrics)
    e, p, v = exp.experiment_id, parent.info.run_id, evaluate.info.run_id
    trace = reviewed_trace(client, e, v)
    return {"1-as-printed-by-cai-ray-ui": printed[0],
            "2-experiment-without-mode": f"{base}/#/experiments/{e}",
            "2b-evaluate-runs-side-by-side": printed[1],
            "3-chart-view": f"{base}/#/experiments/{e}/runs{mode}&compareRunsMode=CHART",
            "4-evaluate-run": f"{base}/#/experiments/{e}/runs/{v}{mode}",
            "5-evaluate-artifacts": f"{base}/#/experiments/{e}/runs/{v}/artifacts{mode}",
            "6-sweep-plot": f"{base}/#/experiments/{e}/runs/{p}/artifacts/sweep.png{mode}",
            "7-sweep-table": f"{base}/#/experiments/{e}/runs/{p}/artifacts/sweep_summary.json{mode}",
            "8-traces-for-review": f"{base}/#/experiments/{e}/traces?compareRunsMode=TRACES",
            "9-trace-with-feedback": f"{base}/#/experiments/{e}/traces?selectedEvaluationId={trace}&traceId={trace}"
                                     f"&compareRunsMode=TRACES",
            "9b-trace-detail": f"{base}/#/experiments/{e}/traces/{trace}"}


def reviewed_trace(client, experiment: str, run_id: str) -> str:
    """A review trace of the run, with one HUMAN feedback on it (added once) so the shot shows both."""
    import mlflow
    from mlflow.entities import AssessmentSource

    traces = client.search_traces(locations=[experiment], run_id=run_id, max_results=50)
    trace = next(t for t in traces if t.info.tags.get("review") == "yes")
    if not any(a.source.source_type == "HUMAN" for a in trace.info.assessments or []):
        mlflow.set_tracking_uri(client.tracking_uri)
        value = "no" if trace.info.tags["metric"] in ("asr", "over_refusal") else 3
        mlflow.log_feedback(trace_id=trace.info.trace_id, name=trace.info.tags["metric"], value=value,
                            source=AssessmentSource(source_type="HUMAN", source_id="bench-reviewer"))
    return trace.info.trace_id


def shoot(chromium: str, url: str, png: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="cai-ray-chromium-") as profile:
        # Virtual time lets the single-page app fetch and render before the shot is taken.
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                        f"--screenshot={png}", url], check=True, capture_output=True, timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "cai-ray-browser")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    out = args.out.resolve()
    overrides = sweep_overrides(out)
    started = time.monotonic()
    cai_ray("sweep", "configs/quickstart.yaml", *overrides, f"judge.port={free_port()}", check=True)
    print(f"sweep: {time.monotonic() - started:.0f} s")
    proc, printed = start_ui(overrides)
    try:
        shots = out / "screenshots"
        shots.mkdir(exist_ok=True)
        for name, url in pages(out, printed).items():
            shoot(chromium, url, shots / f"{name}.png")
            print(f"{shots / name}.png  <- {url}")
    finally:
        proc.terminate()  # cai-ray ui stops its server's process group
        proc.wait(timeout=60)


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    main()
