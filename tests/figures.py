"""Figures the suite measures as it runs (Bazel's wall times, the fairness experiment),
printed in a section of their own at the end of the run so that a CI log shows them.
They are reported, never asserted on: timings are for people, conditions for tests."""

from __future__ import annotations

import pytest

SECTIONS: dict[str, list[str]] = {}


def record(section: str, line: str) -> None:
    SECTIONS.setdefault(section, []).append(line)
    print(f"[{section}] {line}")


def write_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for title, lines in SECTIONS.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
