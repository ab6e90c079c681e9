"""The machine a process runs on, as logs and reports name it (no torch: the report reads it too)."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), for logs and reports: speeds differ between machines."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
