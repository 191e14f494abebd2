"""ModelConfig: the hyper-parameters of a GPT-2 or GPT-Neo model, built from a HF config."""

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
    "ModelConfig",
    "SIZE_LIMITS",
    "config_from_hf",
]

#: Supported Hugging Face architectures and the family (converter) that reads them.
ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
    "GPTNeoForCausalLM": "gpt_neo",
    "GPTNeoModel": "gpt_neo",
}

#: HF ``model_type`` -> architecture used when a config names no ``architectures``.
_MODEL_TYPES: dict[str, str] = {"gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM"}

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

#: Upper bounds on the sizes of a :class:`ModelConfig` (far above any GPT-2 or GPT-Neo). A
#: mistyped or hostile ``config.json`` fails on them at once, before per-layer structures
#: (attention types, scales) are built or weights are allocated.
SIZE_LIMITS: dict[str, int] = {
    "n_layers": 10_000,
    "n_heads": 100_000,
    "d_model": 1_000_000,
    "d_head": 1_000_000,
    "d_mlp": 10_000_000,
    "d_vocab": 10_000_000,
    "n_ctx": 10_000_000,
    "window_size": 10_000_000,
}

#: The HF ``config.json`` sizes :func:`config_from_hf` reads, per family: key -> the
#: :data:`SIZE_LIMITS` entry that bounds it.
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
}
_HF_NULLABLE = ("n_inner", "intermediate_size")
_HF_FLAGS = (
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "tie_word_embeddings",
    "add_cross_attention",
)
_MISSING = object()


def _got(value: Any) -> str:
    """``value`` for an error message: short, one line, safe for deeply nested input."""
    return f"{reprlib.repr(value)} ({type(value).__name__})"


