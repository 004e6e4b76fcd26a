#!/bin/sh
# aarch64 Python under qemu user-mode emulation, installed by scripts/arm_check.sh as
# <sysroot>/usr/bin/python3-qemu. Without binfmt_misc the host kernel cannot exec an aarch64
# binary, so a child started as `subprocess.run([sys.executable, ...])` would fail; with `-0`
# the emulated Python sees this script as argv[0], so sys.executable is this launcher and its
# children are emulated too. Other commands (sh, mosquitto, ...) run natively.
# QEMU_CPU picks the CPU model (default cortex-a72, the Raspberry Pi 4 core).
here=$(cd -P "$(dirname "$0")" && pwd)
sysroot=$(cd -P "$here/../.." && pwd)
exec "${QEMU_AARCH64:-qemu-aarch64-static}" -cpu "${QEMU_CPU:-cortex-a72}" -L "$sysroot" \
    -0 "$here/python3-qemu" "$sysroot/usr/bin/python3.11" "$@"
