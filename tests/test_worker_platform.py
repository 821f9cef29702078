"""The platform a worker detects for its host."""

from __future__ import annotations

import os
import platform

from expbuild.worker.host_platform import detected_platform


def test_detected_platform():
    detected = detected_platform()
    assert detected["OSFamily"] == (platform.system(),)
    assert detected["cpu_count"] == (str(len(os.sched_getaffinity(0))),)
    if platform.machine() == "x86_64":
        assert detected["Arch"] == ("x86_64",)
        isa = detected["ISA"]
        assert isa[0] == "x86-64"
        # The micro-architecture levels come in order, each implying the ones before.
        levels = [value for value in isa if value.startswith("x86-64-v")]
        assert levels == [f"x86-64-v{n}" for n in range(2, 2 + len(levels))]
        flags = open("/proc/cpuinfo").read()
        if "x86-64-v3" in isa:
            assert all(f" {flag}" in flags for flag in ("avx2", "bmi2", "fma", "movbe"))
