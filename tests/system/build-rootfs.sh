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

# The modules to load for `names`, in order, each after what it depends on, as paths under
# /lib/modules/<kver>/, read from the tree's modules.dep (no need to run the tree's modprobe,
# which may be another architecture's). Names may be spelt with - or _.
module_order() {
    local dir=$1
    shift
    awk -v want="$*" '
        function norm(p) { sub(/.*\//, "", p); sub(/\.ko.*$/, "", p); gsub(/-/, "_", p); return p }
        function emit(p) { if (!(p in done)) { done[p] = 1; print p } }
        { key = $1; sub(/:$/, "", key); line[norm(key)] = $0; path[norm(key)] = key }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                m = w[i]; gsub(/-/, "_", m)
                if (!(m in line)) { print "build-rootfs: no module " m > "/dev/stderr"; exit 1 }
                k = split(line[m], deps, " ")
                for (j = k; j >= 2; j--) emit(deps[j])
                emit(path[m])
            }
        }' "$dir/modules.dep"
}

# An initrd: busybox, `modules` (paths under the tree's /lib/modules/<kver>/, in load order) and
# the /init below, as a newc cpio on stdout.
make_initrd() {
    local tree=$1 kver=$2 dir
    shift 2
    dir=$(mktemp -d "$work/initrd-XXXXXX")
    mkdir -p "$dir/bin" "$dir/dev" "$dir/proc" "$dir/sys" "$dir/root" "$dir/lib/modules"
    if [ -f "$tree/usr/bin/busybox" ]; then cp "$tree/usr/bin/busybox" "$dir/bin/"; else cp "$tree/bin/busybox" "$dir/bin/"; fi
    : >"$dir/modules"
    for ko in "$@"; do
        cp "$tree/lib/modules/$kver/$ko" "$dir/lib/modules/"
        echo "/lib/modules/${ko##*/}" >>"$dir/modules"
    done
    cat >"$dir/init" <<'INIT'
#!/bin/busybox sh
# The virtual box's init in its initrd: modules, the root disk (root= on the kernel command
# line), the box's data disk (opq.data=, default /dev/vdb; opq.data=none leaves it to the
# system) on /data with /data/opq on /opt/opq and /data/box-updater on /var/lib/box-updater,
# then systemd (or opq.init=). Anything wrong ends the boot (and qemu, run with -no-reboot).
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "initrd: $*"; sleep 1; reboot -f; }
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
while read -r m; do insmod "$m" || fail "cannot load $m"; done </modules
root=/dev/vda data=/dev/vdb init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case $arg in
        root=/dev/*) root=${arg#root=} ;;
        opq.data=*) data=${arg#opq.data=} ;;
        opq.init=*) init=${arg#opq.init=} ;;
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
exec switch_root /root "$init"
INIT
    chmod 0755 "$dir/init"
    (cd "$dir" && find . | LC_ALL=C sort | cpio --quiet -o -H newc)
    rm -rf "$dir"
}

# A foreign architecture's debootstrap ends in the machine itself (no binfmt_misc on the host):
# the tree boots under qemu with its own kernel, runs the second stage and `trim`, writes the
# tree as a tar to a second disk and powers off. (The tree once came back out of the ext4 image
# through debugfs, which lost set-uid bits, device nodes and hard links: tar, run where the
# tree is, keeps every mode, owner and link.)
second_stage() {
    local kver img tree log boot debs m ko entries
    # The kernel and busybox are only unpacked by the second stage: take them from their packages.
    boot="$work/stage2-boot"
    debs="$root/var/cache/apt/archives"
    mkdir -p "$boot"
    for deb in "$debs"/linux-image-[0-9]*.deb "$debs"/busybox-static_*.deb; do
        dpkg-deb -x "$deb" "$boot"
    done
    kver=$(ls "$boot/lib/modules")
    # No modules.dep yet: the few the machine needs, in dependency order (a missing one is
    # built in).
    local mods=()
    for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk \
        crc16 mbcache jbd2 crc32c_generic ext4; do
        ko=$(cd "$boot/lib/modules/$kver" && find kernel -name "$m.ko*" -o -name "${m//_/-}.ko*" | head -n 1)
        [ -z "$ko" ] || mods+=("$ko")
    done
    make_initrd "$boot" "$kver" "${mods[@]}" >"$work/stage2-initrd.img"
    cat >"$root/opq-second-stage" <<STAGE
#!/bin/sh
# build-rootfs.sh: the second stage of a foreign debootstrap, then the trim, in the machine.
# The first stage leaves /proc a link to the host's /proc (for a chroot there): here it loops.
if [ -L /proc ]; then rm -f /proc; mkdir /proc; fi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
ln -sfn /proc/self/fd /dev/fd
export PATH=/usr/sbin:/usr/bin:/sbin:/bin INITRD=No DEBIAN_FRONTEND=noninteractive
# The second stage unmounts /proc when it ends; the trim needs it (/dev/fd). The tar reads the
# tree through a bind mount of /, which shows what lies under /dev, /proc and /sys (debootstrap's
# device nodes) and nothing mounted there; its list of entries, on a tmpfs, is counted for the
# host, which checks that its tar holds as many.
if /debootstrap/debootstrap --second-stage && { [ -e /proc/self ] || mount -t proc proc /proc; } &&
    root_modules="$root_modules" bash /opq-trim &&
    mkdir -p /mnt && mount --bind / /mnt && mount -t tmpfs tmpfs /tmp &&
    tar -C /mnt --numeric-owner --xattrs --xattrs-include='*' \
        --anchored --exclude=./opq-second-stage --exclude=./opq-trim --exclude=./lost+found \
        -cvf /dev/vdb . >/tmp/opq-tree.list && sync; then
    echo "opq-second-stage: done, \$(wc -l </tmp/opq-tree.list) entries"
else
    tail -n 30 /debootstrap/debootstrap.log 2>/dev/null
    echo "opq-second-stage: failed"
fi
sync
/usr/bin/busybox poweroff -f || /bin/busybox poweroff -f
STAGE
    { echo 'set -euo pipefail'; declare -f trim; echo trim; } >"$root/opq-trim"
    chmod 0755 "$root/opq-second-stage"
    img="$work/stage2.img"
    mkfs.ext4 -q -F -d "$root" "$img" "$(( $(du -sm "$root" | cut -f1) + 1536 ))M"
    # The disk the tar goes to, raw (sparse): as large as the image that holds the tree.
    tree="$work/stage2-tree.tar"
    truncate -s "$(stat -c %s "$img")" "$tree"
    log="$PWD/target/system/second-stage-$arch.log"
    echo "build-rootfs: second stage under qemu-system-aarch64 (console: $log)" >&2
    timeout 7200 qemu-system-aarch64 -accel tcg,thread=multi -machine virt -cpu cortex-a72 -m 1024 -smp 2 \
        -nodefaults -no-user-config -display none -no-reboot \
        -kernel "$boot/boot/vmlinuz-$kver" -initrd "$work/stage2-initrd.img" \
        -append "console=ttyAMA0 root=/dev/vda opq.data=none opq.init=/opq-second-stage" \
        -drive "file=$img,format=raw,if=virtio,cache=unsafe" -drive "file=$tree,format=raw,if=virtio,cache=unsafe" \
        -serial "file:$log" </dev/null >&2 || true
    entries=$(sed -n 's/.*opq-second-stage: done, \([0-9]*\) entries.*/\1/p' "$log")
    [ -n "$entries" ] || { tail -n 40 "$log" >&2; echo "build-rootfs: the second stage failed" >&2; exit 1; }
    # The tree back out of the tar (it ends with its end-of-archive blocks; zeros follow), as
    # many entries as went in: a tar cut short would be read as a shorter one.
    [ "$(tar -tf "$tree" | wc -l)" -eq "$entries" ] ||
        { echo "build-rootfs: the tar on the second disk does not hold the $entries entries written in the machine" >&2; exit 1; }
    rm -rf "$root"
    mkdir -p "$root"
    tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xpf "$tree"
    rm -f "$img" "$tree"
    if [ ! -x "$root/usr/bin/sudo" ] || [ ! -d "$root/usr/lib/modules/$kver" ]; then
        echo "build-rootfs: the tree did not come back out of the second stage's tar" >&2
        exit 1
    fi
}

