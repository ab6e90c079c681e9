"""The machine a process runs on, as logs and reports name it (no torch: the report reads it too)."""

from __future__ import annotations

import platform


def cpu_info() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo ("model name", "cpu family", "flags", ...);
    empty where there is no such file (not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():  # the end of the first processor's block
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), for logs and reports: speeds differ between machines."""
    return cpu_info().get("model name") or platform.processor() or platform.machine() or "unknown CPU"
