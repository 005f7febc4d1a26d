"""The judge as a Ray Serve application: one engine per replica, requests batched.

Requests arrive over HTTP (POST JSON to ``http://HOST:PORT/judge``) or through a
``DeploymentHandle`` (``serve.get_app_handle("judge").score.remote(dict)``); both
paths validate with the same schema and return the same body:

    verdict  {id, rubric, value, parse_ok, raw, error, fields}
    rejected {id, status, error}     (HTTP: the same status code; no retry helps)

Each request goes straight to the engine's ``agenerate``, which batches across
requests: vLLM continuously (a request joins the running batch and leaves it
when done), hf by running what arrived while its previous call ran as the next
call, in whole ``judge.engine.batch_size`` chunks, with no batch timeout (a lone
request starts at once).

The prompt format follows ``judge.model.role`` and is fixed when a replica
starts: an instruct judge always sees the rubric's chat messages through its
own chat template, a base judge the rubric's few-shot text, cut at the next
``Human:`` turn.  ``POST /judge/render`` returns the exact prompt text for a
request, so the format can be checked from outside.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
import zlib
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from cai_ray.config import JudgeConfig
from cai_ray.judge.rubrics import RUBRICS, get_rubric

APP_NAME = "judge"
ROUTE_PREFIX = "/judge"
# A base judge that keeps going writes the next few-shot turn; it is not part of the verdict.
BASE_STOP = ["\n\nHuman:"]
# JSON escapes can grow a character to 6 bytes ("\uXXXX"); past this a body is refused unread.
_BODY_BYTES_PER_CHAR = 6
_BODY_SLACK = 64 * 1024


class JudgeRequest(BaseModel):
    """One row to judge.  Strict: no coercion, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid")
    rubric: Literal[tuple(RUBRICS)]  # type: ignore[valid-type]
    prompt: str
    response: str
    style: Optional[str] = None
    id: Optional[str] = None


class RequestError(ValueError):
    """A request the judge refuses; ``status`` is the HTTP code that says why."""

    def __init__(self, status: int, reason: str, request_id: str | None = None):
        super().__init__(reason)
        self.status, self.reason, self.request_id = status, reason, request_id

    def body(self) -> dict:
        return {"id": self.request_id, "status": self.status, "error": self.reason}


def parse_request(payload: Any, max_chars: int) -> JudgeRequest:
    """Validate a dict (handle) or raw JSON bytes (HTTP); RequestError says what is wrong."""
    raw = isinstance(payload, (bytes, bytearray))
    if raw and len(payload) > max_chars * _BODY_BYTES_PER_CHAR + _BODY_SLACK:
        raise RequestError(413, f"body has {len(payload)} bytes; judge.max_request_chars is {max_chars}")
    if raw:
        try:
            bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"body is not valid UTF-8 (byte 0x{payload[exc.start]:02x} at offset "
                                    f"{exc.start}); send JSON encoded as UTF-8") from None
    try:
        req = JudgeRequest.model_validate_json(payload) if raw else JudgeRequest.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        request_id = payload.get("id") if isinstance(payload, dict) else None
        if any(e["type"] == "json_invalid" for e in errors):
            raise RequestError(400, f"body is not valid JSON ({errors[0]['msg']})", request_id) from None
        reason = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)
        raise RequestError(422, reason, request_id) from None
    if not req.prompt.strip():
        raise RequestError(422, "prompt: is empty", req.id)
    size = len(req.prompt) + len(req.response)
    if size > max_chars:
        raise RequestError(413, f"prompt+response have {size} characters; judge.max_request_chars "
                                f"is {max_chars}", req.id)
    return req


