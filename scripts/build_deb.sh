#!/usr/bin/env bash
# Build the edge-agent Debian package for amd64 or arm64 on this (x86_64 or any) machine.
#
#   scripts/build_deb.sh [--arch amd64|arm64] [--revision N] [--out DIR]
#
# The package is a venv made for the target with `dpkg-deb`, not dh-virtualenv: pip installs
# the target architecture's wheels (--platform manylinux..._<machine>, --only-binary) into the
# venv's site-packages without running any target code, so the arm64 package is built here as
# quickly as the amd64 one, with no arm64 build chroot under qemu, and both are made by the
# same lines. dh-virtualenv runs pip with the build machine's own Python, so an arm64 package
# would need a whole arm64 build environment under emulation. (Both give the same result on a
# device: a private venv whose bin/python is Debian's /usr/bin/python3.11.)
#
# Steps:
#   1. the edge-agent wheel, built from the checkout's tracked files (the same wheel as pip's);
#   2. the target's wheels of its dependencies and pip (edge-agent models fetch uses it), at
#      the versions installed in the dev venv (.venv), downloaded once into
#      $DEB_CACHE/wheels/<arch>-<key> (seeded from scripts/arm_check.sh's aarch64 wheels);
#   3. the venv in /usr/lib/edge-agent: site-packages from those wheels, bin/python linking
#      Debian's python3.11, bin/edge-agent, /usr/bin/edge-agent; byte-compiled here (the
#      bytecode of CPython 3.11 is the same on every architecture);
#   4. the unit and the conffile /etc/edge-agent/agent.toml from systemd/ (packaging/deb/
#      packaged_files.py), the maintainer scripts, docs, man page, lintian overrides;
#   5. dpkg-deb --build --root-owner-group into DIR (default dist/).
#
# Environment: DEB_CACHE (default ~/.cache/edge-agent-deb), DEB_NATIVE_PYTHON (a Python 3.11
# with pip and edge-agent's dependencies; default .venv/bin/python), DEB_COMPRESS (dpkg-deb
# -Z; default xz, as in Debian's archive: the smallest download for devices, 42 MB for amd64,
# but 2-3 min on 2 cores; gzip: 62 MB in ~30 s; zstd: 2 s, but lintian 2.116 refuses it).
# Prints the path of the .deb on stdout.
set -euo pipefail

REPO=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$REPO/packaging/deb
CACHE=${DEB_CACHE:-$HOME/.cache/edge-agent-deb}
NATIVE_PY=${DEB_NATIVE_PYTHON:-$REPO/.venv/bin/python}
COMPRESS=${DEB_COMPRESS:-xz}
PY_VERSION=3.11
PREFIX=/usr/lib/edge-agent

arch=amd64
revision=1
out=$REPO/dist
while (($#)); do
    case $1 in
        --arch) arch=$2; shift 2 ;;
        --revision) revision=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "usage: $0 [--arch amd64|arm64] [--revision N] [--out DIR]" >&2; exit 2 ;;
    esac
done
case $arch in
    amd64) machine=x86_64 ;;
    arm64) machine=aarch64 ;;
    *) echo "build_deb: --arch must be amd64 or arm64, not $arch" >&2; exit 2 ;;
esac

log() { printf 'build_deb: %s\n' "$*" >&2; }
die() { printf 'build_deb: FAILED: %s\n' "$*" >&2; exit 1; }
started=$(date +%s.%N)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

