# Sealroom developer commands. A fresh machine needs only Python 3.11+, pip and make.
#   make demo   set everything up and run the whole platform on synthetic data
#   make test   set everything up and run the checks and the test suite (what CI runs)
#   make test-fast   the unit tests only (tests/unit), for quick local loops

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast lint protos protos-check bench lock clean browser

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Sealroom needs Python 3.11 or newer (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/sealroom demo

protos: install
	$(BIN)/python scripts/gen_protos.py

protos-check: install
	$(BIN)/python scripts/gen_protos.py --check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy sealroom enclave_worker coordinator connectors

# The compliance report is checked in a real headless browser: Debian's chromium, installed here
# when it is missing and this runs as root with apt (CI); elsewhere that test says why it skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	  else echo "chromium is not installed: the HTML report test will be skipped (apt-get install chromium)"; fi; }

test: install protos-check lint browser
	$(BIN)/python -m pytest

# Unit tests only: no lint, no browser, no integration or end-to-end platform runs. `make test` is what CI runs.
test-fast: install
	$(BIN)/python -m pytest tests/unit

bench: install
	$(BIN)/python benchmarks/ingest.py

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^sealroom' > constraints.txt.new
	@printf '# Exact versions tested together; `make install` installs with `pip install -c constraints.txt`.\n# Regenerate after changing pyproject.toml: `make lock`.\n' | cat - constraints.txt.new > constraints.txt
	@rm constraints.txt.new

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
