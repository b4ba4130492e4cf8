#!/usr/bin/env bash
# Builds the pcg gateway appliance from Debian bookworm packages and this workspace's release
# binaries: a BIOS-bootable 2 GiB disk (MBR; FAT boot partition with syslinux, ext4 root), written
# as pcg-gateway.qcow2 (KVM/OpenStack) and pcg-gateway.ova (OVF descriptor with vApp properties,
# a streamOptimized VMDK and a SHA-256 manifest).
#
# Usage: appliance/build.sh [--out DIR]
#   Output: DIR (default target/appliance/out): pcg-gateway.ova, pcg-gateway.qcow2,
#   build-info.json (sizes, step times, cache hits).
# Needs: root (mmdebstrap --mode=root, mke2fs -d keep file owners), the tools that
# scripts/peers/install-appliance.sh installs, and the Debian mirror of /etc/apt (no other
# network). Caches under target/appliance/cache (PCG_APPLIANCE_DIR overrides target/appliance):
# the root file system keyed by packages.txt and the mirror, the finished images keyed by every
# input (root file system, binaries, appliance files); a cache hit skips the step.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
app="$repo/appliance"
work="${PCG_APPLIANCE_DIR:-$repo/target/appliance}"
out="$work/out"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
cache="$work/cache"
mkdir -p "$cache" "$out"

t_all=$(date +%s)
declare -A took
declare -A hit
step_name=""
step_t=0
step() {
  if [[ -n $step_name ]]; then took[$step_name]=$(($(date +%s) - step_t)); fi
  step_name="$1"
  step_t=$(date +%s)
  printf '\n==> [%s] %s\n' "$1" "$2"
}
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'printf "build.sh: error: step [%s] failed (line %s: %s)\n" "$step_name" "$LINENO" "$BASH_COMMAND" >&2' ERR

