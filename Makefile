# Everything a fresh machine needs: `make test` and `make demo` create .venv,
# install torch first (CPU build 2.13.0 unless TORCH=... says otherwise),
# then the project with its test extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.asrfx-installed

.PHONY: venv test test-all demo bench zoo zoo-sweep zoo-fused zoo-fold-paths zoo-collections zoo-collections-fused clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" tests

demo: $(STAMP)
	$(VENV)/bin/asrfx demo --out out/demo

# timm and torchvision need the CUDA build of torch (it runs on the CPU): a separate environment
# outside the clone, made once and reused (about 5 GB). `make zoo` runs the zoo checks
# (tests/test_zoo_models.py), then the sweep: bench/zoo_sweep.py (one small model per timm family
# with channel attention, and torchvision's SE models; about 16 min on one thread) writes
# bench/results/zoo-timm.{md,json,png}. `make zoo-sweep` runs the sweep alone.
ZOO_VENV ?= ../.zoo-venv
ZOO_PY := $(ZOO_VENV)/bin/python
ZOO_STAMP := $(ZOO_VENV)/.asrfx-zoo-installed

$(ZOO_STAMP):
	test -x $(ZOO_PY) || $(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(ZOO_PY) -m pip install -q timm networkx tabulate tqdm pytest hypothesis matplotlib
	touch $(ZOO_STAMP)

zoo: $(ZOO_STAMP)
	$(ZOO_PY) -m pip install -q --no-deps -e .
	$(ZOO_PY) -m pytest -q -m "zoo" tests/test_zoo_models.py
	$(MAKE) zoo-sweep

zoo-sweep: $(ZOO_STAMP)
	$(ZOO_PY) -m pip install -q --no-deps -e .
	$(ZOO_PY) -c "import matplotlib" 2>/dev/null || $(ZOO_PY) -m pip install -q matplotlib
	$(ZOO_PY) bench/zoo_sweep.py --out bench/results

# the fused training form (prepare(fused=True)) against the multiply form on the sweep's models
# that have BatchNorm: training step, eval and deploy outputs compared (about 15 min; bench/zoo_fused.py ->
# bench/results/zoo-fused.{md,json})
zoo-fused: $(ZOO_STAMP)
	$(ZOO_PY) -m pip install -q --no-deps -e .
	$(ZOO_PY) bench/zoo_fused.py --out bench/results

zoo-fold-paths: $(ZOO_STAMP)
	$(ZOO_PY) -m pip install -q --no-deps -e .
	$(ZOO_PY) bench/zoo_fold_paths.py --out bench/results

# attention models of other collections (pytorchcv, resnest, pretrainedmodels, geffnet,
# segmentation_models_pytorch, vit_pytorch), with the steps and verdicts of zoo-sweep (about 10 min;
# bench/zoo_collections.py -> bench/results/zoo-collections.{md,json}); the collections are
# pure Python and install without their dependencies (torch and timm are there)
ZOO_COLLECTIONS := pytorchcv resnest pretrainedmodels munch six geffnet segmentation-models-pytorch \
	vit-pytorch einops
zoo-collections: $(ZOO_STAMP)
	$(ZOO_PY) -m pip install -q --no-deps -e .
	$(ZOO_PY) -c "import pytorchcv, resnest, pretrainedmodels, geffnet, segmentation_models_pytorch, vit_pytorch" \
		2>/dev/null || $(ZOO_PY) -m pip install -q --no-deps $(ZOO_COLLECTIONS)
	$(ZOO_PY) bench/zoo_collections.py --out bench/results

# the fused training form against the multiply form on the same models (bench/zoo_fused.py's
# steps; about 9 min; bench/results/zoo-collections-fused.{md,json})
zoo-collections-fused: $(ZOO_STAMP)
	$(ZOO_PY) -m pip install -q --no-deps -e .
	$(ZOO_PY) -c "import pytorchcv, resnest, pretrainedmodels, geffnet, segmentation_models_pytorch, vit_pytorch" \
		2>/dev/null || $(ZOO_PY) -m pip install -q --no-deps $(ZOO_COLLECTIONS)
	$(ZOO_PY) bench/zoo_collections.py --fused --out bench/results

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
