# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and explicitly: on these machines the pinned wheels lie on local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow lint data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Fashion-MNIST from Debian's package where we can install it; otherwise natgrad
# falls back to torchvision's download on first use.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || echo "apt-get could not install dataset-fashion-mnist; natgrad will try torchvision's download"; \
	else echo "dataset-fashion-mnist not installed (needs root); natgrad will try torchvision's download"; fi

demo: $(VENV)/.installed data
	$(VENV)/bin/natgrad demo --out runs/demo

# Lint and types first (seconds), then the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/mypy

test: $(VENV)/.installed data lint
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed data
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
