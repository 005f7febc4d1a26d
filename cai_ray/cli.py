"""``cai-ray``: the command line.  The only module that reaches the stages.

Stages are found through ``STAGES``, a name -> module map imported lazily, so
``cai-ray --help`` and ``cai-ray config show`` never import Ray or torch.  A
stage module exposes ``run(cfg, store) -> dict`` and a one-line ``__doc__``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

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
    "serve-judge": ("cai_ray.stages.serve_judge",
                    "run the judge on Ray Serve (HTTP on judge.host:judge.port) until Ctrl-C"),
}
# Commands that chain stages (see pipeline.py): name -> (module:function, help).
PIPELINES: dict[str, tuple[str, str]] = {
    "run": ("cai_ray.pipeline:run", "the whole pipeline: generate -> SFT -> DPO -> evaluate, resumable"),
    "sweep": ("cai_ray.pipeline:sweep",
              "DPO + evaluate on nested pair subsets x seeds, one generation pass and one SFT checkpoint"),
}
# Tool commands with their own argument parsing: name -> (module:function, help).
TOOLS: dict[str, tuple[str, str]] = {
    "tiny-model": ("cai_ray.tiny:main", "build the tiny offline Llama + tokenizer in a folder"),
    "submit": ("cai_ray.submit:submit_main", "submit a command to a Ray cluster as a Ray Job"),
    "jobs": ("cai_ray.submit:jobs_main", "list, inspect, follow or stop Ray Jobs"),
    "plan": ("cai_ray.plan:plan_main", "what each stage requests against a cluster file's node types"),
}


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
    for name, (_, text) in {**STAGES, **PIPELINES}.items():
        _config_args(sub.add_parser(name, help=text, description=text))
    for name, (_, text) in TOOLS.items():
        # Listed for --help only; main() hands their arguments over untouched.
        sub.add_parser(name, help=text, description=text)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _call(target: str, *args):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(*args)


def run_command(name: str, cfg) -> dict:
    """Run a stage or a pipeline under one top-level MLflow run."""
    from cai_ray.pipeline import stage_tags
    from cai_ray.runtime import preflight
    from cai_ray.tracking import open_store

    preflight(cfg, name)  # hub setting applied and every model resolvable, before any actor starts
    store = open_store(cfg, f"{cfg.name}-{name}", stage_tags(cfg, name))
    store.log_config(cfg)
    try:
        if name in PIPELINES:
            summary = _call(PIPELINES[name][0], cfg, store)
        else:
            summary = importlib.import_module(STAGES[name][0]).run(cfg, store)
    except BaseException:
        store.end("FAILED")
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
        from cai_ray.config import load_config, to_yaml

        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            return 0
        cfg.require(args.command)
        summary = run_command(args.command, cfg)
        for key, value in (summary or {}).items():
            print(f"{key}: {value}")
        return 0
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        if os.environ.get("CAI_RAY_DEBUG"):
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"cai-ray: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cai-ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
