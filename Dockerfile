# syntax=docker/dockerfile:1
# Two images from one file (see README, "Container image"):
#   docker build -t etcd-config-dispenser .                 the dispenser alone
#   docker build --target nginx -t nginx-etcd-certs .       nginx with the dispenser as PID 1
# Both install into a venv built on Debian bookworm, whose python3 (3.11) is the
# one the nginx image gets from apt, so the venv can be copied between them.

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY etcd_config_dispenser ./etcd_config_dispenser
RUN python3 -m venv /opt/etcd-config-dispenser \
 && /opt/etcd-config-dispenser/bin/pip install --no-cache-dir '.[metrics]' \
 && /opt/etcd-config-dispenser/bin/etcd-config-dispenser --version

# nginx whose certificates come from etcd: SIGHUP reloads it after each change.
FROM nginx:1.27-bookworm AS nginx
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/etcd-config-dispenser /opt/etcd-config-dispenser
ENTRYPOINT ["/opt/etcd-config-dispenser/bin/etcd-config-dispenser", \
            "--prefix=/certificates", "--target=/etc/nginx/certs", "--signal=SIGHUP", \
            "--check=nginx -t -q", "--"]
CMD ["nginx", "-g", "daemon off;"]

# The dispenser alone: a sidecar or an init container (--once), no child.
FROM debian:bookworm-slim AS dispenser
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/etcd-config-dispenser /opt/etcd-config-dispenser
ENTRYPOINT ["/opt/etcd-config-dispenser/bin/etcd-config-dispenser"]
CMD ["--help"]
