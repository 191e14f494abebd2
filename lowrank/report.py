"""The all-heads weight report: analyse a model's heads and write figures, JSON and HTML.

:func:`analyse` a model, then make its :func:`figures`, the :func:`to_json` dict, and the files
(:func:`write_files`: PNGs, ``index.html``, ``report.json``).

Each analysis is jitted on its own (never two decompositions in one program, see
``lowrank._deadlock.Serial``). Given a device mesh, the per-head analyses run sharded over it (see
:mod:`lowrank.sharding`); on several processes every process computes the same results.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import circuits, interpret, linalg, sharding
from lowrank.models import ModelConfig, TransformerModel
from lowrank.models._common import dotted_path

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.figure import Figure

__all__ = [
    "REPORT_FILE_NAMES",
    "REPORT_FILE_SUFFIXES",
    "SCHEMA_PATH",
    "SECTIONS",
    "InterpretedHead",
    "Results",
    "RotaryPositions",
    "analyse",
    "dumps",
    "figures",
    "format_tables",
    "nonfinite_parameters",
    "progress_bar",
    "provenance",
    "to_json",
    "write_files",
    "write_html",
]

KINDS: tuple[circuits.CompositionKind, ...] = ("Q", "K", "V")
POSITIONS_SHOWN = 64  # positional QK patterns are drawn over the first positions
# Rotary models: the relative-position profile covers offsets 0 .. min(n_ctx, POSITIONS_SHOWN) - 1,
# every offset that the rotary positional pattern over the first positions shows.
REPORT_JSON = "report.json"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")  # describes report.json
# What a report folder holds: an existing folder of only these may be replaced by a new report.
REPORT_FILE_NAMES = frozenset({REPORT_JSON, "index.html"})
REPORT_FILE_SUFFIXES = frozenset({".png"})


def progress_bar(total: int, *, enabled: bool = True, file: TextIO | None = None) -> Any:
    """A ``tqdm`` bar of ``total`` steps on stderr; silent when it is not a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        file=sys.stderr if file is None else file,
        disable=None if enabled else True,  # None: off when the stream is not a terminal
        unit="step",
        bar_format="{l_bar}{bar:30}| {n_fmt}/{total_fmt} [{elapsed}]",
    )


def _step(bar: Any, label: str) -> None:
    if bar is not None:
        bar.set_description_str(label)
        bar.update()


def _labels(n_layers: int, n_heads: int) -> list[str]:
    return [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]


def _top_pairs(scores: np.ndarray, baseline: float, k: int) -> list[dict[str, Any]]:
    flat = np.argsort(-scores.reshape(-1))[:k]
    pairs = []
    for index in flat:
        l1, h1, l2, h2 = np.unravel_index(index, scores.shape)
        value = float(scores[l1, h1, l2, h2])
        if not value > 0:  # also stops at NaN
            break
        pairs.append(
            {
                "left": f"L{l1}H{h1}",
                "right": f"L{l2}H{h2}",
                "score": value,
                "x_baseline": value / baseline,
            }
        )
    return pairs


