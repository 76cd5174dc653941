#!/bin/sh
# install_update.sh: the service-level install of one OPQ Box update image.
#
# Run by box-updater, with its working directory the unpacked release and BOX_ROOT,
# BOX_UPDATE_VERSION, BOX_UPDATE_RELEASE_DIR and BOX_UPDATE_PREVIOUS_VERSION set: box-updater has
# already placed the release and will switch /opt/opq/current itself; this script only installs
# the box's systemd units (every `*.service` one level down in the payload), which run the box's
# services through the stable path /opt/opq/current, and reloads systemd.
#
# Run by hand or by the old shell updater (none of those variables set): it migrates the box. It
# copies this release under /opt/opq/releases/, switches /opt/opq/current to it, installs the
# units and enables box-updater, so that later updates go through box-updater.
#
# Every path it writes lies under BOX_ROOT (default /), so it can run in a sandbox.
set -eu

log() { printf 'install_update: %s\n' "$*"; }
die() { printf 'install_update: error: %s\n' "$*" >&2; exit 1; }

release_src=$(pwd -P)
[ -f "$release_src/VERSION" ] || die "no VERSION file in $release_src; run me from the unpacked image directory"
version=$(cat "$release_src/VERSION")
case $version in
    '' | *[!0-9]*) die "VERSION in $release_src is not a decimal number: $version" ;;
esac
name="opq-box-update-$version"

if [ -n "${BOX_UPDATE_RELEASE_DIR:-}" ]; then
    mode=box-updater
    root=${BOX_ROOT:-/}
    [ "${BOX_UPDATE_VERSION:-$version}" = "$version" ] ||
        die "BOX_UPDATE_VERSION=$BOX_UPDATE_VERSION but VERSION says $version"
else
    mode=migrate
    root=${BOX_ROOT:-/}
    if [ "$root" = / ] && [ "$(id -u)" -ne 0 ]; then
        die "migrating a box needs root; run: sudo ./install_update.sh"
    fi
fi
root=${root%/}
opq="$root/opt/opq"
units_dir="$root/etc/systemd/system"
log "mode $mode, version $version, root ${root:-/}, previous ${BOX_UPDATE_PREVIOUS_VERSION:-none}"

# Places this release under releases/ and points current at it, as box-updater would.
migrate_release() {
    releases="$opq/releases"
    dest="$releases/$name"
    mkdir -p "$releases"
    if [ "$release_src" != "$(cd "$dest" 2>/dev/null && pwd -P || true)" ]; then
        rm -rf "$dest.partial"
        cp -a "$release_src" "$dest.partial"
        rm -rf "$dest"
        mv "$dest.partial" "$dest"
    fi
    ln -sfn "releases/$name" "$opq/current.new"
    mv -T "$opq/current.new" "$opq/current"
    sync
    log "current -> releases/$name"
    release_dir=$dest
}

# Copies each unit that changed and enables it for the target its [Install] section names.
install_units() {
    mkdir -p "$units_dir"
    changed=0
    for unit in "$release_dir"/*/*.service; do
        [ -f "$unit" ] || continue
        base=$(basename "$unit")
        if ! cmp -s "$unit" "$units_dir/$base"; then
            cp "$unit" "$units_dir/$base.new"
            chmod 0644 "$units_dir/$base.new"
            mv "$units_dir/$base.new" "$units_dir/$base"
            changed=1
            log "installed unit $base"
        fi
        wanted_by=$(sed -n 's/^WantedBy=[[:space:]]*//p' "$unit" | head -n 1)
        if [ -n "$wanted_by" ]; then
            mkdir -p "$units_dir/$wanted_by.wants"
            ln -sfn "/etc/systemd/system/$base" "$units_dir/$wanted_by.wants/$base"
        fi
    done
    if [ "$changed" = 1 ] && [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
        log "systemd reloaded"
    elif [ "$changed" = 1 ]; then
        log "not reloading systemd (sandbox root or no systemd)"
    fi
}

if [ "$mode" = migrate ]; then
    migrate_release
else
    release_dir=$release_src
fi
install_units
log "done"
