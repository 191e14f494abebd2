"""ModelConfig: the hyper-parameters of a decoder-only transformer, built from a HF config.

GPT-2, GPT-Neo, GPT-NeoX (Pythia), Llama, Mistral, Qwen2, Gemma and Gemma-2. What differs
between the families is a set of forward-pass options (normalisation, positions,
grouped-query heads, gated MLPs, parallel blocks, sliding windows, post-norms, soft-capping),
never per-family code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "ROPE_SCALING_TYPES",
    "ModelConfig",
    "RopeScaling",
    "SIZE_LIMITS",
    "config_from_hf",
]

#: Supported Hugging Face architectures and the family (layout) that reads them.
ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
    "GPTNeoForCausalLM": "gpt_neo",
    "GPTNeoModel": "gpt_neo",
    "GPTNeoXForCausalLM": "gpt_neox",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
}

#: HF ``model_type`` -> architecture used when a config names no ``architectures``.
_MODEL_TYPES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neo": "GPTNeoForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}

#: Architecture -> the ``transformers`` config class that fills in HF's defaults.
_HF_CONFIG_CLASSES: dict[str, str] = {
    "GPT2LMHeadModel": "GPT2Config",
    "GPT2Model": "GPT2Config",
    "GPTNeoForCausalLM": "GPTNeoConfig",
    "GPTNeoModel": "GPTNeoConfig",
    "GPTNeoXForCausalLM": "GPTNeoXConfig",
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "GemmaForCausalLM": "GemmaConfig",
    "Gemma2ForCausalLM": "Gemma2Config",
}

#: Activation names accepted in ``act_fn`` (the functions live in ``transformer.py``).
ACTIVATIONS: tuple[str, ...] = (
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "gelu",
    "relu",
    "silu",
    "swish",
)

_ATTN_KINDS = ("global", "local")
_NORMALIZATIONS = ("LN", "RMS")
_POSITIONALS = ("learned", "rotary")

#: ``rope_scaling`` types the rotary embedding implements (HF's ``rope_type``).
ROPE_SCALING_TYPES: tuple[str, ...] = ("linear", "llama3")

#: Upper bounds on the sizes of a :class:`ModelConfig` (far above any GPT-2 or GPT-Neo). A
#: mistyped or hostile ``config.json`` fails on them at once, before per-layer structures
#: (attention types, scales) are built or weights are allocated.
SIZE_LIMITS: dict[str, int] = {
    "n_layers": 10_000,
    "n_heads": 100_000,
    "n_kv_heads": 100_000,
    "d_model": 1_000_000,
    "d_head": 1_000_000,
    "d_mlp": 10_000_000,
    "d_vocab": 10_000_000,
    "n_ctx": 10_000_000,
    "window_size": 10_000_000,
}

#: The HF ``config.json`` sizes :func:`config_from_hf` reads, per family: key -> the
#: :class:`ModelConfig` field it fills (and the :data:`SIZE_LIMITS` entry that bounds it).
_HF_KEYS: dict[str, dict[str, str]] = {
    "gpt2": {
        "n_layer": "n_layers",
        "n_head": "n_heads",
        "n_embd": "d_model",
        "n_inner": "d_mlp",
        "vocab_size": "d_vocab",
        "n_positions": "n_ctx",
    },
    "gpt_neo": {
        "num_layers": "n_layers",
        "num_heads": "n_heads",
        "hidden_size": "d_model",
        "intermediate_size": "d_mlp",
        "vocab_size": "d_vocab",
        "max_position_embeddings": "n_ctx",
        "window_size": "window_size",
    },
    "gpt_neox": {
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "hidden_size": "d_model",
        "intermediate_size": "d_mlp",
        "vocab_size": "d_vocab",
        "max_position_embeddings": "n_ctx",
        "head_dim": "d_head",
    },
    "llama": {
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "hidden_size": "d_model",
        "head_dim": "d_head",
        "intermediate_size": "d_mlp",
        "vocab_size": "d_vocab",
        "max_position_embeddings": "n_ctx",
        "sliding_window": "window_size",
    },
}
_HF_KEYS["gemma"] = _HF_KEYS["gemma2"] = _HF_KEYS["llama"]

#: Per family, the HF keys of the MLP activation and of the norm epsilon.
_HF_ACT_EPS: dict[str, tuple[str, str]] = {
    "gpt2": ("activation_function", "layer_norm_epsilon"),
    "gpt_neo": ("activation_function", "layer_norm_epsilon"),
    "gpt_neox": ("hidden_act", "layer_norm_eps"),
    "llama": ("hidden_act", "rms_norm_eps"),
    "gemma": ("hidden_act", "rms_norm_eps"),
    "gemma2": ("hidden_activation", "rms_norm_eps"),
}
#: Positive numbers Gemma-2 reads (``null`` turns a soft-cap off).
_HF_POSITIVE = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
_HF_NULLABLE = ("n_inner", "intermediate_size", "num_key_value_heads", "head_dim", "sliding_window")
_HF_FLAGS = (
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "tie_word_embeddings",
    "add_cross_attention",
    "attention_bias",
    "mlp_bias",
    "use_sliding_window",
    "use_parallel_residual",
)
_HF_EPS = ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps")
_HF_ACTIVATIONS = ("activation_function", "hidden_act", "hidden_activation")
_HF_ROPE_BASES = ("rope_theta", "rotary_emb_base")
_HF_ROPE_FRACTIONS = ("rotary_pct", "partial_rotary_factor")
_HF_ROPE_DICTS = ("rope_scaling", "rope_parameters")
_MISSING = object()


def _got(value: Any) -> str:
    """``value`` for an error message: short, one line, safe for deeply nested input."""
    return f"{reprlib.repr(value)} ({type(value).__name__})"


def _check_size(where: str, name: str, value: Any, limit: int, when: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(
            f"{where}: {name} must be a positive integer (at most {limit}){when}, got {_got(value)}"
        )


def _check_number(where: str, name: str, value: Any, low: float, high: float) -> None:
    """``low < value <= high`` (``low`` excluded, so 0 is refused for a positive bound)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and low < value <= high):
        raise ValueError(
            f"{where}: {name} must be a number in ({low:g}, {high:g}], got {_got(value)}"
        )


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Scaling of the rotary frequencies, as HF's ``rope_scaling`` (``rope_parameters``).

    Attributes:
        rope_type: one of :data:`ROPE_SCALING_TYPES`. ``"linear"`` divides every frequency
            by ``factor``; ``"llama3"`` (Llama 3.1) divides the low frequencies (wavelength
            above ``original_max_position_embeddings / low_freq_factor``) by ``factor``,
            keeps the high ones (below ``... / high_freq_factor``) and interpolates between.
        factor: the context extension factor.
        low_freq_factor, high_freq_factor, original_max_position_embeddings: ``"llama3"``.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(_unknown_rope_type(self.rope_type))
        where = f"RopeScaling({self.rope_type!r})"
        _check_number(where, "factor", self.factor, 0, 1e6)
        if self.rope_type == "llama3":
            _check_number(where, "low_freq_factor", self.low_freq_factor, 0, 1e6)
            _check_number(where, "high_freq_factor", self.high_freq_factor, 0, 1e6)
            if not self.high_freq_factor > self.low_freq_factor:
                raise ValueError(
                    f"{where}: high_freq_factor ({self.high_freq_factor}) must exceed "
                    f"low_freq_factor ({self.low_freq_factor})"
                )
            _check_size(
                where,
                "original_max_position_embeddings",
                self.original_max_position_embeddings,
                SIZE_LIMITS["n_ctx"],
            )


