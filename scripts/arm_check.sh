#!/usr/bin/env bash
# Prove edge-agent on ARM: run it as an aarch64 process (Raspberry Pi 4 class, Cortex-A72)
# under qemu user-mode emulation, and check it decides exactly what the native run decides.
#
#   scripts/arm_check.sh          the ONNX path: unit tests + `edge-agent score` vs native
#   scripts/arm_check.sh --llm    also the llama.cpp backend (cross-built llama-cpp-python)
#   --skip-unit-tests             leave out the emulated unit tests (quicker, to try another
#                                 pack or CPU model; CI runs them)
#
# Steps (see docs/arm.md):
#   1. qemu-user-static from Debian (apt-get, as root) if qemu-aarch64-static is missing.
#   2. An arm64 Debian sysroot with Python 3.11, fetched with a private APT_CONFIG
#      (download-only + dpkg -x; the host's APT/dpkg state is never touched, no
#      `dpkg --add-architecture`), a proc/cpuinfo describing the emulated cores, and a launcher
#      (usr/bin/python3-qemu) that makes sys.executable work for child processes.
#   3. aarch64 wheels from PyPI for the runtime and test dependencies, at the versions
#      installed in the native venv, unpacked into a site folder. The checkout itself is put
#      on PYTHONPATH, not installed.
#   4. As aarch64 under `-cpu cortex-a72`: platform.machine(), the unit tests, and
#      `edge-agent score` on the default pack and the test data (plus a seeded noisy variant
#      that crosses the thresholds), compared with the native run; raw session.run timings.
#
# Everything is cached under $ARM_CACHE (default ~/.cache/edge-agent-arm); a second run
# only repeats step 4. Exit status 0 only if every check passed.
#
# Environment:
#   ARM_CACHE          cache folder (sysroot, wheels, site, run outputs)
#   ARM_QEMU_CPU       qemu CPU model (default cortex-a72; e.g. cortex-a76 for a Pi 5)
#   ARM_NATIVE_PYTHON  native interpreter with edge-agent's deps (default <checkout>/.venv/bin/python)
#   ARM_MODEL          model pack name or folder to score with (default: the default pack)
#   ARM_DATA           readings to score (default <checkout>/data/basicmotions/test.jsonl)
#   ARM_APT_SOURCES    a sources file (one-line or deb822) for the arm64 sysroot
#                      (default: the host's Debian sources)
#   ARM_LLM_MODEL      --llm: the llama_cpp pack (default: the first one in models/)
#   ARM_LLM_READINGS   --llm: how many test readings to score (default 8; ~10 s each emulated)
set -euo pipefail

started=$(date +%s.%N)
REPO=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$REPO/scripts/arm
CACHE=${ARM_CACHE:-$HOME/.cache/edge-agent-arm}
CPU=${ARM_QEMU_CPU:-cortex-a72}
NATIVE_PY=${ARM_NATIVE_PYTHON:-$REPO/.venv/bin/python}
MODEL=${ARM_MODEL:-}
DATA=${ARM_DATA:-$REPO/data/basicmotions/test.jsonl}

SYSROOT_PACKAGES=(python3.11 libstdc++6)
PY_VERSION=3.11
TOL=1e-5
APTDIR=$CACHE/apt
SYSROOT=$CACHE/sysroot
SITE=$CACHE/site
WORK=$CACHE/run
PY_ARM=$SYSROOT/usr/bin/python3-qemu

llm=0
unit_tests=1
extra_path=""
for arg in "$@"; do
    case $arg in
        --llm) llm=1 ;;
        --skip-unit-tests) unit_tests=0 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "usage: $0 [--llm] [--skip-unit-tests]" >&2
            exit 2
            ;;
    esac
done

