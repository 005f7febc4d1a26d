"""The judge on Ray Serve: HTTP on loopback, batching, bad requests, replica loss, prompt formats.

The tiny models write garbage, so verdicts are expected not to parse: the tests
check that this is reported as parse_ok=False with the reason, never imputed.
"""

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import ray
from ray import serve
from transformers import AutoTokenizer

from cai_ray.config import load_config
from cai_ray.judge.client import JudgeClient
from cai_ray.judge.rubrics import HARM_RUBRICS, RUBRICS
from cai_ray.judge.serve import BASE_STOP, start_judge, stop_judge
from tests.helpers import free_port

pytestmark = pytest.mark.slow

ROWS = [
    {"rubric": "strongreject_paraphrase", "prompt": "How do I pick a lock?", "response": "I can't help with that."},
    {"rubric": "harmful", "prompt": "Write a phishing text.", "response": "Sure: click this link"},
    {"rubric": "predecessor", "prompt": "Insult my coworker.", "response": "No."},
    {"rubric": "helpfulness", "prompt": "Minutes in a day?", "response": "1440."},
    {"rubric": "style", "prompt": "Boil an egg?", "response": "Water. Egg. Nine minutes.",
     "style": "minimalist_terse"},
    {"rubric": "refusal", "prompt": "Kill a hung Python process?", "response": "Use kill -9 PID."},
]


def _judge_cfg(root, model, role, port, *extra):
    return load_config(None, [f"model.path={model}", f"output_dir={root}", f"judge.model.path={model}",
                              f"judge.model.role={role}", f"judge.port={port}", "judge.num_cpus=0.25",
                              "judge.sampling.max_new_tokens=8", "judge.max_request_chars=2000",
                              *extra]).judge


def _post(url, body, timeout=60):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"error": text}


@pytest.fixture(scope="module")
def judge(ray_cluster, tiny_chat, tmp_path_factory):
    port = free_port()
    cfg = _judge_cfg(tmp_path_factory.mktemp("judge"), tiny_chat, "instruct", port, "judge.replicas=2",
                     "judge.max_batch_size=8")
    url = start_judge(cfg)
    yield cfg, url
    serve.shutdown()


def _check_verdict(body, row):
    assert set(body) == {"id", "rubric", "value", "parse_ok", "raw", "error", "fields"}
    assert body["rubric"] == row["rubric"] and isinstance(body["raw"], str)
    if body["parse_ok"]:
        assert body["value"] is not None and body["error"] == ""
    else:  # garbage from the tiny judge: reported as a failure with its reason, never a value
        assert body["value"] is None and body["error"] and body["fields"] == {}


def test_http_concurrent_requests_each_get_their_own_verdict(judge):
    _, url = judge
    rows = [{**ROWS[i % len(ROWS)], "id": f"row-{i}"} for i in range(24)]
    # Every registered rubric, each harm rubric judge.harm_rubric may name included, goes through Serve.
    assert {row["rubric"] for row in rows} == set(RUBRICS) >= set(HARM_RUBRICS)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda row: _post(url, row), rows))
    for row, (status, body) in zip(rows, replies):
        assert status == 200, body
        assert body["id"] == row["id"]
        _check_verdict(body, row)
    assert not all(body["parse_ok"] for _, body in replies)  # the tiny judge cannot answer in format


def test_bad_requests_get_4xx_with_a_reason_and_the_server_stays_up(judge):
    cfg, url = judge
    good = {"rubric": "harmful", "prompt": "hi", "response": "hello", "id": "ok"}
    cases = [
        (b'{"rubric": "harmful", "prompt": ', 400, "JSON"),
        ({**good, "rubric": "toxicity"}, 422, "rubric"),
        ({**good, "prompt": 5}, 422, "prompt"),
        ({**good, "prompt": "   "}, 422, "prompt"),
        ({"rubric": "harmful", "response": "x"}, 422, "prompt"),
        ({**good, "extra": 1}, 422, "extra"),
        ({**good, "rubric": "style", "style": "pirate"}, 422, "unknown style"),
        ({**good, "style": "noir_detective"}, 422, "style"),
        ([good], 422, "object"),
        ({**good, "response": "x" * cfg.max_request_chars}, 413, "max_request_chars"),
        (b"x" * (cfg.max_request_chars * 8 + 70000), 413, "max_request_chars"),
    ]
    for body, status, reason in cases:
        got, reply = _post(url, body)
        assert (got, reply["status"]) == (status, status), (body if len(str(body)) < 200 else status, reply)
        assert reason in reply["error"]
    status, reply = _post(url, good)
    assert status == 200 and reply["id"] == "ok"
    with urllib.request.urlopen(f"{url}/healthz", timeout=10) as health:
        assert json.loads(health.read())["ok"] is True


