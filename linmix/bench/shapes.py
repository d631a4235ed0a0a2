"""Shape sets shared by the benchmark entries, and the parsing of ``--shapes``.

A shape is a dict of positive integers keyed by an entry's shape keys (``B, T, H, K, V`` for
decayed_attention, ``B, T, d`` for a layer). The sets every entry names alike: ``fla``, fla's
benchmark shapes; ``tsweep``, ``T = 1024 .. 32768`` at ``B * T = 32768`` tokens; ``small``, shapes a
CPU runs in seconds.
"""

from __future__ import annotations

import json

FLA_SHAPES = ((8, 2048, 16, 128), (4, 4096, 16, 128), (2, 16384, 16, 128))  # fla's (B, T, H, D)
TSWEEP_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
TOKENS_PER_BATCH = 32768  # B * T of every tsweep shape


def tsweep(**fixed: int) -> list[dict]:
    """The ``T`` sweep at ``B * T = 32768`` tokens: ``[{"B", "T", **fixed}]`` for T = 1024 .. 32768."""
    return [{"B": TOKENS_PER_BATCH // T, "T": T, **fixed} for T in TSWEEP_LENGTHS]


HEAD_SHAPE_KEYS = ("B", "T", "H", "K", "V")


def head_shape_sets() -> dict[str, list[dict]]:
    """The sets of an op with ``B, T, H, K, V`` shapes (decayed_attention, delta_rule, gated_kalman):
    fla's shapes; ``fla_long``, one 16k sequence (the decoding prefill); the T sweep at H = 16,
    K = V = 128; ``k2``, the K2 layer's widths (one head, K = 32, V = 1024); ``small``, for the CPU."""
    return {
        "fla": [{"B": B, "T": T, "H": H, "K": D, "V": D} for B, T, H, D in FLA_SHAPES],
        "fla_long": [{"B": 1, "T": 16384, "H": 16, "K": 128, "V": 128}],
        "tsweep": tsweep(H=16, K=128, V=128),
        "k2": tsweep(H=1, K=32, V=1024),
        "small": [{"B": 2, "T": 64, "H": 2, "K": 16, "V": 16}, {"B": 1, "T": 130, "H": 2, "K": 16, "V": 32}],
    }


def shape_label(keys: tuple[str, ...], shape: dict) -> str:
    """A compact label of a shape, e.g. ``"B8 T2048 H16 K128 V128"``."""
    return " ".join(f"{key}{shape[key]}" for key in keys)


def parse_shapes(text: str, keys: tuple[str, ...], shape_sets: dict[str, list[dict]], owner: str
                 ) -> tuple[str, list[dict]]:
    """``--shapes``: a shape set's name, or a JSON dict or list of dicts with exactly the shape keys.

    Args:
        text: the flag's value.
        keys: the shape keys of the entry.
        shape_sets: the entry's named sets.
        owner: the entry's name, for messages.

    Returns:
        ``(set name or "custom", shapes)``.

    Raises:
        ValueError: an unknown set, invalid JSON, or a shape with missing, unknown or non-positive keys.
    """
    if not text.lstrip().startswith(("{", "[")):
        if text not in shape_sets:
            raise ValueError(f"unknown shape set {text!r} for {owner}; sets: {', '.join(shape_sets)}, "
                             "or a JSON dict or list of dicts")
        return text, [dict(shape) for shape in shape_sets[text]]
    try:
        custom = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--shapes is not valid JSON ({error}): {text!r}") from error
    custom = [custom] if isinstance(custom, dict) else custom
    if not isinstance(custom, list) or not custom or not all(isinstance(shape, dict) for shape in custom):
        raise ValueError(f"custom --shapes must be a JSON dict or a non-empty list of dicts, got {text!r}")
    for shape in custom:
        missing = [key for key in keys if key not in shape]
        unknown = sorted(set(shape) - set(keys))
        if missing or unknown:
            raise ValueError(f"shape {shape} for {owner}: needs keys {', '.join(keys)}"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        if not all(isinstance(shape[key], int) and shape[key] > 0 for key in keys):
            raise ValueError(f"shape {shape}: {', '.join(keys)} must be positive integers")
    return "custom", custom