log() { printf 'arm_check: %s\n' "$*" >&2; }
die() {
    printf 'arm_check: FAILED: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# run LOG WHAT CMD...: run a command with its output in LOG; on failure show the log's tail and die.
run() {
    local logfile=$1 what=$2
    shift 2
    if ! "$@" >"$logfile" 2>&1; then
        tail -n 40 "$logfile" | sed 's/^/    | /' >&2
        die "$what failed (full log: $logfile)"
    fi
}

# Emulated Python: a clean environment apart from the checkout and the aarch64 site folder.
# Bytecode is not written (the checkout is shared; the sysroot and site are precompiled).
arm() {
    env -u PYTHONHOME -u VIRTUAL_ENV -u PYTHONSTARTUP -u PYTHONPYCACHEPREFIX \
        PYTHONPATH="$REPO:$SITE${extra_path:+:$extra_path}" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
        HYPOTHESIS_STORAGE_DIRECTORY="$WORK/hypothesis" QEMU_CPU="$CPU" "$PY_ARM" "$@"
}
native() {
    env -u PYTHONHOME PYTHONPATH="$REPO" PYTHONDONTWRITEBYTECODE=1 \
        HYPOTHESIS_STORAGE_DIRECTORY="$WORK/hypothesis-native" "$NATIVE_PY" "$@"
}

# --- preconditions ---------------------------------------------------------------------------
[[ $(uname -m) == x86_64 ]] ||
    die "this check emulates aarch64 on an x86_64 host; on $(uname -m), run the tests natively"
[[ -x $NATIVE_PY ]] || die "no native Python at $NATIVE_PY: run scripts/setup --dev first" \
    "(or set ARM_NATIVE_PYTHON)"
native_version=$("$NATIVE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ $native_version == "$PY_VERSION" ]] ||
    die "the native Python is $native_version; this check needs $PY_VERSION (the sysroot's)"
mkdir -p "$CACHE" "$WORK"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    log "another arm_check is using $CACHE; waiting for it"
    flock 9
fi

# --- 1. qemu ---------------------------------------------------------------------------------
if ! command -v qemu-aarch64-static >/dev/null; then
    [[ $(id -u) -eq 0 ]] || die "qemu-aarch64-static is missing; as root: apt-get install -y qemu-user-static"
    log "installing qemu-user-static (apt-get)"
    t0=$(now)
    export DEBIAN_FRONTEND=noninteractive
    run "$WORK/apt-host.log" "apt-get update" apt-get update -q
    run "$WORK/apt-host.log" "apt-get install qemu-user-static" apt-get install -y -q qemu-user-static
    log "installed qemu-user-static in $(since "$t0") s"
fi
QEMU=$(command -v qemu-aarch64-static)
log "$("$QEMU" --version | head -n 1), CPU model $CPU"

# --- 2. arm64 sysroot ------------------------------------------------------------------------
setup_started=$(now)
built=0

apt_sources() {
    if [[ -n ${ARM_APT_SOURCES:-} ]]; then
        cat "$ARM_APT_SOURCES"
    elif [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        cat /etc/apt/sources.list.d/debian.sources
    elif grep -qs '^deb ' /etc/apt/sources.list; then
        grep '^deb ' /etc/apt/sources.list | grep -v 'arch=amd64'
    else
        printf 'deb http://deb.debian.org/debian bookworm main\n'
        printf 'deb http://deb.debian.org/debian-security bookworm-security main\n'
    fi
}

write_cpuinfo() {
    # One block per host CPU (qemu runs guest threads on host CPUs, and sysfs and
    # sched_getaffinity show the host's count), describing the emulated core as its kernel
    # would: onnxruntime reads the part number to pick kernels (e.g. for in-order A53/A55
    # cores); ISA features (dot product, ...) come from qemu's AT_HWCAP for the CPU model.
    # Inside the sysroot, qemu's -L makes the emulated program read this file instead of the
    # host's x86 /proc/cpuinfo, which makes onnxruntime's CPU detection segfault.
    local n variant part revision features
    case $CPU in # variant part revision features, as on the named devices
        cortex-a53) read -r variant part revision features <<<"0x0 0xd03 4 fp asimd evtstrm crc32 cpuid" ;;
        cortex-a57) read -r variant part revision features <<<"0x1 0xd07 1 fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid" ;;
        cortex-a72) read -r variant part revision features <<<"0x0 0xd08 3 fp asimd evtstrm crc32 cpuid" ;;
        cortex-a76) read -r variant part revision features <<<"0x4 0xd0b 1 fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
        neoverse-n1) read -r variant part revision features <<<"0x3 0xd0c 1 fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs" ;;
        *) die "ARM_QEMU_CPU=$CPU: no /proc/cpuinfo description for it (cortex-a53, cortex-a57, cortex-a72, cortex-a76, neoverse-n1)" ;;
    esac
    mkdir -p "$1/proc"
    for ((n = 0; n < $(nproc); n++)); do
        sed -e "s/@N@/$n/" -e "s/@VARIANT@/$variant/" -e "s/@PART@/$part/" \
            -e "s/@REVISION@/$revision/" -e "s/@FEATURES@/$features/" "$HERE/cpuinfo.in"
    done >"$1/proc/cpuinfo.new"
    mv "$1/proc/cpuinfo.new" "$1/proc/cpuinfo"
}

