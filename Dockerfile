# syntax=docker/dockerfile:1
# Two images from one file, built offline (no registry, no package index):
#   debian:bookworm-slim   pulled, or made locally (debootstrap + podman import): images/make-base.sh
#   wheelhouse/            wheels built on the host:  pip wheel -w wheelhouse '.[metrics]'
#
#   make image   (podman build --runtime runc --network=host --pull=never \
#       --target dispenser -t etcd-config-dispenser .)
#   ... --target nginx -t etcd-config-dispenser-nginx .)
#
# Everything is Debian bookworm: the venv's python (3.11) is the one every stage gets from apt,
# so the venv can be copied between stages.

# The nginx image's base: by default Debian's nginx on the same base, which `make image`
# builds first from the debian-nginx stage below (tagged so: buildah cannot name a stage here).
ARG NGINX_BASE=localhost/etcd-config-dispenser-nginx-base

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY wheelhouse /wheelhouse
RUN python3 -m venv /opt/etcd-config-dispenser \
 && /opt/etcd-config-dispenser/bin/pip install --no-cache-dir --no-index --find-links=/wheelhouse \
        'etcd-config-dispenser[metrics]' \
 && /opt/etcd-config-dispenser/bin/pip uninstall -y pip setuptools \
 && /opt/etcd-config-dispenser/bin/etcd-config-dispenser --version

# Python, no pip/venv: what both images share.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/etcd-config-dispenser /opt/etcd-config-dispenser
ENV PATH=/opt/etcd-config-dispenser/bin:$PATH

# Debian's nginx on the same base: the default base of the nginx image, built and tested here
# (make image tags it localhost/etcd-config-dispenser-nginx-base).
FROM debian:bookworm-slim AS debian-nginx
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 nginx-light \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log

# nginx whose certificates come from etcd; the dispenser is PID 1 and starts nginx after the
# first snapshot, SIGHUPs it after each change (if "nginx -t -q" passes). Every setting can be
# overridden with DISPENSER_* (see etcd-config-dispenser --help); ETCD_* says where etcd is.
# Another nginx as the base: --build-arg NGINX_BASE=nginx:1.27-bookworm (any Debian
# bookworm image with nginx: the venv needs bookworm's python3, installed here if missing).
FROM ${NGINX_BASE} AS nginx
RUN command -v python3 >/dev/null || { apt-get update \
 && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*; }
COPY --from=build /opt/etcd-config-dispenser /opt/etcd-config-dispenser
ENV PATH=/opt/etcd-config-dispenser/bin:$PATH \
    DISPENSER_PREFIX=/certificates \
    DISPENSER_TARGET=/etc/nginx/certs \
    DISPENSER_SIGNAL=SIGHUP \
    DISPENSER_CHECK="nginx -t -q"
# SIGQUIT: the dispenser forwards it, nginx then shuts down gracefully (finishes requests).
STOPSIGNAL SIGQUIT
ENTRYPOINT ["etcd-config-dispenser", "--"]
CMD ["nginx", "-g", "daemon off;"]

# The dispenser alone: a sidecar, or an init container with DISPENSER_ONCE=true. Last stage, so
# a build without --target gives this one.
FROM runtime AS dispenser
ENTRYPOINT ["etcd-config-dispenser"]
