"""The training loop without Ray: devices, train mode and gradient checkpointing, per step.

Device placement is checked on a device that is not the CPU: PyTorch's lazy
tensor device (its TorchScript backend computes on the CPU), which refuses CPU
operands exactly as CUDA kernels do, and a process group whose only backend
serves that device (it reduces through gloo) and refuses CPU tensors, as NCCL
refuses anything but CUDA.  Forward calls of a decoder layer are counted on
the CPU under DeepSpeed over gloo, the production engine.
"""

import datetime

import pytest
import torch
import torch.distributed as dist

from cai_ray.config import load_config
from cai_ray.tracking import NullStore
from cai_ray.train.context import LocalContext
from cai_ray.train.loops import Job, run_worker, window_means

ROWS = [{"prompt": "say hello", "completion": "Hello there, friend!"},
        {"prompt": "name a colour", "completion": "Blue is a colour."}] * 2
PAIRS = [{"prompt": "\n\nHuman: say hello\n\nAssistant:", "chosen": " Hello!", "rejected": " No."},
         {"prompt": "\n\nHuman: name a colour\n\nAssistant:", "chosen": " Blue.", "rejected": " Go away."}] * 2


class _Done(dist._Work):
    def __init__(self):
        super().__init__()
        self._future = torch.futures.Future()
        self._future.set_result(None)

    def wait(self, timeout=None):
        return True

    def get_future(self):
        return self._future


class LazyGroup(dist.ProcessGroup):
    """All-reduce for lazy tensors through a gloo group on the same store; anything else is refused."""

    def __init__(self, store, rank, size, timeout):
        super().__init__(rank, size)
        self.gloo = dist.ProcessGroupGloo(dist.PrefixStore("lazy/", store), rank, size, timeout)

    def allreduce(self, tensors, opts):
        wrong = [str(t.device) for t in tensors if t.device.type != "lazy"]
        if wrong:
            raise RuntimeError(f"lazy process group: tensors must be on the lazy device, got {wrong}")
        cpu = [t.cpu() for t in tensors]
        self.gloo.allreduce(cpu, opts).wait()
        for t, c in zip(tensors, cpu):
            t.copy_(c)
        return _Done()

    def getBackendName(self):
        return "lazygroup"


@pytest.fixture(scope="module")
def lazy_backend():
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()  # once per process: a second call raises
    dist.Backend.register_backend("lazygroup", LazyGroup, devices=["lazy"])


@pytest.fixture
def lazy_group(tmp_path, lazy_backend):
    dist.init_process_group("lazy:lazygroup", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield torch.device("lazy")
    dist.destroy_process_group()


@pytest.fixture
def gloo_group(tmp_path, monkeypatch):
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # what torchrun (or Ray Train) sets, and DeepSpeed reads
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield torch.device("cpu")
    dist.destroy_process_group()


def _job(tmp_path, model, kind, *overrides, steps=2):
    from cai_ray.train.data import tokenize
    from cai_ray.train.lora import load_tokenizer

    cfg = load_config(None, [f"model.path={model}", f"output_dir={tmp_path / 'out'}", "train.batch_size=2",
                             "train.log_every=1", "train.checkpoint_every=100", "train.lora.r=4",
                             "train.lora.alpha=8", *overrides])
    tok = load_tokenizer(cfg.model, model)
    data = tokenize(tok, ROWS if kind == "sft" else PAIRS, kind, 64)
    return Job(kind=kind, cfg=cfg, model_path=model, data=None, total_steps=steps, pad_id=tok.pad_token_id,
               lr=0.01, start=None, store=NullStore(), fail_once=None), data


def test_the_lazy_group_refuses_cpu_tensors_as_nccl_does(lazy_group):
    """The all-reduce of today's window sums (a CPU tensor) fails there; on the group's device it sums."""
    window = [{"loss": 2.0, "micro_batches": 1.0, "tokens": 10.0}, {"loss": 1.0, "micro_batches": 1.0, "tokens": 6.0}]
    with pytest.raises(RuntimeError, match="must be on the lazy device"):
        dist.all_reduce(torch.tensor([1.0], dtype=torch.float64))
    means, tokens = window_means(window, 2.0, lazy_group)
    assert means == {"loss": 1.5, "tokens_per_s": 8.0} and tokens == 16.0


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_sft_and_dpo_steps_run_on_a_non_cpu_device(tmp_path, tiny_base, lazy_group, kind):
    """Batches reach the engine's device and the window sums the group's: a CPU tensor anywhere in
    the forward, the loss or the all-reduce raises."""
    from cai_ray.train.plain import start_torch_engine

    job, data = _job(tmp_path, tiny_base, kind, steps=1)  # each new graph costs seconds to trace
    launcher = LocalContext(tmp_path / "ckpt", lazy_group)
    run_worker(launcher.as_worker(), job, data, make_engine=start_torch_engine(lazy_group))
    final = launcher.reports[-1]
    assert final["step"] == 1 and final["final"] and final["tokens_seen"] > 0
    assert (tmp_path / "ckpt" / "checkpoint_000001" / "adapter" / "adapter_model.safetensors").is_file()
    if kind == "dpo":
        assert final["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step


def test_sft_and_dpo_train_in_train_mode_and_checkpointing_recomputes_each_layer(tmp_path, tiny_base, gloo_group):
    """Layer 0's forward calls in training mode per step under DeepSpeed: 1, or 2 when checkpointing
    recomputes it in backward (DPO's reference pass runs in eval mode and is not counted).
    One test: DeepSpeed keeps the first process group it joins for the whole process."""
    from cai_ray.train.deepspeed import start_engine

    for checkpointing in (False, True):
        for kind in ("sft", "dpo"):
            calls = []

            def make_engine(model, *args):
                layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
                # A pre-hook: the recomputation stops once it has what backward needs, before post-hooks.
                layer.register_forward_pre_hook(lambda module, _: calls.append(module.training))
                return start_engine(model, *args)

            where = tmp_path / f"{kind}-{checkpointing}"
            job, data = _job(where, tiny_base, kind, f"train.gradient_checkpointing={checkpointing}")
            run_worker(LocalContext(where / "ckpt", gloo_group).as_worker(), job, data, make_engine=make_engine)
            assert sum(calls) == job.total_steps * (2 if checkpointing else 1), (kind, checkpointing, calls)
            assert calls.count(False) == (job.total_steps if kind == "dpo" else 0), (kind, checkpointing, calls)