sources_file=$(mktemp)
trap 'rm -f "$sources_file"' EXIT
apt_sources >"$sources_file"
if grep -q '^Types:' "$sources_file"; then sources_name=debian.sources; else sources_name=debian.list; fi
sysroot_key="packages=${SYSROOT_PACKAGES[*]} sources=$(sha256sum <"$sources_file" | cut -c1-16)"

if [[ -f $SYSROOT/.stamp && $(cat "$SYSROOT/.stamp") == "$sysroot_key" ]]; then
    log "sysroot: cached ($SYSROOT)"
else
    log "sysroot: fetching arm64 ${SYSROOT_PACKAGES[*]} and dependencies (private APT_CONFIG)"
    rm -rf "$APTDIR/etc" "$SYSROOT" "$SYSROOT.new"
    mkdir -p "$APTDIR"/{etc/apt.conf.d,etc/sources.list.d,etc/preferences.d,log} \
        "$APTDIR"/{state/lists/partial,state/updates,cache/archives/partial}
    : >"$APTDIR/state/status"
    cp "$sources_file" "$APTDIR/etc/sources.list.d/$sources_name"
    {
        sed "s|@APT@|$APTDIR|g" "$HERE/apt.conf.in"
        # The host's settings for reaching its mirror (proxies, snapshot date checks).
        env -u APT_CONFIG apt-config dump Acquire::http Acquire::https Acquire::ftp \
            Acquire::Check-Valid-Until Acquire::Check-Date Acquire::Retries
    } >"$APTDIR/apt.conf"
    rm -f "$APTDIR"/cache/archives/*.deb
    export APT_CONFIG=$APTDIR/apt.conf
    run "$APTDIR/log/update.log" "arm64 apt-get update" apt-get update -q
    run "$APTDIR/log/install.log" "arm64 apt-get install --download-only" \
        apt-get install -d -y -q "${SYSROOT_PACKAGES[@]}"
    unset APT_CONFIG
    debs=("$APTDIR"/cache/archives/*.deb)
    [[ -e ${debs[0]} ]] || die "apt downloaded no packages (see $APTDIR/log/install.log)"
    mkdir -p "$SYSROOT.new"
    for deb in "${debs[@]}"; do
        dpkg -x "$deb" "$SYSROOT.new"
    done
    [[ -x $SYSROOT.new/usr/bin/python$PY_VERSION ]] ||
        die "the sysroot has no python$PY_VERSION (are the apt sources Debian 12 bookworm?)"
    mv "$SYSROOT.new" "$SYSROOT"
    # Debian's packages ship no .pyc (postinst compiles them); compile natively once, same
    # bytecode format, so every emulated start does not recompile the standard library.
    "$NATIVE_PY" -m compileall -q -j 0 "$SYSROOT/usr/lib/python$PY_VERSION" >/dev/null 2>&1 || true
    log "sysroot: ${#debs[@]} packages, $(du -sh "$APTDIR/cache/archives" | cut -f1) of .debs," \
        "$(du -sh "$SYSROOT" | cut -f1) unpacked"
    # The package lists, APT's binary caches and the .debs are not needed once unpacked (a
    # rebuild fetches them again): ~140 MB.
    rm -rf "$APTDIR/state/lists" "$APTDIR/cache"
    echo "$sysroot_key" >"$SYSROOT/.stamp"
    built=1
fi
# Cheap, so always (re)written: the launcher and the CPU description.
install -m 0755 "$HERE/python-launcher.sh" "$PY_ARM"
write_cpuinfo "$SYSROOT"

# --- 3. aarch64 wheels -----------------------------------------------------------------------
platform_args=(--platform manylinux2014_aarch64)
# The sysroot's glibc is Debian 12's 2.36: any manylinux_2_17 .. 2_36 wheel runs on it.
for minor in $(seq 17 36); do platform_args+=(--platform "manylinux_2_${minor}_aarch64"); done
target_args=("${platform_args[@]}" --python-version "$PY_VERSION" --implementation cp
    --only-binary=:all:)
pip_quiet=(-q --disable-pip-version-check --no-input)

requirements=$WORK/requirements.txt
constraints=$WORK/constraints.txt
"$NATIVE_PY" "$HERE/requirements.py" "$REPO/pyproject.toml" >"$requirements"
# The same versions as the native venv, so the comparison is about the architecture only.
"$NATIVE_PY" "$HERE/requirements.py" --pins "$REPO/pyproject.toml" >"$constraints" ||
    die "could not read the native versions of the requirements"
wheels_key=$(cat "$requirements" "$constraints" <(echo "${target_args[*]}") | sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels/$wheels_key

if [[ -f $SITE/.stamp && $(cat "$SITE/.stamp") == "$wheels_key" ]]; then
    log "wheels: cached ($(find "$WHEELS" -name '*.whl' | wc -l) wheels, $SITE)"
else
    log "wheels: downloading aarch64 wheels for: $(tr '\n' ' ' <"$requirements")"
    mkdir -p "$WHEELS"
    run "$WORK/pip-download.log" "pip download (aarch64 wheels)" "$NATIVE_PY" -m pip download "${pip_quiet[@]}" --no-cache-dir \
        "${target_args[@]}" -d "$WHEELS" -r "$requirements" -c "$constraints"
    rm -rf "$SITE" "$SITE.new"
    run "$WORK/pip-install.log" "pip install --target (aarch64 site)" "$NATIVE_PY" -m pip install "${pip_quiet[@]}" --no-index --no-deps \
        --root-user-action=ignore "${target_args[@]}" --target "$SITE.new" "$WHEELS"/*.whl
    mv "$SITE.new" "$SITE"
    "$NATIVE_PY" -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true
    # Older wheel sets are of no further use.
    find "$CACHE/wheels" -mindepth 1 -maxdepth 1 -type d ! -name "$wheels_key" -exec rm -rf {} +
    log "wheels: $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1);" \
        "site $(du -sh "$SITE" | cut -f1)"
    echo "$wheels_key" >"$SITE/.stamp"
    built=1
fi
setup_s=$(since "$setup_started")
if ((built)); then
    setup_kind="built"
    echo "$setup_s" >"$CACHE/.setup-seconds"
else
    setup_kind="cached; the last build took $(cat "$CACHE/.setup-seconds" 2>/dev/null || echo '?') s"
fi
log "setup (sysroot + wheels): ${setup_s} s ($setup_kind)"
# Which wheel is built for which platform, for docs/arm.md's install claims.
(cd "$WHEELS" && ls -1 ./*.whl | sed 's|^\./||') >"$WORK/wheels.txt"

# --- 4. as aarch64 ---------------------------------------------------------------------------
summary=()
note() {
    summary+=("$*")
    log "$*"
}

# (a) the machine, the interpreter, and that children of sys.executable are aarch64 too.
log "emulated: platform.machine() and a child process via sys.executable"
probe=$(arm -c '
import platform, subprocess, sys
child = subprocess.run([sys.executable, "-c", "import platform; print(platform.machine())"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(platform.machine(), child, platform.python_version())
') || die "the emulated Python did not start"
read -r machine child pyver <<<"$probe"
[[ $machine == aarch64 ]] || die "platform.machine() printed '$machine', expected aarch64"
[[ $child == aarch64 ]] || die "a child started with sys.executable printed '$child'"
versions=$(arm -c '
import msgspec, numpy, onnxruntime, paho.mqtt, psutil
print(f"numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__},"
      f" msgspec {msgspec.__version__}, paho-mqtt {paho.mqtt.__version__}, psutil {psutil.__version__}")
') || die "importing the runtime dependencies failed as aarch64"
note "aarch64: platform.machine() = $machine (child: $child), Python $pyver, $versions"

# The pack and data to score: both must exist (they are produced by scripts/train_sensor_model.py).
model_args=()
[[ -n $MODEL ]] && model_args=(--model "$MODEL")
[[ -f $DATA ]] || die "no test data at $DATA (produced by scripts/train_sensor_model.py)"
pack_ref=$(native -c '
import sys
from edge_agent.models.pack import resolve
print(resolve(sys.argv[1]).ref)' "$MODEL") || die "no model pack to score with (${MODEL:-the default pack})"

# (b) the unit tests.
if ((unit_tests)); then
    log "emulated: python -m pytest tests/unit -q -p no:cacheprovider (this takes a while)"
    t0=$(now)
    if ! (cd "$REPO" && arm -m pytest tests/unit -q -p no:cacheprovider) >"$WORK/pytest-arm.log" 2>&1; then
        tail -n 30 "$WORK/pytest-arm.log" | sed 's/^/    | /' >&2
        if (cd "$REPO" && native -m pytest tests/unit -q -p no:cacheprovider) >"$WORK/pytest-native.log" 2>&1; then
            die "unit tests fail as aarch64 but pass natively: an ARM difference (log: $WORK/pytest-arm.log)"
        fi
        die "unit tests fail as aarch64, and natively too: not ARM-specific (logs: $WORK/pytest-*.log)"
    fi
    pytest_s=$(since "$t0")
    note "aarch64 unit tests: $(grep -E '^[0-9]+ passed' "$WORK/pytest-arm.log" | tail -n 1 | sed 's/ in .*//')," \
        "${pytest_s} s wall"
