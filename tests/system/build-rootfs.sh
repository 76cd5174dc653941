#!/usr/bin/env bash
# Builds the virtual OPQ Box's disk: a Debian bookworm root file system (debootstrap, systemd, the
# stock linux-image kernel), written to an ext4 image with `mkfs.ext4 -d` (no loop mount), plus
# the kernel and a small initrd of our own for qemu's -kernel/-initrd. Two caches under
# target/system/, each keyed by a hash of what makes it:
#   base-<arch>-<key>.tar   the debootstrapped tree, already trimmed (the package list, `trim`);
#   rootfs-<arch>-<key>/    root.img, vmlinuz, initrd.img (this script, tests/system/rootfs/);
# so a change to the box's files costs a repack (seconds), not a download (minutes). The
# directory's path is printed on stdout.
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
work=$(mktemp -d "$PWD/target/system/build-XXXXXX")
root="$work/root"
mounted=()
cleanup() {
    for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
mount_api() {
    for m in proc sys dev; do
        mount --bind "/$m" "$root/$m"
        mounted=("$root/$m" "${mounted[@]}")
    done
}
umount_api() {
    for m in "${mounted[@]}"; do umount -l "$m"; done
    mounted=()
}

# The kernel modules the box needs, with what they depend on: the initrd's (find and mount the
# root disk, the network card) and, in the root file system, the random source and the
# device-mapper targets of the power-cut tests (dm-log-writes, dm-flakey).
initrd_modules="virtio_pci virtio_mmio virtio_blk virtio_net crc32c_generic ext4"
root_modules="$initrd_modules virtio_rng dm_mod dm_log_writes dm_flakey"

# Run in the chroot of a fresh debootstrap: only what a measuring box runs is kept. Most of the
# size is the kernel's 4000 modules; with only a dozen left, udev's coldplug at each boot has
# nothing to load either.
trim() {
    kver=$(ls /lib/modules)
    # shellcheck disable=SC2086 # a list of module names
    keep=$(modprobe -a --show-depends -S "$kver" $root_modules | awk '$1 == "insmod" { print $2 }' | sort -u)
    [ -n "$keep" ] || { echo "build-rootfs: modprobe found none of: $root_modules" >&2; exit 1; }
    find "/lib/modules/$kver/kernel" -name '*.ko*' | sort | comm -23 - <(echo "$keep") | xargs rm -f
    find "/lib/modules/$kver/kernel" -type d -empty -delete
    depmod -a "$kver"
    rm -f /boot/initrd.img-* /boot/System.map-*
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/* \
        /usr/share/locale/* /usr/share/info/* /var/log/*.log /var/cache/debconf/*-old
}

pkgs=systemd,systemd-sysv,udev,kmod,e2fsprogs,dmsetup,busybox-static,$kernel_pkg,bzip2,wget,sudo,python3
base="target/system/base-$arch-$( (echo "$pkgs"; echo "$root_modules"; declare -f trim) | sha256sum | cut -c1-12).tar"
if [ ! -f "$base" ]; then
    echo "build-rootfs: debootstrap bookworm $arch from $mirror (minutes; cached in $base)" >&2
    [ "$arch" = amd64 ] || { echo "build-rootfs: $arch needs a foreign debootstrap, not supported yet" >&2; exit 2; }
    mkdir -p "$PWD/target/system/debs-$arch"
    debootstrap --variant=minbase --arch="$arch" --include="$pkgs" --cache-dir="$PWD/target/system/debs-$arch" \
        bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { tail -n 30 "$work/debootstrap.log" >&2; echo "build-rootfs: debootstrap failed" >&2; exit 1; }
    mount_api
    in_root env root_modules="$root_modules" bash -c "$(declare -f trim); set -euo pipefail; trim"
    umount_api
    tar -C "$root" --numeric-owner -cf "$base.tmp" .
    mv "$base.tmp" "$base"
    echo "build-rootfs: base tree $(du -sm "$base" | cut -f1) MiB after $(( $(date +%s) - started )) s" >&2
else
    mkdir -p "$root"
    tar -C "$root" --numeric-owner -xf "$base"
fi
kver=$(ls "$root/lib/modules")

# The box's own files: config, the stand-in of the original box-config-daemon, network, markers.
cp -a tests/system/rootfs/. "$root/"
chown -R root:root "$root/etc" "$root/usr/local"
mount_api
in_root useradd --create-home --shell /bin/bash --user-group pi
chmod 0440 "$root/etc/sudoers.d/010_pi-nopasswd"
mkdir -p "$root/data" "$root/opt/opq" "$root/var/lib/box-updater" "$root/var/log/opq"
in_root chown pi:pi /var/log/opq

# Only the units a box needs. The network is qemu's user network with a fixed address, set by
# opq-vm-net.service (busybox ip) instead of systemd-networkd; the data disk needs no fsck at
# each boot (the power-cut tests check it from the host).
in_root systemctl enable box-config-daemon.service opq-vm-net.service opq-vm-boot.service opq-vm-ready.service >/dev/null 2>&1
in_root systemctl mask getty@tty1.service serial-getty@ttyS0.service serial-getty@ttyAMA0.service \
    systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer dpkg-db-backup.timer systemd-tmpfiles-clean.timer \
    systemd-networkd.service systemd-networkd.socket systemd-networkd-wait-online.service \
    systemd-network-generator.service systemd-pstore.service getty-static.service getty.target \
    systemd-binfmt.service proc-sys-fs-binfmt_misc.automount systemd-update-utmp.service \
    systemd-update-utmp-runlevel.service systemd-rfkill.socket systemd-journal-flush.service \
    systemd-sysusers.service systemd-hwdb-update.service ldconfig.service systemd-journal-catalog-update.service \
    systemd-firstboot.service systemd-random-seed.service systemd-modules-load.service systemd-remount-fs.service \
    systemd-fsckd.socket systemd-fsckd.service systemd-machine-id-commit.service \
    sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount \
    dev-hugepages.mount dev-mqueue.mount modprobe@drm.service modprobe@fuse.service modprobe@configfs.service \
    modprobe@efi_pstore.service modprobe@loop.service modprobe@dm_mod.service \
    systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket systemd-udev-trigger.service systemd-udev-settle.service >/dev/null 2>&1 || true
: >"$root/etc/machine-id"
# Generators the box has nothing for (each is a process before systemd starts any unit); the
# fstab generator stays.
mkdir -p "$root/etc/systemd/system-generators"
for g in "$root"/lib/systemd/system-generators/*; do
    case ${g##*/} in systemd-fstab-generator) ;; *) ln -sfn /dev/null "$root/etc/systemd/system-generators/${g##*/}" ;; esac