step tools "checking the tools"
missing=()
for pair in cargo:cargo strip:binutils mmdebstrap:mmdebstrap qemu-img:qemu-utils sfdisk:fdisk mkfs.fat:dosfstools \
  mcopy:mtools syslinux:syslinux mke2fs:e2fsprogs sha256sum:coreutils tar:tar; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair%%:*} (Debian package ${pair#*:})")
done
[[ -f /usr/lib/syslinux/mbr/mbr.bin ]] || missing+=("/usr/lib/syslinux/mbr/mbr.bin (Debian package syslinux-common)")
if [[ ${#missing[@]} -gt 0 ]]; then
  die "missing: ${missing[*]}; install them with: sudo bash scripts/peers/install-appliance.sh"
fi
[[ $(id -u) -eq 0 ]] || die "run as root: mmdebstrap --mode=root and mke2fs -d need to set file owners"
mke2fs -V 2>&1 | sed -n 1p # sed reads it all: head could SIGPIPE mke2fs under pipefail

step rootfs "Debian bookworm root file system (mmdebstrap)"
sources=/etc/apt/sources.list.d/debian.sources
[[ -f $sources ]] || sources=/etc/apt/sources.list
[[ -f $sources ]] || die "no apt sources found (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list)"
pkgs="$(grep -v '^\s*#' "$app/packages.txt" | grep -v '^\s*$' | paste -sd, -)"
mmdebstrap_opts=(--variant=minbase --mode=root --format=tar --include="$pkgs" --aptopt='Acquire::Retries "3"'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-include=/usr/share/locale/locale.alias' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/info/*')
rootfs_key="$( { echo "rootfs v1"; printf '%s\n' "${mmdebstrap_opts[@]}"; grep -v '^#' "$sources"; } | sha256sum | cut -c1-16)"
rootfs="$cache/rootfs-$rootfs_key.tar"
if [[ -f $rootfs ]]; then
  hit[rootfs]=true
  echo "cached: $rootfs"
else
  hit[rootfs]=false
  find "$cache" -maxdepth 1 -name 'rootfs-*.tar*' -delete
  mmdebstrap "${mmdebstrap_opts[@]}" bookworm "$cache/rootfs-partial.tar" "$sources"
  mv "$cache/rootfs-partial.tar" "$rootfs"
fi

step binaries "cargo build --release (pcg-gateway, pcgctl, pcg-appliance)"
(cd "$repo" && cargo build --release --locked -p pcg-gateway -p pcgctl -p pcg-appliance)
bins=(pcg-gateway pcgctl pcg-appliance)
for b in "${bins[@]}"; do [[ -x $repo/target/release/$b ]] || die "target/release/$b was not built"; done
version="$(grep -m1 '^version' "$repo/Cargo.toml" | cut -d'"' -f2)"

step key "hashing the inputs"
inputs_key="$( {
  echo "image v1 $rootfs_key"
  for b in "${bins[@]}"; do sha256sum <"$repo/target/release/$b"; done
  (cd "$app" && find build.sh packages.txt ovf rootfs -type f -print0 | sort -z | xargs -0 sha256sum)
  (cd "$app" && find rootfs -print0 | sort -z | xargs -0 stat -c '%n %a')
  cat "$repo/README.md" "$app/README.md"
} | sha256sum | cut -c1-16)"
img="$cache/image-$inputs_key"
echo "image key $inputs_key"

if [[ -f $img/pcg-gateway.ova && -f $img/pcg-gateway.qcow2 && -f $img/pcg-gateway.raw.sha256 ]]; then
  hit[image]=true
  step cached "image up to date in $img"
else
  hit[image]=false
  find "$cache" -maxdepth 1 -name 'image-*' -exec rm -rf {} +
  tmp="$cache/tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  tree="$tmp/tree"
  mkdir "$tree"

  step tree "unpacking the root file system and installing pcg"
  tar --numeric-owner -xpf "$rootfs" -C "$tree"
  cp -a "$app/rootfs/." "$tree/"
  for b in "${bins[@]}"; do
    install -m 0755 "$repo/target/release/$b" "$tree/usr/bin/$b"
    strip --strip-debug "$tree/usr/bin/$b"
  done
  install -d -m 0755 "$tree/usr/share/doc/pcg"
  install -m 0644 "$repo/README.md" "$tree/usr/share/doc/pcg/README.md"
  install -m 0644 "$app/README.md" "$tree/usr/share/doc/pcg/appliance.md"
  chroot "$tree" /usr/sbin/useradd --system --user-group --home-dir /var/lib/pcg --no-create-home \
    --shell /usr/sbin/nologin --comment "pcg gateway" pcg
  install -d -m 0750 -o "$(chroot "$tree" id -u pcg)" -g "$(chroot "$tree" id -g pcg)" "$tree/var/lib/pcg"
  chroot "$tree" chown root:pcg /etc/pcg /etc/pcg/gateway.toml
  chmod 0750 "$tree/etc/pcg"
  chmod 0640 "$tree/etc/pcg/gateway.toml"
  {
    systemctl --root="$tree" enable systemd-networkd.service systemd-resolved.service \
      systemd-timesyncd.service pcg-ssh-hostkeys.service pcg-firstboot.service \
      pcg-gateway.service pcg-console.service pcg-console.timer
    systemctl --root="$tree" mask apt-daily.timer apt-daily-upgrade.timer
  } 2>&1 | sed '/^Created symlink/d'
  echo "enabled: networkd, resolved, timesyncd, pcg-ssh-hostkeys, pcg-firstboot, pcg-gateway, pcg-console(.timer)"
  # Every appliance gets its own SSH host keys and machine id at first boot.
  rm -f "$tree"/etc/ssh/ssh_host_*
  : >"$tree/etc/machine-id"
  rm -f "$tree/var/lib/dbus/machine-id"
  ln -sf /run/systemd/resolve/stub-resolv.conf "$tree/etc/resolv.conf"
  echo "pcg-gateway" >"$tree/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tpcg-gateway\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$tree/etc/hosts"
  echo "LABEL=pcgroot / ext4 defaults,errors=remount-ro 0 1" >"$tree/etc/fstab"
  echo "$version $inputs_key" >"$tree/etc/pcg/appliance-release"
  kernel="$(find "$tree/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -1)"
  initrd="$(find "$tree/boot" -maxdepth 1 -name 'initrd.img-*' | sort | tail -1)"
  [[ -n $kernel && -n $initrd ]] || die "no kernel or initrd under $tree/boot (is linux-image-amd64 in packages.txt?)"

  step disk "BIOS-bootable disk (MBR: FAT boot partition with syslinux, ext4 root; no loop devices)"
  raw="$tmp/pcg-gateway.raw"
  disk_mib=2048
  boot_start=2048                       # sectors
  boot_sectors=$((128 * 2048))          # 128 MiB
  root_start=$((boot_start + boot_sectors))
  root_sectors=$((disk_mib * 2048 - root_start))
  truncate -s "${disk_mib}M" "$raw"
  printf 'label: dos\nstart=%d,size=%d,type=6,bootable\nstart=%d,size=%d,type=83\n' \
    "$boot_start" "$boot_sectors" "$root_start" "$root_sectors" | sfdisk -q "$raw"
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
  off=$((boot_start * 512))
  # mkfs.fat warns that the block count is smaller than the image: it formats the partition only.
  mkfs.fat -F16 -n PCGBOOT --offset "$boot_start" "$raw" $((boot_sectors / 2)) >/dev/null 2>&1 ||
    die "mkfs.fat failed on $raw"
  cat >"$tmp/syslinux.cfg" <<'CFG'
DEFAULT pcg
SERIAL 0 115200
PROMPT 0
TIMEOUT 0
LABEL pcg
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND root=LABEL=pcgroot rw console=tty0 console=ttyS0,115200n8
CFG
  export MTOOLS_SKIP_CHECK=1
  mcopy -i "$raw@@$off" "$kernel" ::/vmlinuz
  mcopy -i "$raw@@$off" "$initrd" ::/initrd.img
  mcopy -i "$raw@@$off" "$tmp/syslinux.cfg" ::/syslinux.cfg
  syslinux --offset "$off" --install "$raw"
  mke2fs -q -t ext4 -L pcgroot -d "$tree" -E offset=$((root_start * 512)) "$raw" $((root_sectors / 2))k
  sha256sum <"$raw" | cut -d' ' -f1 >"$tmp/pcg-gateway.raw.sha256"
  used_kib="$(du -sk "$tree" | cut -f1)"

  step qcow2 "pcg-gateway.qcow2 (compressed)"
  qemu-img convert -f raw -O qcow2 -c "$raw" "$tmp/pcg-gateway.qcow2"

  step vmdk "streamOptimized VMDK"
  vmdk=pcg-gateway-disk1.vmdk
  qemu-img convert -f raw -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic,hwversion=6 \
    "$raw" "$tmp/$vmdk"

  step ova "OVF descriptor, manifest, OVA"
  sed -e "s|@VMDK@|$vmdk|" -e "s|@VMDK_SIZE@|$(stat -c %s "$tmp/$vmdk")|" \
    -e "s|@CAPACITY@|$((disk_mib * 1024 * 1024))|" -e "s|@POPULATED@|$((used_kib * 1024))|" \
    -e "s|@VERSION@|$version|g" -e "s|@BUILD_ID@|$inputs_key|g" \
    "$app/ovf/pcg-gateway.ovf.in" >"$tmp/pcg-gateway.ovf"
  if grep -n '@[A-Z_]*@' "$tmp/pcg-gateway.ovf"; then die "unfilled placeholder in the OVF descriptor"; fi
  (cd "$tmp" && for f in pcg-gateway.ovf "$vmdk"; do
    echo "SHA256($f)= $(sha256sum <"$f" | cut -d' ' -f1)"
  done) >"$tmp/pcg-gateway.mf"
  # OVF requires the descriptor first, then the manifest, then the files in References order.
  (cd "$tmp" && tar --format=ustar --owner=0 --group=0 --numeric-owner -cf pcg-gateway.ova \
    pcg-gateway.ovf pcg-gateway.mf "$vmdk")
  rm -rf "$tree" "$raw" "$tmp/$vmdk"
  mv "$tmp" "$img"
fi

step publish "writing $out"
for f in pcg-gateway.ova pcg-gateway.qcow2 pcg-gateway.ovf pcg-gateway.mf; do
  ln -f "$img/$f" "$out/$f" 2>/dev/null || cp -f "$img/$f" "$out/$f"
done
step done ""
size() { stat -c %s "$1"; }
cat >"$out/build-info.json" <<JSON
{
  "version": "$version",
  "image_key": "$inputs_key",
  "rootfs_key": "$rootfs_key",
  "rootfs_cached": ${hit[rootfs]},
  "image_cached": ${hit[image]},
  "ova_bytes": $(size "$out/pcg-gateway.ova"),
  "qcow2_bytes": $(size "$out/pcg-gateway.qcow2"),
  "rootfs_tar_bytes": $(size "$rootfs"),
  "seconds": {
$(for k in "${!took[@]}"; do printf '    "%s": %s,\n' "$k" "${took[$k]}"; done | sort)
    "total": $(($(date +%s) - t_all))
  }
}
JSON
echo
cat "$out/build-info.json"
echo "appliance: $out/pcg-gateway.ova and $out/pcg-gateway.qcow2"
