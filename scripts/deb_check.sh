#!/usr/bin/env bash
# Install the Debian packages the way a fresh device does, and check them (docs/install.md).
#
#   scripts/deb_check.sh [--skip-arm64] [--skip-lintian]
#
#   1. Build edge-agent_<v>-1 and -2 for amd64 and -1 for arm64 (scripts/build_deb.sh).
#   2. lintian on the amd64 package: no error or warning left that is not overridden (each
#      override is explained in packaging/deb/lintian-overrides).
#   3. A clean Debian 12 root (mmdebstrap --variant=minbase, plus systemd, which a device
#      runs), made once and cached as a tarball keyed by the APT sources and the package list.
#      In it, as root in a chroot: `apt-get install ./edge-agent_<v>-1_amd64.deb` (apt
#      resolves the dependencies from Debian's mirror); then `edge-agent score --example` must
#      decide what the checkout decides (scripts/arm/compare_decisions.py) with the accuracy
#      the manifest states; `systemd-analyze verify` of the installed unit must be silent and
#      `systemd-analyze security --offline` must rate it at most $MAX_EXPOSURE; the user, the
#      state folder, the conffile and the enabled-but-not-started unit are checked.
#   4. The upgrade to -2 with a hard case in the outbox and a pushed release serving
#      (scripts/deb/upgrade_check.py), then `apt-get remove` (state and config kept) and
#      `apt-get purge` (state gone).
#   5. arm64: an arm64 root whose packages apt resolves from the arm64 package's Depends
#      (private APT_CONFIG, download only; cached), the package unpacked into it, and
#      `edge-agent score --example` run there under qemu (cortex-a72) — the decisions must be
#      the amd64 root's. This machine has no binfmt_misc, so the arm64 root cannot run dpkg's
#      maintainer scripts (they are the same shell scripts step 3 and 4 run on amd64).
#
# Everything reusable is cached in $DEB_CACHE (default ~/.cache/edge-agent-deb): the roots'
# tarballs, the wheels; a run's files are in $DEB_CACHE/run. Runs as root (chroot, mounts).
# Exit status 0 only if every check passed. Prints the time of each step.
set -euo pipefail

REPO=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DEB_CACHE:-$HOME/.cache/edge-agent-deb}
WORK=$CACHE/run
PY=${DEB_NATIVE_PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm
MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}
ROOT_PACKAGES=systemd
QEMU_CPU=${DEB_QEMU_CPU:-cortex-a72}
BUNDLED=/usr/lib/edge-agent/lib/python3.11/site-packages/edge_agent/bundled

arm64=1
lint=1
for arg in "$@"; do
    case $arg in
        --skip-arm64) arm64=0 ;;
        --skip-lintian) lint=0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "usage: $0 [--skip-arm64] [--skip-lintian]" >&2; exit 2 ;;
    esac
done

