"""Figures: built without pyplot, saved as PNG, bad shapes rejected."""

import io

import numpy as np
import pytest
from matplotlib.figure import Figure

from lowrank import plot

rng = np.random.default_rng(0)
FIGURES = {
    "head_heatmap": lambda: plot.head_heatmap(rng.uniform(-1, 1, (2, 4)), title="copying"),
    "composition_heatmap": lambda: plot.composition_heatmap(
        rng.uniform(0, 1, (2, 4, 2, 4)), title="K", baseline=0.125
    ),
    "eigenvalue_scatter": lambda: plot.eigenvalue_scatter(
        rng.standard_normal((2, 3, 8)) + 1j * rng.standard_normal((2, 3, 8)), title="eig"
    ),
    "singular_value_spectra": lambda: plot.singular_value_spectra(
        {"W_E": np.sort(rng.uniform(0.1, 5, 16))[::-1], "W_U": np.linspace(3, 0.5, 16)},
        title="spectra",
    ),
    "singular_vectors_over_positions": lambda: plot.singular_vectors_over_positions(
        rng.standard_normal((48, 16)), np.linspace(4, 1, 16), k=3, title="W_pos"
    ),
    "positional_pattern": lambda: plot.positional_pattern(
        rng.standard_normal((2, 4, 12, 12)), heads=[(0, 1), (1, 3)], title="pos"
    ),
}


@pytest.mark.parametrize("name", FIGURES)
def test_figures_render_to_png(name):
    fig = FIGURES[name]()
    assert isinstance(fig, Figure)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: plot.head_heatmap(np.zeros(3), title=""), r"\[layers, heads\], got \(3,\)"),
        (lambda: plot.composition_heatmap(np.zeros((2, 2)), title=""), r"\[L, H, L, H\]"),
        (lambda: plot.eigenvalue_scatter(np.zeros((2, 2)), title=""), r"\[L, H, k\]"),
        (lambda: plot.positional_pattern(np.zeros((2, 2)), heads=[], title=""), r"\[L, H, n, n\]"),
    ],
)
def test_bad_shapes(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", FIGURES)
def test_no_text_is_clipped(name):
    """Titles, labels and colour bars lie inside the canvas (after the layout has run)."""
    fig = FIGURES[name]()
    fig.savefig(io.BytesIO(), format="png", dpi=110)
    box = fig.get_tightbbox()
    width, height = fig.get_size_inches()
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, box


def test_one_diverging_convention():
    """Signed data use the same map, centred at 0 (red > 0 > blue) in every figure."""
    heat = plot.head_heatmap(np.array([[0.5, -0.25]]), title="t")
    comp = plot.composition_heatmap(rng.uniform(0, 1, (2, 2, 2, 2)), title="t", vmax=2.0)
    pos = plot.positional_pattern(rng.standard_normal((1, 1, 4, 4)), heads=[(0, 0)], title="t")
    for fig in (heat, comp, pos):
        image = fig.axes[0].images[0]
        assert image.get_cmap().name == plot.DIVERGING
        low, high = image.get_clim()
        assert low == -high
    assert comp.axes[0].images[0].get_clim() == (-2.0, 2.0)  # a shared scale when asked
