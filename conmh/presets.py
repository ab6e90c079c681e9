"""Encoder sizes of the upstream model presets (docs/reference.md §3).

Kept apart from ``conmh.model`` so that reading them does not import torch
(the command line offers them as choices; ``conmh --help`` stays fast).
"""

from __future__ import annotations

# Encoder sizes of the upstream presets; the decoder is the same for all.
PRESETS: dict[str, dict[str, int]] = {
    "mini": {"hidden_size": 256, "encoder_depth": 1, "encoder_heads": 1},
    "small": {"hidden_size": 256, "encoder_depth": 12, "encoder_heads": 6},
    "base": {"hidden_size": 256, "encoder_depth": 12, "encoder_heads": 12},
    "large": {"hidden_size": 256, "encoder_depth": 24, "encoder_heads": 16},
}
PAPER_PRESET = "small"  # the preset of every result in the paper