@serve.deployment(name="JudgeDeployment")
class JudgeDeployment:
    def __init__(self, judge: JudgeConfig):
        from cai_ray.engines import make_engine

        self.judge = judge
        self._failure: str | None = None
        # The judge serves no adapter: vLLM starts without LoRA.
        self._engine = make_engine(judge.model, judge.engine, lora=False, share=judge.num_gpus)
        if judge.model.role == "instruct":
            # Fails here, at start-up, for a model without a chat template.
            self._engine.chat_format([{"role": "user", "content": "x"}])
            self.format, self._stop = "chat", None
        else:
            self.format, self._stop = "fewshot", list(BASE_STOP)

    def __del__(self):  # Serve calls it when the replica shuts down
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            engine.close()

    def check_health(self) -> None:
        if self._engine is None:
            raise RuntimeError("judge engine is not loaded")
        if self._failure:
            # Serve replaces an unhealthy replica; an engine that raised is not trusted again.
            raise RuntimeError(f"judge engine failed: {self._failure}")

    def _prompt(self, req: JudgeRequest) -> str:
        rubric = get_rubric(req.rubric)
        try:
            if self.format == "chat":
                return self._engine.chat_format(rubric.messages(req.prompt, req.response, req.style))
            return rubric.fewshot(req.prompt, req.response, req.style)
        except ValueError as exc:  # unknown style, or a style given to a rubric without one
            raise RequestError(422, str(exc), req.id) from None

    async def _verdict(self, req: JudgeRequest) -> dict:
        prompt = self._prompt(req)
        # Seeds follow the prompt text, so a sampled verdict does not depend on its batch-mates.
        seed = self.judge.sampling.seed + zlib.crc32(prompt.encode())
        try:
            done, = await self._engine.agenerate([prompt], self.judge.sampling, seeds=[seed], stop=self._stop)
        except Exception as exc:
            self._failure = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise
        if done.finish_reason == "error":
            return RequestError(413, f"judge could not run the prompt: {done.error}", req.id).body()
        verdict = get_rubric(req.rubric).parse(done.text)
        return {"id": req.id, "rubric": req.rubric, "value": verdict.value, "parse_ok": verdict.parse_ok,
                "raw": verdict.raw, "error": verdict.error, "fields": verdict.fields}

    async def score(self, payload: dict) -> dict:
        """Handle entry point: a verdict, or a rejection body with its status."""
        try:
            return await self._verdict(parse_request(payload, self.judge.max_request_chars))
        except RequestError as exc:
            return exc.body()

    async def render(self, payload: dict) -> dict:
        """The exact prompt the judge model would see for ``payload``."""
        try:
            return self._render(parse_request(payload, self.judge.max_request_chars))
        except RequestError as exc:
            return exc.body()

    def _render(self, req: JudgeRequest) -> dict:
        return {"id": req.id, "format": self.format, "prompt": self._prompt(req), "stop": self._stop}

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        sub = request.url.path[len(request.scope.get("root_path", "")):].strip("/")
        if request.method == "GET" and sub == "healthz":
            return JSONResponse({"ok": self._failure is None, "format": self.format,
                                 "model": self.judge.model.path})
        if request.method != "POST" or sub not in ("", "render"):
            return JSONResponse({"status": 404, "error": f"no route {request.method} /{sub}; "
                                 "use POST / (score), POST /render or GET /healthz"}, status_code=404)
        try:
            req = parse_request(await request.body(), self.judge.max_request_chars)
            body = self._render(req) if sub else await self._verdict(req)
        except RequestError as exc:
            body = exc.body()
        except Exception as exc:  # the engine failed; the client may retry on another replica
            body = {"id": None, "status": 500, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        return JSONResponse(body, status_code=body.get("status", 200))


def judge_app(judge: JudgeConfig):
    """The judge application, with replicas, placement and backpressure from config."""
    from cai_ray.runtime import placement

    return JudgeDeployment.options(
        num_replicas=judge.replicas,
        # num_cpus/num_gpus plus judge.resources and judge.labels; fails if no node has them.
        ray_actor_options=placement("judge", judge).ray_options(),
        max_ongoing_requests=judge.max_ongoing_requests,
        max_queued_requests=judge.max_queued_requests,
        # A judge that cannot start (bad path, no chat template, no memory) fails the same way
        # again: report it after one attempt instead of after Serve's default of 20.
        max_constructor_retry_count=1,
        # One access-log line per judged row would drown the driver's output.
        logging_config={"enable_access_log": False},
    ).bind(judge)


def start_judge(judge: JudgeConfig, app_name: str = APP_NAME, route_prefix: str = ROUTE_PREFIX,
                ready_timeout_s: float = 30.0) -> str:
    """Deploy the judge on the connected Ray cluster and return its URL once it answers.

    Serve's HTTP options only take effect when Serve first starts, so they are
    set here before ``serve.run``; if Serve already runs elsewhere, the URL check
    below says so instead of leaving the judge on an unexpected port.
    """
    if not judge.model.path:
        raise ValueError("judge.model.path is empty; set it to the judge model folder or hub id")
    app = judge_app(judge)  # placement is checked here: no node with judge.resources is its own line
    serve.start(http_options={"host": judge.host, "port": judge.port})
    try:
        serve.run(app, name=app_name, route_prefix=route_prefix)
    except RuntimeError as exc:
        # serve.run only says the deployment failed; the replica's traceback is in its status.
        status = serve.status().applications.get(app_name)
        text = "\n".join([str(exc)] + [d.message for d in (status.deployments.values() if status else [])])
        causes = [ln.strip() for ln in text.splitlines() if re.match(r"\s*\w*(Error|Exception): ", ln)]
        raise RuntimeError(f"judge app {app_name!r} failed to start: "
                           f"{causes[-1] if causes else str(exc).splitlines()[0]}") from None
    host = "127.0.0.1" if judge.host in ("0.0.0.0", "::", "") else judge.host
    url = f"http://{host}:{judge.port}{route_prefix}"
    deadline, last = time.monotonic() + ready_timeout_s, ""
    while time.monotonic() < deadline:  # the proxy learns new routes a moment after serve.run
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as reply:
                if reply.status == 200:
                    return url
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"judge deployed but {url}/healthz does not answer ({last}); Serve may have been "
                       f"started earlier with other HTTP options: run serve.shutdown() first")


def stop_judge(app_name: str = APP_NAME) -> None:
    """Remove the judge application; Serve itself (and other apps) keep running."""
    serve.delete(app_name)

