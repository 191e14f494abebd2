"""Train the embedded models ``induction-2l`` and ``induction-2l-rope`` (induction circuits).

Run (the shipped models are exactly this; ``induction-2l`` trained in 83 s on two idle CPU
cores, see its ``metrics.json``, and takes up to about 4 minutes on a loaded machine)::

    python -m lowrank.data.train_embedded [--model NAME] --out DIR [--steps N] [--seed S]

``--model`` picks a recipe of :data:`RECIPES`: ``induction-2l`` (the default), a 2-layer
GPT-2, or ``induction-2l-rope``, a 2-layer attention-only Llama (RMSNorm, RoPE, grouped-query
attention with 4 query and 2 key/value heads). It writes ``config.json`` +
``model.safetensors`` (Hugging Face GPT-2 or Llama layout), the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) and
``metrics.json`` into ``DIR``.

Task. A sequence is ``<|endoftext|>`` (BOS) followed by words written left to right: at each
position outside a copy, with probability ``p_copy`` a copy starts (a segment of 2 to 6
words from a uniformly random earlier start is repeated), otherwise a uniformly random word
follows. The loss is on the copied tokens after each copy's first, where the answer is
unambiguous: at such a position ``q`` the current word occurred before, and the word after
that earlier occurrence comes next. Copy lengths and distances vary, so no fixed positional
offset solves it; the model has to find the earlier occurrence of the current token and
copy its successor -- an induction circuit: a layer-0 previous-token head writes each
token's predecessor into the residual stream, and a layer-1 head's keys read it
(K-composition) while its values copy the attended token.

Training. AdamW (weight decay 1.0 on weight matrices, none on biases and LayerNorms; GPT-2
has no unembedding bias, so ``b_U`` stays zero), linear warm-up then cosine decay. Layer 0's
attention is frozen at its random initialisation for the first 1000 steps. Without that,
layer 0 first becomes a set of broad "tokens in context" copying heads and the model then
solves the task with a pair of layer-0 heads at offsets ``k`` and ``k + 1`` (``k`` about
5) instead of a previous-token head: the layer-1 head then reads both key and value from
layer 0, its direct-path OV circuit is not a copying one, and nothing attends to ``q - 1``.
With layer 0 frozen, layer 1 learns the copying OV first and layer 0 then forms a
previous-token head for it. Weight decay keeps the previous-token head's OV circuit and the
induction head's QK circuit low-rank and aligned, which is what lifts their K-composition
score well above the ``1 / sqrt(d_model)`` baseline.

The RoPE model. The same task and recipe, with weight decay 2.0 instead of 1.0. Hugging
Face's ``LlamaForCausalLM`` has no attention-only form, so its MLP is one unit wide with zero
weights, which adds exactly zero to the residual stream and which training never updates
(nor the biases, which the checkpoint does not store, nor ``ln2``, which feeds only the MLP).
The layer-0 freeze works unchanged: a previous-token head forms whose rotary profile
(:func:`lowrank.circuits.relative_position_profile`) peaks at offset 1, and all four layer-1
heads become copying induction heads. RoPE leaves content matching to the slowly rotating
features, and the two circuits stay rank 10 rather than 7 at weight decay 1.0, which held
K-composition to 3.0x the baseline; weight decay 2.0 lifts it to about 3.4x. A wider model
(d_model 128, lr 2e-3) did not: 3.1x. The metrics add the previous-token head's profile over
offsets 0..16 (:data:`PROFILE_OFFSETS`).

Everything is deterministic given ``--seed``: parameters come from ``jax.random.key(seed)``,
training batches from ``numpy.random.default_rng([seed, 0])`` and held-out sequences from
``numpy.random.default_rng([seed, 1])``. The model is trained in the canonical tree with
:func:`lowrank.models.forward`, saved with :func:`lowrank.models.save_pretrained`, and
reloaded with :func:`lowrank.models.load_pretrained` (default processing) for the metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BOS",
    "UNK",
    "VOCAB",
    "WORDS",
    "TaskConfig",
    "TrainConfig",
    "build_tokenizer",
    "circuit_metrics",
    "copy_task_batch",
    "evaluate",
    "held_out_batch",
    "main",
    "metrics_table",
    "model_config",
    "run",
    "save_tokenizer",
    "train",
]

BOS = "<|endoftext|>"
UNK = "[UNK]"

#: The word tokens (ids 2..), short and common; each is one whitespace-separated token.
WORDS: tuple[str, ...] = tuple(
    """
    the cat dog sat on mat red blue green big small old new hot cold sun moon star tree
    leaf rock sea sky rain snow wind fire ice gold iron wood milk tea cake egg fish bird
    frog bear wolf fox owl bee ant cow pig hen lion duck goat deer king queen boy girl man
    woman child baby home door road town city park farm ship boat car bus train book pen
    cup box bag hat shoe coat bed lamp key ring bell drum song word name time day night
    year week run walk jump swim fly sing read eat drink
    """.split()
)

#: Token ids: 0 is BOS (also EOS and padding), 1 is the unknown-word token, then the words.
VOCAB: tuple[str, ...] = (BOS, UNK, *WORDS)
FIRST_WORD = 2


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Shape of the copying task.

    Attributes:
        seq_len: tokens per sequence, BOS included (also the model's ``n_ctx``).
        p_copy: probability that a copy starts at a position outside a copy.
        min_copy, max_copy: length range of a copied segment (inclusive).
    """

    seq_len: int = 48
    p_copy: float = 0.2
    min_copy: int = 2
    max_copy: int = 6


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model and optimiser hyper-parameters (the defaults are ``induction-2l``'s).

    ``arch`` is ``"gpt2"`` (GPT-2: LayerNorm, learned positions, MLPs) or ``"llama"``
    (attention-only Llama: RMSNorm, RoPE, ``n_kv_heads`` key/value heads, no biases, a
    zero MLP; see :func:`model_config`). The architecture fields are left out of
    ``metrics.json`` for ``"gpt2"`` (:func:`train_dict`), whose file predates them.
    """

    d_model: int = 96
    n_heads: int = 4
    steps: int = 4000
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 200
    final_lr_fraction: float = 0.1  # cosine decay from lr to lr * final_lr_fraction
    weight_decay: float = 1.0
    freeze_layer0_attn: int = 1000  # steps during which layer 0's attention is not updated
    chunk: int = 100  # optimiser steps per jitted scan (does not change the result)
    eval_sequences: int = 1024
    task: TaskConfig = TaskConfig()
    arch: str = "gpt2"
    n_kv_heads: int | None = None
    rotary_base: float = 10000.0


#: Fields of :class:`TrainConfig` that only a non-GPT-2 recipe writes into ``metrics.json``.
ARCH_FIELDS = ("arch", "n_kv_heads", "rotary_base")

#: The embedded models this script trains, by name: their recipes (``--model NAME``).
RECIPES: dict[str, TrainConfig] = {
    "induction-2l": TrainConfig(),
    "induction-2l-rope": TrainConfig(weight_decay=2.0, arch="llama", n_kv_heads=2),
}
DEFAULT_MODEL = "induction-2l"

#: Relative offsets (query minus key position, the keys a query sees) of the rotary profile.
PROFILE_OFFSETS = tuple(range(17))


def train_dict(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as the ``"train"`` entry of ``metrics.json`` (no architecture fields for GPT-2)."""
    out = {**dataclasses.asdict(cfg), "task": dataclasses.asdict(cfg.task)}
    if cfg.arch == "gpt2":
        for name in ARCH_FIELDS:
            out.pop(name)
    return out


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """The inverse of :func:`train_dict`."""
    return TrainConfig(**{**data, "task": TaskConfig(**data["task"])})


def model_config(cfg: TrainConfig) -> Any:
    """The :class:`~lowrank.models.ModelConfig` trained here (untied embeddings).

    ``"gpt2"``: a GPT-2 with ``4 * d_model`` MLPs. ``"llama"``: a ``LlamaForCausalLM`` with
    RMSNorm, RoPE on the whole head, ``n_kv_heads`` key/value heads and no biases; it is
    attention-only, which Hugging Face's Llama cannot say, so its MLP has width 1 and zero
    weights (``act(x W_gate) * (x W_in) W_out = 0`` exactly) that training never updates.
    """
    from lowrank.models import ModelConfig

    if cfg.arch == "llama":
        return ModelConfig(
            architecture="LlamaForCausalLM",
            n_layers=2,
            n_heads=cfg.n_heads,
            d_model=cfg.d_model,
            d_head=cfg.d_model // cfg.n_heads,
            d_mlp=1,
            d_vocab=len(VOCAB),
            n_ctx=cfg.task.seq_len,
            act_fn="silu",
            eps=1e-5,
            tie_word_embeddings=False,
            n_kv_heads=cfg.n_kv_heads,
            normalization="RMS",
            positional="rotary",
            rotary_base=cfg.rotary_base,
            gated_mlp=True,
            attn_qkv_bias=False,
            attn_out_bias=False,
        )
    if cfg.arch != "gpt2":
        raise ValueError(f"TrainConfig.arch must be 'gpt2' or 'llama', got {cfg.arch!r}")
    return ModelConfig(
        architecture="GPT2LMHeadModel",
        n_layers=2,
        n_heads=cfg.n_heads,
        d_model=cfg.d_model,
        d_head=cfg.d_model // cfg.n_heads,
        d_mlp=4 * cfg.d_model,
        d_vocab=len(VOCAB),
        n_ctx=cfg.task.seq_len,
        tie_word_embeddings=False,
    )


def build_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over :data:`VOCAB`: WordLevel, whitespace pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        unk_token=UNK,
        model_max_length=TaskConfig().seq_len,
    )


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike[str]) -> None:
    """Save ``tokenizer`` so that ``transformers.AutoTokenizer`` 4.x and 5.x both load it.

    transformers 5 names its class ``TokenizersBackend`` in ``tokenizer_config.json``, which
    4.x does not know; ``PreTrainedTokenizerFast`` works in both. ``special_tokens_map.json``
    is written for 4.x as well.
    """
    d = Path(directory)
    tokenizer.save_pretrained(str(d))
    path = d / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": BOS, "pad_token": BOS, "unk_token": UNK}
    (d / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


# ----------------------------------------------------------------------------- data
def copy_task_batch(
    rng: np.random.Generator, n: int, task: TaskConfig = TaskConfig()
) -> dict[str, np.ndarray]:
    """``n`` sequences of the copying task.

    Each sequence is ``BOS`` followed by ``seq_len - 1`` tokens written left to right: at
    each position not inside a copy, with probability ``p_copy`` a copy starts (a segment of
    ``min_copy..max_copy`` tokens from a uniformly random earlier start, wholly in the past,
    is repeated), otherwise a uniformly random word is written.

    Returns:
        ``tokens [n, seq] int32``; ``source [n, seq] int32``: for a copied token the position
        it was copied from, else -1; ``mask [n, seq] float32``: 1 at the scored positions
        ``q``: inside a copy and not its last token, where every earlier occurrence of
        ``tokens[q]`` is followed by ``tokens[q + 1]`` (so "the token after the earlier
        occurrence" is the unambiguous answer).
    """
    S, n_words = task.seq_len, len(WORDS)
    if not 2 <= task.min_copy <= task.max_copy < S // 2:
        raise ValueError(f"bad copy lengths {task.min_copy}..{task.max_copy} for seq_len {S}")
    tokens = np.zeros((n, S), dtype=np.int64)
    source = np.full((n, S), -1, dtype=np.int64)
    last = np.zeros((n, S), dtype=bool)  # last token of a copy
    remaining = np.zeros(n, dtype=np.int64)  # tokens of the current copy still to write
    pointer = np.zeros(n, dtype=np.int64)  # where the next copied token comes from
    rows = np.arange(n)
    for cur in range(1, S):
        start = (remaining == 0) & (rng.random(n) < task.p_copy)
        length = rng.integers(task.min_copy, task.max_copy + 1, size=n)
        length = np.minimum(length, min(S - cur, cur - 1))
        start &= length >= 2
        src = 1 + np.floor(rng.random(n) * np.maximum(cur - length, 1)).astype(np.int64)
        remaining = np.where(start, length, remaining)
        pointer = np.where(start, src, pointer)
        word = rng.integers(0, n_words, size=n) + FIRST_WORD
        copying = remaining > 0
        tokens[:, cur] = np.where(copying, tokens[rows, pointer], word)
        source[:, cur] = np.where(copying, pointer, -1)
        last[:, cur] = remaining == 1
        pointer = pointer + copying
        remaining = remaining - copying
    mask = np.zeros((n, S), dtype=bool)
    for q in range(2, S - 1):
        earlier = tokens[:, 1:q] == tokens[:, q : q + 1]
        agree = tokens[:, 2 : q + 1] == tokens[:, q + 1 : q + 2]
        mask[:, q] = np.all(~earlier | agree, axis=1)
    mask &= (source >= 0) & ~last
    return {
        "tokens": tokens.astype(np.int32),
        "source": source.astype(np.int32),
        "mask": mask.astype(np.float32),
    }


def held_out_batch(cfg: TrainConfig, seed: int) -> dict[str, np.ndarray]:
    """The held-out sequences of ``metrics.json`` (a stream the training batches never use)."""
    return copy_task_batch(np.random.default_rng([seed, 1]), cfg.eval_sequences, cfg.task)


# ------------------------------------------------------------------------- training
def _loss(params: Any, tokens: jax.Array, mask: jax.Array, config: Any) -> jax.Array:
    from lowrank.models import forward

    logits = forward(params, tokens, config)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, :-1]
    return jnp.sum(nll * m) / jnp.sum(m)


