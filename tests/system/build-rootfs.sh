#!/usr/bin/env bash
# Builds the virtual OPQ Box's disk: a Debian bookworm root file system (debootstrap, systemd, the
# stock linux-image kernel and a small initrd), written to an ext4 image with `mkfs.ext4 -d` (no
# loop mount), plus the kernel and initrd for qemu's -kernel/-initrd. The result is cached under
# target/system/ keyed by a hash of the recipe (this script and tests/system/rootfs/), so a second
# run reuses it; the directory's path is printed on stdout.
# Usage: tests/system/build-rootfs.sh [amd64|arm64]
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=${1:-amd64}
case $arch in
    amd64) kernel_pkg=linux-image-amd64 ;;
    arm64) kernel_pkg=linux-image-arm64 ;;
    *) echo "build-rootfs: arch must be amd64 or arm64" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "build-rootfs: needs root (debootstrap, chroot, file owners)" >&2; exit 2; }

key=$( (cat tests/system/build-rootfs.sh; echo "$arch"; cd tests/system/rootfs && find . -type f -o -type l | LC_ALL=C sort |
    while read -r f; do echo "$f"; if [ -L "$f" ]; then readlink "$f"; else cat "$f"; fi; done) | sha256sum | cut -c1-16)
out="target/system/rootfs-$arch-$key"
if [ -f "$out/ready" ]; then
    echo "$PWD/$out"
    exit 0
fi

# Debian's mirror as apt is configured here; deb.debian.org otherwise.
mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
[ -n "$mirror" ] || mirror=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\(http[^[:space:]]*\/debian\)[[:space:]]\+bookworm[[:space:]].*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n 1)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

started=$(date +%s)
mkdir -p target/system
work=$(mktemp -d target/system/build-XXXXXX)
root="$work/root"
mounted=()
cleanup() {
    for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

pkgs=systemd,systemd-sysv,udev,kmod,e2fsprogs,dmsetup,initramfs-tools,zstd,$kernel_pkg,bzip2,wget,sudo,python3,ca-certificates
# The debootstrapped tree is cached on its own (keyed by the package list), so that a change to
# the box's files below costs seconds, not a new download.
base="target/system/debootstrap-$arch-$(echo "$pkgs" | sha256sum | cut -c1-12).tar"
if [ ! -f "$base" ]; then
    echo "build-rootfs: debootstrap bookworm $arch from $mirror" >&2
    if [ "$arch" = amd64 ]; then
        debootstrap --variant=minbase --arch="$arch" --include="$pkgs" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
            { tail -n 30 "$work/debootstrap.log" >&2; echo "build-rootfs: debootstrap failed" >&2; exit 1; }
    else
        echo "build-rootfs: $arch is not supported yet" >&2
        exit 2
    fi
    tar -C "$root" --numeric-owner -cf "$base.tmp" .
    mv "$base.tmp" "$base"
else
    mkdir -p "$root"
    tar -C "$root" --numeric-owner -xf "$base"
fi

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
for m in proc sys dev; do
    mount --bind "/$m" "$root/$m"
    mounted=("$root/$m" "${mounted[@]}")
done

# The box's own files: config, the stand-in of the original box-config-daemon, network, markers.
cp -a tests/system/rootfs/. "$root/"
chown -R root:root "$root/etc" "$root/usr/local"
in_root useradd --create-home --shell /bin/bash --user-group pi
chmod 0440 "$root/etc/sudoers.d/010_pi-nopasswd"
mkdir -p "$root/data" "$root/opt/opq" "$root/var/lib/box-updater" "$root/var/log/opq"
in_root chown pi:pi /var/log/opq

# A small initrd: only what finds and mounts a virtio disk (and dm-log-writes for power-cut tests).
cat >"$root/etc/initramfs-tools/conf.d/opq-vm.conf" <<'CONF'
MODULES=list
COMPRESS=zstd
COMPRESSLEVEL=1
CONF
printf '%s\n' virtio_pci virtio_mmio virtio_blk virtio_net ext4 dm_mod dm_log_writes >"$root/etc/initramfs-tools/modules"
in_root update-initramfs -u -k all >"$work/initramfs.log" 2>&1 || { cat "$work/initramfs.log" >&2; exit 1; }

# Units a measuring box does not need, which only slow down each boot.
in_root systemctl enable systemd-networkd.service box-config-daemon.service opq-vm-ready.service >/dev/null 2>&1
in_root systemctl mask getty@tty1.service serial-getty@ttyS0.service serial-getty@ttyAMA0.service \
    systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer dpkg-db-backup.timer systemd-networkd-wait-online.service \
    systemd-pstore.service getty-static.service getty.target systemd-binfmt.service \
    proc-sys-fs-binfmt_misc.automount systemd-update-utmp.service systemd-update-utmp-runlevel.service \
    systemd-rfkill.socket systemd-journal-flush.service >/dev/null 2>&1 || true
in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/locale/* "$root"/var/log/*.log
: >"$root/etc/machine-id"

for m in "${mounted[@]}"; do umount -l "$m"; done
mounted=()
mkdir -p "$work/out"
kernels=("$root"/boot/vmlinuz-*) initrds=("$root"/boot/initrd.img-*)
cp "${kernels[0]}" "$work/out/vmlinuz"
cp "${initrds[0]}" "$work/out/initrd.img"
rm -f "$root"/boot/initrd.img-*
size_mib=$(( $(du -sm "$root" | cut -f1) + 384 ))
mkfs.ext4 -q -F -L opqroot -d "$root" "$work/out/root.img" "${size_mib}M" >&2
{
    echo "arch $arch"
    echo "mirror $mirror"
    echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - started )) s"
    echo "root.img ${size_mib} MiB, $(du -sm "$root" | cut -f1) MiB used"
} >"$work/out/ready"
rm -rf "$out"
mv "$work/out" "$out"
cat "$out/ready" >&2
echo "$PWD/$out"
