# dinoprobe — the main job is `make features && make probe`; `make test` runs the suite.
PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# torch/torchvision pinned to the releases that install from this machine's local wheel files
TORCH_PIN   ?= torch==2.14.1 torchvision==0.29.1

DATA        ?= cifar10
MODEL       ?= vit_small_patch16_dinov3.lvd1689m
WEIGHTS     ?= hub
IMAGE_SIZE  ?= 224
BATCH_SIZE  ?= 64
DEVICE      ?= auto
WORKERS     ?=
DATA_NAME   := $(notdir $(patsubst %/,%,$(DATA)))
WEIGHTS_TAG := $(if $(filter hub random,$(WEIGHTS)),$(WEIGHTS),local)
# `make features` writes here and records the path in cache/LAST so a bare `make probe` finds it
CACHE       ?= cache/$(DATA_NAME)-$(MODEL)-$(IMAGE_SIZE)px-$(WEIGHTS_TAG)
LAST_CACHE  := $(shell cat cache/LAST 2>/dev/null)
PROBE_CACHE := $(if $(filter command line environment,$(origin CACHE)),$(CACHE),$(or $(LAST_CACHE),$(CACHE)))
# a new run directory each time (dinoprobe refuses to replace an existing one without --overwrite)
STAMP       := $(shell date +%Y%m%d-%H%M%S)
RUN         ?= runs/probe-$(notdir $(PROBE_CACHE))-$(STAMP)
SWEEP       ?= runs/sweep-$(notdir $(PROBE_CACHE))-$(STAMP)
EPOCHS      ?= 100
HEAD        ?= mlp
BENCH_SCALE ?= small

.PHONY: install test lint test-gpu features probe sweep bench clean

$(BIN)/dinoprobe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[dev]" $(TORCH_PIN)
	touch $@

install: $(BIN)/dinoprobe

test: $(BIN)/dinoprobe
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: $(BIN)/dinoprobe
	$(BIN)/ruff check .

test-gpu: $(BIN)/dinoprobe
	$(BIN)/python -m pytest -q -m gpu tests

features: $(BIN)/dinoprobe
	$(BIN)/dinoprobe features --data $(DATA) --model $(MODEL) --weights $(WEIGHTS) --cache $(CACHE) \
	  --image-size $(IMAGE_SIZE) --batch-size $(BATCH_SIZE) --device $(DEVICE) $(if $(WORKERS),--workers $(WORKERS))
	@echo $(CACHE) > cache/LAST

probe: $(BIN)/dinoprobe
	$(BIN)/dinoprobe probe --cache $(PROBE_CACHE) --out $(RUN) --head $(HEAD) --epochs $(EPOCHS)

sweep: $(BIN)/dinoprobe
	$(BIN)/dinoprobe sweep --cache $(PROBE_CACHE) --out $(SWEEP) --head linear,mlp \
	  --lr 1e-4,3e-4,1e-3,3e-3,1e-2 --weight-decay 0,1e-4 --epochs $(EPOCHS)

bench: $(BIN)/dinoprobe
	$(BIN)/python -m bench.benchmark --scale $(BENCH_SCALE) --out bench --readme README.md

clean:
	rm -rf $(VENV) *.egg-info
