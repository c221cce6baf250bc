#!/usr/bin/env bash
# Checks takumi's .deb files (board/deb/build.sh), then installs the one of this machine's
# architecture in a clean root and checks the installed result.
#
#   board/deb/check.sh takumi_<version>_<arch>.deb...
#
# For every package: the files (binary of the right ELF machine, models, profiles, unit, default
# config as a conffile, docs), the control fields, and maintainer scripts that neither create
# users nor enable or start anything.
# For the package of this machine's architecture, in a fresh directory with an empty dpkg
# database (`dpkg --root`, maintainer scripts run chrootless with $DPKG_ROOT set):
#   - dpkg installs it, and the unit is `disabled` (systemctl --root);
#   - nothing was created besides the package's files: no enable symlink, no state, no user;
#   - `systemd-analyze verify --root` passes on the unit as installed and prints nothing (the
#     root gets a copy of this machine's systemd units, for the targets the unit names);
#   - the installed binary, chrooted into the root with the libraries it needs, learns the sample
#     pair and applies it with no --models, TAKUMI_MODELS or config: it finds its models in
#     /usr/share/takumi/models (needs root, or user namespaces for `unshare -r`);
#   - a purge leaves none of the package's files behind.
set -euo pipefail
cd "$(dirname "$0")/../.."
[[ $# -ge 1 ]] || { echo "usage: $0 DEB..." >&2; exit 2; }

fail() { echo "deb check: FAILED: $*" >&2; exit 1; }
ok() { echo "deb check: ok: $*"; }

check_static() { # DEB
    local deb=$1 arch list want
    arch=$(dpkg-deb -f "$deb" Architecture)
    list=$(dpkg-deb -c "$deb" | awk '{print $1, $6}')
    for want in \
        "-rwxr-xr-x ./usr/bin/takumi" \
        "-rw-r--r-- ./usr/share/takumi/models/model.json" \
        "-rw-r--r-- ./usr/share/takumi/models/hypernet.onnx" \
        "-rw-r--r-- ./usr/share/takumi/models/backbone.onnx" \
        "-rw-r--r-- ./usr/share/takumi/models/hypernet.int8.onnx" \
        "-rw-r--r-- ./usr/share/takumi/models/backbone.int8.onnx" \
        "-rw-r--r-- ./usr/share/takumi/profiles/rpi4.toml" \
        "-rw-r--r-- ./usr/share/takumi/profiles/rpi5.toml" \
        "-rw-r--r-- ./usr/share/takumi/profiles/jetson-orin-nano.toml" \
        "-rw-r--r-- ./lib/systemd/system/takumi.service" \
        "-rw-r--r-- ./etc/takumi/station.toml" \
        "-rw-r--r-- ./usr/share/doc/takumi/copyright"; do
        grep -qxF -- "$want" <<<"$list" || fail "$deb lacks $want"
    done
    # nothing outside the package's own places (no /var state, no enable symlink, no sysusers)
    local stray
    stray=$(awk '{print $2}' <<<"$list" |
        grep -vE '^\./((usr|usr/bin|usr/share|usr/share/doc|etc|lib|lib/systemd|lib/systemd/system)/)?$' |
        grep -vE '^\./(usr/share/takumi/|usr/share/doc/takumi/|etc/takumi/)|^\./usr/bin/takumi$|^\./lib/systemd/system/takumi\.service$' ||
        true)
    [[ -z $stray ]] || fail "$deb installs unexpected paths: $stray"
    [[ $(dpkg-deb -f "$deb" Package) == takumi ]] || fail "$deb: Package is not takumi"
    local tmp
    tmp=$(mktemp -d)
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/takumi >"$tmp/takumi"
    # a dynamic binary needs its glibc floor in Depends; a static (musl) one depends on nothing
    if readelf -l "$tmp/takumi" | grep -q 'interpreter'; then
        dpkg-deb -f "$deb" Depends | grep -q '^libc6 (>= 2\.[0-9]*)' || fail "$deb: no libc6 floor in Depends"
    fi
    dpkg-deb -e "$deb" "$tmp/DEBIAN"
    [[ $(cat "$tmp/DEBIAN/conffiles") == /etc/takumi/station.toml ]] || fail "$deb: conffiles"
    for s in preinst postinst prerm postrm; do
        [[ -e $tmp/DEBIAN/$s ]] || continue
        # an install must start and enable nothing; upgrades may try-restart a running station
        if grep -v '^[[:space:]]*#' "$tmp/DEBIAN/$s" | grep -wE 'enable|start|useradd|adduser|systemd-sysusers'; then
            fail "$deb: $s enables, starts or creates something"
        fi
    done
    local machine
    machine=$(readelf -h "$tmp/takumi" | sed -n 's/^ *Machine: *//p')
    case $arch in
    arm64) [[ $machine == AArch64 ]] ;;
    armhf) [[ $machine == ARM ]] ;;
    amd64) [[ $machine == *X86-64* ]] ;;
    *) false ;;
    esac || fail "$deb ($arch) holds a $machine binary"
    rm -rf "$tmp"
    ok "$deb: files, control, conffiles, maintainer scripts ($arch, $machine, $(stat -c %s "$deb") bytes)"
}

