"""The all-heads weight report: :func:`analyse` a model, then its :func:`figures`, the
:func:`to_json` dict, and the files (:func:`write_files`: PNGs, ``index.html``, ``report.json``).

Each analysis is jitted on its own (never two decompositions in one program, see
``lowrank.linalg._Serial``). Given a device mesh, the per-head analyses run sharded over it (see
:mod:`lowrank.sharding`); on several processes every process computes the same results.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import circuits, interpret, linalg, sharding
from lowrank.models import ModelConfig, TransformerModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "REPORT_FILE_NAMES",
    "REPORT_FILE_SUFFIXES",
    "InterpretedHead",
    "Progress",
    "Results",
    "analyse",
    "dumps",
    "figures",
    "format_tables",
    "nonfinite_parameters",
    "to_json",
    "write_files",
    "write_html",
]

KINDS: tuple[circuits.CompositionKind, ...] = ("Q", "K", "V")
POSITIONS_SHOWN = 64  # positional QK patterns are drawn over the first positions
REPORT_JSON = "report.json"
# What a report folder holds: an existing folder of only these may be replaced by a new report.
REPORT_FILE_NAMES = frozenset({REPORT_JSON, "index.html"})
REPORT_FILE_SUFFIXES = frozenset({".png"})


class Progress:
    """A one-line progress bar on a stream (a line per step when it is not a terminal)."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.done, self.width = total, 0, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"[{bar}] {self.done}/{self.total} {label} ({elapsed:.1f}s)"
        if self.tty:
            end = "\n" if self.done == self.total else ""
            self.stream.write("\r\033[K" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


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
class Results:
    """Every number of the report, as host NumPy arrays (``L`` layers, ``H`` heads)."""

    model: str
    config: ModelConfig
    full_ov_eigenvalues: np.ndarray  # [L, H, k] complex
    full_ov_copying: np.ndarray  # [L, H]
    ov_copying: np.ndarray  # [L, H]
    composition: Mapping[str, np.ndarray]  # "Q" | "K" | "V" -> [L, H, L, H]
    baseline: float
    embedding_spectra: Mapping[str, np.ndarray]  # name -> [k]
    w_pos_vectors: np.ndarray  # [n_ctx, k], left singular vectors
    w_pos_singular_values: np.ndarray  # [k]
    w_pos_effective_rank: int
    interpreted: tuple[InterpretedHead, ...]
    positional_qk: np.ndarray  # [L, H, P, P], query x key over the first P positions
    positional_heads: tuple[tuple[int, int], ...]  # (layer, head) drawn in the positional figure


def nonfinite_parameters(model: TransformerModel) -> list[str]:
    """Names of the parameters holding NaN or Inf (dotted paths of ``model.params``)."""
    finite = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: jnp.isfinite(x).all(), p))
    flags = jax.tree_util.tree_flatten_with_path(finite(model.params))[0]
    return [".".join(str(key.key) for key in path) for path, ok in flags if not bool(ok)]


def analyse(
    model: TransformerModel,
    *,
    name: str,
    top_heads: int = 3,
    top_tokens: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    progress: Progress | None = None,
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
    tick: Callable[[str], None] = progress.step if progress is not None else (lambda _: None)

    def compute(fn: Callable[..., Any], *args: Any, per_head: bool = False) -> Any:
        """``fn(*args)`` jitted (over ``mesh``: ``[L, H, ...]`` results split where their heads
        live when ``per_head``, else replicated), as NumPy arrays on this host."""
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
    U_pos, S_pos, _ = compute(linalg.svd, model.W_pos)
    pos_rank = int(interpret.effective_rank(jnp.asarray(S_pos)))
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

    n_pos = min(POSITIONS_SHOWN, c.n_ctx)
    positional = compute(
        lambda m: circuits.positional_qk_circuit(m)[..., :n_pos, :n_pos].AB, model, per_head=True
    )
    n_all = c.n_layers * c.n_heads
    shown = tuple(divmod(i, c.n_heads) for i in range(n_all)) if n_all <= 8 else chosen
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
        w_pos_vectors=U_pos,
        w_pos_singular_values=S_pos,
        w_pos_effective_rank=pos_rank,
        interpreted=tuple(interpreted),
        positional_qk=positional,
        positional_heads=shown,
    )


@dataclasses.dataclass(frozen=True)
class _FigureSpec:
    filename: str
    caption: str
    draw: Callable[[], Figure]


