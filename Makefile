# Two commands do everything on a fresh Debian machine:
#   make demo   a local etcd, the dispenser as nginx's entrypoint, a TLS certificate rotated
#   make test   the whole test suite against a real etcd (and nginx)
# Both install what they need first (system packages need root).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := etcd-server etcd-client nginx-light openssl curl

.PHONY: all deps venv install test lint demo bench clean

all: test

deps:
	@missing=""; \
	for tool in /usr/bin/etcd /usr/bin/etcdctl /usr/sbin/nginx /usr/bin/openssl /usr/bin/curl; do \
		[ -x $$tool ] || missing=yes; \
	done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python

# A real (non-editable) install: the tests run the package as users get it.
# build/ is removed first: setuptools would otherwise ship a module deleted from the tree.
install: venv
	rm -rf build
	$(BIN)/python -m pip install -q '.[test,lint,metrics]'
	$(BIN)/python -m pip install -q --no-deps --force-reinstall .

test: deps install
	cd tests && ../$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: deps install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.demo

bench: deps install
	$(BIN)/python -m scripts.bench

clean:
	rm -rf $(VENV) build *.egg-info demo-run
