# The README's two commands. Each makes .venv right for what it runs (scripts/bootstrap.sh), then runs it.
VENV ?= .venv
PYTHON_BIN := $(VENV)/bin/python
export VENV
# Same PATH as an activated venv, so DeepSpeed's JIT ops build with the venv's ninja and stay cached
# (see scripts/bootstrap.sh).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test

demo:  ## install [train,serve] and run a short demo of both packages on the tiny local model
	@bash scripts/bootstrap.sh train,serve
	@$(PYTHON_BIN) scripts/demo.py

test:  ## install [dev] and run every test tier (unit, integration)
	@bash scripts/bootstrap.sh dev
	@$(PYTHON_BIN) -m pytest $(PYTEST_ARGS)
