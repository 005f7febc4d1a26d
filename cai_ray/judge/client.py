"""Score rows through the judge, from the driver or from Ray Data workers.

``JudgeClient(app_name)`` talks to the Serve application through a
``DeploymentHandle`` (the natural path inside a Ray cluster);
``JudgeClient(url=...)`` uses HTTP instead (outside Ray, or across clusters).

Every row comes back, in order, as exactly one of:
  scored  failed=False: the judge's verdict (value, parse_ok, raw, error from the parser;
          a verdict that did not parse stays parse_ok=False with value None);
  failed  failed=True: no verdict was obtained; ``error`` says why (a rejected
          request, or the judge unreachable after every retry).
Lost replicas, backpressure and timeouts are retried with jittered backoff, so a replica
killed mid-evaluation costs time, not rows.  Backpressure is Serve's own: past a replica's
``judge.max_ongoing_requests`` requests wait in its queue, and past ``judge.max_queued_requests``
Serve answers 503 at once (a handle raises BackPressureError); nothing ran, so a retry never
scores a row twice.  A rejected request (4xx) is never
retried: the same request would be rejected again.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from cai_ray.judge.serve import APP_NAME

FIELDS = ("rubric", "prompt", "response", "style", "id")
OPTIONAL = ("style", "id")
# Statuses a later attempt can fix: overload, a replica going away, a proxy timeout.
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})


class JudgeClient:
    """Picklable: ship it to Ray Data workers; each process opens its own connection."""

    def __init__(self, app_name: str = APP_NAME, url: str | None = None, max_in_flight: int = 32,
                 retries: int = 5, timeout_s: float = 300.0, backoff_s: float = 0.5,
                 overload_wait_s: float = 3600.0):
        if max_in_flight < 1 or retries < 0:
            raise ValueError(f"max_in_flight={max_in_flight} must be >= 1 and retries={retries} >= 0")
        self.app_name, self.url = app_name, url
        self.max_in_flight, self.retries = max_in_flight, retries
        self.timeout_s, self.backoff_s, self.overload_wait_s = timeout_s, backoff_s, overload_wait_s
        self._handle = None

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    def score(self, rows: list[dict]) -> list[dict]:
        """One result per row, in order; concurrency is capped at ``max_in_flight``."""
        rows = list(rows)
        if not rows:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(rows))) as pool:
            return list(pool.map(self.score_one, rows))

    def score_one(self, row: dict) -> dict:
        payload = {}
        for key in FIELDS:
            value = row.get(key)
            # Ray Data hands over a missing value as None, or NaN in a float column.
            if value is None or (key in OPTIONAL and value != value):
                continue
            # numpy.str_ and integer ids become plain str; other types go as they are, to be refused.
            payload[key] = str(value) if key == "id" or isinstance(value, str) else value
        attempt, error, overloaded, started = 0, "", 0, time.monotonic()
        while attempt - overloaded <= self.retries:
            attempt += 1
            try:
                body = self._send(payload)
            except Exception as exc:  # transport trouble: a dead replica, a refused connection, ...
                text = str(exc).strip().splitlines()
                full = type(exc).__name__ == "BackPressureError"  # the handle's form of Serve's 503
                body = {"status": 503, "error": f"{type(exc).__name__}: {text[0] if text else ''}",
                        "overloaded": full}
            if "status" not in body:
                return {**body, "failed": False, "attempts": attempt}
            error = f"{body['error']} (status {body['status']})"
            if body["status"] not in RETRYABLE:
                break
            # Back-pressure (the request never ran) is waited out up to overload_wait_s and does not use
            # up a retry: a flooded judge drains, and a row given up on is a judge failure, not a verdict.
            if body.get("overloaded", body["status"] == 503) and time.monotonic() - started < self.overload_wait_s:
                overloaded += 1
            # Jittered: clients turned away by one full queue must not all come back at once.
            time.sleep(min(self.backoff_s * 2 ** min(attempt - 1, 6), 10.0) * random.uniform(0.5, 1.0))
        return {"id": payload.get("id"), "rubric": payload.get("rubric"), "value": None, "parse_ok": False,
                "raw": None, "error": error, "fields": {}, "failed": True, "attempts": attempt}

    def _send(self, payload: dict) -> dict:
        if self.url is None:
            if self._handle is None:
                from ray import serve

                self._handle = serve.get_app_handle(self.app_name)
            response = self._handle.score.remote(payload)
            try:
                return response.result(timeout_s=self.timeout_s)
            except TimeoutError:
                response.cancel()  # do not leave the abandoned request queued on a replica
                raise
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                body = json.loads(text)
            except ValueError:  # Serve's own errors (503 backpressure, 500) are plain text
                body = {"error": text.strip()[:200] or exc.reason}
            return {**body, "status": exc.code}