done

# The initrd: busybox, the modules that find and mount the disks, and an /init that loads them,
# mounts the root and the box's data and hands over to systemd. (initramfs-tools' initrd starts
# udev and waits for it to settle, and the data disk's mount at boot would wait for udev again:
# many seconds under emulation.)
initrd="$root/tmp/initrd"
mkdir -p "$initrd/bin" "$initrd/dev" "$initrd/proc" "$initrd/sys" "$initrd/root" "$initrd/lib/modules"
cp "$root/usr/bin/busybox" "$initrd/bin/busybox"
# shellcheck disable=SC2086 # a list of module names
in_root modprobe -a --show-depends -S "$kver" $initrd_modules | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$work/initrd.order"
while read -r ko; do
    cp "$root$ko" "$initrd/lib/modules/"
    echo "/lib/modules/$(basename "$ko")" >>"$initrd/modules"
done <"$work/initrd.order"
cat >"$initrd/init" <<'INIT'
#!/bin/busybox sh
# The virtual box's init in its initrd: modules, the root disk (root= on the kernel command
# line), the box's data disk (opq.data=, default /dev/vdb; opq.data=none leaves it to the
# system) on /data with /data/opq on /opt/opq and /data/box-updater on /var/lib/box-updater,
# then systemd. Anything wrong ends the boot (and qemu, which runs with -no-reboot).
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "initrd: $*"; sleep 1; reboot -f; }
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
while read -r m; do insmod "$m" || fail "cannot load $m"; done </modules
root=/dev/vda data=/dev/vdb
for arg in $(cat /proc/cmdline); do
    case $arg in
        root=/dev/*) root=${arg#root=} ;;
        opq.data=*) data=${arg#opq.data=} ;;
    esac
done
wait_dev() {
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1))
        [ $i -le 100 ] || fail "no $1 after 10 s"
        sleep 0.1
    done
}
wait_dev "$root"
mount -t ext4 -o rw "$root" /root || fail "cannot mount $root"
if [ "$data" != none ]; then
    wait_dev "$data"
    mount -t ext4 -o rw "$data" /root/data || fail "cannot mount $data on /data"
    mount --bind /root/data/opq /root/opt/opq || fail "no opq/ on $data"
    mount --bind /root/data/box-updater /root/var/lib/box-updater || fail "no box-updater/ on $data"
fi
mount --move /dev /root/dev
umount /proc
exec switch_root /root /sbin/init
INIT
chmod 0755 "$initrd/init"
mkdir -p "$work/out"
in_root sh -c 'cd /tmp/initrd && find . | sort | cpio --quiet -o -H newc' >"$work/out/initrd.img"
rm -rf "$initrd"
umount_api

# The kernel for qemu: on x86_64 the ELF image inside the compressed one, which qemu boots
# directly (PVH entry); the kernel's own XZ decompression takes many seconds under emulation.
if [ "$arch" = amd64 ]; then
    in_root python3 -c '
import lzma, sys
data = open(sys.argv[1], "rb").read()
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[data.index(b"\xfd7zXZ\x00"):])
assert elf[:4] == b"\x7fELF", "not an XZ-compressed x86 kernel"
sys.stdout.buffer.write(elf)' "/boot/vmlinuz-$kver" >"$work/out/vmlinuz"
else
    cp "$root/boot/vmlinuz-$kver" "$work/out/vmlinuz"
fi
rm -f "$root"/boot/vmlinuz-* "$root"/boot/config-*
size_mib=$(( $(du -sm "$root" | cut -f1) + 256 ))
mkfs.ext4 -q -F -L opqroot -d "$root" "$work/out/root.img" "${size_mib}M" >&2
{
    echo "arch $arch, kernel $kver"
    echo "mirror $mirror"
    echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - started )) s"
    echo "root.img ${size_mib} MiB, $(du -sm "$root" | cut -f1) MiB used; initrd $(du -k "$work/out/initrd.img" | cut -f1) KiB"
} >"$work/out/ready"
rm -rf "$out"
mv "$work/out" "$out"
# Older recipes' disks are of no more use.
for old in target/system/rootfs-"$arch"-*; do
    [ "$old" = "$out" ] || rm -rf "$old"
done
cat "$out/ready" >&2
echo "$PWD/$out"
