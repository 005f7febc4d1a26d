import ipaddress
import os
import socket

import psutil
import pytest
import ray

from cai_ray.runtime import cluster_address, worker_env
from tests.conftest import make_config


def _ray_pids():
    """This test process, its children, and every Ray process of this session's cluster."""
    me = psutil.Process()
    pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
    session = ray.get_runtime_context().gcs_address
    for proc in psutil.process_iter(["cmdline"]):
        if session.split(":")[-1] in " ".join(proc.info["cmdline"] or []):
            pids.add(proc.pid)
    return pids


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_local_ray_listens_on_loopback_only(ray_cluster):
    @ray.remote
    def env():
        return {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE",
                                               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}

    seen = ray.get(env.remote())
    assert seen == {"MLFLOW_TRACKING_URI": ray_cluster.tracking_uri, "HF_HUB_OFFLINE": "1",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    pids = _ray_pids()
    assert len(pids) > 3  # gcs, raylet, workers: the check below really looked at Ray
    exposed = [(c.pid, c.laddr) for c in psutil.net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN and c.pid in pids
               and not _loopback(c.laddr.ip)]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_attach_address_and_worker_env(tmp_path, tiny_base, monkeypatch):
    cfg = make_config(tmp_path, tiny_base)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(cfg) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")   # as inside a Ray Job
    assert cluster_address(cfg) == "10.0.0.5:6379"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in worker_env(cfg, local=False)
    assert worker_env(cfg, local=True)["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    explicit = make_config(tmp_path, tiny_base, "runtime.address=ray://head:10001")
    assert cluster_address(explicit) == "ray://head:10001"


def test_hub_access_follows_config_then_environment_and_reaches_workers(ray_cluster, tmp_path, tiny_base,
                                                                        monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    online = make_config(tmp_path, tiny_base, "runtime.offline=false")
    env = worker_env(online, local=True)
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "0"
    assert worker_env(make_config(tmp_path, tiny_base, "runtime.offline=true"), local=True)["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # unset in config: the driver's environment decides
    assert worker_env(make_config(tmp_path, tiny_base), local=True)["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert worker_env(make_config(tmp_path, tiny_base), local=True)["HF_HUB_OFFLINE"] == "0"

    @ray.remote
    def seen():
        return {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME")}

    got = ray.get(seen.options(runtime_env={"env_vars": env}).remote())
    assert got == {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token", "HF_HOME": str(tmp_path / "hf")}


def _cache_repo(hub_cache, repo: str, files: dict[str, str]) -> None:
    """The hub cache layout huggingface_hub reads offline: refs/main -> snapshots/<commit>/files."""
    folder = hub_cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)


def test_models_are_checked_before_any_actor_starts(tmp_path, tiny_base, tiny_chat, monkeypatch):
    import huggingface_hub.constants as hub

    from cai_ray.runtime import OFFLINE_KEYS, preflight

    # preflight applies the hub setting to this process: restore it after the test.
    for key in OFFLINE_KEYS:
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)
    cfg = make_config(tmp_path, tiny_base, f"judge.model.path={tiny_chat}", "runtime.offline=true")
    assert preflight(cfg, "run") == [tiny_base, tiny_chat]
    assert preflight(cfg, "generate") == [tiny_base]
    with pytest.raises(ValueError, match=r"^judge.model.path=/nope/judge: no such folder"):
        preflight(make_config(tmp_path, tiny_base, "judge.model.path=/nope/judge"), "evaluate")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no config.json or no tokenizer file"):
        preflight(make_config(tmp_path, half), "sft")

    # A hub id, offline: resolvable only from the local cache.
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_cfg = make_config(tmp_path, "org/tiny", "runtime.offline=true")
    with pytest.raises(ValueError, match=r"^model.path=org/tiny: hub access is off .* not in the local hub cache"):
        preflight(hub_cfg, "generate")
    _cache_repo(tmp_path / "hub", "org/tiny", {"config.json": "{}", "tokenizer_config.json": "{}"})
    assert preflight(hub_cfg, "generate") == ["org/tiny"]

    # Online, with a hub that does not answer: one line naming the key, before anything runs.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(ValueError, match=r"^model.path=org/tiny: not resolvable on the hub"):
        preflight(make_config(tmp_path, "org/tiny", "runtime.offline=false"), "generate")


def test_cli_stops_on_a_missing_model_before_writing_anything(tmp_path, tiny_base):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "cai_ray", "run", "configs/quickstart.yaml",
                           f"model.path={tiny_base}", "judge.model.path=/nope/judge", f"output_dir={out}"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["cai-ray: error: judge.model.path=/nope/judge: no such folder "
                                                "(and not a hub id like org/name)"]
    assert not out.exists()


def test_local_placement_drops_node_choices_and_fails_at_once_on_missing_gpus(ray_cluster, tmp_path, tiny_base):
    import time

    from cai_ray.runtime import placement

    cfg = make_config(tmp_path, tiny_base, "generate.resources={gen: 1}", "generate.labels={tier: gpu}",
                      "train.use_gpu=true", "runtime.placement_timeout_s=600")
    req = placement("generate", cfg.generate)
    assert req.ray_options() == {"num_cpus": 1.0}
    started = time.time()
    with pytest.raises(RuntimeError, match=r"^train \(sft, dpo\): no node offers resource 'GPU'.*train.use_gpu"):
        placement("train", cfg.train)
    assert time.time() - started < 10  # a private local Ray never grows: no waiting
