"""Experiment tracking: a small ``Store`` protocol, MLflow and null implementations.

``MlflowStore`` talks to MLflow through an explicit ``MlflowClient`` bound to a
tracking URI and a run id, never through MLflow's process-global active run.
That makes it picklable and usable unchanged from Ray actors, tasks and train
workers: ship the store (URI + run id) and log into the same run.  Rank 0 of a
training job logs; every other rank gets a ``NullStore``.

Tracking never fails the work.  Every call is retried with backoff (a server
restarting, sqlite's "database is locked"); a call that still fails is dropped
and its points counted, and for ``tracking.pause_s`` afterwards calls are
dropped at once, so a dead server costs a training loop one backoff, not one
per step.  Each process writes its counts under ``{output_dir}/.tracking_lost/``
(shared storage on a cluster), and the command's top run sums and prints them
when it ends.

Why our own layer and not MLflow's (issue 22): MLflow's client retries cover HTTP calls only
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), not a sqlite store's "database is locked"; after its last
retry the call raises, with no drop-and-count and no pause, so a dead server would cost each
training step the whole backoff.  Async logging (``synchronous=False``) queues points but reports
a failure only when the queue is flushed, and counts nothing it lost.  We keep MLflow's HTTP
timeout and turn its retries off (MLFLOW_HTTP_ENV) so one backoff policy applies.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from cai_ray import console
from cai_ray.files import write_atomic

# MLflow errors no retry can fix: the call is dropped at once (and counted).
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}
# Our retries replace MLflow's own HTTP retries (7 by default, minutes of backoff per call).
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_paused_until: dict[str, float] = {}   # tracking URI -> monotonic time until which calls are dropped
_lost: dict[str, Counter] = {}         # ledger (or URI) -> points this process dropped


# MLflow 3.17's UI opens an experiment without this tag on its GenAI traces page (empty for us);
# "custom_model_development" is its "Machine learning" kind, which opens on the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


@runtime_checkable
class Store(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_table(self, rows: dict[str, list] | Any, name: str) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_config(self, cfg: Any) -> None: ...
    def log_dataset(self, path: str | Path, name: str, context: str) -> None: ...
    def log_traces(self, records: list[dict]) -> int: ...
    def child(self, name: str, tags: dict[str, Any] | None = None) -> "Store": ...
    def end(self, status: str = "FINISHED") -> None: ...


class NullStore:
    """Does nothing; for non-zero ranks and for tracking.enabled=false."""

    run_id = None

    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None): pass
    def set_tags(self, tags): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_text(self, text, name): pass
    def log_table(self, rows, name): pass
    def log_figure(self, figure, name): pass
    def log_config(self, cfg): pass
    def log_dataset(self, path, name, context): pass
    def log_traces(self, records): return 0
    def child(self, name, tags=None): return NullStore()
    def end(self, status="FINISHED"): pass


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become JSON strings (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


def retrying(call: Callable[[], Any], retries: int, first_wait: float = 0.5) -> Any:
    """``call()``, retried ``retries`` times with doubling waits unless the error is permanent."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == retries or getattr(exc, "error_code", None) in PERMANENT:
                raise
            time.sleep(first_wait * 2 ** attempt)


def _guarded(kind: str, points: Callable[..., int] = lambda *a, **k: 1):
    """Run a store method through the retry layer; ``points`` counts what a drop loses."""
    def wrap(method):
        @functools.wraps(method)
        def inner(self, *args, **kwargs):
            return self._guard(kind, points(*args, **kwargs), method, *args, **kwargs)
        return inner
    return wrap


