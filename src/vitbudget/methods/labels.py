"""Human names for methods and their settings, shared by tables, plots and the tuner."""
from __future__ import annotations

from typing import Any

from .registry import METHODS

SYMBOLS = {"rho": "ρ", "r": "r", "ratio": "ratio", "thr0": "thr₀", "alpha": "α", "target_depth": "d", "scale": "×", "crop_fraction": "crop", "ponder_weight": "ponder"}
HIDDEN = {"seed", "stages"}  # settings that do not tell curves apart in a legend


def display_name(method: str) -> str:
    """'tome+abs' -> 'ToMe + ABS' (each part's registered label); unknown names are returned as they are."""
    return " + ".join(METHODS[part].label if part in METHODS else part for part in method.split("+"))


def setting_label(options: dict[str, Any]) -> str:
    """{'rho': 0.7, 'alpha': 0.2} -> 'ρ 0.7, α 0.2'; booleans by name ('fuse'), scorers by value."""
    parts = []
    for key, value in options.items():
        if key in HIDDEN:
            continue
        if isinstance(value, bool):
            if value:
                parts.append(key.replace("_", " "))
        elif key == "score":
            parts.append(str(value))
        else:
            parts.append(f"{SYMBOLS.get(key, key.replace('_', ' '))} {value:g}" if isinstance(value, float) else f"{SYMBOLS.get(key, key)} {value}")
    return ", ".join(parts)
