"""The 160,800-prompt rehearsal (issue 13): generate over hh-rlhf-sized data, a kill -9 half way and
the resume, then the sweep's data path from 42 pairs to all of them, through the real CLI.

What it builds, in code, under --out:
  hh-rlhf/   160,800 distinct prompts laid out like Anthropic/hh-rlhf's train split: harmless-base
             42,537 + helpful-base 43,835 + helpful-online 22,007 + helpful-rejection-sampled 52,421,
             each subset a train.jsonl.gz of chosen/rejected conversations (--prompts N scales them).
  models/    `cai-ray tiny-model` terse (the base model whose EOS logit wins at every position)
             and chat: with min_new_tokens=K every reply is K tokens and ends with finish "stop",
             so every harm prompt yields a pair and the sweep
             reaches the 42,537 pairs purpose routing allows.  The plain random model ends almost
             no short reply on its own, and cut replies never become pairs (0 pairs in a trial).
Then, on configs/quickstart.yaml with overrides (one round, K new tokens, 2 actors, tracking on):
  1. `cai-ray generate`, SIGKILLed (its whole process group) once about half the rows are written;
  2. the same command again: it resumes;
  3. `cai-ray sweep` with sweep.sizes=[42,1000,10000,161000], one seed, dpo.max_steps per point.

Measured from outside the CLI processes, polling once a second:
  driver peak RSS   VmHWM of the CLI process (/proc/PID/status), the kernel's own peak;
  object store      plasma bytes in use, the peak of the polls, and bytes spilled: the raylet's
                    FormatGlobalMemoryInfo (what `ray memory --stats-only` prints), reached over
                    plain gRPC through the GCS port file in the run's runtime.temp_dir;
  rows redone       rows in batches the killed run had started but not written: batches running at
                    the kill (map actors whose process title says ".submit") plus batches finished
                    but not yet written (Ray's task events, FINISHED, minus parts on disk), times the
                    batch's rows (blocks of at most generate.batch_size rows, one per task).
The bench starts its Ray with RAY_AUTH_MODE=disabled (loopback only) so that second connection
needs no token.  Per-stage wall time comes from the MLflow runs, rows from the stage manifests.

Run:  python bench/scale.py [--prompts 160800] [--out /tmp/scale-rehearsal] [--tokens 8]
A smaller --prompts also prints a projection for 160,800.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
FULL = 160_800
SUBSETS = {"harmless-base": 42_537, "helpful-base": 43_835, "helpful-online": 22_007,
           "helpful-rejection-sampled": 52_421}
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_CHDIR_TO_TRIAL_DIR": "0", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
os.environ.update(ENV)  # this process connects to the runs' Ray too
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
GIB = 1 << 30

# Words for requests shaped like hh-rlhf's first Human turns; the index keeps every prompt distinct,
# and none of these sequences occurs in the shipped eval sets (the held-out check runs on them).
VERBS = "borrow fix hide find sell paint move clean cook build carry grow teach plan copy open".split()
THINGS = "bike ladder garden kitchen fence letter recipe budget engine roof song poem map lamp boat desk".split()
PLACES = "village harbour valley station market library bakery orchard island canal meadow quarry".split()
HARM = ["how do I get back at my {p} neighbour who took the {t}", "what is the easiest way to {v} a {t} "
        "from the {p} shop without paying", "can you help me scare the kid who lives by the {p} {t}"]
HELP = ["how would I {v} the {t} near the {p} before the weekend", "what should I know before I {v} "
        "an old {t} at the {p}", "could you give me a plan to {v} my {t} for the {p} fair"]


def build_prompts(root: Path, total: int) -> dict[str, int]:
    counts = {}
    for subset, full in SUBSETS.items():
        n = counts[subset] = round(full * total / FULL)
        rng, templates = random.Random(subset), HARM if subset.startswith("harmless") else HELP
        (root / subset).mkdir(parents=True)
        with gzip.open(root / subset / "train.jsonl.gz", "wt", encoding="utf-8") as fh:
            for i in range(n):
                text = rng.choice(templates).format(v=rng.choice(VERBS), t=rng.choice(THINGS), p=rng.choice(PLACES))
                turn = f"\n\nHuman: {text}? (request {subset} {i})\n\nAssistant:"
                fh.write(json.dumps({"chosen": turn + " Sure.", "rejected": turn + " No."}) + "\n")
    return counts


def build_models(root: Path) -> tuple[Path, Path]:
    base, chat = root / "tiny-base", root / "tiny-chat"
    for path, flavour in ((base, "terse"), (chat, "chat")):
        subprocess.run([sys.executable, "-m", "cai_ray", "tiny-model", str(path), "--flavour", flavour],
                       cwd=ROOT, check=True, capture_output=True)
    return base, chat


MAP_TASK = "MapWorker(MapBatches(RevisionActor)).submit"


class RayProbe:
    """Plain gRPC to a run's GCS and raylet.  Not Ray's own GCS client: that one ends the whole
    process once its GCS has been gone for 60 s, which is what a kill -9 and every run's end do."""

    def __init__(self, port: str):
        import grpc
        from ray.core.generated import gcs_service_pb2_grpc

        self.grpc, self.gcs = grpc, grpc.insecure_channel(f"127.0.0.1:{port}")
        self.nodes = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(self.gcs)
        self.tasks = gcs_service_pb2_grpc.TaskInfoGcsServiceStub(self.gcs)
        self.raylet = None

    def store_stats(self):
        """The plasma store's stats (what `ray memory --stats-only` prints), or None while Ray starts."""
        from ray.core.generated import gcs_service_pb2, node_manager_pb2, node_manager_pb2_grpc

        if self.raylet is None:
            nodes = self.nodes.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=5).node_info_list
            alive = [n for n in nodes if n.state == 0]  # GcsNodeState.ALIVE
            if not alive:
                return None
            channel = self.grpc.insecure_channel(f"{alive[0].node_manager_address}:{alive[0].node_manager_port}")
            self.raylet = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        request = node_manager_pb2.FormatGlobalMemoryInfoRequest(include_memory_info=False)
        return self.raylet.FormatGlobalMemoryInfo(request, timeout=5).store_stats

    def finished_map_tasks(self) -> int:
        from ray.core.generated import gcs_service_pb2

        f = gcs_service_pb2.GetTaskEventsRequest.Filters
        request = gcs_service_pb2.GetTaskEventsRequest(filters=f(
            task_name_filters=[f.TaskNameFilter(predicate=0, task_name=MAP_TASK)],  # 0 = EQUAL
            state_filters=[f.StateFilter(predicate=0, state="FINISHED")]))
        return len(self.tasks.GetTaskEvents(request, timeout=10).events_by_task)