def _decode(tokenizer: Any, ids: np.ndarray) -> list[str]:
    if tokenizer is None:
        return [f"#{int(i)}" for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


@dataclasses.dataclass(frozen=True)
class InterpretedHead:
    """The top OV singular direction of one head, read out as tokens through ``W_U``."""

    layer: int
    head: int
    full_ov_copying_score: float
    singular_value: float
    top_tokens: tuple[str, ...]
    top_tokens_negated: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LearnedPositions:
    """What the report shows of a learned positional embedding ``W_pos``."""

    vectors: np.ndarray  # [n_ctx, k], left singular vectors of W_pos
    singular_values: np.ndarray  # [k]
    effective_rank: int
    qk: np.ndarray  # [L, H, P, P], query x key over the first P positions
    heads: tuple[tuple[int, int], ...]  # (layer, head) drawn in the positional figure


@dataclasses.dataclass(frozen=True)
class RotaryPositions:
    """What the report shows of rotary positions (no ``W_pos``): scores by relative offset.

    Both come from :mod:`lowrank.circuits`: ``profile`` is
    :func:`~lowrank.circuits.relative_position_profile` over ``offsets``, ``pattern`` is
    :func:`~lowrank.circuits.rotary_positional_pattern` (``-inf`` where the model computes no
    score) over the first ``P`` positions.
    """

    offsets: np.ndarray  # [n] relative offsets 0 .. n - 1 (query position minus key position)
    profile: np.ndarray  # [L, H, n]
    pattern: np.ndarray  # [L, H, P, P], query x key
    heads: tuple[tuple[int, int], ...]  # (layer, head) drawn in the positional pattern figure


@dataclasses.dataclass(frozen=True)
class Results:
    """Every number of the report, as host NumPy arrays (``L`` layers, ``H`` heads).

    ``positions`` is ``None`` for a model with rotary positions (it has no ``W_pos``) and
    ``rotary`` is ``None`` for any other model.
    """

    model: str
    config: ModelConfig
    full_ov_eigenvalues: np.ndarray  # [L, H, k] complex
    full_ov_copying: np.ndarray  # [L, H]
    ov_copying: np.ndarray  # [L, H]
    composition: Mapping[str, np.ndarray]  # "Q" | "K" | "V" -> [L, H, L, H]
    baseline: float
    embedding_spectra: Mapping[str, np.ndarray]  # name -> [k]
    interpreted: tuple[InterpretedHead, ...]
    positions: LearnedPositions | None
    rotary: RotaryPositions | None = None


def nonfinite_parameters(model: TransformerModel) -> list[str]:
    """Names of the parameters holding NaN or Inf (dotted paths of ``model.params``)."""
    finite = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: jnp.isfinite(x).all(), p))
    flags = jax.tree_util.tree_flatten_with_path(finite(model.params))[0]
    return [dotted_path(path) for path, ok in flags if not bool(ok)]


