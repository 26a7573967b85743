#!/usr/bin/env bash
# Install and configure Podman + Buildah from Debian's packages for the `images` test tier and
# `motioncharacter images build` on a machine like this project's (root without CAP_SYS_RESOURCE,
# hybrid cgroups: crun fails, runc works; overlay storage, not vfs which copies each layer per
# container). Writes /etc/containers/{containers,storage}.conf only when they are absent.
# debootstrap makes the Debian base when no registry can be reached (docker/README.md).
set -euo pipefail
need=()
for b in podman buildah runc debootstrap; do command -v "$b" >/dev/null || need+=("$b"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah runc debootstrap
fi
mkdir -p /etc/containers
if [ ! -f /etc/containers/containers.conf ]; then
  cat > /etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi
if [ ! -f /etc/containers/storage.conf ]; then
  cat > /etc/containers/storage.conf <<'CONF'
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
CONF
fi
podman --version
