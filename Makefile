# The README's two commands: `make up` runs the service, `make test` runs the whole suite.
# Everything they need is installed here, into .venv, from the package registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: up test install install-test lint bench bench-dashboard bench-fused bench-service clean chromium

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fitscope needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

up: $(VENV)/.installed
	$(BIN)/fitscope up

test: $(VENV)/.installed-test chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The browser test drives Debian's chromium. Installed here when missing and possible (root with
# apt-get); otherwise, or if the install fails, `make test` goes on and that one test says why it skips.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
			|| echo "could not install chromium; the browser test will be skipped"; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python bench/overhead.py

bench-dashboard: $(VENV)/.installed
	$(BIN)/python bench/dashboard.py

bench-fused: $(VENV)/.installed
	$(BIN)/python bench/fused.py

bench-service: $(VENV)/.installed
	$(BIN)/python bench/service_fused.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
