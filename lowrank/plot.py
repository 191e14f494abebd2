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
    "composition_heatmap",
    "eigenvalue_scatter",
    "head_heatmap",
    "positional_pattern",
    "singular_value_spectra",
    "singular_vectors_over_positions",
]


def _head_axes(ax: Any, n_layers: int, n_heads: int) -> None:
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))


def head_heatmap(
    scores: Any, *, title: str, vmin: float = -1.0, vmax: float = 1.0, cmap: str = "RdBu"
) -> Figure:
    """Per-head values ``[L, H]`` (e.g. copying scores) as an annotated heatmap."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"head_heatmap: scores must be [layers, heads], got {scores.shape}")
    n_layers, n_heads = scores.shape
    fig = Figure(figsize=(1.0 + 0.55 * n_heads, 1.0 + 0.5 * n_layers), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(scores, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    _head_axes(ax, n_layers, n_heads)
    if n_layers * n_heads <= 400:
        for (i, j), value in np.ndenumerate(scores):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return fig


def composition_heatmap(scores: Any, *, title: str, baseline: float | None = None) -> Figure:
    """All-pairs composition scores ``[L, H, L, H]`` as a (left head) x (right head) image."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 4:
        raise ValueError(f"composition_heatmap: scores must be [L, H, L, H], got {scores.shape}")
    n_layers, n_heads = scores.shape[:2]
    n = n_layers * n_heads
    layer = np.arange(n_layers)
    later = (layer[:, None, None, None] < layer[None, None, :, None]) & np.ones(scores.shape, bool)
    shown = np.where(later, scores, np.nan).reshape(n, n)  # pairs that cannot compose: blank
    fig = Figure(figsize=(2.0 + 0.25 * n, 1.5 + 0.22 * n), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="viridis", vmin=0)
    labels = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("right (later) head")
    ax.set_ylabel("left (earlier) head")
    suffix = f"  (random baseline {baseline:.3f})" if baseline is not None else ""
    ax.set_title(title + suffix)
    fig.colorbar(image, ax=ax)
    return fig


def eigenvalue_scatter(eigenvalues: Any, *, title: str) -> Figure:
    """Eigenvalues per head ``[L, H, k]`` in the complex plane, one panel per head."""
    eigenvalues = np.asarray(eigenvalues)
    if eigenvalues.ndim != 3:
        raise ValueError(f"eigenvalue_scatter: expected [L, H, k], got {eigenvalues.shape}")
    n_layers, n_heads, _ = eigenvalues.shape
    fig = Figure(figsize=(1.8 * n_heads, 1.8 * n_layers), layout="constrained")
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    for (layer, head), ax in np.ndenumerate(axes):
        ev = eigenvalues[layer, head]
        ax.axhline(0, color="0.8", lw=0.5)
        ax.axvline(0, color="0.8", lw=0.5)
        ax.scatter(ev.real, ev.imag, s=6, c=np.where(ev.real >= 0, "tab:blue", "tab:red"))
        ax.set_title(f"L{layer}H{head}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(title)
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
    ax.set_title(title)
    ax.legend()
    return fig


def singular_vectors_over_positions(U: Any, S: Any, *, k: int = 6, title: str) -> Figure:
    """The top ``k`` left singular vectors of ``W_pos`` (``U: [n_ctx, r]``) over positions."""
    U, S = np.asarray(U, dtype=np.float64), np.asarray(S, dtype=np.float64)
    k = min(k, U.shape[-1])
    fig = Figure(figsize=(7, 1.3 * k), layout="constrained")
    axes = fig.subplots(k, 1, sharex=True, squeeze=False)[:, 0]
    for i, ax in enumerate(axes):
        ax.plot(U[:, i])
        ax.set_ylabel(f"u{i}\nS={S[i]:.2g}", fontsize=8)
    axes[-1].set_xlabel("position")
    fig.suptitle(title)
    return fig


def positional_pattern(
    scores: Any, *, heads: Sequence[tuple[int, int]], title: str, causal: bool = True
) -> Figure:
    """Positional QK scores ``[L, H, n, n]`` of chosen heads as query x key images."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 4:
        raise ValueError(f"positional_pattern: expected [L, H, n, n], got {scores.shape}")
    fig = Figure(figsize=(3.0 * len(heads), 3.2), layout="constrained")
    axes = fig.subplots(1, len(heads), squeeze=False)[0]
    for ax, (layer, head) in zip(axes, heads, strict=True):
        image = scores[layer, head]
        if causal:
            image = np.where(np.tril(np.ones_like(image, dtype=bool)), image, np.nan)
        limit = np.nanmax(np.abs(image)) or 1.0
        ax.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"L{layer}H{head}", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.suptitle(title)
    return fig
