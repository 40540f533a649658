# revsd — the README's two commands:  `make demo`  and  `make test`  (each sets up .venv itself).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch/torchvision: the revsd dev machines take these from local disk. On Colab/Kaggle install into the
# system python with `pip install -r requirements.txt && pip install -e .` instead (keeps their torch).
TORCH   ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?= demo
SUBSET  ?= 2m_first_10k
PYTEST_ARGS ?=

.PHONY: setup demo test data bench clean-working
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

demo: setup            ## the whole pipeline on the embedded sample, offline, CPU
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/revsd pipeline --profile $(PROFILE)

test: setup            ## the test suite
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

data: setup            ## fetch a real DiffusionDB subset into input/diffusiondb (needs internet)
	$(BIN)/revsd data fetch --subset $(SUBSET) --out input/diffusiondb

CPU_BENCH := bench/bench_filter.py bench/bench_features.py bench/bench_dakl.py bench/bench_predict.py bench/curriculum_effect.py
bench: setup           ## CPU speed/memory benchmarks; results in bench/results/ (GPU: see README)
	for b in $(CPU_BENCH); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-working:
	rm -rf working/*/ working/report.md
