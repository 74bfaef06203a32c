# Two commands do everything on a fresh machine (see README.md):
#   make book   set-up + every chapter on the embedded default (papermill) + HTML
#   make test   set-up if needed + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROFILE ?= cpu
BOOK_ARGS ?=

.PHONY: setup setup-browser test test-fast smoke book bench corpus clean-book

setup: $(STAMP)

# Every version comes from constraints.txt (the lock the book and the tests run on); torch 2.13.0:
# on these machines pip takes a local CPU build, elsewhere a CUDA one.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[book,test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# Headless Chromium for the browser test of the built book (Debian package; needs root).
# Without it the browser test is skipped with a message saying how to install it.
setup-browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "note: could not install chromium; the browser test will be skipped"; }

# Tests run in parallel on every core (at most 4; pytest-xdist), grouped as tests/conftest.py says.
# Bytecode is cached even where the environment says not to (PYTHONDONTWRITEBYTECODE): each worker,
# papermill kernel, CLI and torchrun rank of the suite would otherwise compile (and pytest rewrite)
# the same sources again.
test: setup setup-browser
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

# The unit layer (under 2 minutes): every test but those marked slow (tests/conftest.py).
test-fast: setup
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -m "not slow" -n auto --maxprocesses 4 --dist loadgroup

smoke: setup
	$(BIN)/python -m pytest -q -m smoke

book: setup
	$(BIN)/selfrepair book --profile $(PROFILE) $(BOOK_ARGS)

bench: setup
	$(BIN)/python bench/bench_sweep.py $(BENCH_ARGS)

corpus: setup
	$(BIN)/python scripts/build_corpus.py

clean-book:
	rm -rf book/_build
