"""Argument types every ``know3d`` command family shares (argparse ``type=``): one-line errors that
name the value and what is expected. Torch-free."""
from __future__ import annotations

import argparse
from typing import List

__all__ = ["positive_int", "positive_float", "fraction", "int_list", "size"]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give block indices >= 0, e.g. 20,30,40")
    return values


def size(text: str) -> tuple:
    """``HxW`` (or ``S`` for a square) in pixels, multiples of 16 -> ``(H, W)``."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        h, w = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(parts[0]), int(parts[0]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give HxW, e.g. 1024x1024") from None
    if h < 16 or w < 16 or h % 16 or w % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be multiples of 16 (at least 16)")
    return h, w