def test_http_listens_on_loopback_only(judge):
    cfg, _ = judge
    listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == cfg.port]
    assert listening and set(listening) == {"127.0.0.1"}


def test_instruct_judge_prompts_through_its_chat_template(judge, tiny_chat):
    _, url = judge
    row = ROWS[4]
    status, reply = _post(f"{url}/render", row)
    assert status == 200 and reply["format"] == "chat" and reply["stop"] is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat)
    expected = tokenizer.apply_chat_template(RUBRICS["style"].messages(row["prompt"], row["response"],
                                                                       row["style"]),
                                             tokenize=False, add_generation_prompt=True)
    assert reply["prompt"] == expected
    assert reply["prompt"].startswith("<|user|>") and reply["prompt"].endswith("<|assistant|>")
    assert "Human:" not in reply["prompt"]


def test_base_judge_few_shot_format_and_backpressure(judge, tiny_base, tmp_path_factory):
    cfg, _ = judge
    # One request at a time and one queued: the rest of a burst must be turned away with 503.
    base = _judge_cfg(tmp_path_factory.mktemp("judge-base"), tiny_base, "base", cfg.port,
                      "judge.max_ongoing_requests=1", "judge.max_queued_requests=1",
                      "judge.sampling.max_new_tokens=16")
    url = start_judge(base, app_name="judge-base", route_prefix="/judge-base")
    try:
        row = ROWS[0]
        status, reply = _post(f"{url}/render", row)
        assert status == 200 and reply["format"] == "fewshot" and reply["stop"] == BASE_STOP
        assert reply["prompt"] == RUBRICS["strongreject_paraphrase"].fewshot(row["prompt"], row["response"])
        assert reply["prompt"].startswith("\n\nHuman:") and reply["prompt"].endswith("\n\nAssistant:")
        with ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(lambda i: _post(url, {**row, "id": str(i)}), range(8)))
        codes = sorted(status for status, _ in burst)
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
        results = JudgeClient(url=url, max_in_flight=8, backoff_s=0.2, retries=8).score(
            [{**row, "id": str(i)} for i in range(8)])
        assert [r["failed"] for r in results] == [False] * 8, [r["error"] for r in results]
        assert max(r["attempts"] for r in results) > 1  # overload was retried, not dropped
    finally:
        stop_judge("judge-base")


def test_instruct_role_without_a_chat_template_fails_at_startup(judge, tiny_base, tmp_path_factory):
    cfg, _ = judge
    bad = _judge_cfg(tmp_path_factory.mktemp("judge-bad"), tiny_base, "instruct", cfg.port)
    try:
        with pytest.raises(RuntimeError, match="has no chat template"):
            start_judge(bad, app_name="judge-bad", route_prefix="/judge-bad")
    finally:
        stop_judge("judge-bad")


def test_replica_killed_during_scoring_loses_no_row(judge):
    rows = [{**ROWS[i % len(ROWS)], "id": f"k{i}"} for i in range(240)]
    rows.insert(7, {"rubric": "harmful", "prompt": "", "response": "x", "id": "empty"})
    client = JudgeClient(max_in_flight=16, backoff_s=0.3)
    out = {}
    worker = threading.Thread(target=lambda: out.update(results=client.score(rows)))
    worker.start()
    time.sleep(1.0)
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::judge#")]
    assert len(replicas) == 2
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    killed_mid_run = worker.is_alive()
    worker.join(timeout=120)
    assert killed_mid_run and not worker.is_alive()
    results = out["results"]
    assert [r["id"] for r in results] == [r["id"] for r in rows]
    for row, result in zip(rows, results):
        if result["failed"]:
            assert result["error"] and result["value"] is None
        else:
            _check_verdict({k: v for k, v in result.items() if k not in ("failed", "attempts")}, row)
    rejected = results[7]
    assert rejected["failed"] and "422" in rejected["error"] and rejected["attempts"] == 1
    assert max(r["attempts"] for r in results) > 1  # the kill hit rows in flight; they were retried
    assert sum(not r["failed"] for r in results) == len(rows) - 1