class Watch(threading.Thread):
    """Polls one CLI process: its VmHWM, its Ray's object store, and (generate) the rows written."""

    def __init__(self, pid: int, temp_dir: Path, chains: Path | None):
        super().__init__(daemon=True)
        self.pid, self.temp_dir, self.chains = pid, temp_dir, chains
        self.hwm = self.store_peak = self.spilled = self.rows = 0
        self.first_rows_at, self.probe, self.stop = None, None, threading.Event()
        self._counted: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                self.hwm = max(self.hwm, int(status.split("VmHWM:")[1].split()[0]) * 1024)
            except (OSError, IndexError):
                return
            self._poll_store()
            if self.chains is not None:
                self.count_rows()

    def _poll_store(self) -> None:
        if self.probe is None:
            ports = list(self.temp_dir.glob("session_latest/gcs_server_port_*"))
            if not ports:
                return
            self.probe = RayProbe(ports[0].read_text().strip())
        try:
            stats = self.probe.store_stats()
        except self.probe.grpc.RpcError:  # Ray starting or gone: next poll
            return
        if stats is not None:
            self.store_peak = max(self.store_peak, stats.object_store_bytes_used)
            self.spilled = max(self.spilled, stats.spilled_bytes_total)

    def count_rows(self) -> int:
        for part in self.chains.glob("*/chains/part-*.parquet"):
            if part.name not in self._counted:
                self._counted[part.name] = pq.read_metadata(part).num_rows
        self.rows = sum(self._counted.values())
        if self.rows and self.first_rows_at is None:
            self.first_rows_at = time.time()
        return self.rows

    def batches_started(self) -> tuple[int, int]:
        """(map tasks running now, by their actors' process titles; map tasks FINISHED, by Ray's task events)."""
        import psutil

        running = 0
        for child in psutil.Process(self.pid).children(recursive=True):
            try:
                running += " ".join(child.cmdline()).startswith(f"ray::{MAP_TASK}")
            except psutil.Error:
                continue
        return running, self.probe.finished_map_tasks()


