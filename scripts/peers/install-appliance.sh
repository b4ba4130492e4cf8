#!/usr/bin/env bash
# Installs the tools the appliance image build (appliance/build.sh) and its boot test need, all
# from Debian bookworm: mmdebstrap, qemu (system emulator and qemu-img from the same suite),
# genisoimage, syslinux, mtools, dosfstools, fdisk, e2fsprogs.
# Idempotent: installs only what is missing (root; apt-get update once when needed).
# qemu-utils from bookworm-backports Breaks bookworm's qemu-system-common; when such a
# qemu-utils is installed it is replaced by bookworm's, the version qemu-system-x86 needs.
set -euo pipefail

need=()
for pair in mmdebstrap:mmdebstrap qemu-system-x86_64:qemu-system-x86 genisoimage:genisoimage \
  syslinux:syslinux mcopy:mtools mkfs.fat:dosfstools sfdisk:fdisk mke2fs:e2fsprogs; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[[ -f /usr/lib/syslinux/mbr/mbr.bin ]] || need+=(syslinux-common)
qsys_installed="$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)"
qutils_installed="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
if [[ ${#need[@]} -eq 0 && -n $qsys_installed && $qsys_installed == "$qutils_installed" ]]; then
  echo "install-appliance: tools present (qemu $qsys_installed)"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-appliance: missing ${need[*]:-a qemu-utils matching qemu-system-x86}; run as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
candidate() { apt-cache policy "$1" | awk '/Candidate:/ {print $2}'; }
qver="$(candidate qemu-system-x86)"
if [[ -z $qver || $qver == "(none)" ]]; then
  apt-get update -qq
  qver="$(candidate qemu-system-x86)"
fi
pkgs=(mmdebstrap qemu-system-x86 "qemu-utils=$qver" genisoimage syslinux syslinux-common mtools
  dosfstools fdisk e2fsprogs)
if ! apt-get install -y -qq --no-install-recommends --allow-downgrades "${pkgs[@]}" >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${pkgs[@]}"
fi
echo "install-appliance: installed ${pkgs[*]}"
