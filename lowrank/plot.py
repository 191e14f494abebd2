"""Matplotlib figures for the analyses. Each function returns a ``Figure``; none shows it.

The figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state), so they work
with any backend, Agg included, and in threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "DIVERGING",
    "composition_heatmap",
    "eigenvalue_scatter",
    "head_heatmap",
    "positional_pattern",
    "relative_position_profiles",
    "singular_value_spectra",
    "singular_vectors_over_positions",
]


#: Every signed quantity uses this map with limits symmetric about 0: red > 0 > blue.
DIVERGING = "RdBu_r"
POSITIVE_COLOUR, NEGATIVE_COLOUR = "tab:red", "tab:blue"


def _head_axes(ax: Any, n_layers: int, n_heads: int) -> None:
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))


def _symmetric_limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def head_heatmap(
    scores: Any, *, title: str, vmin: float = -1.0, vmax: float = 1.0, cmap: str = DIVERGING
) -> Figure:
    """Per-head values ``[L, H]`` (e.g. copying scores) as an annotated heatmap."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"head_heatmap: scores must be [layers, heads], got {scores.shape}")
    n_layers, n_heads = scores.shape
    fig = Figure(
        figsize=(max(4.5, 1.5 + 0.55 * n_heads), max(2.6, 1.2 + 0.5 * n_layers)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    image = ax.imshow(scores, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    _head_axes(ax, n_layers, n_heads)
    if n_layers * n_heads <= 400:
        for (i, j), value in np.ndenumerate(scores):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)
    return fig


def composition_heatmap(
    scores: Any, *, title: str, baseline: float | None = None, vmax: float | None = None
) -> Figure:
    """All-pairs composition scores ``[L, H, L, H]`` as a (left head) x (right head) image.

    Args:
        baseline: drawn as a line on the colour bar (the score of unrelated heads).
        vmax: top of the colour scale (pass the same value to compare several figures);
            default the largest score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 4:
        raise ValueError(f"composition_heatmap: scores must be [L, H, L, H], got {scores.shape}")
    n_layers, n_heads = scores.shape[:2]
    n = n_layers * n_heads
    layer = np.arange(n_layers)
    later = (layer[:, None, None, None] < layer[None, None, :, None]) & np.ones(scores.shape, bool)
    shown = np.where(later, scores, np.nan).reshape(n, n)  # pairs that cannot compose: blank
    top = _symmetric_limit(shown) if vmax is None else vmax
    side = max(4.0, 1.5 + 0.25 * n)
    fig = Figure(figsize=(side + 1.4, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap=DIVERGING, vmin=-top, vmax=top)
    labels = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    ticks = range(0, n, max(1, n // 48))  # at most ~48 labels per axis
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
    ax.set_xlabel("right (later) head")
    ax.set_ylabel("left (earlier) head")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.ax.set_ylim(0, top)  # scores are >= 0: only the red half of the map is used
    if baseline is not None:
        bar.ax.axhline(baseline, color="black", lw=1.5)
        bar.ax.text(
            -0.2,
            baseline,
            "baseline",
            ha="right",
            va="center",
            fontsize=7,
            transform=bar.ax.get_yaxis_transform(),
        )
    return fig


def eigenvalue_scatter(eigenvalues: Any, *, title: str) -> Figure:
    """Eigenvalues per head ``[L, H, k]`` in the complex plane, one panel per head."""
    eigenvalues = np.asarray(eigenvalues)
    if eigenvalues.ndim != 3:
        raise ValueError(f"eigenvalue_scatter: expected [L, H, k], got {eigenvalues.shape}")
    n_layers, n_heads, _ = eigenvalues.shape
    fig = Figure(figsize=(max(4.0, 1.9 * n_heads), 0.4 + 1.9 * n_layers), layout="constrained")
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    for (layer, head), ax in np.ndenumerate(axes):
        ev = eigenvalues[layer, head]
        ax.axhline(0, color="0.8", lw=0.5)
        ax.axvline(0, color="0.8", lw=0.5)
        colours = np.where(ev.real >= 0, POSITIVE_COLOUR, NEGATIVE_COLOUR)
        ax.scatter(ev.real, ev.imag, s=6, c=colours)
        ax.set_title(f"L{layer}H{head}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.supxlabel("real part", fontsize=8)
    fig.supylabel("imaginary part", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def singular_value_spectra(spectra: Mapping[str, Any], *, title: str) -> Figure:
    """Singular values of several matrices on a log scale, one line each."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, values in spectra.items():
        values = np.asarray(values, dtype=np.float64)
        ax.semilogy(np.arange(1, values.shape[-1] + 1), values, label=name)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(title, fontsize=10)
    ax.legend()
    return fig


def singular_vectors_over_positions(U: Any, S: Any, *, k: int = 6, title: str) -> Figure:
    """The top ``k`` left singular vectors of ``W_pos`` (``U: [n_ctx, r]``) over positions."""
    U, S = np.asarray(U, dtype=np.float64), np.asarray(S, dtype=np.float64)
    k = min(k, U.shape[-1])
    fig = Figure(figsize=(7, 0.8 + 1.2 * k), layout="constrained")
    axes = fig.subplots(k, 1, sharex=True, squeeze=False)[:, 0]
    for i, ax in enumerate(axes):
        ax.plot(U[:, i])
        ax.axhline(0, color="0.8", lw=0.5)
        ax.set_ylabel(f"u{i}\nS={S[i]:.2g}", fontsize=8)
    axes[-1].set_xlabel("position")
    fig.suptitle(title, fontsize=10)
    return fig


def positional_pattern(
    scores: Any, *, heads: Sequence[tuple[int, int]], title: str, causal: bool = True
) -> Figure:
    """Positional QK scores ``[L, H, n, n]`` of chosen heads: a grid of query x key images.

    Each head is divided by its largest absolute score (shown in its title), so that every
    head's pattern is visible on the one colour bar from -1 to 1. Scores that are not finite
    (``-inf`` where a rotary model computes none) are left blank.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 4:
        raise ValueError(f"positional_pattern: expected [L, H, n, n], got {scores.shape}")
    if not heads:
        raise ValueError("positional_pattern: no heads to draw")
    n_cols = min(len(heads), 4)
    n_rows = -(-len(heads) // n_cols)
    fig = Figure(figsize=(1.2 + 2.6 * n_cols, 0.8 + 2.6 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True, sharey=True)
    for ax, (layer, head) in zip(axes.flat, heads, strict=False):
        image = scores[layer, head]
        image = np.where(np.isfinite(image), image, np.nan)
        if causal:
            image = np.where(np.tril(np.ones_like(image, dtype=bool)), image, np.nan)
        limit = _symmetric_limit(image)
        mappable = ax.imshow(image / limit, cmap=DIVERGING, vmin=-1, vmax=1)
        ax.set_title(f"L{layer}H{head} (max |score| {limit:.2g})", fontsize=8)
    for ax in axes.flat[len(heads) :]:
        ax.set_axis_off()
    for ax in axes[-1]:
        ax.set_xlabel("key position", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("query position", fontsize=8)
    fig.colorbar(mappable, ax=axes, shrink=0.8, label="score / max |score| of the head")
    fig.suptitle(title, fontsize=10)
    return fig


PROFILE_LINES_MAX = 8  # layers drawn as panels of curves; more: one heatmap of every head


def relative_position_profiles(profile: Any, *, offsets: Any = None, title: str) -> Figure:
    """Relative-position profiles ``[L, H, n]`` of rotary heads (score by query-key offset).

    Up to :data:`PROFILE_LINES_MAX` layers: one panel per layer, a curve per head. More layers:
    one heatmap, a row per head, each row divided by its largest absolute score.

    Args:
        offsets: the ``n`` offsets (default ``0 .. n - 1``).
    """
    profile = np.asarray(profile, dtype=np.float64)
    if profile.ndim != 3:
        raise ValueError(f"relative_position_profiles: expected [L, H, n], got {profile.shape}")
    n_layers, n_heads, n = profile.shape
    offsets = np.arange(n) if offsets is None else np.asarray(offsets)
    if offsets.shape != (n,):
        raise ValueError(f"relative_position_profiles: offsets must be [{n}], got {offsets.shape}")
    if n_layers > PROFILE_LINES_MAX:
        return _profile_heatmap(profile, offsets, title=title)
    n_cols = min(n_layers, 2)
    n_rows = -(-n_layers // n_cols)
    fig = Figure(figsize=(1.0 + 4.6 * n_cols, 0.8 + 2.8 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True)
    for layer, ax in enumerate(axes.flat[:n_layers]):
        for head in range(n_heads):
            ax.plot(offsets, profile[layer, head], marker=".", ms=3, lw=1, label=f"H{head}")
        ax.axhline(0, color="0.8", lw=0.5)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.tick_params(labelsize=7)
        if n_heads <= 16:
            ax.legend(fontsize=6, ncols=2 if n_heads > 8 else 1)
    for ax in axes.flat[n_layers:]:
        ax.set_axis_off()
    fig.supxlabel("offset (query position - key position)", fontsize=8)
    fig.supylabel("score", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _profile_heatmap(profile: np.ndarray, offsets: np.ndarray, *, title: str) -> Figure:
    """``[L, H, n]`` profiles as a (layer, head) x offset image, each row scaled to [-1, 1]."""
    n_layers, n_heads, n = profile.shape
    rows = profile.reshape(n_layers * n_heads, n)
    finite = np.where(np.isfinite(rows), np.abs(rows), 0.0).max(axis=-1, keepdims=True)
    scaled = rows / np.where(finite > 0, finite, 1.0)
    fig = Figure(figsize=(7.0, max(3.0, 1.0 + 0.06 * rows.shape[0])), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        scaled,
        cmap=DIVERGING,
        vmin=-1,
        vmax=1,
        aspect="auto",
        interpolation="nearest",
        extent=(offsets[0] - 0.5, offsets[-1] + 0.5, rows.shape[0] - 0.5, -0.5),
    )
    layers = range(0, n_layers, max(1, n_layers // 24))  # at most ~24 labels
    ax.set_yticks([la * n_heads for la in layers], [f"L{la}" for la in layers])
    ax.set_xlabel("offset (query position - key position)")
    ax.set_ylabel("head (grouped by layer)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="score / max |score| of the head")
    return fig