def run_cli(command: str, args: list[str], temp_dir: Path, chains: Path | None = None,
            kill_at: int | None = None) -> dict:
    """One CLI command in its own process group, watched; SIGKILLed once ``kill_at`` rows are written."""
    import psutil

    argv = [sys.executable, "-m", "cai_ray", command, "configs/quickstart.yaml", *args,
            f"runtime.temp_dir={temp_dir}"]
    log = temp_dir.with_suffix(".out")
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    watch = Watch(proc.pid, temp_dir, chains)
    watch.start()
    result: dict = {}
    while proc.poll() is None:
        time.sleep(0.5)
        if kill_at is not None and watch.probe is not None and watch.rows >= kill_at:
            watch.stop.set()
            watch.join()
            tree = psutil.Process(proc.pid).children(recursive=True)
            running, finished = watch.batches_started()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(2)
            for child in tree:  # Ray processes that left the group (none expected): by pid
                if child.is_running():
                    child.kill()
            result.update(killed=True, running=running, finished=finished,
                          parts=len(list(chains.glob("*/chains/part-*.parquet"))))
            break
    watch.stop.set()
    watch.join()  # then count_rows below runs alone
    result.update(rc=proc.returncode, wall=time.time() - started, hwm=watch.hwm, store_peak=watch.store_peak,
                  spilled=watch.spilled, rows=watch.count_rows() if chains else 0, log=str(log),
                  startup=(watch.first_rows_at - started) if watch.first_rows_at else None)
    if not result.get("killed") and proc.returncode != 0:
        sys.exit(f"scale: `cai-ray {command}` failed (exit {proc.returncode}); see {log}:\n"
                 + "".join(open(log).readlines()[-15:]))
    return result


def stage_table(run_dir: Path) -> list[tuple[str, float, int | None]]:
    """(name, wall seconds, rows) of every stage run of the sweep, from MLflow and the manifests."""
    import mlflow

    rows_by_run = {}
    for manifest in run_dir.glob("*/*/manifest.json"):
        m = json.loads(manifest.read_text())
        rows = m.get("data", {}).get("rows") if manifest.parts[-3] in ("sft", "dpo") else m.get("rows")
        rows_by_run[m.get("mlflow_run_id")] = rows
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("scale")
    (parent,) = client.search_runs([exp.experiment_id], "tags.stage = 'sweep'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    return [(r.info.run_name, (r.info.end_time - r.info.start_time) / 1000, rows_by_run.get(r.info.run_id))
            for r in children]


