import ipaddress
import os

import psutil
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
