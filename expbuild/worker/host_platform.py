"""What a worker's host is, in REAPI platform terms: OS, architecture, ISA levels, CPUs.

The worker advertises this under whatever `[worker] platform` configures (configured
values win); the server matches actions' platform properties against the union.
"""

from __future__ import annotations

import os
import platform as _platform

# Arch (`uname -m`) -> ISA in the REAPI platform lexicon's spelling.
_ISA = {
    "x86_64": "x86-64",
    "i386": "x86-32",
    "i686": "x86-32",
    "aarch64": "arm-a64",
    "armv7l": "arm-a32",
    "ppc64le": "power-isa-le",
    "ppc64": "power-isa-be",
    "sparc64": "sparc-v9",
}
# The CPU flags each x86-64 micro-architecture level adds (psABI); v1 is plain x86-64.
_X86_64_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)


def detected_platform() -> dict[str, tuple[str, ...]]:
    """What a worker advertises when its configuration does not say.

    OSFamily, Arch (`x86_64`), ISA (`x86-64` plus every x86-64-vN level the CPU
    supports, so an action may ask for `x86-64-v3`), and cpu_count (the CPUs this
    process may run on).
    """
    machine = _platform.machine()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)
    platform: dict[str, tuple[str, ...]] = {"OSFamily": (_platform.system(),), "Arch": (arch,)}
    if arch in _ISA:
        isa = [_ISA[arch]]
        if arch == "x86_64":
            isa += _x86_64_levels(_cpu_flags())
        platform["ISA"] = tuple(isa)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus:
        platform["cpu_count"] = (str(cpus),)
    return platform


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _x86_64_levels(flags: set[str]) -> list[str]:
    levels = []
    for level, required in _X86_64_LEVELS:
        if not required <= flags:
            break
        levels.append(level)
    return levels