def _unknown_rope_type(kind: Any, key: str = "rope_scaling") -> str:
    return (
        f"{key} type {kind!r} is not supported; lowrank implements "
        f"{', '.join(repr(t) for t in ROPE_SCALING_TYPES)} (or none)"
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static hyper-parameters of a decoder-only transformer (hashable, usable as a jit key).

    The defaults of the fields after ``tie_word_embeddings`` describe GPT-2 (LayerNorm,
    learned positions, one key/value head per query head, plain MLP, sequential blocks).

    Attributes:
        architecture: HF architecture name, one of :data:`ARCHITECTURES`.
        n_layers, n_heads, d_model, d_head, d_mlp, d_vocab: sizes (``n_heads`` query heads
            of width ``d_head``; ``n_heads * d_head`` need not equal ``d_model``).
        n_ctx: number of positions: rows of ``W_pos`` (learned), or the longest sequence
            the forward pass accepts (rotary).
        act_fn: MLP activation, one of :data:`ACTIVATIONS` (``gelu_new`` is the tanh GELU);
            for a gated MLP, the activation of the gate.
        eps: LayerNorm / RMSNorm epsilon.
        attn_types: ``"global"`` or ``"local"`` for every layer; ``None`` means all global.
        window_size: local-attention (sliding) window: a query at ``i`` sees keys ``j`` with
            ``i - window_size < j <= i``. Required when any layer is local.
        use_attn_scale: divide attention scores by ``sqrt(d_head)`` (GPT-2 yes, GPT-Neo no).
        scale_attn_by_inverse_layer_idx: also divide layer ``l``'s scores by ``l + 1``.
        tie_word_embeddings: whether the checkpoint ties ``lm_head`` to the embedding
            (informational; the parameter tree always holds its own ``W_U``).
        n_kv_heads: key/value heads (grouped-query attention); ``None`` means ``n_heads``.
            Query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``.
        normalization: ``"LN"`` (LayerNorm, weight and bias) or ``"RMS"`` (RMSNorm, weight).
        positional: ``"learned"`` (``W_pos`` added to the embedding) or ``"rotary"`` (RoPE
            on queries and keys; no ``W_pos``).
        rotary_dim: rotated dimensions of each head (the first ``rotary_dim``; the rest pass
            through); ``None`` means ``d_head`` for rotary models. Even.
        rotary_base: the RoPE base (``rope_theta``).
        rope_scaling: frequency scaling (:class:`RopeScaling`), or ``None``.
        gated_mlp: ``act(x W_gate) * (x W_in) + b_in`` feeds ``W_out`` (SwiGLU for silu).
        parallel_attn_mlp: the MLP reads the block input instead of the attention output
            (GPT-NeoX, GPT-J): ``x + attn(ln1(x)) + mlp(ln2(x))``.
        attn_qkv_bias, attn_out_bias: whether the checkpoint stores query/key/value and
            output biases (the tree always has them, as zeros where it does not).
        attn_scale: divisor of the attention scores in place of ``sqrt(d_head)`` (Gemma-2:
            ``sqrt(query_pre_attn_scalar)``); ``None`` keeps ``sqrt(d_head)``.
        attn_softcap: soft-cap of the (scaled) attention scores, ``c * tanh(s / c)`` before
            the mask; ``None``: none.
        final_softcap: soft-cap of the logits, likewise; ``None``: none.
        post_norms: also normalise each attention and MLP output before it joins the
            residual stream (Gemma-2's ``ln1_post``, ``ln2_post``; never folded).
    """

    architecture: str
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    act_fn: str = "gelu_new"
    eps: float = 1e-5
    attn_types: tuple[str, ...] | None = None
    window_size: int | None = None
    use_attn_scale: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    n_kv_heads: int | None = None
    normalization: str = "LN"
    positional: str = "learned"
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    attn_qkv_bias: bool = True
    attn_out_bias: bool = True
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    post_norms: bool = False

    def __post_init__(self) -> None:
        where = "ModelConfig"
        if self.architecture not in ARCHITECTURES:
            raise ValueError(_unknown_architecture(self.architecture))
        for name in ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            _check_size(where, name, getattr(self, name), SIZE_LIMITS[name])
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(
                f"{where}: act_fn {self.act_fn!r} is not supported; use one of {ACTIVATIONS}"
            )
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0):
            raise ValueError(f"{where}: eps must be a non-negative number, got {self.eps!r}")
        kinds = ("global",) * self.n_layers if self.attn_types is None else tuple(self.attn_types)
        if len(kinds) != self.n_layers or any(k not in _ATTN_KINDS for k in kinds):
            raise ValueError(
                f"{where}: attn_types must give 'global' or 'local' for each of the "
                f"{self.n_layers} layers, got {self.attn_types!r}"
            )
        object.__setattr__(self, "attn_types", kinds)
        if "local" in kinds:
            when = " when a layer uses local attention"
            _check_size(where, "window_size", self.window_size, SIZE_LIMITS["window_size"], when)
        self._check_heads()
        for name, allowed in (("normalization", _NORMALIZATIONS), ("positional", _POSITIONALS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{where}: {name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        self._check_rotary()
        for name in ("attn_scale", "attn_softcap", "final_softcap"):
            if getattr(self, name) is not None:
                _check_number(where, name, getattr(self, name), 0, 1e30)

    def _check_heads(self) -> None:
        n_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        _check_size("ModelConfig", "n_kv_heads", n_kv, SIZE_LIMITS["n_kv_heads"])
        if self.n_heads % n_kv:
            raise ValueError(
                f"ModelConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({n_kv}): each key/value head serves a whole group of query heads"
            )
        object.__setattr__(self, "n_kv_heads", n_kv)

    def _check_rotary(self) -> None:
        where = "ModelConfig"
        if self.positional != "rotary":
            if self.rotary_dim is not None or self.rope_scaling is not None:
                raise ValueError(
                    f"{where}: rotary_dim and rope_scaling need positional='rotary', got "
                    f"positional={self.positional!r}"
                )
            return
        dim = self.d_head if self.rotary_dim is None else self.rotary_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or not (0 < dim <= self.d_head):
            raise ValueError(
                f"{where}: rotary_dim must be a positive integer at most d_head "
                f"({self.d_head}), got {_got(dim)}"
            )
        if dim % 2:
            raise ValueError(f"{where}: rotary_dim must be even, got {dim}")
        object.__setattr__(self, "rotary_dim", dim)
        _check_number(where, "rotary_base", self.rotary_base, 0, 1e30)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(
                f"{where}: rope_scaling must be a RopeScaling or None, got "
                f"{type(self.rope_scaling).__name__}"
            )

    @property
    def family(self) -> str:
        """The layout family, a value of :data:`ARCHITECTURES` (``"gpt2"``, ``"llama"``, ...)."""
        return ARCHITECTURES[self.architecture]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        assert self.n_kv_heads is not None
        return self.n_heads // self.n_kv_heads

    @property
    def attn_windows(self) -> tuple[int, ...]:
        """Per-layer attention window (``n_ctx`` for global layers, which never binds)."""
        assert self.attn_types is not None
        return tuple(
            int(self.window_size) if kind == "local" and self.window_size else self.n_ctx
            for kind in self.attn_types
        )

    @property
    def attn_scales(self) -> tuple[float, ...]:
        """Per-layer divisor of the attention scores."""
        base = math.sqrt(self.d_head) if self.use_attn_scale else 1.0
        base = base if self.attn_scale is None else float(self.attn_scale)
        if self.scale_attn_by_inverse_layer_idx:
            return tuple(base * (layer + 1) for layer in range(self.n_layers))
        return (base,) * self.n_layers

    @classmethod
    def from_hf(cls, config: Any) -> ModelConfig:
        """Alias of :func:`config_from_hf`."""
        return config_from_hf(config)


def _unknown_architecture(name: Any) -> str:
    return (
        f"unsupported architecture {name!r}: lowrank.models reads "
        f"{', '.join(sorted(ARCHITECTURES))}"
    )


def _read_config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"config_from_hf: no config file at {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"config_from_hf: could not read {str(p)!r} ({err})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(
            f"config_from_hf: {str(p)!r} is nested too deeply to be a config"
        ) from None
    except ValueError as err:  # JSONDecodeError, or an integer too long to convert
        raise ValueError(f"config_from_hf: {str(p)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"config_from_hf: {str(p)!r} must hold a JSON object, got a {type(data).__name__}"
        )
    return data


def _architecture(architectures: Any, model_type: Any) -> str:
    if architectures is not None and not (
        isinstance(architectures, (list, tuple)) and all(isinstance(a, str) for a in architectures)
    ):
        raise ValueError(
            f"config_from_hf: architectures must be a list of strings such as "
            f"['GPT2LMHeadModel'], got {_got(architectures)}"
        )
    if architectures:
        if architectures[0] not in ARCHITECTURES:
            raise ValueError(_unknown_architecture(architectures[0]))
        return str(architectures[0])
    if model_type is not None and not isinstance(model_type, str):
        raise ValueError(f"config_from_hf: model_type must be a string, got {_got(model_type)}")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ValueError(
        f"unsupported model type {model_type!r} (the config names no architectures): "
        f"lowrank.models reads model types {sorted(_MODEL_TYPES)}"
    )


def _check_hf_values(get: Callable[[str], Any], family: str) -> None:
    """Types and bounds of the HF config values :func:`config_from_hf` reads.

    One step before anything is expanded: transformers' GPT-Neo config builds a list from
    ``attention_types``, Qwen2's one from ``num_hidden_layers``, and :class:`ModelConfig`
    builds per-layer tuples.
    """
    for key, limit_name in _HF_KEYS[family].items():
        value = get(key)
        if value is _MISSING or (value is None and key in _HF_NULLABLE):
            continue
        _check_size("config_from_hf", key, value, SIZE_LIMITS[limit_name])
    for key in _HF_EPS:
        eps = get(key)
        if eps is not _MISSING and (
            isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1
        ):
            raise ValueError(f"config_from_hf: {key} must be a number from 0 to 1, got {_got(eps)}")
    for key in _HF_ACTIVATIONS:
        act = get(key)
        if act is not _MISSING and act is not None and not isinstance(act, str):
            raise ValueError(f"config_from_hf: {key} must be a string, got {_got(act)}")
    for flag in _HF_FLAGS:
        value = get(flag)
        if value is not _MISSING and not isinstance(value, bool):
            raise ValueError(f"config_from_hf: {flag} must be true or false, got {_got(value)}")
    if family == "gpt_neo":
        _check_attention_types(get("attention_types"), get("num_layers"))
    for key in _HF_POSITIVE:
        value = get(key)
        if value is not _MISSING and value is not None:
            _check_number("config_from_hf", key, value, 0, 1e30)
    _check_hf_rope(get)
    heads, kv = get("num_attention_heads"), get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and kv >= 1 and heads % kv:
        raise ValueError(
            f"config_from_hf: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv})"
        )


def _check_hf_rope(get: Callable[[str], Any]) -> None:
    """RoPE base, rotary fraction, and a scaling type lowrank implements."""
    for key in _HF_ROPE_BASES:
        value = get(key)
        if value is not _MISSING and value is not None:
            _check_number("config_from_hf", key, value, 0, 1e30)
    for key in _HF_ROPE_FRACTIONS:
        value = get(key)
        if value is not _MISSING and value is not None:
            _check_number("config_from_hf", key, value, 0, 1)
    for key in _HF_ROPE_DICTS:
        value = get(key)
        if value is _MISSING or value is None:
            continue
        if not isinstance(value, Mapping):
            raise ValueError(
                f"config_from_hf: {key} must be an object such as "
                f'{{"rope_type": "linear", "factor": 2.0}} or null, got {_got(value)}'
            )
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default" and kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"config_from_hf: {_unknown_rope_type(kind, key)}")


def _check_attention_types(value: Any, num_layers: Any) -> None:
    """GPT-Neo's ``attention_types``: ``[[[kind, ...], repeat], ...]``, counted unexpanded."""
    if value is _MISSING:
        return
    total = 0
    items: Any = value if isinstance(value, (list, tuple)) else [None]
    for item in items:
        ok = (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and isinstance(item[0], (list, tuple))
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
            and item[1] >= 0
        )
        if ok:
            total += len(item[0]) * item[1]
            if total > SIZE_LIMITS["n_layers"]:
                raise ValueError(
                    f"config_from_hf: attention_types describes more than "
                    f"{SIZE_LIMITS['n_layers']} layers"
                )
            ok = all(isinstance(k, str) and k in _ATTN_KINDS for k in item[0])
        if not ok:
            raise ValueError(
                "config_from_hf: attention_types must be a list of [[kind, ...], repeat] pairs "
                f"with kinds 'global' or 'local', got {_got(value)}"
            )
    if num_layers is not _MISSING and total != num_layers:
        raise ValueError(
            f"config_from_hf: attention_types describes {total} layers, but num_layers is "
            f"{num_layers}"
        )


def _hf_object(data: Mapping[str, Any], arch: str) -> Any:
    """A transformers config object (fills in HF's defaults for keys a config.json omits)."""
    import transformers

    cls = getattr(transformers, _HF_CONFIG_CLASSES[arch])
    try:
        return cls.from_dict(dict(data))
    except Exception as err:  # transformers' own validation (types vary across versions)
        msg = " ".join(f"{type(err).__name__}: {err}".split())
        raise ValueError(f"config_from_hf: transformers rejects the config ({msg})") from None


def config_from_hf(config: Any) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face config.

    Args:
        config: a ``transformers`` config object (``GPT2Config``, ``LlamaConfig``, ...), a
            dict as in ``config.json``, or the path of a ``config.json`` or of the directory
            holding it.

    Raises:
        ValueError: unknown architecture; a value of the wrong type, beyond
            :data:`SIZE_LIMITS` or inconsistent (``num_attention_heads`` not a multiple of
            ``num_key_value_heads``, a GPT-NeoX ``head_dim`` that is not
            ``hidden_size / num_attention_heads``); a ``rope_scaling`` type other than
            :data:`ROPE_SCALING_TYPES`; a file that is not a JSON object.
        FileNotFoundError: a path without a config.json.
    """
    if isinstance(config, (str, os.PathLike)):
        config = _read_config_json(config)
    if isinstance(config, Mapping):
        arch = _architecture(config.get("architectures"), config.get("model_type"))
        _check_hf_values(lambda key: config.get(key, _MISSING), ARCHITECTURES[arch])
        hf = _hf_object(config, arch)
    elif hasattr(config, "model_type"):
        hf = config
        arch = _architecture(getattr(hf, "architectures", None), getattr(hf, "model_type", None))
        _check_hf_values(lambda key: getattr(hf, key, _MISSING), ARCHITECTURES[arch])
    else:
        raise TypeError(
            "config_from_hf: expected a transformers config, a dict or a path, got "
            f"{type(config).__name__}"
        )
    return _FROM_HF[ARCHITECTURES[arch]](hf, arch)


def _head_size(d_model: int, n_heads: int) -> int:
    if n_heads < 1 or d_model % n_heads:
        raise ValueError(
            f"config_from_hf: hidden size {d_model} is not divisible by the number of heads "
            f"{n_heads}"
        )
    return d_model // n_heads


#: Families whose checkpoints tie the embeddings unless the config says otherwise.
_TIED_BY_DEFAULT = ("gpt2", "gpt_neo")


def _read_fields(hf: Any, arch: str) -> dict[str, Any]:
    """The :class:`ModelConfig` fields every family reads alike (sizes via :data:`_HF_KEYS`).

    Sizes whose HF value is null are left out (``n_kv_heads``: one per query head; a null
    window), ``d_head`` is ``d_model / n_heads`` and ``d_mlp`` is ``4 * d_model`` where the
    config names none.
    """
    family = ARCHITECTURES[arch]
    fields: dict[str, Any] = {"architecture": arch}
    for key, field in _HF_KEYS[family].items():
        value = getattr(hf, key, None)
        if value is not None:
            fields[field] = int(value)
    if "d_head" not in fields:
        fields["d_head"] = _head_size(fields["d_model"], fields["n_heads"])
    fields.setdefault("d_mlp", 4 * fields["d_model"])
    act, eps = _HF_ACT_EPS[family]
    fields["act_fn"], fields["eps"] = str(getattr(hf, act)), float(getattr(hf, eps))
    tied = getattr(hf, "tie_word_embeddings", family in _TIED_BY_DEFAULT)
    fields["tie_word_embeddings"] = bool(tied)
    return fields


def _from_gpt2(hf: Any, arch: str) -> ModelConfig:
    """GPT-2: LayerNorm, learned positions, ``Conv1D`` weights."""
    if getattr(hf, "add_cross_attention", False):
        raise ValueError("config_from_hf: GPT-2 with cross-attention is not supported")
    return ModelConfig(
        **_read_fields(hf, arch),
        use_attn_scale=bool(getattr(hf, "scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(getattr(hf, "scale_attn_by_inverse_layer_idx", False)),
    )


def _from_gpt_neo(hf: Any, arch: str) -> ModelConfig:
    """GPT-Neo: GPT-2 with unscaled attention, no q/k/v biases, and local layers."""
    return ModelConfig(
        **_read_fields(hf, arch),
        attn_types=tuple(str(kind) for kind in hf.attention_layers),
        use_attn_scale=False,
        attn_qkv_bias=False,
    )


def _rope(hf: Any, d_head: int) -> dict[str, Any]:
    """The rotary fields (``positional``, ``rotary_dim``, ``rotary_base``, ``rope_scaling``).

    transformers 5 gathers them in ``rope_parameters``; older versions kept ``rope_theta``
    and ``rope_scaling`` (GPT-NeoX: ``rotary_emb_base``, ``rotary_pct``) as attributes.
    """
    params = getattr(hf, "rope_parameters", None)
    if not isinstance(params, Mapping):
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", None))
        params.setdefault("partial_rotary_factor", getattr(hf, "rotary_pct", 1.0))
        if params["rope_theta"] is None:
            params["rope_theta"] = getattr(hf, "rotary_emb_base", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = None
    if kind != "default":
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"config_from_hf: {_unknown_rope_type(kind)}")
        names = [f.name for f in dataclasses.fields(RopeScaling)][1:]
        scaling = RopeScaling(kind, **{k: params[k] for k in names if k in params})
    fraction = params.get("partial_rotary_factor", 1.0)
    return dict(
        positional="rotary",
        rotary_dim=int(d_head * float(fraction)),
        rotary_base=float(params["rope_theta"]),
        rope_scaling=scaling,
    )


def _attn_kinds(hf: Any, arch: str, n_layers: int) -> tuple[tuple[str, ...], int | None]:
    """Per-layer ``"global"``/``"local"`` and the window, as transformers' modelling reads them.

    Mistral slides every layer when ``sliding_window`` is set; Qwen2 lists its layers in
    ``layer_types`` (``"sliding_attention"`` from ``max_window_layers`` on, and only with
    ``use_sliding_window``, which transformers reflects by a null ``sliding_window``), and
    so does Gemma-2 (even layers slide); Llama never slides (it ignores a ``sliding_window``
    key), and Gemma has none.
    """
    window = getattr(hf, "sliding_window", None)
    if arch == "LlamaForCausalLM" or not window:
        return ("global",) * n_layers, None
    if arch == "MistralForCausalLM":
        return ("local",) * n_layers, int(window)
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * n_layers
    kinds = {"full_attention": "global", "sliding_attention": "local"}
    if len(types) != n_layers or any(t not in kinds for t in types):
        raise ValueError(
            f"config_from_hf: layer_types must give 'full_attention' or 'sliding_attention' "
            f"for each of the {n_layers} layers, got {_got(types)}"
        )
    return tuple(kinds[t] for t in types), int(window)


def _from_llama(hf: Any, arch: str) -> ModelConfig:
    """Llama, Mistral, Qwen2, Gemma, Gemma-2: RMSNorm, RoPE, grouped-query attention, gated MLP."""
    if getattr(hf, "mlp_bias", False):
        raise ValueError(f"config_from_hf: {arch} with mlp_bias=true is not supported")
    fields = _read_fields(hf, arch)  # head_dim may differ from hidden_size / heads (HF too)
    kinds, fields["window_size"] = _attn_kinds(hf, arch, fields["n_layers"])
    qwen2 = arch == "Qwen2ForCausalLM"  # q/k/v biases always, no output bias
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **fields,
        **_rope(hf, fields["d_head"]),
        **_gemma2_options(hf, arch),
        attn_types=kinds,
        normalization="RMS",
        gated_mlp=True,
        attn_qkv_bias=qwen2 or bias,
        attn_out_bias=bias and not qwen2,
    )


def _gemma2_options(hf: Any, arch: str) -> dict[str, Any]:
    """Gemma-2's post-norms, attention scale and soft-caps (none for the other families)."""
    if arch != "Gemma2ForCausalLM":
        return {}
    scalar, attn_cap, final_cap = (getattr(hf, key, None) for key in _HF_POSITIVE)
    return dict(
        post_norms=True,
        attn_scale=None if scalar is None else math.sqrt(float(scalar)),
        attn_softcap=None if attn_cap is None else float(attn_cap),
        final_softcap=None if final_cap is None else float(final_cap),
    )


def _from_gpt_neox(hf: Any, arch: str) -> ModelConfig:
    """GPT-NeoX (Pythia): LayerNorm, partial RoPE, parallel attention and MLP."""
    fields = _read_fields(hf, arch)
    d_model, n_heads = fields["d_model"], fields["n_heads"]
    d_head = _head_size(d_model, n_heads)
    if fields["d_head"] != d_head:
        raise ValueError(
            f"config_from_hf: head_dim {fields['d_head']} does not match hidden_size / "
            f"num_attention_heads = {d_model} / {n_heads} = {d_head}; GPT-NeoX heads are "
            "hidden_size / num_attention_heads wide"
        )
    bias = bool(getattr(hf, "attention_bias", True))
    return ModelConfig(
        **fields,
        **_rope(hf, d_head),
        parallel_attn_mlp=bool(getattr(hf, "use_parallel_residual", True)),
        attn_qkv_bias=bias,
        attn_out_bias=bias,
    )


_FROM_HF: dict[str, Callable[[Any, str], ModelConfig]] = {
    "gpt2": _from_gpt2,
    "gpt_neo": _from_gpt_neo,
    "gpt_neox": _from_gpt_neox,
    "llama": _from_llama,
    "gemma": _from_llama,
    "gemma2": _from_llama,
}
