# Entry points for a fresh machine (see README): `make demo` and `make test`.
#
# Installs are locked. torch is installed first from its own pin (a CPU machine keeps its CPU
# wheel, a CUDA machine gets the CUDA build of the same version, with the triton that build
# pins); every other package comes from requirements.lock at the exact version CI tested;
# the project itself goes in last without dependencies, and `pip check` proves the set is
# consistent. pyproject.toml keeps ranges, for users who install unimm as a library.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
TORCH_VERSION ?= 2.13.0
# A CPU torch wheel brings no triton; torchtitan imports it and the kernel tests interpret it.
TRITON_VERSION ?= 3.9.0
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
# The lock is resolved for this interpreter and platform.
LOCK_PYTHON ?= 3.11
LOCK_PLATFORM ?= x86_64-manylinux_2_28

define install_torch
	$(1) -m pip install --quiet pip==$(PIP_VERSION)
	$(1) -m pip install --quiet torch==$(TORCH_VERSION)
	$(1) -c "import triton" 2>/dev/null || $(1) -m pip install --quiet triton==$(TRITON_VERSION)
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(call install_torch,$(PY))
	$(PY) -m pip install --quiet -r $(LOCK) torch==$(TORCH_VERSION)  # a lock at odds with this torch fails here, never swaps it
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .  # the locked setuptools builds it
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

# The demo (README "Two commands"): one-shape images (one large shape near the centre) with
# their captions written once to runs/demo_data_centred (recipe demo's shards), the demo recipe
# trained on them, a samples grid (runs/demo/samples/samples.png), the targets scored on 64
# held-out scenes (runs/demo/demo_targets.{json,png}) and unimm eval's generation and
# captioning reports (runs/demo/eval/step-N/).
DEMO_DATA := runs/demo_data_centred
$(DEMO_DATA)/manifest.json: | install
	$(PY) -m unimm.data_pipelines.write_shards --out $(DEMO_DATA) --count single_object_centred=8000 \
		--encoder raw_pixels --image-size 32 --patch 8 --per-shard 1000

demo: install $(DEMO_DATA)/manifest.json
	$(VENV)/bin/unimm train --recipe demo --out runs/demo
	$(VENV)/bin/unimm sample --run runs/demo --recipe demo
	$(PY) tools/demo_targets.py --run runs/demo --n 64
	$(VENV)/bin/unimm eval --run runs/demo --suite generation captioning --prompts 64 --captions 64

test: install
	$(PY) -m pytest -q

# Re-resolve the lock to the newest releases pyproject.toml allows. torch is resolved at
# TORCH_VERSION against its CPU wheel (PIP_FIND_LINKS, where this machine keeps it) so that
# the CUDA build's dependencies stay out of the lock; torch and triton are not written to it.
# LOCK_CONSTRAINTS keeps the lock installable beside every supported torch, not only
# TORCH_VERSION: torch 2.11 (the oldest supported, the GPU image's) requires setuptools<82.
LOCK_CONSTRAINTS := setuptools<82
lock:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==$(UV_VERSION)
	printf 'torch==$(TORCH_VERSION)\n$(LOCK_CONSTRAINTS)\n' | $(VENV)/bin/uv pip compile pyproject.toml - --quiet \
		--extra test --extra hf --python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) \
		$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) \
		--no-emit-package torch --no-emit-package triton --upgrade -o $(LOCK)
	@! grep -q '^nvidia-' $(LOCK) || { echo "make lock: CUDA packages came in through torch; resolve against a CPU torch wheel (set PIP_FIND_LINKS)"; exit 1; }

# The suite on the newest releases pyproject.toml allows (torch stays at TORCH_VERSION), in a
# venv of its own: drift shows here before a user's fresh install meets it.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(call install_torch,$(LATEST)/bin/python)
	echo "torch==$(TORCH_VERSION)" > $(LATEST)/torch-pin.txt  # an upgrade must not swap in a CUDA build
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt -e ".[test,hf]"
	$(LATEST)/bin/python tools/lock_drift.py $(LOCK) $(LATEST)/bin/python
	$(LATEST)/bin/python -m pytest -q

.PHONY: install demo test lock test-latest
