"""TransformerModel: config + canonical parameters (+ tokenizer) as one pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import circuits
from lowrank.factored import FactoredMatrix
from lowrank.models._common import Params
from lowrank.models.config import ModelConfig
from lowrank.models.processing import is_layer_norm_folded
from lowrank.models.transformer import forward

__all__ = ["TransformerModel"]

Array = jax.Array

_REPEATED_DOC = "``[L, H, d_model, d_head]`` (repeated over each group for grouped-query models)"
_GROUPED_DOC = "``[L, n_kv_heads, d_model, d_head]`` as stored (TransformerLens's ``_W_K``)"
_forward_jit = jax.jit(forward, static_argnames=("config", "return_activations", "precision"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class TransformerModel:
    """A loaded model: its parameters are pytree leaves; config and tokenizer are static.

    Weights use TransformerLens's names and layouts, stacked over layers:
    ``W_Q, W_K, W_V [L, H, d_model, d_head]``, ``W_O [L, H, d_head, d_model]``,
    ``W_in [L, d_model, d_mlp]`` (and ``W_gate`` for gated MLPs), ``W_out [L, d_mlp,
    d_model]``, ``W_E [d_vocab, d_model]``, ``W_pos [n_ctx, d_model]`` (learned positions
    only), ``W_U [d_model, d_vocab]``. ``OV`` and ``QK`` are ``FactoredMatrix [L, H,
    d_model, d_model]``.

    Grouped-query models (``n_kv_heads < n_heads``) keep their keys and values grouped in
    ``params`` (``W_K``, ``W_V [L, n_kv_heads, d_model, d_head]``, also ``W_K_grouped``,
    ``W_V_grouped`` here). ``W_K``, ``W_V``, ``b_K``, ``b_V`` are TransformerLens's
    per-query-head view: a copy repeated over each group (``jnp.repeat``, only in these four
    properties; the analyses of :mod:`lowrank.circuits` never call them). ``OV`` and ``QK``
    never repeat: their head axis is split in two, ``[L, n_kv_heads, group, d_model,
    d_model]`` (query head ``h`` is ``(h // group, h % group)``), with the key/value factor
    broadcast over ``group``; ``.reshape(L, H, ...)`` any per-head result
    (``eigvals(model.OV).reshape(L, H, -1)`` is TransformerLens's ``model.OV.eigenvalues``).

    Call it (``model(tokens)``) for logits; the call is jitted, and the model itself can be
    passed through ``jax.jit`` / ``jax.vmap`` as an argument.
    """

    params: Params
    config: ModelConfig = dataclasses.field(metadata={"static": True})
    tokenizer: Any = dataclasses.field(default=None, metadata={"static": True})

    def __repr__(self) -> str:
        c = self.config
        return (
            f"TransformerModel({c.architecture}, n_layers={c.n_layers}, n_heads={c.n_heads}, "
            f"d_model={c.d_model}, d_vocab={c.d_vocab}, dtype={self.dtype}, "
            f"ln_folded={self.ln_folded}, tokenizer={self.tokenizer is not None})"
        )

    # --------------------------------------------------------------- metadata
    @property
    def cfg(self) -> ModelConfig:
        """The config (TransformerLens's name for it)."""
        return self.config

    @property
    def dtype(self) -> Any:
        """The parameters' dtype."""
        return self.W_E.dtype

    @property
    def ln_folded(self) -> bool:
        """Whether the LayerNorm weights are folded into the neighbouring weights."""
        return is_layer_norm_folded(self.params)

    # ---------------------------------------------------------------- weights
    @property
    def W_E(self) -> Array:
        """Token embedding ``[d_vocab, d_model]``."""
        return self.params["embed"]["W_E"]

    @property
    def W_pos(self) -> Array:
        """``[n_ctx, d_model]``; rotary models have none (``AttributeError``)."""
        if self.config.positional != "learned":
            raise AttributeError(
                f"TransformerModel.W_pos: {self.config.architecture} uses "
                f"{self.config.positional} position embeddings (applied to queries and keys); "
                "it has no learned W_pos"
            )
        return self.params["pos_embed"]["W_pos"]

    @property
    def W_U(self) -> Array:
        """Unembedding ``[d_model, d_vocab]``."""
        return self.params["unembed"]["W_U"]

    @property
    def b_U(self) -> Array:
        """Unembedding bias ``[d_vocab]``."""
        return self.params["unembed"]["b_U"]

    def _attn(self, name: str) -> Array:
        return self.params["blocks"]["attn"][name]

    def _mlp(self, name: str) -> Array:
        return self.params["blocks"]["mlp"][name]

    def _per_query_head(self, name: str) -> Array:
        """A key/value leaf ``[L, n_kv_heads, ...]`` repeated to ``[L, H, ...]``."""
        x = self._attn(name)
        group = self.config.group_size
        return x if group == 1 else jnp.repeat(x, group, axis=1)

    W_Q = property(lambda self: self._attn("W_Q"), doc="``[L, H, d_model, d_head]``")
    W_K = property(lambda self: self._per_query_head("W_K"), doc=_REPEATED_DOC)
    W_V = property(lambda self: self._per_query_head("W_V"), doc=_REPEATED_DOC)
    W_K_grouped = property(lambda self: self._attn("W_K"), doc=_GROUPED_DOC)
    W_V_grouped = property(lambda self: self._attn("W_V"), doc=_GROUPED_DOC)
    W_O = property(lambda self: self._attn("W_O"), doc="``[L, H, d_head, d_model]``")
    b_Q = property(lambda self: self._attn("b_Q"), doc="``[L, H, d_head]``")
    b_K = property(lambda self: self._per_query_head("b_K"), doc="``[L, H, d_head]``")
    b_V = property(lambda self: self._per_query_head("b_V"), doc="``[L, H, d_head]``")
    b_O = property(lambda self: self._attn("b_O"), doc="``[L, d_model]``")
    W_gate = property(lambda self: self._mlp("W_gate"), doc="``[L, d_model, d_mlp]`` (gated)")
    W_in = property(lambda self: self._mlp("W_in"), doc="``[L, d_model, d_mlp]``")
    b_in = property(lambda self: self._mlp("b_in"), doc="``[L, d_mlp]``")
    W_out = property(lambda self: self._mlp("W_out"), doc="``[L, d_mlp, d_model]``")
    b_out = property(lambda self: self._mlp("b_out"), doc="``[L, d_model]``")

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per query head: ``FactoredMatrix [L, H, d_model, d_model]``.

        Grouped-query models: ``[L, n_kv_heads, group, d_model, d_model]`` with ``A`` the
        grouped ``W_V [L, n_kv_heads, 1, d_model, d_head]`` (see the class docstring).
        """
        return circuits.ov_circuit(self)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per query head: ``FactoredMatrix [L, H, d_model, d_model]``.

        Ignores the rotary embedding (as TransformerLens);
        :func:`lowrank.circuits.rotary_qk_circuit` is the rotary-aware circuit per relative
        offset. Grouped-query models: ``[L,
        n_kv_heads, group, d_model, d_model]`` with ``B`` the grouped ``W_K^T [L, n_kv_heads,
        1, d_head, d_model]`` (see the class docstring).
        """
        return circuits.qk_circuit(self)

    # ---------------------------------------------------------------- forward
    def forward(
        self, tokens: Any, *, return_activations: bool = False, precision: Any = None
    ) -> Any:
        """Logits ``[batch, seq, V]`` for tokens ``[batch, seq]`` (``[seq, V]`` for ``[seq]``).

        With ``return_activations=True`` returns ``(logits, activations)``; see
        :func:`lowrank.models.forward`.
        """
        return _forward_jit(
            self.params,
            tokens,
            config=self.config,
            return_activations=return_activations,
            precision=precision,
        )

    __call__ = forward

    # -------------------------------------------------------------- tokenizer
    def _require_tokenizer(self, fn: str) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                f"TransformerModel.{fn} needs a tokenizer, but this model has none (the "
                "checkpoint directory had no tokenizer files); pass tokens directly"
            )
        return self.tokenizer

    def _encode(self, text: str, prepend_bos: bool, fn: str) -> list[int]:
        tok = self._require_tokenizer(fn)
        ids = [int(i) for i in tok.encode(text, add_special_tokens=False)]
        if prepend_bos:
            bos = tok.bos_token_id
            if bos is None:
                raise ValueError(
                    f"TransformerModel.{fn}: the tokenizer has no BOS token; pass prepend_bos=False"
                )
            ids = [int(bos), *ids]
        return ids

    def to_tokens(self, text: str | Sequence[str], *, prepend_bos: bool = True) -> Array:
        """Token ids ``[batch, seq]`` (int32); several strings are right-padded."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("TransformerModel.to_tokens: got an empty list of strings")
        rows = [self._encode(t, prepend_bos, "to_tokens") for t in texts]
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        pad = 0 if pad is None else int(pad)
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), pad, dtype=np.int32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return jnp.asarray(out)

    def to_str_tokens(self, tokens: str | Any, *, prepend_bos: bool = True) -> list[str]:
        """The string of each token of a text or of a token array ``[seq]`` / ``[1, seq]``."""
        tok = self._require_tokenizer("to_str_tokens")
        if isinstance(tokens, str):
            ids = self._encode(tokens, prepend_bos, "to_str_tokens")
        else:
            arr = np.asarray(tokens)
            if arr.ndim == 2 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 1:
                raise ValueError(
                    "TransformerModel.to_str_tokens: tokens must have shape [seq] or [1, seq], "
                    f"got {arr.shape}"
                )
            ids = [int(i) for i in arr]
        return [tok.decode([i]) for i in ids]

    def to_string(self, tokens: Any) -> str | list[str]:
        """Decode tokens ``[seq]`` to a string, or ``[batch, seq]`` to a list of strings."""
        tok = self._require_tokenizer("to_string")
        arr = np.asarray(tokens)
        if arr.ndim == 1:
            return str(tok.decode([int(i) for i in arr]))
        return [str(tok.decode([int(i) for i in row])) for row in arr]
