"""Ray Jobs: a real `ray start --head` on loopback, `cai-ray submit`, outputs found, cluster stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, free_ports


@pytest.fixture
def head(tmp_path):
    """A private Ray head on 127.0.0.1, stopped by killing its process group (not `ray stop`,
    which would also stop every other Ray on the machine)."""
    gcs, dash, agent, agent_grpc, runtime_env, client_port = free_ports(6)
    # Ray's socket paths must stay under ~107 bytes: pytest's tmp_path is too deep.
    temp = tempfile.mkdtemp(prefix="cairay-head-", dir="/tmp")
    # The job runs `python -m cai_ray ...`: on this head, `python` is this environment's, as on a
    # cluster node where the project is installed (cluster.yaml's setup_commands).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2",
         # Another Ray on this machine (the test session's) holds the default agent ports; a head
         # that cannot bind them has no job agent and refuses every submission.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client_port}", f"--temp-dir={temp}",
         "--include-dashboard=true"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "head.log").open("w"))
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 240  # a loaded 2-core machine can take a minute
    from cai_ray.submit import client

    while True:
        try:
            client(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("ray start --head did not come up: "
                            + (tmp_path / "head.log").read_text()[-2000:])
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)  # a private head: what has not stopped by then is killed with its group
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def test_submit_a_stage_and_find_its_outputs(head, tmp_path, tiny_base):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "cai_ray", "submit", "configs/quickstart.yaml",
            f"model.path={tiny_base}", f"output_dir={out}", "data.limit=4", "generate.actors=1",
            "generate.rounds=1", "generate.sampling.max_new_tokens=4", "evaluate.sets=[{source: samples:red_team_eval}]",
            "--command", "generate", "--address", head]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout
    (manifest,) = (out / "generate").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["chains"] == 4
    job_id = done.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    listed = subprocess.run([sys.executable, "-m", "cai_ray", "jobs", "list", "--address", head],
                            capture_output=True, text=True, cwd=ROOT)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert any("g6" in t["node_config"]["InstanceType"] for t in types.values())
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert any("[vllm]" in c for c in config["setup_commands"])


def test_submit_builds_runtime_env_without_uploading_outputs():
    from cai_ray.submit import build_job

    job = build_job("generate", str(ROOT / "configs/quickstart.yaml"), ["generate.rounds=2"], ["vllm"])
    assert job["entrypoint"] == "python -m cai_ray generate configs/quickstart.yaml generate.rounds=2"
    assert job["runtime_env"]["working_dir"] == str(ROOT)
    assert {".venv", "outputs"} <= set(job["runtime_env"]["excludes"])
    assert any(r.startswith("vllm") for r in job["runtime_env"]["pip"])
    with pytest.raises(ValueError, match="unknown extra"):
        build_job("generate", str(ROOT / "configs/quickstart.yaml"), [], ["nope"])
