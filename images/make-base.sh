#!/bin/sh
# Make a local debian:bookworm-slim substitute (no registry reachable). Root only.
set -eu
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ROOTFS=$(mktemp -d /var/tmp/bookworm-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR"
# Same suites as the official image (updates + security), deb822 format.
rm -f "$ROOTFS/etc/apt/sources.list"
cat > "$ROOTFS/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
# What the official image sets up (debuerreotype's "slimify" + docker-clean): no apt caches or
# downloaded .debs kept after apt-get, and no docs/man pages/locales installed by dpkg.
cat > "$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
echo 'Acquire::Languages "none";' > "$ROOTFS/etc/apt/apt.conf.d/docker-no-languages"
echo 'Acquire::GzipIndexes "true";' > "$ROOTFS/etc/apt/apt.conf.d/docker-gzip-indexes"
printf 'APT::AutoRemove::SuggestsImportant "false";\n' > "$ROOTFS/etc/apt/apt.conf.d/docker-autoremove-suggests"
cat > "$ROOTFS/etc/dpkg/dpkg.cfg.d/docker" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
CONF
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/groff/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/lintian/* "$ROOTFS"/usr/share/linda/* "$ROOTFS"/usr/share/locale/*
# Caches the official slim image does not ship.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/*
# Host files debootstrap copies in (podman mounts its own resolv.conf/hostname at run time).
rm -f "$ROOTFS/etc/resolv.conf" "$ROOTFS/etc/hostname"
[ ! -e "$ROOTFS/etc/machine-id" ] || : > "$ROOTFS/etc/machine-id"
tar -C "$ROOTFS" --numeric-owner -c . \
  | podman import --change 'CMD ["bash"]' - localhost/debian:bookworm-slim
podman tag localhost/debian:bookworm-slim docker.io/library/debian:bookworm-slim
