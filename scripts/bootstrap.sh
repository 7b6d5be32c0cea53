#!/usr/bin/env bash
# Installs everything xfgate needs on a fresh Debian 12 machine, as root, idempotently:
# Debian packages (qemu, iptables, ipset, conntrack, httperf, busybox-static, build deps of
# NetfilterQueue) and a venv at .venv with xfgate installed in it. Nothing else is downloaded.
# The lab needs: qemu-system-x86, iproute2, busybox-static (guest userland), gcc + libc6-dev
# (static workload binaries), kmod (modinfo: NIC module order); kernels come later from
# `apt-get download` into the cache, never installed. tcpdump counts the red team's packets
# (xfgate_lab/redteam.py). libvirt: the daemon for `xfgate-lab up --hypervisor libvirt` (run by
# the lab itself, no systemd), libvirt-dev + pkg-config to build libvirt-python in the venv.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "bootstrap: must run as root (it installs Debian packages and builds a network lab)" >&2
  exit 2
fi
debs=(qemu-system-x86 qemu-utils iptables ipset conntrack httperf busybox-static
      libnetfilter-queue-dev libc6-dev gcc kmod cpio xz-utils iproute2 procps file
      python3-dev python3-venv tcpdump
      libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
py=${PYTHON:-python3}
if [ ! -x "$here/.venv/bin/python" ]; then
  echo "bootstrap: creating venv $here/.venv"
  "$py" -m venv "$here/.venv"
fi
stamp="$here/.venv/.xfgate-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  echo "bootstrap: installing xfgate and its Python dependencies into .venv"
  "$here/.venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev,xen,libvirt]"
  touch "$stamp"
fi
