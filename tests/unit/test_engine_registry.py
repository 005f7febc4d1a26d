"""Engine registry and the tokenizer-free rules shared by the backends."""

import importlib.util

import pytest

from cai_ray.config import EngineConfig, ModelConfig, SamplingConfig
from cai_ray.engines import BACKENDS, Completion, gpu_share, make_engine
from cai_ray.engines.base import find_stop, resolve_model_path, row_seeds


def test_every_backend_names_an_existing_module():
    assert set(BACKENDS) == {"hf", "vllm"}
    for target in BACKENDS.values():
        module, cls = target.split(":")
        assert importlib.util.find_spec(module) is not None and cls


def test_unknown_backend_fails_before_any_import():
    with pytest.raises(ValueError, match="engine.backend='tgi' is unknown; use one of hf, vllm"):
        make_engine(ModelConfig(path="x"), EngineConfig(backend="tgi"))


def test_completion_error_defaults_to_none():
    assert Completion("hi", 3, 1, "stop").error is None


@pytest.mark.parametrize("text, stop, after, cut", [
    ("abc\n\nHuman: x", ["\n\nHuman:"], 0, 3),
    ("a.b!c", [".", "!"], 0, 1),
    ("a.b!c", ["!", "."], 0, 1),          # earliest wins, whatever the list order
    ("a.b!c", ["."], 2, None),            # the only "." ends at char 2: inside min_new_tokens
    ("a.b.c", ["."], 2, 3),
    ("abc", [], 0, None),
    ("abc", None, 0, None),
    ("abc", [""], 0, None),
])
def test_find_stop(text, stop, after, cut):
    assert find_stop(text, stop, after) == cut


def test_row_seeds_default_and_length_check():
    params = SamplingConfig(seed=7)
    assert row_seeds(None, params, 3) == [7, 8, 9]
    assert row_seeds([5, 1], params, 2) == [5, 1]
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        row_seeds([1], params, 2)


@pytest.mark.parametrize("path", ["/no/such/model", "./missing", "a/b/c", ""])
def test_paths_that_cannot_be_hub_ids_fail_with_the_path(path):
    with pytest.raises(ValueError, match=f"model.path={path}: no such folder"):
        resolve_model_path(ModelConfig(path=path))


def test_existing_folder_resolves_and_hub_id_passes_through(tmp_path):
    assert resolve_model_path(ModelConfig(path=str(tmp_path))) == str(tmp_path.resolve())
    assert resolve_model_path(ModelConfig(path="meta-llama/Llama-3.2-3B")) == "meta-llama/Llama-3.2-3B"


@pytest.mark.parametrize("gpus, engines, tp, share", [
    (None, 1, 1, 0.8),    # a whole GPU per rank when the caller does not say
    (1, 1, 1, 0.8),
    (0.5, 1, 1, 0.4),     # two actors on one GPU: each gets half
    (1, 2, 1, 0.4),       # the label actor's policy and feedback engines on one GPU
    (2, 1, 2, 0.8),       # tensor parallel: one GPU per rank
    (1, 1, 2, 0.4),
])
def test_engines_sharing_a_gpu_split_its_memory(gpus, engines, tp, share):
    engine = EngineConfig(gpu_memory_utilization=0.8, tensor_parallel_size=tp)
    assert gpu_share(engine, gpus, engines) == pytest.approx(share)
