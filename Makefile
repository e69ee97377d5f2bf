# One command to a trained model, one to the tests. Both create .venv first.
PYTHON ?= python3
VENV := .venv
# The PyTorch build to install; override for another platform, e.g.
#   make demo TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# one resolver pass; --no-compile skips byte-compiling all of torch up front
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-compile $(TORCH) -e '.[test]'
	# then byte-compile it all on every core (13 s on 2): where PYTHONDONTWRITEBYTECODE is set, as on
	# CI, no .pyc would ever be written, and every process would compile its imports again (import torch
	# 2.7 s instead of 1.3; PIL's 50 ms in the first picture of a training run); -qq and || true: a few
	# files of torch's tests are for other Python versions and do not compile
	$(VENV)/bin/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/aevb train --epochs 100 --out runs/demo --force
	$(VENV)/bin/aevb eval runs/demo --iw-samples 1000
	$(VENV)/bin/aevb report runs/demo

test: $(VENV)/.installed
	# the layering (pyproject.toml's [tool.importlinter]), then the tests
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/python -m pytest

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) runs