[[ -x $NATIVE_PY ]] || die "no Python at $NATIVE_PY: run scripts/setup --dev (or set DEB_NATIVE_PYTHON)"
[[ $("$NATIVE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') == "$PY_VERSION" ]] ||
    die "$NATIVE_PY is not Python $PY_VERSION (the package's bytecode is made with it)"
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (Debian's dpkg package)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$CACHE/wheels"
pip_quiet=(-q --disable-pip-version-check --no-input)

# --- 1. the edge-agent wheel --------------------------------------------------------------
mkdir -p "$work/src"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$REPO" ls-files -z | tar -C "$REPO" --null -T - -cf - | tar -C "$work/src" -xf -
else
    tar -C "$REPO" --exclude=.venv --exclude=dist --exclude=build -cf - . | tar -C "$work/src" -xf -
fi
"$NATIVE_PY" -m pip wheel "${pip_quiet[@]}" --no-deps -w "$work/wheel" "$work/src" >"$work/wheel.log" 2>&1 ||
    { tail -n 30 "$work/wheel.log" >&2; die "pip wheel"; }
wheel=$(echo "$work"/wheel/edge_agent-*.whl)
[[ -f $wheel ]] || die "pip wheel made no edge_agent wheel"
version=$(basename "$wheel" | cut -d- -f2)
debversion=$version-$revision

# --- 2. the target's wheels ----------------------------------------------------------------
platform_args=(--platform "manylinux2014_$machine")
# Debian 12's glibc is 2.36: any manylinux_2_17 .. 2_36 wheel runs on it.
for minor in $(seq 17 36); do platform_args+=(--platform "manylinux_2_${minor}_$machine"); done
target_args=("${platform_args[@]}" --python-version "$PY_VERSION" --implementation cp --only-binary=:all:)
"$NATIVE_PY" - "$REPO/pyproject.toml" >"$work/requirements.txt" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join([*project["dependencies"], "pip"]))
EOF
"$NATIVE_PY" "$REPO/scripts/arm/requirements.py" --pins "$REPO/pyproject.toml" >"$work/constraints.txt" ||
    die "could not read the dev venv's versions of the requirements"
key=$(cat "$work/requirements.txt" "$work/constraints.txt" <(echo "${target_args[*]}") | sha256sum | cut -c1-16)
wheels=$CACHE/wheels/$arch-$key
if [[ ! -f $wheels/.complete ]]; then
    mkdir -p "$wheels"
    # pip download skips files already in the folder: start from arm_check's aarch64 wheels.
    if [[ $arch == arm64 ]]; then
        find "$HOME/.cache/edge-agent-arm/wheels" -name '*.whl' -exec cp -n {} "$wheels/" \; 2>/dev/null || true
    fi
    log "downloading $arch wheels: $(tr '\n' ' ' <"$work/requirements.txt")"
    "$NATIVE_PY" -m pip download "${pip_quiet[@]}" "${target_args[@]}" -d "$wheels" \
        -r "$work/requirements.txt" -c "$work/constraints.txt" >"$work/download.log" 2>&1 ||
        { tail -n 30 "$work/download.log" >&2; die "pip download ($arch wheels)"; }
    touch "$wheels/.complete"
    # Other wheel sets of this architecture are of no further use.
    find "$CACHE/wheels" -mindepth 1 -maxdepth 1 -type d -name "$arch-*" ! -name "$arch-$key" \
        -exec rm -rf {} +
fi

# --- 3. the venv -----------------------------------------------------------------------------
root=$work/root
venv=$root$PREFIX
site=$venv/lib/python$PY_VERSION/site-packages
"$NATIVE_PY" -m pip install "${pip_quiet[@]}" --root-user-action=ignore --no-index \
    --find-links "$wheels" "${target_args[@]}" --target "$site" "$wheel" pip \
    -c "$work/constraints.txt" >"$work/install.log" 2>&1 ||
    { tail -n 30 "$work/install.log" >&2; die "pip install --target ($arch)"; }
rm -rf "$site/bin" # console scripts pip wrote for this machine's Python
mkdir -p "$venv/bin" "$root/usr/bin"
ln -s "../../../bin/python$PY_VERSION" "$venv/bin/python$PY_VERSION" # /usr/bin/python3.11
ln -s "python$PY_VERSION" "$venv/bin/python3"
ln -s python3 "$venv/bin/python"
cat >"$venv/pyvenv.cfg" <<EOF
home = /usr/bin
include-system-site-packages = false
version = $PY_VERSION
EOF
cat >"$venv/bin/edge-agent" <<EOF
#!$PREFIX/bin/python3 -s
# edge-agent, from the edge-agent Debian package (its venv: $PREFIX).
import sys

from edge_agent.cli import main

sys.exit(main())
EOF
chmod 0755 "$venv/bin/edge-agent"
ln -s "../lib/edge-agent/bin/edge-agent" "$root/usr/bin/edge-agent"
# checked-hash: valid whatever the files' times, and checked against the source at import.
if ! "$NATIVE_PY" -m compileall -q -j 0 --invalidation-mode checked-hash -s "$root" -p / "$site" \
    >"$work/compile.log" 2>&1; then
    log "compileall: some files did not compile; they run from source:"
    grep -E '^\*\*\*|Error' "$work/compile.log" | head -n 5 >&2 || true
fi
log "venv: $(du -sh "$venv" | cut -f1) in $(since "$started") s"

# --- 4. configuration, unit, scripts, docs ---------------------------------------------------
install -d "$root/etc/edge-agent" "$root/lib/systemd/system" "$root/usr/share/doc/edge-agent" \
    "$root/usr/share/man/man1" "$root/usr/share/lintian/overrides" "$root/DEBIAN"
"$NATIVE_PY" "$HERE/packaged_files.py" config "$REPO/systemd/agent.toml.example" "$root/etc/edge-agent/agent.toml"
"$NATIVE_PY" "$HERE/packaged_files.py" unit "$REPO/systemd/edge-agent.service" "$root/lib/systemd/system/edge-agent.service"
install -m 0644 "$HERE/README.Debian" "$HERE/copyright" "$root/usr/share/doc/edge-agent/"
printf 'edge-agent (%s) unstable; urgency=medium\n\n  * Package of edge-agent %s (%s).\n\n -- edge-agent developers <edge-agent@example.org>  %s\n' \
    "$debversion" "$version" "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo source)" \
    "$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)}")" |
    gzip -9n >"$root/usr/share/doc/edge-agent/changelog.Debian.gz"
gzip -9n <"$HERE/edge-agent.1" >"$root/usr/share/man/man1/edge-agent.1.gz"
install -m 0644 "$HERE/lintian-overrides" "$root/usr/share/lintian/overrides/edge-agent"
install -m 0755 "$HERE/postinst" "$HERE/prerm" "$HERE/postrm" "$root/DEBIAN/"
echo /etc/edge-agent/agent.toml >"$root/DEBIAN/conffiles"
# Plain permissions: directories and programs 0755, everything else 0644 (shared objects
# need no execute bit to be loaded).
find "$root" -path "$root/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
find "$root" -path "$root/DEBIAN" -prune -o -type f -exec chmod 0644 {} +
chmod 0755 "$venv/bin/edge-agent"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$debversion/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" "$HERE/control.in" \
    >"$root/DEBIAN/control"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    >"$root/DEBIAN/md5sums"

# --- 5. the package ------------------------------------------------------------------------
deb=$out/edge-agent_${debversion}_$arch.deb
packed=$(date +%s.%N)
dpkg-deb --root-owner-group -Z"$COMPRESS" --build "$root" "$deb" >/dev/null
log "dpkg-deb -Z$COMPRESS: $(since "$packed") s"
log "$deb: $(du -h "$deb" | cut -f1), installed ${size} KB, in $(since "$started") s"
echo "$deb"
