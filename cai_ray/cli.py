"""``cai-ray``: the command line.  The only module that reaches the stages.

Stages are found through ``STAGES``, a name -> module map imported lazily, so
``cai-ray --help`` and ``cai-ray config show`` never import Ray or torch.  A
stage module exposes ``run(cfg, store) -> dict`` and a one-line ``__doc__``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback

from cai_ray import console

# name -> (module, help).  Add a stage here when its module lands.
STAGES: dict[str, tuple[str, str]] = {
    "generate": ("cai_ray.stages.generate",
                 "few-shot critique/revision chains, SFT rows and preference pairs (Ray Data)"),
    "sft": ("cai_ray.stages.sft",
            "supervised fine-tuning on (prompt, completion) rows (Ray Train + DeepSpeed, LoRA)"),
    "dpo": ("cai_ray.stages.dpo",
            "DPO / IPO / soft-label preference training against the frozen SFT policy"),
    "evaluate": ("cai_ray.stages.evaluate",
                 "held-out evaluation of every arm: ASR, over-refusal, helpfulness, style with intervals"),
    "estimate": ("cai_ray.stages.estimate",
                 "tokens, device-hours and cost of each stage at the configured scale"),
    "label": ("cai_ray.stages.label",
              "preference labels from AI feedback (RL-CAI): two SL-CAI samples, base-model comparison"),
    "judge": ("cai_ray.stages.judge",
              "measure the judge: --check scores labelled rows (accuracy per rubric, confusion, parse failures)"),
    "serve-judge": ("cai_ray.stages.serve_judge",
                    "run the judge on Ray Serve (HTTP on judge.host:judge.port) until Ctrl-C"),
}
# Commands that chain stages (see pipeline.py): name -> (module:function, help).
PIPELINES: dict[str, tuple[str, str]] = {
    "run": ("cai_ray.pipeline:run", "the whole pipeline: generate -> SFT -> DPO -> evaluate, resumable"),
    "sweep": ("cai_ray.pipeline:sweep",
              "DPO + evaluate on nested pair subsets x seeds, one generation pass and one SFT checkpoint"),
}
# How to read what a command prints, shown by `cai-ray COMMAND --help`.
EPILOGS = {"evaluate": """reading the report:
  rates are per request first (a request's samples and jailbreak templates count once), then
  averaged over requests; [lo,hi] is a 95% bootstrap interval resampling requests; hits/rated
  counts responses (e.g. harmful / judged). Each set has its own row; 'pooled' joins sets by
  request. 'judge' columns come from the LLM judge, 'keyword' from a refusal-phrase rater; kappa
  is their agreement. 'failures' are shares of responses (generation errors, empty, truncated,
  garbage) and of verdicts (parse, judge failures); past evaluate.max_share an arm is UNRELIABLE.
  'b vs a' differences pair requests (sign-test p); INVALID when formats, sampling or failure
  shares differ."""}
# Tool commands with their own argument parsing: name -> (module:function, help).
TOOLS: dict[str, tuple[str, str]] = {
    "tiny-model": ("cai_ray.tiny:main", "build the tiny offline Llama + tokenizer in a folder"),
    "submit": ("cai_ray.submit:submit_main", "submit a command to a Ray cluster as a Ray Job"),
    "jobs": ("cai_ray.submit:jobs_main", "list, inspect, follow or stop Ray Jobs"),
    "plan": ("cai_ray.plan:plan_main", "what each stage requests against a cluster file's node types"),
}
JUDGE_MODES = {"check": "score the shipped labelled check set (and judge.check_data): accuracy per rubric "
                        "with Wilson intervals, a confusion table and the parse-failure share",
               "agreement": "the judge against people's feedback (MLflow assessments) on the newest evaluate "
                            "run's judge traces: accuracy, kappa, keyword rater, confusion"}
UI_HELP = "browse this config's MLflow runs: starts the MLflow UI on 127.0.0.1 and prints its URL"
UI_PORT = 5000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cai-ray", description="Constitutional AI from a base model on Ray.",
        epilog="Every config command takes CONFIG (a YAML file) then key=value overrides, "
               "e.g. cai-ray config show configs/quickstart.yaml generate.rounds=3")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    config = sub.add_parser("config", help="inspect configs").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    show = config.add_parser("show", help="print the resolved, validated config")
    _config_args(show)
    doc = config.add_parser("doc", help="print every config key: its type, default and meaning")
    doc.add_argument("section", nargs="?", metavar="SECTION", help="only this section (e.g. train)")
    for name, (_, text) in {**STAGES, **PIPELINES}.items():
        _config_args(sub.add_parser(name, help=text, description=text, epilog=EPILOGS.get(name),
                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.choices["label"].add_argument(
        "--check", action="store_true",
        help="score the shipped check pairs (and label.check_data): feedback-model accuracy and calibration")
    # One flag per mode of `cai-ray judge` (cai_ray/stages/judge.py MODES; listed here so --help
    # imports no stage); exactly one is given.
    modes = sub.choices["judge"].add_mutually_exclusive_group(required=True)
    for mode, text in JUDGE_MODES.items():
        modes.add_argument(f"--{mode}", action="store_true", help=text)
    sub.choices["judge"].add_argument("--run", default=None, metavar="RUN_ID",
                                      help="with --agreement: that evaluate run instead of the newest")
    ui = sub.add_parser("ui", help=UI_HELP, description=UI_HELP)
    _config_args(ui)
    ui.add_argument("--port", type=int, default=None,
                    help=f"port on 127.0.0.1 (default {UI_PORT}, or a free one when it is taken)")
    for name, (_, text) in TOOLS.items():
        # Listed for --help only; main() hands their arguments over untouched.
        sub.add_parser(name, help=text, description=text)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help=f"show library and Ray worker output here instead of only in "
                             f"{{output_dir}}/logs/ (also: {console.VERBOSE_ENV}=1)")


def _call(target: str, *args):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(*args)


def run_command(name: str, cfg, **options) -> dict:
    """Run a stage or a pipeline under one top-level MLflow run; ``options`` are a stage's flags."""
    from cai_ray.pipeline import stage_tags
    from cai_ray.runtime import preflight
    from cai_ray.tracking import open_store

    # A stage or pipeline may check its inputs first (cheap checks only), so bad input stops
    # before an MLflow run or any output exists.
    module = PIPELINES[name][0].partition(":")[0] if name in PIPELINES else STAGES[name][0]
    check = getattr(importlib.import_module(module), "check", None)
    if check is not None:
        check(cfg)
    preflight(cfg, name)  # hub setting applied and every model resolvable, before any actor starts
    suffix = "".join(f"-{k}" for k, v in options.items() if v)
    store = open_store(cfg, f"{cfg.name}-{name}{suffix}", stage_tags(cfg, name))
    store.log_config(cfg)
    try:
        if name in PIPELINES:
            summary = _call(PIPELINES[name][0], cfg, store)
        else:
            with console.stage(name, f"{cfg.name}-{name}") as shown:
                summary = shown["result"] = importlib.import_module(STAGES[name][0]).run(cfg, store, **options)
    except BaseException as exc:
        store.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")  # SIGTERM and Ctrl-C: KILLED
        raise
    store.end("FINISHED")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before anything imports ray: keep a local Ray on loopback (see runtime.py).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # MLflow announces its database migrations on stderr; keep errors one line.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        if argv and argv[0] in TOOLS:
            return _call(TOOLS[argv[0]][0], argv[1:]) or 0
        args = _parser().parse_args(argv)
        if args.command == "config" and args.action == "doc":
            from cai_ray.config.doc import reference

            print(reference(args.section), end="")
            return 0
        from cai_ray.config import load_config, to_yaml

        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            return 0
        if args.command == "ui":
            return ui(cfg, args.port)
        if args.command == "judge" and args.agreement:  # annotates an evaluate run; opens no run of its own
            _call("cai_ray.stages.judge:agreement", cfg, args.run)
            return 0
        cfg.require(args.command)
        from cai_ray.runtime import check_folders, stop_on_sigterm

        check_folders(cfg)  # before the log folder is made under output_dir
        stop_on_sigterm(cfg.runtime.stop_timeout_s)  # `ray job stop`, a preempted node: see runtime.py
        return _run_captured(args, cfg)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        if os.environ.get("CAI_RAY_DEBUG"):
            console.error(traceback.format_exc().rstrip())
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        console.error(f"cai-ray: error: {message}{_log_hint()}")
        return 2
    except OSError as exc:  # a full disk, a folder where a file should be, ...: name the path, no traceback
        if os.environ.get("CAI_RAY_DEBUG"):
            console.error(traceback.format_exc().rstrip())
        where = f"{exc.filename}: " if exc.filename else ""
        what = os.strerror(exc.errno) if exc.errno else str(exc).strip().splitlines()[0]
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = "; free space there and rerun the same command to resume" if full else ""
        console.error(f"cai-ray: error: {where}{what}{hint}{_log_hint()}")
        return 2
    except KeyboardInterrupt as exc:
        from cai_ray.runtime import STOPPED_EXIT, Stopped, stopping_for

        if isinstance(exc, Stopped) or stopping_for() is not None:  # ray.get re-raises it as a KeyboardInterrupt
            console.error(f"cai-ray: stopped by SIGTERM at a safe point after {stopping_for() or 0:.1f}s; every "
                          f"part written is whole; rerun the same command to resume{_log_hint()}")
            return STOPPED_EXIT
        console.error(f"cai-ray: interrupted; rerun the same command to resume{_log_hint()}")
        return 130
    finally:
        if "cai_ray.runtime" in sys.modules:
            sys.modules["cai_ray.runtime"].restore_sigterm()
        console.release()


def _run_captured(args, cfg) -> int:
    """The command with library output in {output_dir}/logs/ (unless verbose), then its summary."""
    if not console.verbose_requested(args.verbose):
        path = console.capture(cfg.output_root, args.command)
        console.say(f"cai-ray {args.command}: library and worker output -> {_shown(path)} (--verbose shows it here)")
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        flags = ("check", *JUDGE_MODES)
        summary = run_command(args.command, cfg, **{f: True for f in dict.fromkeys(flags) if getattr(args, f, False)})
    finally:
        # Shut down a Ray this command started while the log still catches its farewell lines.
        ray = sys.modules.get("ray")
        if ray is not None and not ray_was_up and ray.is_initialized():
            ray.shutdown()
    for key, value in (summary or {}).items():
        print(f"{key}: {value}")
    if args.command in PIPELINES and cfg.tracking.enabled:
        print(f"browse the runs: cai-ray ui {args.config}" + "".join(f" {o}" for o in args.overrides))
    return 0


def _shown(path) -> str:
    """A path relative to the working directory when it lies below it (shorter to read)."""
    try:
        return str(path.relative_to(os.getcwd()))
    except ValueError:
        return str(path)


def _log_hint() -> str:
    path = console.log_path()
    return f" (full log: {_shown(path)})" if path else ""


def _experiment_page(cfg, url: str) -> str:
    """The experiment's runs table.  MLflow 3.17's UI starts in its GenAI mode whatever the experiment's
    kind tag says; the workflowType parameter opens the model-training view instead."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=cfg.tracking_uri).get_experiment_by_name(cfg.tracking.experiment)
    page = f"experiments/{exp.experiment_id}/runs" if exp else "experiments"
    return f"{url}/#/{page}?workflowType=machine_learning"


def _wait_for_ui(proc, url: str, log) -> None:
    """Until the server answers its health check; a server that exits or stays silent is an error."""
    import time
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the MLflow UI stopped at start (exit {proc.returncode}); see {log}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the MLflow UI did not answer on {url} within 120 s; see {log}")
            time.sleep(0.5)


def ui(cfg, port: int | None) -> int:
    """The MLflow UI for this config's runs: a tracking server's URL, or a local UI until Ctrl-C."""
    import signal
    import socket
    import subprocess
    import time
    import urllib.parse

    if cfg.tracking.uri and cfg.tracking.uri.startswith(("http://", "https://")):
        # Not asked for the experiment id: a server that is down would keep MLflow's client retrying.
        print(f"MLflow UI: {cfg.tracking.uri.rstrip('/')}/#/experiments?workflowType=machine_learning")
        return 0
    if not cfg.tracking.enabled:
        raise ValueError("tracking.enabled=false: this config records no MLflow runs to browse")
    db = cfg.output_root / "mlflow.db"
    if not cfg.tracking.uri and not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}; run a command with this config first")
    if port is None:
        with socket.socket() as probe:
            free = probe.connect_ex(("127.0.0.1", UI_PORT)) != 0
        port = UI_PORT if free else 0
    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    logs = cfg.output_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"ui-{time.strftime('%Y%m%d-%H%M%S')}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cfg.tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--artifacts-destination", str(cfg.output_root / "mlartifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        # Its own session: Ctrl-C reaches us, and we stop the server's whole process group.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    # Ctrl-C and `kill` stop the server too (a background job starts with SIGINT ignored).
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.default_int_handler)
    try:
        _wait_for_ui(proc, url, log)
        page = _experiment_page(cfg, url)
        print(f"MLflow UI: {page}  (Ctrl-C stops it; log: {_shown(log)})", flush=True)
        if "/runs?" in page:
            # MLflow 3.17 still nests the filtered runs under their command's run (one collapsed row),
            # but once expanded only the evaluate runs show, e.g. a sweep's points side by side.
            only = urllib.parse.quote("tags.stage = 'evaluate'")
            print(f"evaluate runs only (expand the parent row): {page}&searchFilter={only}", flush=True)
        proc.wait()
        raise RuntimeError(f"the MLflow UI stopped (exit {proc.returncode}); see {log}")
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
