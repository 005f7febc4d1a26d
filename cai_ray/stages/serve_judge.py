"""Serve the judge on its own (Ray Serve, HTTP on judge.host:judge.port) until Ctrl-C."""

from __future__ import annotations

import time

from cai_ray.config import Config, to_yaml
from cai_ray.judge.serve import APP_NAME, start_judge, stop_judge
from cai_ray.runtime import init_ray
from cai_ray.tracking import Store


def run(cfg: Config, store: Store) -> dict:
    """Start the judge, print its URL and block; Ctrl-C removes the app and returns."""
    judge = cfg.judge
    print(f"serve-judge: judge config\n{to_yaml(judge)}", end="", flush=True)
    init_ray(cfg)
    url = start_judge(judge)
    store.set_tags({"judge_url": url})
    print(f"serve-judge: {judge.model.path} (role={judge.model.role}, "
          f"{'chat template' if judge.model.role == 'instruct' else 'few-shot'} prompts, "
          f"{judge.replicas} replica(s)) at {url}\n"
          f"  POST {url}  JSON {{rubric, prompt, response, style?, id?}}\n"
          f"  POST {url}/render  (the exact judge prompt)   GET {url}/healthz\n"
          f"  Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        # Ctrl-C is how this stage ends normally; the run is not a failure.
        print("serve-judge: stopping", flush=True)
    finally:
        stop_judge(APP_NAME)
    return {"judge_url": url, "app": APP_NAME, "status": "stopped"}
