# Two entry points: `make demo` (train + sample on the CPU) and `make test` (the test suite).
# Each creates .venv and installs what it needs; torch comes as the pinned CPU build when absent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)
# Use the shared copy of the data when it is there (tests and CI); else the loader downloads it.
ifneq ($(wildcard $(SHARED_DATA)/tinyshakespeare/input.txt),)
export LINMIX_DATA_DIR ?= $(SHARED_DATA)
endif
DEMO_OUT ?= runs/demo

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/linmix train --preset kops-ts-v2 --set decay_backend=chunk --max-steps 350 --warmup-steps 50 \
		--batch-size 8 --eval-interval 175 --eval-protocols full --out $(DEMO_OUT)
	$(VENV)/bin/linmix sample --ckpt $(DEMO_OUT)/best.pt --prompt "ROMEO:" --tokens 400 --top-k 20

clean:
	rm -rf $(VENV) runs