def analyse(
    model: TransformerModel,
    *,
    name: str,
    top_heads: int = 3,
    top_tokens: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    progress: Any = None,
) -> Results:
    """Run every analysis of the report on ``model``; nothing is written.

    Args:
        name: how the model is named in the report (its hub id or path).
        top_heads: the heads with the highest full OV copying scores to interpret (and to draw
            positional patterns of, when the model has more than 8 heads).
        mesh: a ``(layers, heads)`` mesh (:func:`lowrank.sharding.make_mesh`) that ``model``'s
            parameters are placed on; ``None`` runs on the default device.
    """
    c = model.config
    if top_heads < 1:
        raise ValueError(f"analyse: top_heads must be at least 1, got {top_heads}")
    tick: Callable[[str], None] = functools.partial(_step, progress)

    def compute(fn: Callable[..., Any], *args: Any, per_head: bool = False) -> Any:
        """``fn(*args)`` jitted, as NumPy arrays on this host.

        Over ``mesh``, ``[L, H, ...]`` results are split where their heads live when
        ``per_head``, else replicated.
        """
        jitted: Callable[..., Any]
        if mesh is None:
            jitted = jax.jit(fn)
        else:
            jitted = sharding.sharded(
                fn, mesh, sharding.PER_HEAD if per_head else sharding.REPLICATED
            )
        return jax.tree_util.tree_map(sharding.to_host, jitted(*args))

    full_eig = compute(circuits.ov_eigenvalues, model, per_head=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        full_copy = full_eig.sum(-1).real / np.abs(full_eig).sum(-1)
    ov_copy = compute(lambda m: circuits.copying_scores(m, full=False), model, per_head=True)
    tick("copying scores")

    composition: dict[str, np.ndarray] = {}
    for kind in KINDS:
        if mesh is None:
            scores = jax.jit(circuits.composition_scores, static_argnums=1)(model, kind)
        else:
            scores = sharding.composition_scores(model, kind, mesh)
        composition[kind] = sharding.to_host(scores)
    tick("composition scores")

    spectra = compute(interpret.embedding_spectra, model)
    tick("embedding spectra")

    order = np.argsort(-full_copy.reshape(-1))[: min(top_heads, c.n_layers * c.n_heads)]
    chosen = tuple(divmod(int(i), c.n_heads) for i in order)  # (layer, head)
    interpreted = []
    for layer, head in chosen:
        directions = compute(
            lambda m, layer=layer, head=head: interpret.svd_directions(
                m, "OV", layer, head, num_vectors=1, top_k=top_tokens
            ),
            model,
        )
        ids = directions.top_tokens[0]
        interpreted.append(
            InterpretedHead(
                layer=layer,
                head=head,
                full_ov_copying_score=float(full_copy[layer, head]),
                singular_value=float(directions.singular_values[0]),
                top_tokens=tuple(_decode(model.tokenizer, ids[0])),
                top_tokens_negated=tuple(_decode(model.tokenizer, ids[1])),
            )
        )
    tick("SVD interpreter")

    positions, rotary = None, None
    n_pos = min(POSITIONS_SHOWN, c.n_ctx)
    n_all = c.n_layers * c.n_heads
    drawn = tuple(divmod(i, c.n_heads) for i in range(n_all)) if n_all <= 8 else chosen
    if c.positional == "learned":
        U_pos, S_pos, _ = compute(linalg.svd, model.W_pos)
        positions = LearnedPositions(
            vectors=U_pos,
            singular_values=S_pos,
            effective_rank=int(interpret.effective_rank(jnp.asarray(S_pos))),
            qk=compute(
                lambda m: circuits.positional_qk_circuit(m)[..., :n_pos, :n_pos].AB,
                model,
                per_head=True,
            ),
            heads=drawn,
        )
    elif c.positional == "rotary":
        offsets = np.arange(n_pos)
        rotary = RotaryPositions(
            offsets=offsets,
            profile=compute(
                lambda m: circuits.relative_position_profile(m, offsets), model, per_head=True
            ),
            pattern=compute(
                lambda m: circuits.rotary_positional_pattern(m, n_pos), model, per_head=True
            ),
            heads=drawn,
        )
    tick("positional QK")

    return Results(
        model=name,
        config=c,
        full_ov_eigenvalues=full_eig,
        full_ov_copying=full_copy,
        ov_copying=ov_copy,
        composition=composition,
        baseline=circuits.composition_baseline(c.d_model),
        embedding_spectra=spectra,
        interpreted=tuple(interpreted),
        positions=positions,
        rotary=rotary,
    )


W_POS_VECTORS_SHOWN = 6  # top singular vectors of W_pos drawn over positions

#: The report's sections: (key, heading, what it measures and how to read it).
SECTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "copying",
        "Copying scores",
        "Each head's full OV circuit W_E W_V W_O W_U maps the token a head attends to onto "
        "the logits it raises. Its copying score, sum(eigenvalues) / sum(|eigenvalues|), is +1 "
        "when every eigenvalue is positive (attending to a token raises that same token) and -1 "
        "when the head suppresses what it attends to. The OV circuit W_V W_O alone acts on the "
        "residual stream, not on tokens: its spectrum is that of W_O W_V, while the full "
        "circuit's is that of W_O (W_U W_E) W_V. The two agree only where W_U W_E acts like a "
        "positive multiple of the identity on the head's subspace, so a head that copies tokens "
        "perfectly (+1.0 on the full circuit) can score negative on the OV circuit alone.",
    ),
    (
        "composition",
        "Composition between heads",
        "How much an earlier head's output (its OV circuit L) feeds a later head's queries (Q), "
        "keys (K) or values (V) (R: the later head's QK circuit, its transpose, or its OV "
        "circuit): ||L R||_F / (||L||_F ||R||_F). Heads whose subspaces are unrelated score "
        "about 1/sqrt(d_model), the random baseline marked on the colour bars (one scale for "
        "all three). K-composition far above the baseline from a previous-token head into a "
        "later head is the signature of an induction circuit.",
    ),
    (
        "embeddings",
        "Embeddings",
        "Singular values of the token embedding W_E, the unembedding W_U, the positional "
        "embedding W_pos and of every token + position sum. The effective rank counts the "
        "singular values above 1% of the largest; the top singular vectors of W_pos show how "
        "positions are encoded (smooth waves for learned sinusoid-like codes).",
    ),
    (
        "interpretation",
        "SVD interpreter",
        "The top right singular vector of each most-copying head's OV circuit, read out through "
        "the unembedding: the tokens whose logits the head's strongest output direction raises "
        "(+) and lowers (-). For a copying head these are the tokens it copies.",
    ),
    (
        "positional",
        "Positional attention",
        "W_pos W_Q W_K^T W_pos^T: the attention score a query at one position gives a key at "
        "another from positional embeddings alone (query x key, causal part). A bright "
        "sub-diagonal is a previous-token head. Each head is scaled by its own largest score.",
    ),
    (
        "rotary",
        "Rotary positional attention",
        "A rotary model has no W_pos: its queries and keys are rotated by their positions, so a "
        "head's score x_i W_Q R(i - j) W_K^T x_j depends on the offset i - j between query and "
        "key (TransformerLens's QK = W_Q W_K^T ignores the rotation; it is the offset-0 "
        "circuit). The relative-position profile evaluates this form with the same residual "
        "vector as query and key, the mean normalised token embedding: the expected score of a "
        "key that many tokens back, with token identity averaged out, the part of the score "
        "that depends on position alone. A previous-token head peaks at offset 1. The "
        "positional pattern lays the profile out as query x key over the first positions (the "
        "rotary analogue of W_pos W_Q W_K^T W_pos^T); keys after the query, or outside a local "
        "layer's window, get no score. Scores exclude biases and the attention divisor "
        "(sqrt(d_head) in most models); each head of the pattern is scaled by its own largest "
        "score.",
    ),
)


