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
# units and enables box-updater, and installs the guard (a copy of this box-updater kept in
# /var/lib/box-updater/guard/ and box-updater-guard.service, which confirms or rolls back each
# new release at boot), so that later updates go through box-updater.
#
# Either way, when the box still has the original page (box-config-daemon) and its updater.sh,
# that script is replaced by one that asks box-updater for the update: the old Update Box button
# then installs only verified, signed images, atomically, with a way back, instead of running
# whatever the server sends and rebooting whatever happened.
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
        # The old updater unpacked the image as its own user; the release belongs to root.
        if [ "$(id -u)" -eq 0 ]; then chown -R 0:0 "$dest.partial"; fi
        rm -rf "$dest"
        mv "$dest.partial" "$dest"
    fi
    # The release's files durable before current points at them: after a power cut current
    # must not name a release whose files never reached the disk (zero-length on ext4).
    sync
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
        # The guard is never the new release's to replace: box-updater installs it from a
        # release only once that release is confirmed (a migration installs it below).
        [ "$base" = box-updater-guard.service ] && continue
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
    # Durable before box-updater switches to the release (an empty unit file is a masked unit).
    [ "$changed" = 0 ] || sync
    if [ "$changed" = 1 ] && [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
        log "systemd reloaded"
    elif [ "$changed" = 1 ]; then
        log "not reloading systemd (sandbox root or no systemd)"
    fi
}

# The guard of a migrated box: this release's box-updater, outside releases/, and its unit.
install_guard() {
    updater="$release_dir/box-updater/box-updater"
    guard_unit="$release_dir/box-updater/box-updater-guard.service"
    [ -x "$updater" ] && [ -f "$guard_unit" ] || return 0
    guard_dir="$root/var/lib/box-updater/guard"
    mkdir -p "$guard_dir" "$units_dir/multi-user.target.wants"
    cp "$updater" "$guard_dir/.box-updater.new"
    chmod 0755 "$guard_dir/.box-updater.new"
    sync
    mv "$guard_dir/.box-updater.new" "$guard_dir/box-updater"
    cp "$guard_unit" "$units_dir/box-updater-guard.service.new"
    chmod 0644 "$units_dir/box-updater-guard.service.new"
    mv "$units_dir/box-updater-guard.service.new" "$units_dir/box-updater-guard.service"
    ln -sfn /etc/systemd/system/box-updater-guard.service \
        "$units_dir/multi-user.target.wants/box-updater-guard.service"
    sync
    log "installed the guard (box-updater-guard.service)"
}

# The original page's updater, if the box still has it, now asks box-updater for the update.
replace_old_updater() {
    old="$root/usr/local/box-config-daemon/updater/updater.sh"
    [ -f "$old" ] && [ -x "$release_dir/box-updater/box-updater" ] || return 0
    grep -q '^# This updater asks box-updater' "$old" 2>/dev/null && return 0
    cat >"$old.new" <<'SHIM'
#!/bin/sh
# This updater asks box-updater for the update.
# The original Update Box button's updater was replaced by this when box-updater was installed:
# box-updater (port 8080) does the update, which installs only a verified, signed image,
# atomically, and rolls back a release that does not come up. It installs nothing itself and
# never reboots: box-updater reboots the box when an update is installed.
url=http://127.0.0.1:8080
config=/etc/opq/opqbox_config.json
token=$(sed -n 's/.*"updater_token"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$config" 2>/dev/null | head -n 1)
echo "Asking box-updater for the update..."
if ! wget -q -O - --header='Content-Type: application/json' ${token:+--header="X-Box-Token: $token"} \
    --post-data='{}' "$url/box_update"; then
    echo "box-updater did not take the update; is box-updater.service running? Nothing was installed."
    exit 1
fi
# Follow it to its end, so that this log says how it went.
i=0
while [ $i -lt 3600 ]; do
    sleep 1
    i=$((i + 1))
    status=$(wget -q -O - ${token:+--header="X-Box-Token: $token"} "$url/box_update/status") || continue
    case $status in *'"running":false'*) break ;; esac
done
echo "box-updater: $(printf '%s' "$status" | sed -n 's/.*"message":"\([^"]*\)".*/\1/p')"
case $status in *'"state":"failed"'*) exit 1 ;; esac
SHIM
    chmod 0755 "$old.new"
    mv "$old.new" "$old"
    log "the original page's updater.sh now asks box-updater"
}

if [ "$mode" = migrate ]; then
    migrate_release
    install_guard
else
    release_dir=$release_src
fi
install_units
replace_old_updater
log "done"