log() { printf 'deb_check: %s\n' "$*" >&2; }
die() { printf 'deb_check: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
started=$(now)
step_started=$started
step() { log "--- $* (at $(since "$started") s)"; step_started=$(now); }
done_step() { log "    $* in $(since "$step_started") s"; }

[[ $(id -u) -eq 0 ]] || die "run as root (chroot, mounts, apt inside the root)"
[[ -x $PY ]] || die "no venv at $PY: run scripts/setup --dev first"

mounts=()
cleanup() {
    local i
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_into() { # mount_into ROOT: /proc and /dev for a chroot
    mkdir -p "$1/proc" "$1/dev"
    mount -t proc proc "$1/proc" && mounts+=("$1/proc")
    mount --rbind /dev "$1/dev" && mount --make-rslave "$1/dev" && mounts+=("$1/dev")
}
in_root() { # in_root ROOT CMD...: as root inside the chroot, with a clean environment
    local root=$1
    shift
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        chroot "$root" "$@"
}
run() { # run LOG WHAT CMD...: output to LOG; on failure its tail and die
    local logfile=$1 what=$2
    shift 2
    if ! "$@" >"$logfile" 2>&1; then
        tail -n 30 "$logfile" | sed 's/^/    | /' >&2
        die "$what (log: $logfile)"
    fi
}

# --- 0. tools --------------------------------------------------------------------------------
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
((lint)) && ! command -v lintian >/dev/null && need+=(lintian)
((arm64)) && ! command -v qemu-aarch64-static >/dev/null && need+=(qemu-user-static)
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
if ((${#need[@]})); then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
# A previous run's mounts (had its cleanup not run) must go before its files do; and rm stays
# on this file system whatever happens.
{ grep -o " $WORK/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m"; done
rm -rf --one-file-system "$WORK"
mkdir -p "$WORK" "$CACHE/roots"
sources=$WORK/debian.sources
if [[ -n ${DEB_APT_SOURCES:-} ]]; then
    cp "$DEB_APT_SOURCES" "$sources"
elif [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    cp /etc/apt/sources.list.d/debian.sources "$sources"
else
    printf 'deb http://deb.debian.org/debian %s main\n' "$SUITE" >"$sources"
fi
# The host's settings for reaching the mirror (proxies, snapshot date checks), for every apt.
apt-config dump Acquire::http Acquire::https Acquire::Check-Valid-Until Acquire::Check-Date \
    Acquire::Retries >"$WORK/apt-acquire.conf"

# --- 1. build --------------------------------------------------------------------------------
step "build the packages"
# Compression (build_deb.sh's default, xz, takes 2-3 min a package here): gzip for the package
# lintian reads (it refuses zstd), zstd (2 s) for the others; apt and dpkg read all three.
deb1=$(DEB_COMPRESS=gzip bash "$REPO/scripts/build_deb.sh" --arch amd64 --revision 1 --out "$WORK/dist")
deb2=$(DEB_COMPRESS=zstd bash "$REPO/scripts/build_deb.sh" --arch amd64 --revision 2 --out "$WORK/dist")
if ((arm64)); then
    debarm=$(DEB_COMPRESS=zstd bash "$REPO/scripts/build_deb.sh" --arch arm64 --revision 1 --out "$WORK/dist")
fi
done_step "built $(basename "$deb1") $(basename "$deb2") ${debarm:+$(basename "$debarm")}"

# --- 2. lintian ------------------------------------------------------------------------------
if ((lint)); then
    step "lintian"
    lintian --fail-on error,warning --tag-display-limit 0 "$deb1" >"$WORK/lintian.txt" 2>&1 ||
        { grep -v 'root privileges' "$WORK/lintian.txt" >&2; die "lintian reports what no override explains"; }
    done_step "lintian: clean apart from the overrides ($(grep -c '^edge-agent:' "$REPO/packaging/deb/lintian-overrides") kinds)"
fi

# --- 3. fresh amd64 root ---------------------------------------------------------------------
step "a clean Debian root (amd64), apt-get install the package"
key=$(cat "$sources" <(echo "$SUITE minbase $ROOT_PACKAGES mmdebstrap-$(mmdebstrap --version | cut -d' ' -f2)") |
    sha256sum | cut -c1-16)
tarball=$CACHE/roots/$SUITE-amd64-$key.tar
if [[ ! -f $tarball ]]; then
    log "mmdebstrap $SUITE (minbase + $ROOT_PACKAGES); cached as $tarball"
    run "$WORK/mmdebstrap.log" "mmdebstrap" mmdebstrap --variant=minbase --format=tar --include="$ROOT_PACKAGES" \
        "$SUITE" "$tarball.new" "$sources"
    mv "$tarball.new" "$tarball"
    find "$CACHE/roots" -name "$SUITE-amd64-*.tar" ! -name "$(basename "$tarball")" -delete
fi
root=$WORK/root-amd64
mkdir -p "$root"
tar -C "$root" -xf "$tarball"
mount_into "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$WORK/apt-acquire.conf" "$root/etc/apt/apt.conf.d/99host-acquire"
mkdir -p "$CACHE/archives"
cp "$CACHE"/archives/*.deb "$root/var/cache/apt/archives/" 2>/dev/null || true
cp "$deb1" "$deb2" "$root/tmp/"
run "$WORK/apt-update.log" "apt-get update in the root" in_root "$root" apt-get update -q
t0=$(now)
run "$WORK/apt-install.log" "apt-get install of the package in the root" \
    in_root "$root" apt-get install -y -q "/tmp/$(basename "$deb1")"
install_s=$(since "$t0")
cp -n "$root"/var/cache/apt/archives/*.deb "$CACHE/archives/" 2>/dev/null || true
done_step "installed with $(grep -c '^Setting up' "$WORK/apt-install.log") packages set up, apt-get install ${install_s} s"

step "checks in the root"
in_root "$root" edge-agent score --example >"$WORK/amd64.jsonl" 2>"$WORK/amd64.err" ||
    die "edge-agent score --example in the root: $(tail -n 5 "$WORK/amd64.err")"
(cd "$REPO" && "$PY" -m edge_agent score --example >"$WORK/native.jsonl" 2>/dev/null)
"$PY" "$REPO/scripts/arm/compare_decisions.py" --tol 1e-5 "$WORK/native.jsonl" "$WORK/amd64.jsonl" >&2 ||
    die "the packaged agent decides differently from the checkout"
"$PY" "$REPO/scripts/deb/accuracy.py" "$WORK/amd64.jsonl" "$root$BUNDLED" >&2 ||
    die "accuracy of the packaged agent"
in_root "$root" systemd-analyze verify /lib/systemd/system/edge-agent.service >"$WORK/verify.txt" 2>&1 ||
    { cat "$WORK/verify.txt" >&2; die "systemd-analyze verify"; }
[[ ! -s $WORK/verify.txt ]] || { cat "$WORK/verify.txt" >&2; die "systemd-analyze verify printed messages"; }
exposure=$(in_root "$root" systemd-analyze security --offline=true /lib/systemd/system/edge-agent.service 2>&1 |
    sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
[[ -n $exposure ]] && awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' ||
    die "systemd-analyze security: exposure '${exposure}' (at most $MAX_EXPOSURE)"
log "ok: systemd-analyze verify is silent; security exposure $exposure"
in_root "$root" getent passwd edge-agent | grep -q ':/var/lib/edge-agent:/usr/sbin/nologin$' ||
    die "no edge-agent system user with home /var/lib/edge-agent"
[[ $(in_root "$root" stat -c '%U %a' /var/lib/edge-agent) == "edge-agent 700" ]] ||
    die "/var/lib/edge-agent is not edge-agent's, mode 700"
in_root "$root" dpkg-query -W -f='${Conffiles}\n' edge-agent | grep -q '^ /etc/edge-agent/agent.toml ' ||
    die "/etc/edge-agent/agent.toml is not a conffile"
[[ -L $root/etc/systemd/system/multi-user.target.wants/edge-agent.service ]] ||
    die "the unit is not enabled"
in_root "$root" runuser -u edge-agent -- edge-agent models verify basicmotions-int8 basicmotions-fp32 \
    basicmotions-cloud >"$WORK/verify-models.txt" 2>&1 ||
    die "edge-agent models verify as the edge-agent user: $(tail -n 3 "$WORK/verify-models.txt")"
log "ok: user, state folder (edge-agent, 0700), conffile, unit enabled (not started: no systemd runs here)"
done_step "checks"

# --- 4. upgrade, remove, purge ---------------------------------------------------------------
step "upgrade with a hard case in the outbox and a pushed release serving"
"$PY" "$REPO/scripts/deb/upgrade_check.py" --root "$root" --new-deb "/tmp/$(basename "$deb2")" \
    --work "$WORK/upgrade" >"$WORK/upgrade.json" || die "upgrade (see above; logs in $WORK/upgrade)"
log "upgrade: $(cat "$WORK/upgrade.json")"
run "$WORK/apt-remove.log" "apt-get remove" in_root "$root" apt-get remove -y -q edge-agent
[[ -f $root/etc/edge-agent/agent.toml && -f $root/var/lib/edge-agent/outbox.db && ! -e $root/usr/lib/edge-agent/bin ]] ||
    die "apt-get remove: the program must go, configuration and state stay"
run "$WORK/apt-purge.log" "apt-get purge" in_root "$root" apt-get purge -y -q edge-agent
[[ ! -e $root/var/lib/edge-agent && ! -e $root/etc/edge-agent ]] ||
    die "apt-get purge left /var/lib/edge-agent or /etc/edge-agent"
log "ok: remove keeps /etc/edge-agent and /var/lib/edge-agent; purge deletes both"
done_step "upgrade, remove, purge"
cleanup
mounts=()

# --- 5. arm64 --------------------------------------------------------------------------------
if ((arm64)); then
    step "arm64: a root with the package's dependencies resolved by apt, score under qemu"
    depends=$(dpkg-deb -f "$debarm" Depends)
    akey=$(cat "$sources" <(echo "$SUITE arm64 $depends") | sha256sum | cut -c1-16)
    aroot_cache=$CACHE/roots/$SUITE-arm64-$akey
    if [[ ! -f $aroot_cache/.complete ]]; then
        apt_dir=$WORK/apt-arm64
        rm -rf "$apt_dir" "$aroot_cache"
        mkdir -p "$apt_dir"/{etc/apt.conf.d,etc/sources.list.d,etc/preferences.d,log} \
            "$apt_dir"/{state/lists/partial,cache/archives/partial} "$aroot_cache"
        : >"$apt_dir/state/status"
        cp "$sources" "$apt_dir/etc/sources.list.d/"
        { sed "s|@APT@|$apt_dir|g" "$REPO/scripts/arm/apt.conf.in"; cat "$WORK/apt-acquire.conf"; } >"$apt_dir/apt.conf"
        run "$WORK/apt-arm64-update.log" "arm64 apt-get update" env APT_CONFIG="$apt_dir/apt.conf" apt-get update -q
        # apt resolves the .deb's Depends against an empty arm64 system: the closure a device
        # needs beyond the package itself.
        run "$WORK/apt-arm64-install.log" "arm64 apt-get install --download-only of the package" \
            env APT_CONFIG="$apt_dir/apt.conf" apt-get install -d -y -q "$debarm"
        for deb in "$apt_dir"/cache/archives/*.deb; do dpkg -x "$deb" "$aroot_cache"; done
        [[ -x $aroot_cache/usr/bin/python3.11 ]] || die "the arm64 root has no python3.11"
        ls "$apt_dir"/cache/archives/*.deb | wc -l >"$aroot_cache/.complete"
        find "$CACHE/roots" -maxdepth 1 -name "$SUITE-arm64-*" ! -name "$(basename "$aroot_cache")" -exec rm -rf {} +
        rm -rf "$apt_dir"
    fi
    aroot=$WORK/root-arm64
    cp -a "$aroot_cache" "$aroot"
    dpkg -x "$debarm" "$aroot"
    file -L "$aroot$BUNDLED/../../onnxruntime/capi/libonnxruntime.so".* | grep -q 'ARM aarch64' ||
        die "the arm64 package's onnxruntime is not an aarch64 library"
    install -m 0755 "$(command -v qemu-aarch64-static)" "$aroot/usr/bin/qemu-aarch64-static"
    # onnxruntime reads /proc/cpuinfo for the CPU's part number; without a mounted /proc it
    # reads this description of the emulated core (as scripts/arm_check.sh gives it).
    mkdir -p "$aroot/proc"
    for ((n = 0; n < $(nproc); n++)); do
        sed -e "s/@N@/$n/" -e "s/@VARIANT@/0x0/" -e "s/@PART@/0xd08/" -e "s/@REVISION@/3/" \
            -e "s/@FEATURES@/fp asimd evtstrm crc32 cpuid/" "$REPO/scripts/arm/cpuinfo.in"
    done >"$aroot/proc/cpuinfo"
    mkdir -p "$aroot/dev"
    mount --rbind /dev "$aroot/dev" && mount --make-rslave "$aroot/dev" && mounts+=("$aroot/dev")
    t0=$(now)
    in_root "$aroot" /usr/bin/qemu-aarch64-static -cpu "$QEMU_CPU" /usr/lib/edge-agent/bin/python3 -s \
        /usr/bin/edge-agent score --example >"$WORK/arm64.jsonl" 2>"$WORK/arm64.err" ||
        die "edge-agent score --example in the arm64 root: $(tail -n 5 "$WORK/arm64.err")"
    score_s=$(since "$t0")
    in_root "$aroot" /usr/bin/qemu-aarch64-static /usr/lib/edge-agent/bin/python3 -c \
        'import platform; print(platform.machine())' | grep -qx aarch64 || die "not an aarch64 Python"
    "$PY" "$REPO/scripts/arm/compare_decisions.py" --tol 1e-5 "$WORK/amd64.jsonl" "$WORK/arm64.jsonl" >&2 ||
        die "the arm64 package decides differently from the amd64 one"
    done_step "arm64: $(cat "$aroot_cache/.complete") Debian packages + edge-agent; score under qemu ($QEMU_CPU) ${score_s} s, same decisions as amd64"
    cleanup
    mounts=()
fi

log "all checks passed in $(since "$started") s"