@dataclasses.dataclass(frozen=True)
class _FigureSpec:
    filename: str
    section: str
    caption: str
    draw: Callable[[ModuleType], Figure]  # given lowrank.plot (matplotlib: imported to draw)


def _figure_specs(r: Results) -> list[_FigureSpec]:
    """The report's figures: names, sections, captions, and how to draw each with ``plot``.

    Needs no matplotlib (:func:`to_json` lists the figures); :func:`figures` draws them.
    """
    c = r.config
    specs = [
        _FigureSpec(
            "copying_full_ov.png",
            "copying",
            "Copying score of each head's full OV circuit W_E W_V W_O W_U.",
            lambda plot: plot.head_heatmap(
                r.full_ov_copying, title="Full OV circuit copying score (W_E W_V W_O W_U)"
            ),
        ),
        _FigureSpec(
            "copying_ov.png",
            "copying",
            "Copying score of each head's OV circuit W_V W_O alone (see above for why it can "
            "differ in sign).",
            lambda plot: plot.head_heatmap(
                r.ov_copying, title="OV circuit copying score (W_V W_O)"
            ),
        ),
    ]
    if c.n_layers * c.n_heads <= 64:
        specs.append(
            _FigureSpec(
                "eigenvalues_full_ov.png",
                "copying",
                "Eigenvalues of each head's full OV circuit in the complex plane "
                "(red: positive real part, blue: negative).",
                lambda plot: plot.eigenvalue_scatter(
                    r.full_ov_eigenvalues, title="Full OV circuit eigenvalues per head"
                ),
            )
        )
    vmax = max(float(np.nanmax(r.composition[kind], initial=0.0)) for kind in KINDS) or 1.0

    def composition(kind: str) -> _FigureSpec:
        return _FigureSpec(
            f"composition_{kind}.png",
            "composition",
            f"{kind}-composition of every (earlier, later) head pair.",
            lambda plot: plot.composition_heatmap(
                r.composition[kind], title=f"{kind}-composition", baseline=r.baseline, vmax=vmax
            ),
        )

    specs += [composition(kind) for kind in KINDS]
    specs.append(
        _FigureSpec(
            "embedding_spectra.png",
            "embeddings",
            "Singular values of W_E, W_U, W_pos and of token + position embeddings (log scale)."
            if r.positions
            else "Singular values of W_E and W_U (log scale); rotary positions have no W_pos.",
            lambda plot: plot.singular_value_spectra(
                r.embedding_spectra, title="Singular values of the embeddings"
            ),
        )
    )
    if r.positions:
        specs += _positional_figure_specs(r.positions, c)
    if r.rotary:
        specs += _rotary_figure_specs(r.rotary, c)
    return specs


