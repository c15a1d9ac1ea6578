# Two commands do everything on a fresh Debian machine:
#   make demo   a local etcd, the dispenser as nginx's entrypoint, a TLS certificate rotated
#   make test   the whole test suite against a real etcd (and nginx)
# Both install what they need first (system packages need root).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# python3-venv: a minimal Debian has python3 without venv and ensurepip.
APT_PACKAGES := etcd-server etcd-client nginx-light openssl curl python3-venv
# What the installed package is made of: a change to any of them reinstalls it
# (the directory too: its time changes when a module is removed or renamed).
SOURCES := etcd_config_dispenser $(wildcard etcd_config_dispenser/*.py) setup.cfg pyproject.toml \
	README.md

.PHONY: all deps venv install install-run test lint demo bench clean image-deps base-image \
	wheelhouse image image-test

all: test

deps:
	@missing=""; \
	for tool in /usr/bin/etcd /usr/bin/etcdctl /usr/sbin/nginx /usr/bin/openssl /usr/bin/curl; do \
		[ -x $$tool ] || missing=yes; \
	done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing=yes; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "run 'make deps' first (python3-venv)"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python

# A real (non-editable) install: the tests run the package as users get it.
# build/ is removed first: setuptools would otherwise ship a module deleted from the tree.
# Stamps: a second `make demo` or `make test` installs nothing unless a source changed.
$(VENV)/.installed-run: $(SOURCES) | $(BIN)/python
	rm -rf build
	$(BIN)/python -m pip install -q .
	$(BIN)/python -m pip install -q --no-deps --force-reinstall .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-run
	$(BIN)/python -m pip install -q '.[test,lint,metrics]'
	touch $@

# The package and what it needs to run: enough for the demo and the benchmark.
install-run: $(VENV)/.installed-run

# Besides, the test, lint and metrics extras.
install: $(VENV)/.installed-dev

test: deps install
	cd tests && ../$(BIN)/python -m pytest -q -m "not container"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: deps install-run
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.demo

bench: deps install-run
	$(BIN)/python -m scripts.bench

# -- container images (podman; see README "Container images") ---------------------------
# runc: crun refuses hosts that mix cgroup v1 and v2. --pull=never: the base is ours or
# pulled once by base-image, never fetched behind the user's back.
PODMAN := podman --runtime runc
IMAGES := etcd-config-dispenser etcd-config-dispenser-nginx
REGISTRY_PROBE := https://registry-1.docker.io/v2/

image-deps:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap; }

# debian:bookworm-slim: present, else pulled, else (no registry answers) made with debootstrap.
base-image: image-deps
	@$(PODMAN) image exists docker.io/library/debian:bookworm-slim || { \
		if curl -s -m 5 -o /dev/null $(REGISTRY_PROBE); then \
			$(PODMAN) pull docker.io/library/debian:bookworm-slim; \
		else \
			echo "no registry answers: making debian:bookworm-slim with debootstrap"; \
			./images/make-base.sh; \
		fi; }

# The package and its dependencies as wheels, built here: the image build needs no package
# index (nor does an air-gapped site: copy the wheelhouse).
wheelhouse: install-run
	rm -rf wheelhouse build
	$(BIN)/python -m pip wheel -q -w wheelhouse '.[metrics]'

image: base-image wheelhouse
	$(PODMAN) build --network=host --pull=never --target dispenser -t etcd-config-dispenser .
	$(PODMAN) build --network=host --pull=never --target debian-nginx \
		-t etcd-config-dispenser-nginx-base .
	$(PODMAN) build --network=host --pull=never --target nginx -t etcd-config-dispenser-nginx .
	@$(PODMAN) image prune -f >/dev/null
	@$(PODMAN) images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep etcd-config-dispenser

image-test: deps install image
	cd tests && ../$(BIN)/python -m pytest -q -m container

clean:
	rm -rf $(VENV) build *.egg-info demo-run wheelhouse