def _llama_frozen(keys: list[str]) -> bool:
    """Leaves the attention-only Llama keeps at their initial values.

    Its biases (zero: the checkpoint stores none), its zero MLP and the norm that only feeds
    the MLP (``ln2``).
    """
    return keys[-1].startswith("b_") or "mlp" in keys or "ln2" in keys


def init_train_params(cfg: TrainConfig, seed: int) -> Any:
    """Initial parameters: :func:`~lowrank.models.init_params`, with Llama's MLP zeroed."""
    from lowrank.models import init_params

    params = init_params(model_config(cfg), jax.random.key(seed))
    if cfg.arch == "llama":
        params["blocks"]["mlp"] = jax.tree_util.tree_map(jnp.zeros_like, params["blocks"]["mlp"])
    return params


def _optimizer(cfg: TrainConfig, params: Any) -> Any:
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.lr,
        cfg.warmup,
        max(cfg.steps, cfg.warmup + 1),
        end_value=cfg.lr * cfg.final_lr_fraction,
    )

    def label(path: Any, _leaf: Any) -> str:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[-1] == "b_U" or (cfg.arch == "llama" and _llama_frozen(keys)):
            return "frozen"  # GPT-2 has no unembedding bias; Llama: see _llama_frozen
        return "decay" if keys[-1].startswith("W_") else "no_decay"

    return optax.multi_transform(
        {
            "decay": optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay),
            "no_decay": optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.0),
            "frozen": optax.set_to_zero(),
        },
        jax.tree_util.tree_map_with_path(label, params),
    )