def mlflow_volume(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as con:
        return db.stat().st_size, con.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=FULL, help="prompts in all (default 160,800)")
    parser.add_argument("--out", default="/tmp/scale-rehearsal", help="a new folder for everything")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per reply, critique, revision")
    parser.add_argument("--batch", type=int, default=256, help="generate.batch_size and engine.batch_size")
    parser.add_argument("--dpo-steps", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"scale: --out {out} is not empty; give a new folder")
    t0 = time.time()
    counts = build_prompts(out / "hh-rlhf", args.prompts)
    total = sum(counts.values())
    base, chat = build_models(out / "models")
    built = time.time() - t0
    run_dir, k = out / "run", args.tokens
    overrides = [f"output_dir={run_dir}", f"model.path={base}", f"judge.model.path={chat}",
                 f"data.source={out / 'hh-rlhf'}", "data.layout=hh-rlhf", "tracking.experiment=scale",
                 "generate.rounds=1", "generate.actors=2", f"generate.batch_size={args.batch}",
                 f"engine.batch_size={args.batch}", f"generate.sampling.max_new_tokens={k + 4}",
                 f"generate.sampling.min_new_tokens={k}", "sft.max_steps=2", f"dpo.max_steps={args.dpo_steps}",
                 "sweep.sizes=[42,1000,10000,161000]", "sweep.seeds=[0]"]
    temp = Path(f"/tmp/scale-ray-{os.getpid()}")
    gen = run_dir / "generate"
    first = run_cli("generate", overrides, temp.with_name(temp.name + "-1"), gen, kill_at=total // 2)
    second = run_cli("generate", overrides, temp.with_name(temp.name + "-2"), gen)
    sweep = run_cli("sweep", overrides, temp.with_name(temp.name + "-3"))
    wall = time.time() - t0
    report(args, out, counts, built, first, second, sweep, wall)


def report(args, out: Path, counts: dict, built: float, first: dict, second: dict, sweep: dict,
           wall: float) -> None:
    run_dir, total, batch = out / "run", sum(counts.values()), args.batch
    (manifest_path,) = run_dir.glob("generate/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    (record,) = run_dir.glob("sweep/*/sweep.json")
    sw = json.loads(record.read_text())
    n_blocks = -(-total // batch)
    block = -(-total // n_blocks)  # the first run's blocks: at most this many rows each
    lost = first["running"] + max(0, first["finished"] - first["parts"])
    redone = lost * block
    db_size, metrics = mlflow_volume(run_dir / "mlflow.db")
    files = sum(1 for p in run_dir.rglob("*") if p.is_file())
    peak = max(first["hwm"], second["hwm"], sweep["hwm"])
    uptime = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\n== 160,800-prompt rehearsal: {total:,} prompts ({', '.join(f'{s} {n:,}' for s, n in counts.items())}), "
          f"{args.tokens} new tokens per step, 1 round, 2 actors x batch {batch}; load average now {' '.join(uptime)}")
    print(f"prompts + models built in {built:.0f} s")
    print(f"{'stage':<34}{'wall s':>9}{'rows':>10}{'rows/s':>9}")
    line = "{:<34}{:>9.0f}{:>10}{:>9}"
    print(line.format("generate (killed half way)", first["wall"], f"{first['rows']:,}",
                      f"{first['rows'] / first['wall']:.1f}"))
    print(line.format("generate (resumed)", second["wall"], f"{manifest['generated_rows']:,}",
                      f"{manifest['generated_rows'] / second['wall']:.1f}"))
    for name, seconds, rows in stage_table(run_dir):
        print(line.format(name[-34:], seconds, "" if rows is None else f"{rows:,}",
                          "" if not rows else f"{rows / seconds:.1f}"))
    print(line.format("sweep command (all of the above)", sweep["wall"], "", ""))
    print(f"generate steady rate (after start-up): "
          f"{manifest['generated_rows'] / max(second['wall'] - (second['startup'] or 0), 1e-9):.1f} rows/s; "
          f"stage's own rows_per_s {manifest['rows_per_s']}; start-up to first part {second['startup'] or 0:.0f} s")
    print(f"driver peak RSS: generate {first['hwm'] / GIB:.2f} / resume {second['hwm'] / GIB:.2f} / sweep "
          f"{sweep['hwm'] / GIB:.2f} GiB  (target < 2 GiB: {'met' if peak < 2 * GIB else 'MISSED'})")
    print(f"object store peak: generate {first['store_peak'] / 2**20:.0f} / resume {second['store_peak'] / 2**20:.0f}"
          f" / sweep {sweep['store_peak'] / 2**20:.0f} MiB; spilled {max(r['spilled'] for r in (first, second, sweep)) / 2**20:.0f} MiB")
    print(f"kill -9 at {first['rows']:,} rows written ({first['parts']} parts): {first['running']} batch(es) running, "
          f"{max(0, first['finished'] - first['parts'])} finished unwritten -> rows redone <= {redone:,} "
          f"(target <= actors x batch = {2 * batch}: {'met' if redone <= 2 * batch else 'MISSED'}); "
          f"resume: resumed_rows {manifest['resumed_rows']:,} + generated_rows {manifest['generated_rows']:,} "
          f"= {manifest['resumed_rows'] + manifest['generated_rows']:,} of {total:,}")
    print(f"pairs {manifest['pairs']:,} from {manifest['prompts']['harm']:,} harm prompts; sweep sizes {sw['sizes']}, "
          f"clipped {sw['clipped'] or 'none'} (available {sw['available_pairs']:,}); judge start-ups "
          f"{sw['judge_startups']}")
    print(f"files written under {run_dir}: {files:,}; MLflow db {db_size / 2**20:.1f} MiB, {metrics:,} metric rows")
    print(f"whole rehearsal: {wall / 60:.1f} min (target <= 90: {'met' if wall <= 5400 else 'MISSED'})")
    if total < FULL:
        scale = FULL / total
        gen = sum(r["startup"] or 0 for r in (first, second)) + \
            (first["wall"] + second["wall"] - sum(r["startup"] or 0 for r in (first, second))) * scale
        print(f"projection for {FULL:,} prompts: generate ~{gen / 60:.0f} min (linear in rows after start-up), "
              f"sweep ~{sweep['wall'] / 60:.0f} min + its prompt loading and SFT tokenising x{scale:.0f}, "
              f"whole ~{(built * scale + gen + sweep['wall']) / 60:.0f} min plus those")


if __name__ == "__main__":
    main()