check_install() { # DEB
    local deb=$1 r
    r=$(mktemp -d)
    trap 'rm -rf "$r"' RETURN
    mkdir -p "$r/var/lib/dpkg/info" "$r/var/lib/dpkg/updates" "$r/var/lib/dpkg/triggers"
    touch "$r/var/lib/dpkg/status" "$r/var/lib/dpkg/available"
    # the clean root has no libc6 package, hence --force-depends
    dpkg --root="$r" --force-script-chrootless --force-depends --log=/dev/null -i "$deb" >/dev/null 2>&1 ||
        fail "dpkg --root -i $deb"
    dpkg --root="$r" -s takumi | grep -qx 'Status: install ok installed' || fail "not installed"
    local made
    made=$(cd "$r" && find . -path ./var/lib/dpkg -prune -o \( -type f -o -type l \) -print | sort)
    [[ $made == "$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $6}' | sort)" ]] ||
        fail "the install made files that are not the package's: $(comm -23 <(echo "$made") <(dpkg-deb -c "$deb" | awk '{print $6}' | sort))"
    [[ $(systemctl --root="$r" is-enabled takumi.service 2>&1 || true) == disabled ]] ||
        fail "takumi.service is not disabled after install"
    ok "installed in a clean root: only the package's files, takumi.service disabled, no state, no user"

    # the targets and units the unit refers to, from this machine's systemd
    cp -a --no-clobber /lib/systemd/system/. "$r/lib/systemd/system/"
    local v
    v=$(systemd-analyze verify --root="$r" takumi.service 2>&1) || fail "systemd-analyze verify: $v"
    [[ -z $v ]] || fail "systemd-analyze verify warns: $v"
    ok "systemd-analyze verify --root passes on the installed unit"

    # the installed binary, in the root: its libraries, the sample pair, and no model flags
    local lib
    for lib in $(ldd "$r/usr/bin/takumi" | grep -oE '/[^ ]+'); do
        mkdir -p "$r$(dirname "$lib")"
        cp -L "$lib" "$r$lib"
    done
    mkdir -p "$r/tmp/s"
    cp models/samples/pair_before.jpg models/samples/pair_after.jpg "$r/tmp/s/"
    local chroot=("$(command -v chroot)" "$r")
    [[ $(id -u) -eq 0 ]] || chroot=("$(command -v unshare)" -r "${chroot[@]}")
    if ! "${chroot[@]}" /usr/bin/takumi --version >/dev/null 2>&1; then
        [[ ${CI:-} != true ]] || fail "cannot chroot into the root (needs root or user namespaces)"
        echo "deb check: SKIPPED the run in the root: cannot chroot here"
    else
        local log
        log=$(cd "$r" && env -i PATH=/usr/bin "${chroot[@]}" /usr/bin/takumi learn --store /tmp/store \
            --before /tmp/s/pair_before.jpg --after /tmp/s/pair_after.jpg --name smoke 2>&1) ||
            fail "the installed takumi cannot learn without --models: $log"
        log=$(cd "$r" && env -i PATH=/usr/bin "${chroot[@]}" /usr/bin/takumi apply --store /tmp/store \
            --template smoke --input /tmp/s/pair_before.jpg --output /tmp/s/out.png 2>&1) ||
            fail "the installed takumi cannot apply without --models: $log"
        [[ -s $r/tmp/s/out.png ]] || fail "no output from the installed takumi"
        ok "the installed binary learns and applies with its packaged models, no flags"
        rm -rf "$r/tmp/store" "$r/tmp/s"
    fi

    dpkg --root="$r" --force-script-chrootless --log=/dev/null -P takumi >/dev/null 2>&1 || fail "purge"
    [[ ! -e $r/usr/bin/takumi && ! -e $r/etc/takumi && ! -e $r/usr/share/takumi ]] ||
        fail "a purge left the package's files"
    ok "purged: nothing of the package left"
}

host_arch=$(dpkg --print-architecture)
installed=0
for deb in "$@"; do
    check_static "$deb"
    if [[ $(dpkg-deb -f "$deb" Architecture) == "$host_arch" ]]; then
        check_install "$deb"
        installed=1
    fi
done
[[ $installed -eq 1 ]] || fail "no $host_arch package among $*: nothing was installed"