def train(cfg: TrainConfig, seed: int, *, log: Any = None) -> tuple[Any, Any, list[float]]:
    """Train from scratch; returns ``(params, model_config, losses)`` (one loss per step).

    ``params`` is the unprocessed canonical tree (NumPy leaves).
    """
    import optax

    config = model_config(cfg)
    params = init_train_params(cfg, seed)
    opt = _optimizer(cfg, params)
    opt_state = opt.init(params)
    rng = np.random.default_rng([seed, 0])

    def step(carry: Any, batch: tuple[jax.Array, ...]) -> tuple[Any, jax.Array]:
        p, s = carry
        tokens, mask, layer_scale = batch
        loss, grads = jax.value_and_grad(_loss)(p, tokens, mask, config)
        updates, s = opt.update(grads, s, p)
        # layer_scale [L] is 0 for a frozen layer: its attention parameters keep their values.
        updates["blocks"]["attn"] = jax.tree_util.tree_map(
            lambda u: u * layer_scale.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype),
            updates["blocks"]["attn"],
        )
        return (optax.apply_updates(p, updates), s), loss

    @jax.jit
    def run_chunk(p: Any, s: Any, tokens: jax.Array, mask: jax.Array, scale: jax.Array) -> Any:
        (p, s), losses = jax.lax.scan(step, (p, s), (tokens, mask, scale))
        return p, s, losses

    losses: list[float] = []
    done = 0
    while done < cfg.steps:
        k = min(cfg.chunk, cfg.steps - done)
        b = copy_task_batch(rng, k * cfg.batch, cfg.task)
        shape = (k, cfg.batch, cfg.task.seq_len)
        scale = np.ones((k, config.n_layers), np.float32)
        scale[:, 0] = np.arange(done, done + k) >= cfg.freeze_layer0_attn
        params, opt_state, chunk_losses = run_chunk(
            params, opt_state, b["tokens"].reshape(shape), b["mask"].reshape(shape), scale
        )
        losses.extend(float(x) for x in np.asarray(chunk_losses))
        done += k
        if log is not None:
            log(f"step {done:5d}  loss {np.mean(losses[-k:]):.4f}")
    return jax.device_get(params), config, losses