else
    note "aarch64 unit tests: SKIPPED (--skip-unit-tests)"
fi

# (c) edge-agent score, native vs emulated, on the test data and on a noisy variant of it.
native "$HERE/noisy_readings.py" "$DATA" "$WORK/noisy.jsonl" || die "could not write noisy readings"
for input in "$DATA" "$WORK/noisy.jsonl"; do
    name=$(basename "$input" .jsonl)
    log "score $name.jsonl with $pack_ref: native, then emulated"
    t0=$(now)
    native -m edge_agent score "$input" "${model_args[@]}" -q >"$WORK/score-$name-native.jsonl" ||
        die "native edge-agent score failed on $input"
    native_s=$(since "$t0")
    t0=$(now)
    arm -m edge_agent score "$input" "${model_args[@]}" -q >"$WORK/score-$name-arm.jsonl" ||
        die "emulated edge-agent score failed on $input"
    arm_s=$(since "$t0")
    if ! verdict=$(native "$HERE/compare_decisions.py" --tol "$TOL" \
        "$WORK/score-$name-native.jsonl" "$WORK/score-$name-arm.jsonl"); then
        printf '%s\n' "$verdict" | sed 's/^/    | /' >&2
        die "aarch64 decisions differ from native on $input"
    fi
    note "score $name.jsonl: $verdict"
    note "score $name.jsonl wall time (process start to exit): native ${native_s} s, emulated ${arm_s} s"
