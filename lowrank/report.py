"""The all-heads weight report: tables, figures, ``report.json`` and ``index.html``.

Each analysis is jitted on its own (never two decompositions in one program, see
``lowrank.linalg._Serial``), and the figures are written as PNG files next to the JSON. Given a
device mesh, the per-head analyses run sharded over it (see :mod:`lowrank.sharding`); on several
processes every process computes and only process 0 writes.
"""

from __future__ import annotations

import html
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import circuits, interpret, linalg, sharding
from lowrank.models import TransformerModel

__all__ = ["Progress", "build_report", "format_tables", "write_html"]

KINDS: tuple[circuits.CompositionKind, ...] = ("Q", "K", "V")
POSITIONS_SHOWN = 64  # positional QK patterns are drawn over the first positions


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
        if value <= 0:
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


def build_report(
    model: TransformerModel,
    out_dir: str | Path,
    *,
    name: str,
    top_heads: int = 3,
    top_tokens: int = 8,
    progress: Progress | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """Run every analysis on ``model``, write figures and ``report.json`` to ``out_dir``.

    Args:
        mesh: a ``(layers, heads)`` mesh (:func:`lowrank.sharding.make_mesh`) that ``model``'s
            parameters are placed on; ``None`` runs on the default device.

    Returns:
        The report as a JSON-compatible dict (also written to ``out_dir/report.json`` by
        process 0).
    """
    from lowrank import plot  # matplotlib is only needed here

    c = model.config
    writer = jax.process_index() == 0
    out = Path(out_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    tick: Callable[[str], None] = progress.step if progress is not None else (lambda _: None)
    figures: dict[str, str] = {}

    def save(fig: Any, filename: str, caption: str) -> None:
        if writer:
            fig.savefig(out / filename, dpi=110)
        figures[filename] = caption

    def compute(fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` jitted (sharded over ``mesh``), as NumPy arrays on this host."""
        jitted = jax.jit(fn) if mesh is None else sharding.sharded(fn, mesh, c.n_layers, c.n_heads)
        return jax.tree_util.tree_map(sharding.to_host, jitted(*args))

    full_eig = compute(circuits.ov_eigenvalues, model)
    full_copy = full_eig.sum(-1).real / np.abs(full_eig).sum(-1)
    ov_copy = compute(lambda m: circuits.copying_scores(m, full=False), model)
    tick("copying scores")

    baseline = circuits.composition_baseline(c.d_model)
    composition = {}
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
    chosen = [divmod(int(i), c.n_heads) for i in order]  # (layer, head)
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
            {
                "head": f"L{layer}H{head}",
                "full_ov_copying_score": float(full_copy[layer, head]),
                "singular_value": float(directions.singular_values[0]),
                "top_tokens": _decode(model.tokenizer, ids[0]),
                "top_tokens_negated": _decode(model.tokenizer, ids[1]),
            }
        )
    tick("SVD interpreter")

    n_pos = min(POSITIONS_SHOWN, c.n_ctx)
    positional = compute(lambda m: circuits.positional_qk_circuit(m)[..., :n_pos, :n_pos].AB, model)
    tick("positional QK")

    save(
        plot.head_heatmap(full_copy, title="Full OV copying score (W_E W_V W_O W_U)"),
        "copying_full_ov.png",
        "Copying score of each head's full OV circuit: sum of eigenvalues / sum of |eigenvalues|.",
    )
    save(
        plot.head_heatmap(ov_copy, title="OV copying score (W_V W_O)"),
        "copying_ov.png",
        "Copying score of each head's OV circuit alone.",
    )
    for kind in KINDS:
        save(
            plot.composition_heatmap(
                composition[kind], title=f"{kind}-composition", baseline=baseline
            ),
            f"composition_{kind}.png",
            f"{kind}-composition scores of every (earlier, later) head pair.",
        )
    if c.n_layers * c.n_heads <= 64:
        save(
            plot.eigenvalue_scatter(full_eig, title="Full OV eigenvalues per head"),
            "eigenvalues_full_ov.png",
            "Eigenvalues of each head's full OV circuit in the complex plane (blue: Re > 0).",
        )
    save(
        plot.singular_value_spectra(spectra, title="Singular values of the embeddings"),
        "embedding_spectra.png",
        "Singular values of W_E, W_U, W_pos and of token + position embeddings (log scale).",
    )
    save(
        plot.singular_vectors_over_positions(U_pos, S_pos, title="Top singular vectors of W_pos"),
        "w_pos_singular_vectors.png",
        "The top left singular vectors of the positional embedding, over positions.",
    )
    n_all = c.n_layers * c.n_heads
    shown = [divmod(i, c.n_heads) for i in range(n_all)] if n_all <= 8 else chosen
    save(
        plot.positional_pattern(positional, heads=shown, title="Positional QK scores"),
        "positional_qk.png",
        f"W_pos W_Q W_K^T W_pos^T over the first {n_pos} positions (query x key), "
        + ("every head." if n_all <= 8 else "the top heads."),
    )
    tick("figures")

    report = {
        "model": name,
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
        "copying_scores": {"full_ov": full_copy.tolist(), "ov": ov_copy.tolist()},
        "composition": {
            "baseline": baseline,
            "top_pairs": {kind: _top_pairs(composition[kind], baseline, 5) for kind in KINDS},
        },
        "w_pos": {
            "singular_values": S_pos.tolist(),
            "effective_rank": pos_rank,
            "rel_threshold": 0.01,
        },
        "svd_interpreter": interpreted,
        "figures": figures,
    }
    if writer:
        (out / "report.json").write_text(json.dumps(report, indent=2))
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
            lines.append(f"  L{layer:<3} " + "".join(f"{v:7.3f}" for v in row))
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
            f"  {entry['head']} (copying {entry['full_ov_copying_score']:.2f}): "
            f"+ {_quoted(entry['top_tokens'])} | - {_quoted(entry['top_tokens_negated'])}"
        )
    return "\n".join(lines)


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
    path.write_text(page)
    return path