def _figure_specs(r: Results) -> list[_FigureSpec]:
    from lowrank import plot  # matplotlib is only needed for figures

    c = r.config
    specs = [
        _FigureSpec(
            "copying_full_ov.png",
            "Copying score of each head's full OV circuit: sum of eigenvalues / sum of "
            "|eigenvalues|.",
            lambda: plot.head_heatmap(
                r.full_ov_copying, title="Full OV copying score (W_E W_V W_O W_U)"
            ),
        ),
        _FigureSpec(
            "copying_ov.png",
            "Copying score of each head's OV circuit alone.",
            lambda: plot.head_heatmap(r.ov_copying, title="OV copying score (W_V W_O)"),
        ),
    ]
    for kind in KINDS:
        specs.append(
            _FigureSpec(
                f"composition_{kind}.png",
                f"{kind}-composition scores of every (earlier, later) head pair.",
                functools.partial(
                    plot.composition_heatmap,
                    r.composition[kind],
                    title=f"{kind}-composition",
                    baseline=r.baseline,
                ),
            )
        )
    if c.n_layers * c.n_heads <= 64:
        specs.append(
            _FigureSpec(
                "eigenvalues_full_ov.png",
                "Eigenvalues of each head's full OV circuit in the complex plane (blue: Re > 0).",
                lambda: plot.eigenvalue_scatter(
                    r.full_ov_eigenvalues, title="Full OV eigenvalues per head"
                ),
            )
        )
    every_head = len(r.positional_heads) == c.n_layers * c.n_heads
    specs += [
        _FigureSpec(
            "embedding_spectra.png",
            "Singular values of W_E, W_U, W_pos and of token + position embeddings (log scale).",
            lambda: plot.singular_value_spectra(
                r.embedding_spectra, title="Singular values of the embeddings"
            ),
        ),
        _FigureSpec(
            "w_pos_singular_vectors.png",
            "The top left singular vectors of the positional embedding, over positions.",
            lambda: plot.singular_vectors_over_positions(
                r.w_pos_vectors, r.w_pos_singular_values, title="Top singular vectors of W_pos"
            ),
        ),
        _FigureSpec(
            "positional_qk.png",
            f"W_pos W_Q W_K^T W_pos^T over the first {r.positional_qk.shape[-1]} positions "
            f"(query x key), {'every head' if every_head else 'the top heads'}.",
            lambda: plot.positional_pattern(
                r.positional_qk, heads=r.positional_heads, title="Positional QK scores"
            ),
        ),
    ]
    return specs


def figures(results: Results) -> dict[str, tuple[Figure, str]]:
    """Every figure of the report: ``{filename: (figure, caption)}``."""
    return {spec.filename: (spec.draw(), spec.caption) for spec in _figure_specs(results)}


def _label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def to_json(results: Results) -> dict[str, Any]:
    """The report as a JSON-compatible dict; NaN and Inf become ``None`` (strict JSON)."""
    r, c = results, results.config
    report = {
        "model": r.model,
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
        "composition": {
            "baseline": r.baseline,
            "top_pairs": {kind: _top_pairs(r.composition[kind], r.baseline, 5) for kind in KINDS},
        },
        "w_pos": {
            "singular_values": r.w_pos_singular_values.tolist(),
            "effective_rank": r.w_pos_effective_rank,
            "rel_threshold": 0.01,
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
        "figures": {spec.filename: spec.caption for spec in _figure_specs(r)},
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


def write_files(results: Results, folder: str | Path, progress: Progress | None = None) -> dict:
    """Write every figure, ``index.html`` and ``report.json`` (last) into ``folder``.

    ``folder`` should be fresh: :func:`lowrank.atomic_dir.staged` gives one that replaces the
    output folder only once everything is written.

    Returns:
        The report dict (:func:`to_json`).
    """
    out = Path(folder)
    report = to_json(results)
    for filename, (figure, _) in figures(results).items():
        figure.savefig(out / filename, dpi=110)
    if progress is not None:
        progress.step("figures")
    write_html(report, out)
    (out / REPORT_JSON).write_text(dumps(report))
    if progress is not None:
        progress.step("report.json + index.html")
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
    w_pos = report["w_pos"]
    lines.append(
        f"W_pos effective rank (singular values above {w_pos['rel_threshold']:.0%} of the top): "
        f"{w_pos['effective_rank']} of {len(w_pos['singular_values'])}"
    )
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


def write_html(report: dict[str, Any], out_dir: str | Path) -> Path:
    """``index.html`` showing the tables and every figure of the report."""
    out = Path(out_dir)
    tables = html.escape(format_tables(report))
    images = "\n".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in report["figures"].items()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>lowrank report: {html.escape(report["model"])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
pre{{background:#f6f6f6;padding:1em;overflow-x:auto}}img{{max-width:100%}}
figure{{margin:2em 0}}</style></head>
<body><h1>lowrank report: {html.escape(report["model"])}</h1>
<pre>{tables}</pre>
{images}
<p>Data: <a href="report.json">report.json</a></p>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