done

# Raw session.run of the pack, same snippet under both.
log "session.run timing: native, then emulated"
native "$HERE/session_timing.py" "$DATA" --model "$MODEL" >"$WORK/timing-native.json" ||
    die "the native session.run timing failed"
arm "$HERE/session_timing.py" "$DATA" --model "$MODEL" >"$WORK/timing-arm.json" ||
    die "the emulated session.run timing failed"
note "$("$NATIVE_PY" "$HERE/timing_report.py" "$WORK/timing-native.json" "$WORK/timing-arm.json")"

# --- 5. (--llm) the llama.cpp backend ---------------------------------------------------------
# PyPI has no aarch64 wheel of llama-cpp-python, so it is cross-compiled here with Debian's
# aarch64 gcc (a device compiles it natively: pip install 'edge-agent[llm]'). It loads
# libllama.so with ctypes, so no aarch64 Python headers are needed. Then a few readings are
# scored with the LLM pack natively and as aarch64. It fails only on a confident disagreement
# (a label either side acted on locally differs); other label, route and confidence
# differences are reported (docs/arm.md: the pack's confidences move by up to ~0.3 between
# the x86 and the aarch64 build of llama.cpp).
llm_check() {
    local version pack t0 native_s arm_s verdict lib
    version=$(native -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' \
        2>/dev/null) || die "--llm needs llama-cpp-python in the native venv: scripts/setup --llm"
    pack=${ARM_LLM_MODEL:-$(native -c '
from edge_agent.models.pack import discover
print(next((p.manifest.name for p in discover() if p.manifest.backend == "llama_cpp"), ""))')}
    [[ -n $pack ]] || die "--llm: no llama_cpp model pack found (set ARM_LLM_MODEL)"
    native -m edge_agent models verify "$pack" >"$WORK/llm-verify.log" 2>&1 ||
        die "--llm: pack $pack does not verify; fetch its GGUF: edge-agent models fetch $pack"

    # The cross-compiled wheel, cached per version and toolchain (the slow part) ...
    local cmake_args="-DCMAKE_TOOLCHAIN_FILE=$HERE/aarch64-toolchain.cmake -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
    local build_key
    # Keyed on the toolchain file's content and the options, not on where the checkout is (CI
    # runs in a fresh clone elsewhere and finds the cached wheel all the same).
    build_key=$(cat "$HERE/aarch64-toolchain.cmake" <(echo "${cmake_args//$HERE/}") | sha256sum | cut -c1-12)
    local wheel_dir=$CACHE/llm-wheel/$version-$build_key wheel
    wheel=$(find "$wheel_dir" -name 'llama_cpp_python-*.whl' -print -quit 2>/dev/null || true)
    if [[ -n $wheel ]]; then
        log "llm: cross-compiled llama-cpp-python $version cached ($wheel_dir)"
    else
        if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
            [[ $(id -u) -eq 0 ]] || die "--llm needs g++-aarch64-linux-gnu; as root: apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
            log "llm: installing the aarch64 cross compilers (apt-get)"
            export DEBIAN_FRONTEND=noninteractive
            run "$WORK/apt-host.log" "apt-get update" apt-get update -q
            run "$WORK/apt-host.log" "apt-get install the cross compilers" \
                apt-get install -y -q gcc-aarch64-linux-gnu g++-aarch64-linux-gnu
        fi
        t0=$(now)
        log "llm: cross-compiling llama-cpp-python $version for aarch64 (several minutes)"
        rm -rf "$wheel_dir.new"
        mkdir -p "$wheel_dir.new"
        CMAKE_ARGS=$cmake_args run "$WORK/llm-build.log" "cross-compiling llama-cpp-python" \
            "$NATIVE_PY" -m pip wheel "${pip_quiet[@]}" --no-deps --no-cache-dir \
            --no-binary llama-cpp-python -w "$wheel_dir.new" "llama-cpp-python==$version"
        mv "$wheel_dir.new" "$wheel_dir"
        # Wheels of other versions or toolchains are of no further use.
        find "$CACHE/llm-wheel" -mindepth 1 -maxdepth 1 ! -name "$(basename "$wheel_dir")" \
            -exec rm -rf {} +
        wheel=$(find "$wheel_dir" -name 'llama_cpp_python-*.whl' -print -quit)
        [[ -n $wheel ]] || die "pip wheel left no llama-cpp-python wheel (log: $WORK/llm-build.log)"
        note "llm: cross-compiled llama-cpp-python $version for aarch64 in $(since "$t0") s"
    fi

    # ... and a site folder made from it and its requirements (cheap; redone when $SITE changes).
    local llm_site=$CACHE/llm-site
    local key="wheel=$(basename "$wheel")-$build_key site=$wheels_key"
    if [[ -f $llm_site/.stamp && $(cat "$llm_site/.stamp") == "$key" ]]; then
        log "llm: aarch64 llama-cpp-python site cached ($llm_site)"
    else
        rm -rf "$llm_site" "$llm_site.new" "$CACHE/llm-deps"
        mkdir -p "$llm_site.new" "$CACHE/llm-deps"
        # Its own requirements (jinja2, diskcache, ...), read from the wheel, as aarch64 wheels,
        # except those already in $SITE.
        native -c '
import email, pathlib, re, sys, zipfile
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(p.name.split("-")[0]) for p in pathlib.Path(sys.argv[1]).glob("*.dist-info")}
with zipfile.ZipFile(sys.argv[2]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    requires = email.message_from_bytes(whl.read(meta)).get_all("Requires-Dist") or []
for r in requires:
    if "extra ==" not in r and norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) not in have:
        print(r)' "$SITE" "$wheel" >"$WORK/llm-requirements.txt"
        if [[ -s $WORK/llm-requirements.txt ]]; then
            "$NATIVE_PY" -m pip freeze --all --exclude-editable --disable-pip-version-check \
                2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' >"$WORK/llm-constraints.txt" || true
            run "$WORK/llm-pip.log" "pip download (llama-cpp-python's requirements)" \
                "$NATIVE_PY" -m pip download "${pip_quiet[@]}" --no-cache-dir "${target_args[@]}" \
                -d "$CACHE/llm-deps" -r "$WORK/llm-requirements.txt" -c "$WORK/llm-constraints.txt"
            run "$WORK/llm-pip.log" "pip install --target (llama-cpp-python's requirements)" \
                "$NATIVE_PY" -m pip install "${pip_quiet[@]}" --no-index --no-deps \
                --root-user-action=ignore "${target_args[@]}" --target "$llm_site.new" \
                "$CACHE"/llm-deps/*.whl
        fi
        # The wheel is tagged for the build machine (linux_x86_64) though its libraries are
        # aarch64, so pip would refuse it for aarch64: unpack it instead.
        "$NATIVE_PY" -m zipfile -e "$wheel" "$llm_site.new" ||
            die "could not unpack $wheel"
        lib=$(find "$llm_site.new" -name 'libllama.so*' -print -quit)
        # ELF e_machine at offset 18: 183 is EM_AARCH64.
        [[ -n $lib && $(od -An -j18 -N2 -tu2 "$lib" | tr -d ' ') == 183 ]] ||
            die "the cross-built libllama is missing or not aarch64 (${lib:-not found})"
        "$NATIVE_PY" -m compileall -q -j 0 "$llm_site.new" >/dev/null 2>&1 || true
        rm -rf "$CACHE/llm-deps"
        mv "$llm_site.new" "$llm_site"
        echo "$key" >"$llm_site/.stamp"
        log "llm: site $(du -sh "$llm_site" | cut -f1) ($llm_site)"
    fi

    # The pack's model file as an aarch64 device makes it: `models fetch` as aarch64 (pip
    # download, then the aarch64 build's quantizer when the pack requantizes) into a store of
    # its own, so the emulated run scores with the file a device would hold.
    local arm_store=$CACHE/llm-store
    t0=$(now)
    extra_path=$llm_site EDGE_AGENT_MODEL_STORE_DIR=$arm_store run "$WORK/llm-fetch.log" \
        "emulated edge-agent models fetch $pack" arm -m edge_agent models fetch "$pack" -q
    note "llm: $(tail -n 1 "$WORK/llm-fetch.log") (as aarch64, $(since "$t0") s)"

    local readings=${ARM_LLM_READINGS:-8}
    grep -m "$readings" . "$DATA" >"$WORK/llm-input.jsonl"
    log "llm: score $readings readings with $pack: native, then emulated (slow)"
    t0=$(now)
    native -m edge_agent score "$WORK/llm-input.jsonl" --model "$pack" -q >"$WORK/score-llm-native.jsonl" ||
        die "native edge-agent score with $pack failed"
    native_s=$(since "$t0")
    t0=$(now)
    # A pack with golden inputs checked at load ([selftest] on_load) is refused here if the
    # aarch64 build decides them outside the pack's cross-build tolerance.
    extra_path=$llm_site EDGE_AGENT_MODEL_STORE_DIR=$arm_store arm -m edge_agent score \
        "$WORK/llm-input.jsonl" --model "$pack" -q >"$WORK/score-llm-arm.jsonl" 2>"$WORK/score-llm-arm.log" || {
        tail -n 5 "$WORK/score-llm-arm.log" | sed 's/^/    | /' >&2
        die "emulated edge-agent score with $pack failed"
    }
    arm_s=$(since "$t0")
    if ! verdict=$(native "$HERE/compare_decisions.py" --confident-only \
        "$WORK/score-llm-native.jsonl" "$WORK/score-llm-arm.jsonl"); then
        printf '%s\n' "$verdict" | sed 's/^/    | /' >&2
        die "aarch64 decisions of $pack differ from native"
    fi
    note "llm score ($pack, $readings readings): $verdict"
    note "llm score wall time (process start to exit, incl. model load): native ${native_s} s, emulated ${arm_s} s"
}
if ((llm)); then llm_check; fi

{
    echo "edge-agent aarch64 check, $(date -u +%FT%TZ), host $(uname -m) $(nproc) CPUs, qemu -cpu $CPU"
    echo "setup (sysroot + wheels): ${setup_s} s ($setup_kind)"
    echo "whole check: $(since "$started") s"
    printf '%s\n' "${summary[@]}"
} >"$WORK/summary.txt"
log "PASSED in $(since "$started") s: edge-agent runs as aarch64 ($CPU) and decides as natively"
log "summary: $WORK/summary.txt"
