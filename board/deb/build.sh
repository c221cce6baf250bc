#!/usr/bin/env bash
# Builds takumi's .deb for one architecture from an already built binary, with dpkg-deb alone
# (no cargo-deb to install: CI's time goes to the builds, not to tooling).
#
#   board/deb/build.sh arm64|armhf|amd64 BINARY [OUT_DIR]    -> OUT_DIR/takumi_<version>_<arch>.deb
#
# The package holds the binary (/usr/bin/takumi), the models (/usr/share/takumi/models, where
# takumi looks when no --models, TAKUMI_MODELS or config says otherwise), the board profiles
# (/usr/share/takumi/profiles), the systemd unit (/lib/systemd/system/takumi.service) and a
# default config (/etc/takumi/station.toml, a conffile). Installing it creates no user (the unit
# runs as a DynamicUser), no state (systemd makes /var/lib/takumi when the service first starts)
# and enables or starts nothing: the maintainer scripts only reload systemd, restart a service
# that was already running on upgrade, and stop it on removal. board/deb/check.sh checks all this.
set -euo pipefail
cd "$(dirname "$0")/../.."

[[ $# -ge 2 && $# -le 3 ]] || { echo "usage: $0 arm64|armhf|amd64 BINARY [OUT_DIR]" >&2; exit 2; }
arch=$1 bin=$2 out=${3:-target/deb}
case $arch in arm64 | armhf | amd64) ;; *) echo "$0: unknown architecture $arch" >&2; exit 2 ;; esac
[[ -x $bin ]] || { echo "$0: $bin: no such executable" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
# the ELF machine must be the package's: a host binary in an arm64 package installs and never runs
want_machine=$(case $arch in arm64) echo AArch64 ;; armhf) echo ARM ;; amd64) echo X86-64 ;; esac)
machine=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
[[ $machine == *"$want_machine"* ]] || { echo "$0: $bin is $machine, not $arch" >&2; exit 1; }

# Depends from what the binary links: its newest GLIBC_ symbol version is libc6's floor (a static
# musl binary links nothing and depends on nothing)
glibc=$(objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1 || true)
deps=()
[[ -z $glibc ]] || deps+=("libc6 (>= $glibc)")
for lib in $(objdump -p "$bin" | awk '/NEEDED/ {print $2}'); do
    case $lib in
    libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux*) ;;
    libgcc_s.so.1) deps+=("libgcc-s1") ;;
    *) echo "$0: $bin needs $lib: map it to a package here" >&2; exit 1 ;;
    esac
done
depends=$(IFS=,; echo "${deps[*]}" | sed 's/,/, /g')

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/takumi
install -d "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/takumi/models" \
    "$root/usr/share/takumi/profiles" "$root/lib/systemd/system" "$root/etc/takumi" \
    "$root/usr/share/doc/takumi"
install -m 755 "$bin" "$root/usr/bin/takumi"
install -m 644 models/model.json models/hypernet.onnx models/backbone.onnx \
    models/hypernet.int8.onnx models/backbone.int8.onnx "$root/usr/share/takumi/models/"
install -m 644 board/rpi4.toml board/rpi5.toml board/jetson-orin-nano.toml "$root/usr/share/takumi/profiles/"
install -m 644 systemd/takumi.service "$root/lib/systemd/system/"
# the default config: the most conservative profile (float, 640x480 YUYV), which runs on every
# board; the operator copies the board's own profile over it (board/README.md)
{
    echo "# /etc/takumi/station.toml: the package's default, the Raspberry Pi 4 profile. For another board,"
    echo "# copy its profile from /usr/share/takumi/profiles/ over this file; then set station.id, [camera]"
    echo "# and [mqtt] (board/README.md, /usr/share/doc/takumi/BOARDS.md)."
    cat board/rpi4.toml
} >"$root/etc/takumi/station.toml"
chmod 644 "$root/etc/takumi/station.toml"
install -m 644 README.md "$root/usr/share/doc/takumi/README.md"
install -m 644 board/README.md "$root/usr/share/doc/takumi/BOARDS.md"
install -m 644 models/MODEL_CARD.md "$root/usr/share/doc/takumi/MODEL_CARD.md"
cat >"$root/usr/share/doc/takumi/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: takumi

Files: *
License: MIT OR Apache-2.0
COPYRIGHT

echo /etc/takumi/station.toml >"$root/DEBIAN/conffiles"

# Maintainer scripts: the dh_installsystemd behaviour minus enabling and starting. $DPKG_ROOT is
# set when dpkg installs into another root (CI's check), where the host's systemd is not ours.
cat >"$root/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
    # an upgrade restarts a station that was running; a first install starts nothing
    if [ -n "$2" ]; then
        systemctl try-restart takumi.service >/dev/null || true
    fi
fi
exit 0
SCRIPT
cat >"$root/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl stop takumi.service >/dev/null || true
fi
exit 0
SCRIPT
cat >"$root/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    # the station's state (templates, outbox) and an operator's enable symlink; the dynamic
    # user's state lives under /var/lib/private, with /var/lib/takumi a link to it
    rm -rf "$DPKG_ROOT/var/lib/private/takumi" "$DPKG_ROOT/var/lib/takumi" \
        "$DPKG_ROOT/etc/systemd/system/multi-user.target.wants/takumi.service"
fi
if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
exit 0
SCRIPT
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

installed_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: takumi
Version: $version
Architecture: $arch
Maintainer: takumi maintainers <takumi@localhost>
Installed-Size: $installed_kb
${depends:+Depends: $depends
}Recommends: v4l-utils
Suggests: mosquitto-clients
Section: misc
Priority: optional
Description: learn a visual edit from one before/after pair and replay it on a line
 takumi learns an edit template from one before/after photo pair and applies it to every
 capture of a production line, on the board itself (Raspberry Pi 4/5, Jetson Orin), with an
 MQTT interface for the line. The service is installed disabled: see
 /usr/share/doc/takumi/BOARDS.md to configure and enable it.
CONTROL

mkdir -p "$out"
deb=$out/takumi_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb: $(stat -c %s "$deb") bytes, Depends: ${depends:-none}"