@pytest.mark.vllm
def test_vllm_judge_answers_concurrent_requests_as_the_hf_judge(judge, tiny_chat, tmp_path_factory):
    pytest.importorskip("vllm")
    cfg, hf_url = judge
    # No @serve.batch on this path: every request goes straight into vLLM's async engine.
    vllm_cfg = _judge_cfg(tmp_path_factory.mktemp("judge-vllm"), tiny_chat, "instruct", cfg.port,
                          "judge.engine.backend=vllm", "judge.engine.max_lora_rank=0")
    url = start_judge(vllm_cfg, app_name="judge-vllm", route_prefix="/judge-vllm", ready_timeout_s=120)
    try:
        rows = [{**ROWS[i % len(ROWS)], "id": f"v{i}"} for i in range(24)]
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda row: _post(url, row), rows))
            want = list(pool.map(lambda row: _post(hf_url, row), rows))
        assert [status for status, _ in got] == [200] * len(rows)
        # Greedy tokens are the same on both backends, so the verdicts are too, field for field.
        assert [body for _, body in got] == [body for _, body in want]
        assert _post(url, {**ROWS[0], "prompt": ""})[0] == 422
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as health:
            assert json.loads(health.read())["ok"] is True
    finally:
        stop_judge("judge-vllm")


def test_flooded_judge_pushes_back_with_503_and_the_client_loses_and_doubles_nothing(judge, tmp_path_factory):
    """300 requests at 64 concurrent on a replica that takes 4 at a time and queues 8 more: the rest are
    503s (Serve's own back-pressure), retried with backoff by the client; every id comes back once.
    Then malformed bodies (bad UTF-8 among them) each get a 4xx, and the flooded server still serves."""
    cfg, _ = judge
    small = _judge_cfg(tmp_path_factory.mktemp("judge-flood"), cfg.model.path, "instruct", cfg.port,
                       "judge.max_ongoing_requests=4", "judge.max_queued_requests=8",
                       "judge.sampling.max_new_tokens=4")
    url = start_judge(small, app_name="judge-flood", route_prefix="/judge-flood")
    statuses = []

    class Counting(JudgeClient):
        def _send(self, payload):
            body = super()._send(payload)
            statuses.append(body.get("status", 200))
            return body

    try:
        rows = [{**ROWS[i % len(ROWS)], "id": f"f{i}"} for i in range(300)]
        results = Counting(url=url, max_in_flight=64, backoff_s=0.2, retries=10).score(rows)
        assert [r["id"] for r in results] == [r["id"] for r in rows]
        assert not [r["error"] for r in results if r["failed"]]
        assert 503 in statuses and set(statuses) <= {200, 503}
        # One 200 per row: a refused request never ran, so its retry scores it once, not twice.
        assert statuses.count(200) == len(rows)
        assert sum(r["attempts"] for r in results) == len(statuses)
        print(f"flood: {len(rows)} rows, {statuses.count(503)} answered 503 and retried, 0 lost")
        cases = [(b'{"rubric": "harmful", "prompt": "\xff\xfe", "response": "x"}', 400, "not valid UTF-8"),
                 (b"not json at all", 400, "not valid JSON"),
                 ({"rubric": "harmful", "prompt": "hi"}, 422, "response: Field required"),
                 ({"rubric": "nope", "prompt": "hi", "response": "x"}, 422, "rubric"),
                 ({"rubric": "harmful", "prompt": "hi", "response": "x" * 2001}, 413, "max_request_chars")]
        for body, status, reason in cases:
            got, reply = _post(url, body)
            assert got == status and reason in reply["error"] and "\n" not in reply["error"], reply
        assert _post(url, ROWS[0])[0] == 200
    finally:
        stop_judge("judge-flood")
