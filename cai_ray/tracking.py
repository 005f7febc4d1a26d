"""Experiment tracking: a small ``Store`` protocol, MLflow and null implementations.

``MlflowStore`` talks to MLflow through an explicit ``MlflowClient`` bound to a
tracking URI and a run id, never through MLflow's process-global active run.
That makes it picklable and usable unchanged from Ray actors, tasks and train
workers: ship the store (URI + run id) and log into the same run.  Rank 0 of a
training job logs; every other rank gets a ``NullStore``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable


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


class MlflowStore:
    """Logs into one MLflow run, addressed by (tracking URI, run id)."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self._client = None

    @classmethod
    def start(cls, uri: str, experiment: str, name: str, tags: dict[str, Any] | None = None,
              parent_run_id: str | None = None) -> "MlflowStore":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
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
        return {"uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state):
        self.uri, self.run_id, self._client = state["uri"], state["run_id"], None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow caps one batch at 100 params and a value at 6000 characters.
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, str(key), str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_table(self, rows: Any, name: str) -> None:
        self.client.log_table(self.run_id, data=rows, artifact_file=name)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_config(self, cfg: Any) -> None:
        """The resolved config, as flat params and as a YAML artifact."""
        from cai_ray.config import to_dict, to_yaml

        self.log_params(flatten(to_dict(cfg)))
        self.log_text(to_yaml(cfg), "config.yaml")

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

    def child(self, name: str, tags: dict[str, Any] | None = None) -> "MlflowStore":
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        exp = self.client.get_experiment(exp_id)
        return MlflowStore.start(self.uri, exp.name, name, tags, parent_run_id=self.run_id)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def open_store(cfg: Any, name: str, tags: dict[str, Any] | None = None) -> Store:
    """The top-level store for a command: MLflow unless tracking is disabled."""
    if not cfg.tracking.enabled:
        return NullStore()
    cfg.output_root.mkdir(parents=True, exist_ok=True)
    return MlflowStore.start(cfg.tracking_uri, cfg.tracking.experiment, name, tags)


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


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    # mkstemp makes owner-only files; outputs are meant to be read by the team.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