def _positional_figure_specs(pos: LearnedPositions, c: ModelConfig) -> list[_FigureSpec]:
    every_head = len(pos.heads) == c.n_layers * c.n_heads
    return [
        _FigureSpec(
            "w_pos_singular_vectors.png",
            "embeddings",
            "The top left singular vectors of the positional embedding, over positions.",
            lambda plot: plot.singular_vectors_over_positions(
                pos.vectors,
                pos.singular_values,
                k=W_POS_VECTORS_SHOWN,
                title="Top singular vectors of W_pos",
            ),
        ),
        _FigureSpec(
            "positional_qk.png",
            "positional",
            f"W_pos W_Q W_K^T W_pos^T over the first {pos.qk.shape[-1]} positions "
            f"(query x key), {'every head' if every_head else 'the most-copying heads'}.",
            lambda plot: plot.positional_pattern(
                pos.qk, heads=pos.heads, title="Positional QK scores"
            ),
        ),
    ]


def _rotary_figure_specs(rot: RotaryPositions, c: ModelConfig) -> list[_FigureSpec]:
    every_head = len(rot.heads) == c.n_layers * c.n_heads
    n_offsets, n_pos = rot.offsets.shape[0], rot.pattern.shape[-1]
    return [
        _FigureSpec(
            "rotary_profile.png",
            "rotary",
            f"Relative-position profile of every head over offsets 0-{n_offsets - 1} (score of "
            "a key that many tokens back, from the mean normalised embedding).",
            lambda plot: plot.relative_position_profiles(
                rot.profile, offsets=rot.offsets, title="Relative-position profiles"
            ),
        ),
        _FigureSpec(
            "rotary_positional_qk.png",
            "rotary",
            f"Rotary positional pattern over the first {n_pos} positions (query x key), "
            f"{'every head' if every_head else 'the most-copying heads'}.",
            lambda plot: plot.positional_pattern(
                rot.pattern, heads=rot.heads, title="Rotary positional QK scores"
            ),
        ),
    ]


def figures(results: Results) -> dict[str, tuple[Figure, str]]:
    """Every figure of the report: ``{filename: (figure, caption)}``."""
    from lowrank import plot  # matplotlib is imported only to draw

    return {spec.filename: (spec.draw(plot), spec.caption) for spec in _figure_specs(results)}


def _label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def provenance(command: str | None = None) -> dict[str, str | None]:
    """Where a report comes from: versions, device, time (UTC) and the command line."""
    import datetime

    import lowrank

    devices = jax.devices()
    return {
        "lowrank_version": lowrank.__version__,
        "jax_version": jax.__version__,
        "device": f"{len(devices)} x {devices[0].platform} ({devices[0].device_kind})",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }


def to_json(results: Results, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every number of the report (all that its tables and figures show) as a JSON-ready dict.

    NaN and Inf become ``None`` (strict JSON). The layout is described by the JSON schema
    ``report.schema.json`` shipped in the package (:data:`SCHEMA_PATH`).

    Args:
        meta: :func:`provenance` of the run (default: none recorded).
    """
    r, c, pos, rot = results, results.config, results.positions, results.rotary
    report = {
        "model": r.model,
        "meta": dict(meta or {}),
        "config": {
            "architecture": c.architecture,
            "n_layers": c.n_layers,
            "n_heads": c.n_heads,
            "d_model": c.d_model,
            "d_head": c.d_head,
            "d_vocab": c.d_vocab,
            "n_ctx": c.n_ctx,
        },
        "heads": _labels(c.n_layers, c.n_heads),
        "copying_scores": {"full_ov": r.full_ov_copying.tolist(), "ov": r.ov_copying.tolist()},
        "full_ov_eigenvalues": {
            "real": r.full_ov_eigenvalues.real.tolist(),
            "imag": r.full_ov_eigenvalues.imag.tolist(),
        },
        "composition": {
            "baseline": r.baseline,
            "top_pairs": {kind: _top_pairs(r.composition[kind], r.baseline, 5) for kind in KINDS},
            "scores": {kind: r.composition[kind].tolist() for kind in KINDS},
        },
        "embedding_spectra": {name: v.tolist() for name, v in r.embedding_spectra.items()},
        "w_pos": None
        if pos is None
        else {
            "singular_values": pos.singular_values.tolist(),
            "effective_rank": pos.effective_rank,
            "rel_threshold": 0.01,
            "top_singular_vectors": pos.vectors[:, :W_POS_VECTORS_SHOWN].T.tolist(),
        },
        "svd_interpreter": [
            {
                "head": _label(h.layer, h.head),
                "full_ov_copying_score": h.full_ov_copying_score,
                "singular_value": h.singular_value,
                "top_tokens": list(h.top_tokens),
                "top_tokens_negated": list(h.top_tokens_negated),
            }
            for h in r.interpreted
        ],
        "positional_qk": None
        if pos is None
        else {
            "positions": int(pos.qk.shape[-1]),
            "heads": [_label(layer, head) for layer, head in pos.heads],
            "scores": [pos.qk[layer, head].tolist() for layer, head in pos.heads],
        },
        "relative_position_profile": None
        if rot is None
        else {
            "offsets": rot.offsets.tolist(),
            "scores": rot.profile.tolist(),
            "peak_offsets": rot.offsets[np.argmax(rot.profile, axis=-1)].tolist(),
        },
        "rotary_positional_qk": None
        if rot is None
        else {
            "positions": int(rot.pattern.shape[-1]),
            "heads": [_label(layer, head) for layer, head in rot.heads],
            "scores": [rot.pattern[layer, head].tolist() for layer, head in rot.heads],
        },
        "figures": {
            spec.filename: {"section": spec.section, "caption": spec.caption}
            for spec in _figure_specs(r)
        },
    }
    return _strict(report)


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    return value


def dumps(report: dict[str, Any]) -> str:
    """``report`` as strict JSON text (``JSON.parse`` reads it; no NaN or Infinity)."""
    return json.dumps(_strict(report), indent=2, allow_nan=False)


def write_files(
    results: Results,
    folder: str | Path,
    *,
    meta: Mapping[str, Any] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Write every figure, ``index.html`` and ``report.json`` (last) into ``folder``.

    ``folder`` should be fresh: :func:`lowrank.atomic_dir.staged` gives one that replaces the
    output folder only once everything is written.

    Args:
        meta: :func:`provenance` of the run, shown in the page's header and in the JSON.
        progress: a :func:`progress_bar` to advance (two steps).

    Returns:
        The report dict (:func:`to_json`).
    """
    out = Path(folder)
    report = to_json(results, meta)
    for filename, (figure, _) in figures(results).items():
        figure.savefig(out / filename, dpi=110)
    _step(progress, "figures")
    write_html(report, out)
    (out / REPORT_JSON).write_text(dumps(report), encoding="utf-8")
    _step(progress, "report.json + index.html")
    return report


def format_tables(report: dict[str, Any]) -> str:
    """The report as plain-text tables for the terminal."""
    cfg = report["config"]
    n_heads = cfg["n_heads"]
    lines = [
        f"lowrank report: {report['model']} ({cfg['architecture']}, {cfg['n_layers']} layers x "
        f"{n_heads} heads, d_model {cfg['d_model']}, d_vocab {cfg['d_vocab']})",
        "",
    ]
    for key, title in (("full_ov", "full OV circuit W_E W_V W_O W_U"), ("ov", "OV circuit")):
        lines.append(f"Copying scores, {title}:")
        lines.append("       " + "".join(f"{'H' + str(h):>7}" for h in range(n_heads)))
        for layer, row in enumerate(report["copying_scores"][key]):
            lines.append(f"  L{layer:<3} " + "".join(_number(v, "7.3f") for v in row))
        lines.append("")
    baseline = report["composition"]["baseline"]
    lines.append(f"Top composition pairs (random baseline 1/sqrt(d_model) = {baseline:.3f}):")
    for kind, pairs in report["composition"]["top_pairs"].items():
        text = ", ".join(
            f"{p['left']}->{p['right']} {p['score']:.3f} ({p['x_baseline']:.1f}x)" for p in pairs
        )
        lines.append(f"  {kind}: {text or '(none)'}")
    lines.append("")
    lines.append(_w_pos_rank(report["w_pos"], "the top"))
    lines.append("")
    profile = report.get("relative_position_profile")
    if profile is not None:
        lines.append(_peak_title(profile) + ":")
        lines.append("       " + "".join(f"{'H' + str(h):>7}" for h in range(n_heads)))
        for layer, row in enumerate(profile["peak_offsets"]):
            lines.append(f"  L{layer:<3} " + "".join(f"{v:>7d}" for v in row))
        lines.append("")
    lines.append("SVD interpreter, top OV direction of the most-copying heads (both signs):")
    for entry in report["svd_interpreter"]:
        lines.append(
            f"  {entry['head']} (copying {_number(entry['full_ov_copying_score'], '.2f')}): "
            f"+ {_quoted(entry['top_tokens'])} | - {_quoted(entry['top_tokens_negated'])}"
        )
    return "\n".join(lines)


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted, with ``None`` (a NaN or Inf in the JSON) shown as ``nan``."""
    return format(math.nan if value is None else value, spec)


def _quoted(tokens: list[str]) -> str:
    return " ".join(repr(t) for t in tokens)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;
background:#fafafa;line-height:1.45}
header{background:#1d2b3a;color:#fff;padding:1.2em 2em}
header h1{margin:0 0 .4em;font-size:1.6em}
header dl{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:0;
font-size:.9em}
header dt{color:#a9bccf}header dd{margin:0;font-family:ui-monospace,monospace}
nav{padding:.6em 2em;background:#eef2f6;font-size:.95em}nav a{margin-right:1.2em}
main{padding:0 2em 2em;max-width:1600px}
section{background:#fff;border:1px solid #e2e6ea;border-radius:8px;margin:1.5em 0;
padding:.5em 1.5em 1.2em}
section>p{max-width:75em;color:#333}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1.2em;
align-items:start}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.3em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #dde2e6;padding:.25em .6em;text-align:right}
th{background:#f3f5f7}td.text{text-align:left;font-family:ui-monospace,monospace}
.tables{display:flex;flex-wrap:wrap;gap:2em}
footer{padding:1em 2em;color:#666;font-size:.85em}
"""


def _cell(value: float | None, spec: str = ".3f") -> str:
    return f"<td>{html.escape(_number(value, spec))}</td>"


def _text_cell(content: str) -> str:
    """A left-aligned monospace cell holding ``content`` (HTML: escape text before)."""
    return f"<td class='text'>{content}</td>"


def _table(head: Sequence[str], rows: Iterable[str], caption: str = "") -> str:
    """An HTML table: ``head`` header cells, then one row per item of ``rows``.

    Args:
        head: the header cells' contents (HTML).
        rows: each row's cells (HTML, ``<td>``/``<th>`` elements).
        caption: the caption (HTML); none when empty.
    """
    caption = f"<caption>{caption}</caption>" if caption else ""
    header = "".join(f"<th>{cell}</th>" for cell in head)
    body = "".join(f"<tr>{row}</tr>" for row in rows)
    return f"<table>{caption}<tr>{header}</tr>{body}</table>"


def _head_table(title: str, rows: list[list[float | None]], spec: str = ".3f") -> str:
    n_heads = len(rows[0]) if rows else 0
    return _table(
        ["", *(f"H{h}" for h in range(n_heads))],
        (
            f"<th>L{layer}</th>{''.join(_cell(v, spec) for v in row)}"
            for layer, row in enumerate(rows)
        ),
        caption=html.escape(title),
    )


def _w_pos_rank(w_pos: Mapping[str, Any] | None, top: str) -> str:
    """The W_pos effective-rank sentence (or that there is no W_pos)."""
    if w_pos is None:
        return "No W_pos: the model's positions are rotary"
    return (
        f"W_pos effective rank (singular values above {w_pos['rel_threshold']:.0%} of {top}): "
        f"{w_pos['effective_rank']} of {len(w_pos['singular_values'])}"
    )


def _section_tables(key: str, report: dict[str, Any]) -> str:
    if key == "copying":
        scores = report["copying_scores"]
        return (
            '<div class="tables">'
            + _head_table("Full OV circuit", scores["full_ov"])
            + _head_table("OV circuit alone", scores["ov"])
            + "</div>"
        )
    if key == "composition":
        comp = report["composition"]
        return _table(
            ["kind", "earlier &rarr; later head", "score", "&times; baseline"],
            (
                _text_cell(html.escape(kind))
                + _text_cell(f"{html.escape(p['left'])} &rarr; {html.escape(p['right'])}")
                + _cell(p["score"])
                + _cell(p["x_baseline"], ".1f")
                for kind, pairs in comp["top_pairs"].items()
                for p in pairs
            ),
            caption=f"Top pairs (random baseline {_number(comp['baseline'], '.3f')})",
        )
    if key == "embeddings":
        table = _table(
            ["matrix", "largest singular value", "count"],
            (
                _text_cell(html.escape(name))
                + _cell(v[0] if v else None, ".3g")
                + f"<td>{len(v)}</td>"
                for name, v in report["embedding_spectra"].items()
            ),
        )
        return f"{table}<p>{html.escape(_w_pos_rank(report['w_pos'], 'the largest'))}.</p>"
    if key == "interpretation":
        return _table(
            ["head", "copying", "singular value", "+ tokens", "&minus; tokens"],
            (
                _text_cell(html.escape(e["head"]))
                + _cell(e["full_ov_copying_score"], ".2f")
                + _cell(e["singular_value"], ".3g")
                + _text_cell(html.escape(_quoted(e["top_tokens"])))
                + _text_cell(html.escape(_quoted(e["top_tokens_negated"])))
                for e in report["svd_interpreter"]
            ),
        )
    if key == "rotary":
        profile = report["relative_position_profile"]
        return _head_table(_peak_title(profile), profile["peak_offsets"], "d")
    return ""


def _peak_title(profile: Mapping[str, Any]) -> str:
    """What the table of peak offsets shows."""
    offsets = profile["offsets"]
    return (
        f"Offset of each head's largest relative-position score (offsets {offsets[0]}-"
        f"{offsets[-1]}; 1: previous token)"
    )


#: Sections shown only when the report has this (nullable) field.
_SECTION_DATA = {"positional": "positional_qk", "rotary": "relative_position_profile"}


def write_html(report: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``index.html`` for ``report`` into ``out_dir`` and return its path.

    The page has a header (model, versions, device, date, command), then one section per
    analysis with what it measures, its tables and its figures. Self-contained: no scripts,
    no network; the figures are the PNG files beside it.
    """
    out = Path(out_dir)
    cfg, meta = report["config"], report.get("meta", {})
    facts = {
        "model": report["model"],
        "architecture": f"{cfg['architecture']}: {cfg['n_layers']} layers x {cfg['n_heads']} "
        f"heads, d_model {cfg['d_model']}, d_head {cfg['d_head']}, d_vocab {cfg['d_vocab']}, "
        f"n_ctx {cfg['n_ctx']}",
        "lowrank": meta.get("lowrank_version"),
        "jax": meta.get("jax_version"),
        "device": meta.get("device"),
        "date": meta.get("date"),
        "command": meta.get("command"),
    }
    header = "".join(
        f"<dt>{name}</dt><dd>{html.escape(str(value))}</dd>"
        for name, value in facts.items()
        if value is not None
    )
    nav, sections = [], []
    for key, heading, explanation in SECTIONS:
        needs = _SECTION_DATA.get(key)
        if needs is not None and report.get(needs) is None:
            continue  # positional: no W_pos (rotary positions); rotary: learned positions
        images = "".join(
            f'<figure><img src="{html.escape(name)}" alt="{html.escape(fig["caption"])}">'
            f"<figcaption>{html.escape(fig['caption'])}</figcaption></figure>"
            for name, fig in report["figures"].items()
            if fig["section"] == key
        )
        nav.append(f'<a href="#{key}">{html.escape(heading)}</a>')
        sections.append(
            f'<section id="{key}"><h2>{html.escape(heading)}</h2>'
            f"<p>{html.escape(explanation)}</p>{_section_tables(key, report)}"
            + (f'<div class="grid">{images}</div>' if images else "")
            + "</section>"
        )
    title = f"lowrank report: {report['model']}"
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><dl>{header}</dl></header>"
        f"<nav>{''.join(nav)}</nav><main>{''.join(sections)}</main>"
        '<footer>Every number shown here is in <a href="report.json">report.json</a> '
        "(described by report.schema.json in the lowrank package).</footer>"
        "</body></html>\n"
    )
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