pkgs=systemd,systemd-sysv,udev,kmod,e2fsprogs,dmsetup,busybox-static,$kernel_pkg,bzip2,wget,sudo,python3
base_key=$( (echo "$pkgs"; echo "$root_modules"; declare -f trim; [ "$arch" = amd64 ] || declare -f second_stage) | sha256sum | cut -c1-12)
base="target/system/base-$arch-$base_key.tar"
if [ ! -f "$base" ]; then
    echo "build-rootfs: debootstrap bookworm $arch from $mirror (minutes; cached in $base)" >&2
    mkdir -p "$PWD/target/system/debs-$arch"
    foreign=()
    [ "$arch" = amd64 ] || foreign=(--foreign)
    debootstrap "${foreign[@]}" --variant=minbase --arch="$arch" --include="$pkgs" --cache-dir="$PWD/target/system/debs-$arch" \
        bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { tail -n 30 "$work/debootstrap.log" >&2; echo "build-rootfs: debootstrap failed" >&2; exit 1; }
    if [ "$arch" = amd64 ]; then
        mount_api
        in_root env root_modules="$root_modules" bash -c "$(declare -f trim); set -euo pipefail; trim"
        umount_api
    else
        # (mkfs.ext4 tells on stdout that it creates the image file; stdout is for the path.)
        second_stage >&2
    fi
    tar -C "$root" --numeric-owner -cf "$base.tmp" .
    mv "$base.tmp" "$base"
    echo "build-rootfs: base tree $(du -sm "$base" | cut -f1) MiB after $(( $(date +%s) - started )) s" >&2