# ------------------------------------------------------------------------ evaluation
def evaluate(model: Any, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Loss and accuracy on the scored tokens, and attention scores, from one forward pass.

    Args:
        model: a :class:`~lowrank.models.TransformerModel` (its jitted forward pass is used).
        batch: from :func:`copy_task_batch`.

    Returns:
        ``loss`` and ``accuracy`` (argmax) over the scored positions; ``prev_token_score [H]``:
        mean attention of each layer-0 head from ``q >= 1`` to ``q - 1``;
        ``induction_score [H]``: mean attention of each layer-1 head, at the scored positions
        ``q``, to the token after the position ``q`` was copied from.
    """
    tokens, mask = batch["tokens"], batch["mask"]
    logits, acts = model.forward(tokens, return_activations=True)
    logits = np.asarray(logits, dtype=np.float64)[:, :-1]
    pattern = np.asarray(acts["pattern"], dtype=np.float64)  # [L, B, H, q, k]
    target = tokens[:, 1:]
    scored = mask[:, :-1] > 0
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    correct = logits.argmax(-1) == target
    q = np.arange(1, tokens.shape[1])
    prev = pattern[0][:, :, q, q - 1].mean(axis=(0, 2))
    b_idx, q_idx = np.nonzero(mask > 0)
    k_idx = batch["source"][b_idx, q_idx] + 1
    induction = pattern[1][b_idx, :, q_idx, k_idx].mean(axis=0)
    return {
        "scored_tokens": int(scored.sum()),
        "loss": float(nll[scored].mean()),
        "accuracy": float(correct[scored].mean()),
        "prev_token_score": prev,
        "induction_score": induction,
    }


def _round(x: Any, digits: int = 4) -> Any:
    return np.round(np.asarray(x, dtype=np.float64), digits).tolist()


def circuit_metrics(model: Any, scores: dict[str, Any], top_k: int = 10) -> dict[str, Any]:
    """Copying scores, K-composition and the SVD interpreter on a processed model.

    The previous-token head ``h0`` is the layer-0 head with the highest previous-token score,
    the induction head ``h1`` the layer-1 head with the highest induction score
    (``scores`` from :func:`evaluate`). For ``h1``'s top OV singular direction (input
    ``u``, output ``v``, value ``s``), ``ov_top_direction.tokens`` are the ``top_k`` tokens
    with the largest ``v @ W_U`` (index 0) and ``-v @ W_U`` (index 1);
    ``copies_top_tokens`` is the fraction of them for which the direction's own term of the
    full OV circuit, ``(W_E[t] @ u) s (v @ W_U[:, t])``, is positive (attending to ``t`` along
    this direction raises ``t``'s logit). ``words_copied`` counts the words ``t`` whose row
    of ``h1``'s full OV circuit ``W_E W_V W_O W_U`` is largest at ``t`` itself.
    """
    from lowrank import linalg
    from lowrank.circuits import (
        composition_baseline,
        composition_scores,
        copying_scores,
        full_ov_circuit,
    )
    from lowrank.factored import FactoredMatrix
    from lowrank.interpret import svd_directions

    # One decomposition per jit: several batched LAPACK calls in one program can deadlock.
    copying = np.asarray(jax.jit(copying_scores)(model))
    copying_ov = np.asarray(jax.jit(lambda m: copying_scores(m, full=False))(model))
    k_comp = np.asarray(jax.jit(composition_scores, static_argnums=1)(model, "K"))
    baseline = composition_baseline(model.config.d_model)
    h0 = int(np.argmax(scores["prev_token_score"]))
    h1 = int(np.argmax(scores["induction_score"]))

    dirs = svd_directions(model, "OV", 1, h1, num_vectors=1, top_k=top_k)
    top = np.asarray(dirs.top_tokens)[0]  # [2, k]: the direction and its negation
    U, S, Vh = linalg.svd(FactoredMatrix(model.W_V[1, h1], model.W_O[1, h1]))
    W_E, W_U = np.asarray(model.W_E, np.float64), np.asarray(model.W_U, np.float64)
    term = (W_E @ np.asarray(U)[:, 0]) * float(S[0]) * (np.asarray(Vh)[0] @ W_U)  # [V]
    c = model.config
    full = np.asarray(full_ov_circuit(model).AB, np.float64)  # grouped-query: [L, n_kv, g, V, V]
    full = full.reshape(c.n_layers, c.n_heads, c.d_vocab, c.d_vocab)[1, h1]
    full = full[FIRST_WORD:, FIRST_WORD:]
    words_copied = int(np.sum(full.argmax(axis=1) == np.arange(full.shape[0])))
    tok = model.tokenizer
    ratio = float(k_comp[0, h0, 1, h1]) / baseline
    return {
        **_rotary_metrics(model, h0),
        "prev_token_head": [0, h0],
        "induction_head": [1, h1],
        "copying_scores": _round(copying),
        "copying_scores_ov": _round(copying_ov),
        "k_composition_layer0_to_layer1": _round(k_comp[0, :, 1, :]),
        "k_composition": round(float(k_comp[0, h0, 1, h1]), 4),
        "composition_baseline": round(baseline, 4),
        "k_composition_over_baseline": round(ratio, 3),
        "ov_top_direction": {
            "singular_value": round(float(np.asarray(dirs.singular_values)[0]), 4),
            "tokens": [[tok.decode([int(t)]) for t in side] for side in top],
            "copies_top_tokens": _round(np.mean(term[top] > 0, axis=1), 3),
        },
        "words_copied": words_copied,
    }


def _rotary_metrics(model: Any, h0: int) -> dict[str, Any]:
    """The previous-token head's :func:`~lowrank.circuits.relative_position_profile`.

    Over :data:`PROFILE_OFFSETS`, with its peak offset; empty for a model without RoPE.
    """
    from lowrank.circuits import relative_position_profile

    if model.config.positional != "rotary":
        return {}
    offsets = np.asarray(PROFILE_OFFSETS)
    profile = np.asarray(jax.jit(relative_position_profile)(model, offsets))[0, h0]
    return {
        "relative_position_offsets": list(PROFILE_OFFSETS),
        "relative_position_profile": _round(profile, 3),
        "relative_position_peak": int(offsets[np.argmax(profile)]),
    }


def metrics_table(metrics: dict[str, Any]) -> str:
    """The model card's metrics table (markdown), from ``metrics.json``."""
    h0, h1 = metrics["prev_token_head"][1], metrics["induction_head"][1]
    copying = metrics["copying_scores"]
    rows = [
        ("training loss (mean of the last 100 steps)", metrics["train_loss_final"]),
        ("held-out loss on scored tokens", metrics["held_out"]["loss"]),
        ("held-out accuracy on scored tokens", metrics["held_out"]["accuracy"]),
        (f"previous-token score of head 0.{h0}", metrics["prev_token_scores_layer0"][h0]),
        (f"induction score of head 1.{h1}", metrics["induction_scores_layer1"][h1]),
        ("full-OV copying scores, layer 0", copying[0]),
        ("full-OV copying scores, layer 1", copying[1]),
        (f"K-composition 0.{h0} -> 1.{h1}", metrics["k_composition"]),
        ("composition baseline 1/sqrt(d_model)", metrics["composition_baseline"]),
        ("K-composition / baseline", metrics["k_composition_over_baseline"]),
    ]
    if "relative_position_peak" in metrics:  # rotary models
        rows.append(
            (
                f"peak offset of head 0.{h0}'s relative-position profile",
                metrics["relative_position_peak"],
            )
        )
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def command(cfg: TrainConfig, seed: int) -> str:
    """The command line that trains ``cfg`` (``DIR`` for the output directory).

    Exact when ``cfg`` is one of :data:`RECIPES` with any number of steps; otherwise the
    command of the first recipe of the same ``arch`` (which does not reproduce ``cfg``).
    """
    name = next(
        (n for n, r in RECIPES.items() if r == dataclasses.replace(cfg, steps=r.steps)),
        next(n for n, r in (*RECIPES.items(), (DEFAULT_MODEL, cfg)) if r.arch == cfg.arch),
    )
    model = "" if name == DEFAULT_MODEL else f" --model {name}"
    return (
        f"python -m lowrank.data.train_embedded{model} --out DIR --steps {cfg.steps} --seed {seed}"
    )


def run(
    out: str | os.PathLike[str], cfg: TrainConfig, seed: int, *, log: Any = None
) -> dict[str, Any]:
    """Train, save the checkpoint and tokenizer into ``out``, write and return the metrics."""
    from lowrank.models import load_pretrained, save_pretrained

    start = time.perf_counter()
    params, config, losses = train(cfg, seed, log=log)
    train_seconds = time.perf_counter() - start
    out = Path(out)
    tokenizer = build_tokenizer()
    save_pretrained(params, config, out, tokenizer=tokenizer)  # BOS/EOS/PAD ids in config
    save_tokenizer(tokenizer, out)  # the tokenizer files again, readable by transformers 4.x
    model = load_pretrained(out)
    scores = evaluate(model, held_out_batch(cfg, seed))
    metrics = {
        "command": command(cfg, seed),
        "seed": seed,
        "train": train_dict(cfg),
        "train_loss_final": round(float(np.mean(losses[-100:])), 4),
        "train_loss_curve": [
            round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)
        ],
        "held_out": {
            "sequences": cfg.eval_sequences,
            "scored_tokens": scores["scored_tokens"],
            "loss": round(scores["loss"], 4),
            "accuracy": round(scores["accuracy"], 4),
        },
        "prev_token_scores_layer0": _round(scores["prev_token_score"]),
        "induction_scores_layer1": _round(scores["induction_score"]),
        **circuit_metrics(model, scores),
        "train_seconds": round(train_seconds, 1),
        "versions": {"jax": jax.__version__, "numpy": np.__version__},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Train the embedded model from the command line ``argv`` and return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m lowrank.data.train_embedded",
        description="Train an embedded 2-layer induction model (the defaults are the "
        "shipped model's).",
    )
    parser.add_argument(
        "--model",
        choices=tuple(RECIPES),
        default=DEFAULT_MODEL,
        help=f"which embedded model's recipe (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.model]
    steps = recipe.steps if args.steps is None else args.steps
    if steps < 1:
        parser.error(f"--steps must be positive, got {steps}")
    cfg = dataclasses.replace(recipe, steps=steps)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    metrics = run(args.out, cfg, args.seed, log=log)
    keep = [
        "held_out",
        "prev_token_head",
        "induction_head",
        "copying_scores",
        "k_composition",
        "k_composition_over_baseline",
        "ov_top_direction",
        "relative_position_peak",
        "train_seconds",
    ]
    print(json.dumps({k: metrics[k] for k in keep if k in metrics}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