def lost_points(ledger: str | None, uri: str = "") -> Counter:
    """Points dropped for one command: every process's file in its ledger folder (or, without
    a ledger, this process's count for the URI)."""
    if not ledger:
        return Counter(_lost.get(uri, {}))
    total: Counter = Counter()
    for path in Path(ledger).glob("*.json"):
        try:
            total.update(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return total


class MlflowStore:
    """Logs into one MLflow run, addressed by (tracking URI, run id).

    ``run_id`` None is a run that could not be created: its calls are counted as lost.
    """

    def __init__(self, uri: str, run_id: str | None, ledger: str | None = None,
                 retry: tuple[int, float] = (4, 30.0)):
        self.uri = uri
        self.run_id = run_id
        self.ledger = ledger
        self.retry = retry
        self.reports_losses = False
        self._client = None

    @classmethod
    def start(cls, uri: str, experiment: str, name: str, tags: dict[str, Any] | None = None,
              parent_run_id: str | None = None, artifact_location: str | None = None) -> "MlflowStore":
        from mlflow.tracking import MlflowClient

        _mlflow_env()
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
            if artifact_location and exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
                _warn(f"experiment {experiment!r} keeps the artifact location it was created with, "
                      f"{exp.artifact_location} (not {artifact_location}); use a new tracking.experiment to move it")
        if exp is None or EXPERIMENT_KIND[0] not in exp.tags:
            client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=name, tags=all_tags)
        store = cls(uri, run.info.run_id)
        store._client = client
        return store

    def __getstate__(self):
        # The client holds a DB engine; workers build their own from the URI.
        return {"uri": self.uri, "run_id": self.run_id, "ledger": self.ledger, "retry": self.retry}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["run_id"], state.get("ledger"), tuple(state.get("retry", (4, 30.0))))

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            _mlflow_env()
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _guard(self, kind: str, points: int, method: Callable, *args, **kwargs) -> Any:
        """One tracking call through retries; a call that still fails is dropped and counted."""
        retries, pause = self.retry
        if self.run_id is None or time.monotonic() < _paused_until.get(self.uri, 0.0):
            return self._drop(kind, points, None)
        try:
            return retrying(lambda: method(self, *args, **kwargs), retries)
        except Exception as exc:  # noqa: BLE001 - tracking never fails the work
            if getattr(exc, "error_code", None) not in PERMANENT:
                _paused_until[self.uri] = time.monotonic() + pause
            return self._drop(kind, points, exc)

    def _drop(self, kind: str, points: int, exc: Exception | None) -> None:
        counts = _lost.setdefault(self.ledger or self.uri, Counter())
        counts[kind] += points
        if exc is not None:  # one line per failure that was really tried, not per dropped call
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            _warn(f"{kind} for run {self.run_id} not logged to {self.uri} after {self.retry[0]} retries "
                  f"({type(exc).__name__}: {reason}); the work goes on, calls in the next "
                  f"{self.retry[1]:g}s are dropped and counted")
        if self.ledger:
            try:
                path = Path(self.ledger) / f"{socket.gethostname()}-{os.getpid()}.json"
                write_atomic(path, json.dumps(dict(counts)))
            except OSError:
                pass  # the count stays in this process; the warning above was printed
        return None

    @_guarded("params", lambda params: len(params))
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow caps one batch at 100 params and a value at 6000 characters.
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    @_guarded("metrics", lambda metrics, step=None: len(metrics))
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    @_guarded("tags", lambda tags: len(tags))
    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, str(key), str(value))

    @_guarded("artifacts")
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_guarded("artifacts")
    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    @_guarded("artifacts")
    def log_table(self, rows: Any, name: str) -> None:
        self.client.log_table(self.run_id, data=rows, artifact_file=name)

    @_guarded("artifacts")
    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_config(self, cfg: Any) -> None:
        """The resolved config, as flat params and as a YAML artifact."""
        from cai_ray.config import to_dict, to_yaml

        self.log_params(flatten(to_dict(cfg)))
        self.log_text(to_yaml(cfg), "config.yaml")

    @_guarded("datasets")
    def log_dataset(self, path: str | Path, name: str, context: str) -> None:
        """A parquet/jsonl file as a run input (MLflow's Datasets tab: digest, schema, row count)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        path = Path(path)
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
        dataset = mlflow.data.from_pandas(frame, source=str(path.resolve()), name=name)
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=[tag])])

    @_guarded("traces", lambda records: len(records))
    def log_traces(self, records: list[dict]) -> int:
        """One trace per record (name, inputs, outputs, tags) on this run; returns how many.

        MLflow's trace exporter writes to the process-wide tracking URI, not to the client's,
        so the URI is set for the duration and the async queue flushed before it is restored.
        """
        import mlflow

        exp_id = self.client.get_run(self.run_id).info.experiment_id
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        try:
            for record in records:
                span = self.client.start_trace(name=record["name"], inputs=record["inputs"], tags=record["tags"],
                                               experiment_id=exp_id, run_id=self.run_id)
                self.client.end_trace(span.trace_id, outputs=record["outputs"])
            mlflow.flush_trace_async_logging()
        finally:
            mlflow.set_tracking_uri(before)
        return len(records)

    def child(self, name: str, tags: dict[str, Any] | None = None) -> "MlflowStore":
        """A nested run; if it cannot be created, a store whose calls are counted as lost."""
        made = self._guard("runs", 1, MlflowStore._start_child, name, tags)
        return made or MlflowStore(self.uri, None, self.ledger, self.retry)

    def _start_child(self, name: str, tags: dict[str, Any] | None) -> "MlflowStore":
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        exp = self.client.get_experiment(exp_id)
        child = MlflowStore.start(self.uri, exp.name, name, tags, parent_run_id=self.run_id)
        child.ledger, child.retry = self.ledger, self.retry
        return child

    def end(self, status: str = "FINISHED") -> None:
        self._guard("runs", 1, MlflowStore._terminate, status)
        lost = lost_points(self.ledger, self.uri) if self.reports_losses else Counter()
        if lost:
            parts = ", ".join(f"{kind} {n}" for kind, n in sorted(lost.items()))
            _warn(f"{sum(lost.values())} points could not be logged to {self.uri} and were dropped "
                  f"({parts}); the outputs on disk are complete")

    def _terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _warn(message: str) -> None:
    # On the user's stderr even while the console sends library output to the log.
    console.error(f"cai-ray: warning: tracking: {message}")


def _mlflow_env() -> None:
    for key, value in MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(key, value)


def artifact_location(cfg: Any) -> str | None:
    """Where a new experiment keeps artifacts: never the current directory."""
    root = cfg.tracking.artifact_root
    if root:
        return root if "://" in root else Path(root).expanduser().resolve().as_uri()
    if cfg.tracking_uri.startswith(("http://", "https://")):
        return None  # the server's --artifacts-destination (shared storage on a cluster)
    return (cfg.output_root / "mlartifacts").as_uri()


def _check_server(uri: str, attempts: int = 3) -> None:
    """An http(s) tracking URI must answer /health before the command starts any work."""
    import urllib.error
    import urllib.request

    reason = ""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
                reason = f"HTTP {reply.status}"
        except (urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc))
        if attempt + 1 < attempts:
            time.sleep(attempt + 1)
    raise RuntimeError(f"tracking.uri={uri}: no MLflow server answers ({reason}); start it (on a cluster: "
                       f"jobs/mlflow_server.sh on the head) or fix tracking.uri")


def _check_credentials(uri: str) -> None:
    """A server with MLflow's basic auth (jobs/mlflow_server.sh) refuses a client without its user and
    password: one line now, not a retried 401 from every call.  The credentials are MLflow's own:
    MLFLOW_TRACKING_USERNAME/PASSWORD or ~/.mlflow/credentials, read by its client in every process."""
    import base64
    import urllib.error
    import urllib.request

    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    if creds.username and creds.password:
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as exc:
        how = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or write them to "
               "~/.mlflow/credentials (see jobs/mlflow_server.sh)")
        if exc.code == 401:
            given = f"user {creds.username!r} was refused" if creds.username else "no credentials were given"
            raise RuntimeError(f"tracking.uri={uri}: the MLflow server asks for a user and password and "
                               f"{given}; {how}") from None
        if exc.code == 403:
            raise RuntimeError(f"tracking.uri={uri}: user {creds.username!r} may not read experiments on this "
                               f"MLflow server; ask its admin for access") from None
    except (urllib.error.URLError, OSError):
        pass  # /health answered: let MLflow's own retries deal with a passing network error


def open_store(cfg: Any, name: str, tags: dict[str, Any] | None = None) -> Store:
    """The top-level store for a command: MLflow unless tracking is disabled.

    A store that cannot be reached or created here fails the command with one line:
    nothing has run yet, so nothing is lost by stopping.
    """
    if not cfg.tracking.enabled:
        return NullStore()
    uri = cfg.tracking_uri
    try:
        cfg.output_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"output_dir={cfg.output_dir}: cannot create it ({exc.strerror}); set output_dir "
                           f"(or tracking.enabled=false for commands that write nothing else)") from None
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
        _check_credentials(uri)
    t = cfg.tracking
    try:
        store = retrying(lambda: MlflowStore.start(uri, t.experiment, name, tags,
                                                   artifact_location=artifact_location(cfg)), t.retries)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; the CLI wants one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RuntimeError(f"tracking.uri={uri}: cannot start an MLflow run ({type(exc).__name__}: "
                           f"{reason})") from None
    store.ledger = str(cfg.output_root / ".tracking_lost" / store.run_id)
    store.retry, store.reports_losses = (t.retries, t.pause_s), True
    return store


def run_traces(uri: str, run_id: str | None, experiment: str) -> tuple[str, list]:
    """(run id, its traces with their assessments): ``run_id``, or the newest evaluate run of the
    experiment.  A server that does not answer is one line (RuntimeError)."""
    from mlflow.tracking import MlflowClient

    _mlflow_env()
    if uri.startswith(("http://", "https://")):
        _check_server(uri, attempts=1)
    client = MlflowClient(tracking_uri=uri)
    if run_id is None:
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'",
                                                         order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ValueError(f"tracking.experiment={experiment}: no evaluate run in {uri}; run `cai-ray evaluate` first")
        run = runs[0]
    else:
        try:
            run = client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception for an unknown id
            raise ValueError(f"--run {run_id}: no such run in {uri} ({type(exc).__name__})") from None
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(f"--run {run.info.run_id}: the run is deleted")
    traces, token = [], None
    while True:  # tags carry what agreement needs: no spans
        page = client.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id,
                                    max_results=500, page_token=token, include_spans=False)
        traces.extend(page)
        token = getattr(page, "token", None)
        if not token:
            break
    return run.info.run_id, traces


def deleted_runs(uri: str, run_ids: set[str]) -> set[str]:
    """The ids among ``run_ids`` whose run is deleted or gone."""
    from mlflow.tracking import MlflowClient

    client, gone = MlflowClient(tracking_uri=uri), set()
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.lifecycle_stage == "deleted":
                gone.add(run_id)
        except Exception:  # noqa: BLE001 - an unknown id is a run that no longer exists
            gone.add(run_id)
    return gone


@contextmanager
def stage_run(parent: Store, name: str, tags: dict[str, Any] | None = None) -> Iterator[Store]:
    """A child run that ends FAILED if the block raises, FINISHED otherwise."""
    child = parent.child(name, tags)
    try:
        yield child
    except BaseException:
        child.end("FAILED")
        raise
    child.end("FINISHED")