else
    mkdir -p "$root"
    tar -C "$root" --numeric-owner -xf "$base"
fi
kver=$(ls "$root/lib/modules")

# The box's own files: config, the stand-in of the original box-config-daemon, network, markers.
# (From here on only host tools work on the tree, which may be another architecture's.)
cp -a tests/system/rootfs/. "$root/"
chown -R root:root "$root/etc" "$root/usr/local"
useradd --root "$root" --create-home --shell /bin/bash --user-group pi
pi=$(awk -F: '$1 == "pi" { print $3 ":" $4 }' "$root/etc/passwd")
chmod 0440 "$root/etc/sudoers.d/010_pi-nopasswd"
mkdir -p "$root/data" "$root/opt/opq" "$root/var/lib/box-updater" "$root/var/log/opq"
chown "$pi" "$root/var/log/opq"

# Only the units a box needs. The network is qemu's user network with a fixed address, set by
# opq-vm-net.service (busybox ip) instead of systemd-networkd; the disks are mounted by the
# initrd, so nothing waits for udev, which does not run at all.
units="$root/etc/systemd/system"
for u in box-config-daemon.service opq-vm-net.service opq-vm-boot.service opq-vm-ready.service opq-vm-logw.service; do
    # shellcheck disable=SC2013 # WantedBy= holds words: unit names
    for target in $(sed -n 's/^WantedBy=//p' "$units/$u"); do
        mkdir -p "$units/$target.wants"
        ln -sfn "/etc/systemd/system/$u" "$units/$target.wants/$u"
    done
done
for u in getty@tty1.service serial-getty@ttyS0.service serial-getty@ttyAMA0.service \
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
    systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket systemd-udev-trigger.service \
    systemd-udev-settle.service; do
    ln -sfn /dev/null "$units/$u"
done
: >"$root/etc/machine-id"
# Generators the box has nothing for (each is a process before systemd starts any unit); the
# fstab generator stays.
mkdir -p "$root/etc/systemd/system-generators"
for g in "$root"/lib/systemd/system-generators/*; do
    case ${g##*/} in systemd-fstab-generator) ;; *) ln -sfn /dev/null "$root/etc/systemd/system-generators/${g##*/}" ;; esac
done

# The initrd: busybox, the modules that find the disks and the network card, and an /init that
# mounts the root and the box's data and hands over to systemd. (initramfs-tools' initrd starts
# udev and waits for it to settle, and a mount of the data disk by systemd would wait for udev
# again: many seconds under emulation.)
mkdir -p "$work/out"
mapfile -t order < <(module_order "$root/lib/modules/$kver" "$initrd_modules")
make_initrd "$root" "$kver" "${order[@]}" >"$work/out/initrd.img"

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
# The old updater runs `sudo ./install_update.sh`: sudo refuses to run unless it is set-uid root,
# which a tree carried out of a foreign machine once lost without a word.
if [ ! -u "$root/usr/bin/sudo" ] || [ "$(stat -c %u "$root/usr/bin/sudo")" != 0 ]; then
    echo "build-rootfs: $root/usr/bin/sudo is not set-uid root ($(stat -c '%A %u:%g' "$root/usr/bin/sudo")): the tree lost its modes" >&2
    exit 1
fi
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