def _check_size(where: str, name: str, value: Any, limit: int, when: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(
            f"{where}: {name} must be a positive integer (at most {limit}){when}, got {_got(value)}"
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static hyper-parameters of a decoder-only transformer (hashable, usable as a jit key).

    Attributes:
        architecture: HF architecture name, one of :data:`ARCHITECTURES`.
        n_layers, n_heads, d_model, d_head, d_mlp, d_vocab: sizes.
        n_ctx: number of learned positions (rows of ``W_pos``).
        act_fn: MLP activation, one of :data:`ACTIVATIONS` (``gelu_new`` is the tanh GELU).
        eps: LayerNorm epsilon.
        attn_types: ``"global"`` or ``"local"`` for every layer; ``None`` means all global.
        window_size: local-attention window: a query at ``i`` sees keys ``j`` with
            ``i - window_size < j <= i``. Required when any layer is local.
        use_attn_scale: divide attention scores by ``sqrt(d_head)`` (GPT-2 yes, GPT-Neo no).
        scale_attn_by_inverse_layer_idx: also divide layer ``l``'s scores by ``l + 1``.
        tie_word_embeddings: whether the checkpoint ties ``lm_head`` to ``wte`` (informational;
            the parameter tree always holds its own ``W_U``).
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

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(_unknown_architecture(self.architecture))
        for name in ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            _check_size("ModelConfig", name, getattr(self, name), SIZE_LIMITS[name])
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(
                f"ModelConfig: act_fn {self.act_fn!r} is not supported; use one of {ACTIVATIONS}"
            )
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0):
            raise ValueError(f"ModelConfig: eps must be a non-negative number, got {self.eps!r}")
        kinds = ("global",) * self.n_layers if self.attn_types is None else tuple(self.attn_types)
        if len(kinds) != self.n_layers or any(k not in _ATTN_KINDS for k in kinds):
            raise ValueError(
                f"ModelConfig: attn_types must give 'global' or 'local' for each of the "
                f"{self.n_layers} layers, got {self.attn_types!r}"
            )
        object.__setattr__(self, "attn_types", kinds)
        if "local" in kinds:
            when = " when a layer uses local attention"
            _check_size(
                "ModelConfig", "window_size", self.window_size, SIZE_LIMITS["window_size"], when
            )

    @property
    def family(self) -> str:
        """The converter family: ``"gpt2"`` or ``"gpt_neo"``."""
        return ARCHITECTURES[self.architecture]

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
    ``attention_types`` and :class:`ModelConfig` builds per-layer tuples.
    """
    for key, limit_name in _HF_KEYS[family].items():
        value = get(key)
        if value is _MISSING or (value is None and key in _HF_NULLABLE):
            continue
        _check_size("config_from_hf", key, value, SIZE_LIMITS[limit_name])
    eps = get("layer_norm_epsilon")
    if eps is not _MISSING and (
        isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1
    ):
        raise ValueError(
            f"config_from_hf: layer_norm_epsilon must be a number from 0 to 1, got {_got(eps)}"
        )
    act = get("activation_function")
    if act is not _MISSING and not isinstance(act, str):
        raise ValueError(f"config_from_hf: activation_function must be a string, got {_got(act)}")
    for flag in _HF_FLAGS:
        value = get(flag)
        if value is not _MISSING and not isinstance(value, bool):
            raise ValueError(f"config_from_hf: {flag} must be true or false, got {_got(value)}")
    if family == "gpt_neo":
        _check_attention_types(get("attention_types"), get("num_layers"))


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
    from transformers import GPT2Config, GPTNeoConfig

    cls = GPT2Config if ARCHITECTURES[arch] == "gpt2" else GPTNeoConfig
    try:
        return cls.from_dict(dict(data))
    except Exception as err:  # transformers' own validation (types vary across versions)
        msg = " ".join(f"{type(err).__name__}: {err}".split())
        raise ValueError(f"config_from_hf: transformers rejects the config ({msg})") from None


def config_from_hf(config: Any) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face config.

    Args:
        config: a ``transformers`` config object (``GPT2Config``, ``GPTNeoConfig``), a dict
            as in ``config.json``, or the path of a ``config.json`` or of the directory
            holding it.

    Raises:
        ValueError: unknown architecture; a value of the wrong type, beyond
            :data:`SIZE_LIMITS` or inconsistent; a file that is not a JSON object.
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
    if ARCHITECTURES[arch] == "gpt2":
        return _from_gpt2(hf, arch)
    return _from_gpt_neo(hf, arch)


def _head_size(d_model: int, n_heads: int) -> int:
    if n_heads < 1 or d_model % n_heads:
        raise ValueError(
            f"config_from_hf: hidden size {d_model} is not divisible by the number of heads "
            f"{n_heads}"
        )
    return d_model // n_heads


def _from_gpt2(hf: Any, arch: str) -> ModelConfig:
    if getattr(hf, "add_cross_attention", False):
        raise ValueError("config_from_hf: GPT-2 with cross-attention is not supported")
    d_model, n_heads = int(hf.n_embd), int(hf.n_head)
    n_inner = getattr(hf, "n_inner", None)
    return ModelConfig(
        architecture=arch,
        n_layers=int(hf.n_layer),
        n_heads=n_heads,
        d_model=d_model,
        d_head=_head_size(d_model, n_heads),
        d_mlp=int(n_inner) if n_inner else 4 * d_model,
        d_vocab=int(hf.vocab_size),
        n_ctx=int(hf.n_positions),
        act_fn=str(hf.activation_function),
        eps=float(hf.layer_norm_epsilon),
        use_attn_scale=bool(getattr(hf, "scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(getattr(hf, "scale_attn_by_inverse_layer_idx", False)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    )


def _from_gpt_neo(hf: Any, arch: str) -> ModelConfig:
    d_model, n_heads = int(hf.hidden_size), int(hf.num_heads)
    intermediate = getattr(hf, "intermediate_size", None)
    return ModelConfig(
        architecture=arch,
        n_layers=int(hf.num_layers),
        n_heads=n_heads,
        d_model=d_model,
        d_head=_head_size(d_model, n_heads),
        d_mlp=int(intermediate) if intermediate else 4 * d_model,
        d_vocab=int(hf.vocab_size),
        n_ctx=int(hf.max_position_embeddings),
        act_fn=str(hf.activation_function),
        eps=float(hf.layer_norm_epsilon),
        attn_types=tuple(str(kind) for kind in hf.attention_layers),
        window_size=int(hf.window_size),
        use_attn_scale=False,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    )
