"""Test-wide JAX settings: float32 by default, strict dtype promotion, 8 CPU devices, and
programs compiled for speed of compiling (see ``_compile_for_tests``).
"""

import atexit
import os
import shutil
import tempfile

_FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
_CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"


def _compile_for_tests() -> None:
    """Make XLA compile the suite's programs about twice as fast; results are unchanged.

    Most of the suite's CPU time is XLA compiling programs that then run for milliseconds. So:
    * LLVM's backend optimisation level 0 (unless XLA_FLAGS sets one): the same HLO passes,
      the same IEEE arithmetic without fast-math, roughly half the compile time and several
      times the (millisecond) run time.
    * JAX's persistent compilation cache in a folder of this session, shared by the xdist
      workers and the subprocesses the tests start (notebook kernels, ``python -m lowrank``),
      which compile many of the same programs. Keyed by the program and its options, so it
      can only return what compiling would have; removed when the session ends.
    Runs whose speed or bits matter (retraining, multi-process pods) get ``user_environment()``.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FAST_COMPILE_FLAG}".strip()
    if _CACHE_VARIABLE not in os.environ:  # the controller (or -n 0) creates it, workers inherit
        folder = tempfile.mkdtemp(prefix="lowrank-tests-jax-cache-")
        os.environ[_CACHE_VARIABLE] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


def user_environment(**changes: str) -> dict[str, str]:
    """``os.environ`` without the settings of ``_compile_for_tests``, updated with ``changes``:
    for subprocesses that must compile and run as users' do.
    """
    env = {k: v for k, v in os.environ.items() if k != _CACHE_VARIABLE}
    flags = env.pop("XLA_FLAGS", "").split()
    if flags := [f for f in flags if f != _FAST_COMPILE_FLAG]:
        env["XLA_FLAGS"] = " ".join(flags)
    return {**env, **changes}


_compile_for_tests()

import jax  # noqa: E402

# Must run before any JAX backend is initialised.
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_dtype_promotion", "strict")


# --------------------------------------------------------------------------------------
# Small random GPT-2 / GPT-Neo checkpoints (lowrank.models tests). Heavy imports (torch,
# transformers, transformer_lens) happen inside the fixtures, so other tests stay fast.
import copy  # noqa: E402
import dataclasses  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _reference import log_softmax  # noqa: E402
from tl_weights import TL4, bridge  # noqa: E402
from tl_weights import weights as tl_tree  # noqa: E402

from benchmarks.helpers import LLAMA_3_1, hooked_config  # noqa: E402

# ``flatten`` is re-exported for the tests: it lives with the helpers the benchmarks share.
from benchmarks.helpers import flatten as flatten  # noqa: E402

TOKEN_SEQ = 17  # longer than the GPT-Neo window (5), shorter than n_ctx (24)
_WORDS = ["<|endoftext|>", "[UNK]"] + [f"w{i}" for i in range(60)]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A saved random HF checkpoint and the torch model it came from."""

    family: str  # "gpt2" | "gpt_neo" | "gpt_neox" | "llama" | "mistral" | "qwen2"
    path: Path
    hf_model: Any


def _randomise(model: Any, seed: int) -> None:
    """Non-trivial LayerNorm / RMSNorm weights and biases, so that folding is exercised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".ln_" in name or "ln_f" in name or "norm" in name:
                p.copy_((1.0 + 0.3 * noise) if name.endswith("weight") else 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="[UNK]",
    ).save_pretrained(path)


#: Settings every small GPT-2 / GPT-Neo checkpoint shares.
_SMALL = dict(
    vocab_size=101,
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=0,
    attn_implementation="eager",
)


def _build(path: Path, seed: int, architecture: str, config: Any) -> Any:
    """Save a random ``transformers.<architecture>(config)`` (safetensors) in ``path``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    return model


def build_gpt2(path: Path, seed: int = 0, **overrides: Any) -> Any:
    """Save a random GPT2LMHeadModel (safetensors) in ``path``; return the torch model."""
    from transformers import GPT2Config

    sizes = dict(n_layer=3, n_head=4, n_embd=32, n_positions=24)
    return _build(path, seed, "GPT2LMHeadModel", GPT2Config(**{**_SMALL, **sizes, **overrides}))


def build_gpt_neo(path: Path, seed: int = 1, **overrides: Any) -> Any:
    """Save a random GPTNeoForCausalLM with global and local (window 5) layers."""
    from transformers import GPTNeoConfig

    sizes = dict(
        num_layers=4,
        num_heads=4,
        hidden_size=32,
        max_position_embeddings=24,
        attention_types=[[["global", "local"], 2]],
        window_size=5,
    )
    config = GPTNeoConfig(**{**_SMALL, **sizes, **overrides})
    return _build(path, seed, "GPTNeoForCausalLM", config)


#: transformers config class and the overrides of each Llama-layout variant's test model.
LLAMA_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # llama3 scaling with every frequency band present at d_head 8 (wavelengths 6, 63, 628,
    # 6283 against 64 / 4 and 64 / 1); untied.
    "llama": (
        "LlamaConfig",
        dict(
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
    ),
    # every layer slides with window 5 < TOKEN_SEQ; untied.
    "mistral": ("MistralConfig", dict(sliding_window=5, rope_theta=100.0)),
    # q/k/v biases, tied embeddings, a sliding window on the last layer only.
    "qwen2": (
        "Qwen2Config",
        dict(
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=2,
            rope_theta=1000.0,
        ),
    ),
    # heads 16 wide (not d_model / heads = 8), tied embeddings, tanh-GELU gate.
    "gemma": ("GemmaConfig", dict(head_dim=16, rope_theta=1000.0)),
    # heads 16 wide, even layers slide with window 5 < TOKEN_SEQ, score divisor sqrt(12),
    # soft-caps low enough to bind on these weights; untied.
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
            tie_word_embeddings=False,
            rope_theta=1000.0,
        ),
    ),
}


#: What every rotary test model shares (its transformers config keywords).
_ROTARY_COMMON: dict[str, Any] = dict(
    vocab_size=101,
    max_position_embeddings=24,
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=0,
    attn_implementation="eager",
)


def build_llama(
    path: Path, variant: str = "llama", seed: int = 2, dtype: Any = None, **overrides: Any
) -> Any:
    """Save a random Llama / Mistral / Qwen2 / Gemma / Gemma-2 (:data:`LLAMA_VARIANTS`): 3
    layers, 4 query heads sharing 2 key/value heads, d_model 32, non-trivial RMSNorm weights
    and biases.

    ``dtype`` (a torch dtype) is the storage dtype; the returned model is float32 and holds
    the stored (rounded) weights, so it is the reference for a float32 load.
    """
    cls_name, variant_kwargs = LLAMA_VARIANTS[variant]
    sizes = dict(
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=48,
        rms_norm_eps=1e-5,
    )
    return _build_rotary(path, cls_name, seed, dtype, sizes, variant_kwargs, overrides)


def build_gpt_neox(path: Path, seed: int = 3, dtype: Any = None, **overrides: Any) -> Any:
    """Save a random GPTNeoXForCausalLM: 2 layers, partial rotary (a quarter of d_head 16),
    parallel attention and MLP, untied ``embed_out``; see :func:`build_llama` for ``dtype``.
    """
    sizes = dict(
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_size=32,
        intermediate_size=64,
        rotary_pct=0.25,
        rotary_emb_base=100,
        hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return _build_rotary(path, "GPTNeoXConfig", seed, dtype, sizes, overrides)


def _build_rotary(
    path: Path, cls_name: str, seed: int, dtype: Any, *settings: dict[str, Any]
) -> Any:
    """Save a random causal LM of config class ``cls_name`` from :data:`_ROTARY_COMMON` updated
    by each of ``settings`` in turn; the float32 model of what was saved (see :func:`_save`).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(_ROTARY_COMMON)
    for more in settings:
        kwargs.update(copy.deepcopy(more))  # transformers fills in nested dicts
    config = getattr(transformers, cls_name)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _randomise(model, seed)
    return _save(model, path, dtype)


def _save(model: Any, path: Path, dtype: Any) -> Any:
    """``save_pretrained`` (safetensors) in ``dtype``; the float32 model of what was saved."""
    import torch

    if dtype is not None and dtype != torch.float32:
        with torch.no_grad():  # parameters only: buffers (rotary inv_freq) stay float32
            for p in model.parameters():
                p.copy_(p.to(dtype))
        copy.deepcopy(model).to(dtype).save_pretrained(path)
    else:
        model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    path = tmp_path_factory.mktemp("gpt2")
    model = build_gpt2(path)
    _save_tokenizer(path)
    return Checkpoint("gpt2", path, model)


@pytest.fixture(scope="session")
def gpt_neo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    path = tmp_path_factory.mktemp("gpt_neo")
    return Checkpoint("gpt_neo", path, build_gpt_neo(path))


@pytest.fixture(scope="session")
def rotary_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Factory ``(variant, storage="float32", **overrides) -> Checkpoint``, each built once.

    ``variant`` is a key of :data:`LLAMA_VARIANTS` or ``"gpt_neox"``; ``storage`` the torch
    dtype name the safetensors hold; ``overrides`` go to the transformers config.
    """
    built: dict[tuple[str, str, str], Checkpoint] = {}

    def make(variant: str, storage: str = "float32", **overrides: Any) -> Checkpoint:
        key = (variant, storage, repr(sorted(overrides.items())))
        if key not in built:
            import torch

            path = tmp_path_factory.mktemp(f"{variant}_{storage}")
            dtype = getattr(torch, storage)
            if variant == "gpt_neox":
                model = build_gpt_neox(path, dtype=dtype, **overrides)
            else:
                model = build_llama(path, variant, dtype=dtype, **overrides)
            built[key] = Checkpoint(variant, path, model)
        return built[key]

    return make


@pytest.fixture(scope="session", params=["gpt2", "gpt_neo"])
def checkpoint(request: pytest.FixtureRequest) -> Checkpoint:
    """Each family's checkpoint in turn."""
    return request.getfixturevalue(f"{request.param}_checkpoint")


@pytest.fixture(scope="session")
def tokens() -> np.ndarray:
    """Random token ids ``[2, TOKEN_SEQ]`` below the tiny models' vocabulary."""
    return np.random.default_rng(0).integers(0, 101, size=(2, TOKEN_SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def converted(
    gpt2_checkpoint: Checkpoint, gpt_neo_checkpoint: Checkpoint
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Family -> (its ``ModelConfig``, its unprocessed tree in NumPy), GPT-2 and GPT-Neo."""
    from lowrank.models import config_from_hf, convert_state_dict

    out = {}
    for ckpt in (gpt2_checkpoint, gpt_neo_checkpoint):
        config = config_from_hf(ckpt.path)
        out[ckpt.family] = config, convert_state_dict(hf_numpy_state_dict(ckpt), config)
    return out


def hf_logits(ckpt: Checkpoint, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ckpt.hf_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def hf_numpy_state_dict(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in ckpt.hf_model.state_dict().items()}


#: The HF config attributes TransformerLens reads d_model, n_heads, n_layers, n_ctx from.
_HF_SIZES = {
    "gpt2": ("n_embd", "n_head", "n_layer", "n_positions"),
    "gpt_neo": ("hidden_size", "num_heads", "num_layers", "max_position_embeddings"),
}


def tl_config(ckpt: Checkpoint) -> Any:
    """A HookedTransformerConfig mirroring what TransformerLens derives from the HF config."""
    c = ckpt.hf_model.config
    sizes = zip(("d_model", "n_heads", "n_layers", "n_ctx"), _HF_SIZES[ckpt.family], strict=True)
    d = {field: getattr(c, name) for field, name in sizes}
    if ckpt.family == "gpt2":
        d.update(use_attn_scale=c.scale_attn_weights, use_local_attn=False)
        d.update(scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx)
    else:
        d.update(attn_types=c.attention_layers, window_size=c.window_size)
        d.update(use_attn_scale=False, use_local_attn=True, scale_attn_by_inverse_layer_idx=False)
    d.update(
        d_head=d["d_model"] // d["n_heads"],
        d_mlp=4 * d["d_model"],
        eps=c.layer_norm_epsilon,
        d_vocab=c.vocab_size,
        act_fn=c.activation_function,
        normalization_type="LN",
        original_architecture=type(ckpt.hf_model).__name__,
    )
    return hooked_config(d)


#: ``load_pretrained`` / ``process_params`` flags that leave the weights as stored.
NO_PROCESSING = dict(
    fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
)


#: TransformerLens's processing flags, in ``load_and_process_state_dict``'s order.
_TL_FLAGS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


@pytest.fixture(scope="session")
def tl_model() -> Any:
    """Factory ``tl_model(ckpt, fold_ln, center_writing_weights, center_unembed,
    fold_value_biases, refactor=False)`` -> a processed TransformerLens HookedTransformer.
    """
    import warnings

    built: dict[tuple[Any, ...], Any] = {}

    def make(
        ckpt: Checkpoint,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor: bool = False,
    ) -> Any:
        key = (
            ckpt.family,
            fold_ln,
            center_writing_weights,
            center_unembed,
            fold_value_biases,
            refactor,
        )
        if key not in built and TL4:
            flags = dict(zip(_TL_FLAGS, key[1:], strict=True))
            built[key] = bridge(ckpt.hf_model, **flags)
        if key not in built:
            import torch
            from transformer_lens import HookedTransformer
            from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
            from transformer_lens.pretrained.weight_conversions.neo import convert_neo_weights

            cfg = tl_config(ckpt)
            convert = convert_gpt2_weights if ckpt.family == "gpt2" else convert_neo_weights
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state_dict = {k: v.clone() for k, v in convert(ckpt.hf_model, cfg).items()}
                model = HookedTransformer(cfg)
                model.load_and_process_state_dict(
                    state_dict,
                    fold_ln=fold_ln,
                    center_writing_weights=center_writing_weights,
                    center_unembed=center_unembed,
                    fold_value_biases=fold_value_biases,
                    refactor_factored_attn_matrices=refactor,
                )
            built[key] = model.eval()
        return built[key]

    return make


def tl_rotary_config(ckpt: Checkpoint) -> Any:
    """A HookedTransformerConfig mirroring what TransformerLens 3.9 derives (its
    ``loading_from_pretrained``) for a GPT-NeoX, Llama, Mistral, Qwen2, Gemma or Gemma-2
    checkpoint.

    TransformerLens ignores Qwen2's sliding windows and runs Gemma's MLP with the exact GELU
    (HF: the tanh one), so its logits differ from HF's there.
    """
    from transformer_lens import HookedTransformerConfig

    c = ckpt.hf_model.config
    rope = c.rope_parameters
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d = dict(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size,
        act_fn=getattr(c, "hidden_activation", None) or c.hidden_act,
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_base=rope["rope_theta"],
        rotary_dim=int(d_head * rope.get("partial_rotary_factor", 1.0)),
        original_architecture=type(ckpt.hf_model).__name__,
    )
    if ckpt.family == "gpt_neox":
        d.update(eps=c.layer_norm_eps, normalization_type="LN")
        d.update(parallel_attn_mlp=c.use_parallel_residual)
    else:
        d.update(eps=c.rms_norm_eps, normalization_type="RMS", gated_mlp=True, final_rms=True)
        d.update(n_key_value_heads=c.num_key_value_heads)
    if rope.get("rope_type") == "llama3":
        d.update(
            use_NTK_by_parts_rope=True,
            NTK_original_ctx_len=rope["original_max_position_embeddings"],
            NTK_by_parts_low_freq_factor=rope["low_freq_factor"],
            NTK_by_parts_high_freq_factor=rope["high_freq_factor"],
            NTK_by_parts_factor=rope["factor"],
        )
    if ckpt.family == "mistral" and c.sliding_window:
        d.update(use_local_attn=True, window_size=c.sliding_window)
        d.update(attn_types=["local"] * c.num_hidden_layers)
    if ckpt.family == "gemma":
        d.update(act_fn="gelu")  # TransformerLens's Gemma table
    if ckpt.family == "gemma2":
        d.update(_tl_gemma2(c))
    return HookedTransformerConfig(**d, device="cpu", default_prepend_bos=False)


def _tl_gemma2(c: Any) -> dict[str, Any]:
    """TransformerLens's Gemma-2 options (its ``attn_scale``: sqrt(query_pre_attn_scalar))."""
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    return dict(
        use_normalization_before_and_after=True,
        attn_scale=c.query_pre_attn_scalar**0.5,
        attn_scores_soft_cap=c.attn_logit_softcapping,
        output_logits_soft_cap=c.final_logit_softcapping,
        use_local_attn=True,
        window_size=c.sliding_window,
        attn_types=[kinds[t] for t in c.layer_types],
    )


def _tl_state_dict(ckpt: Checkpoint, cfg: Any) -> dict[str, Any]:
    """TransformerLens's ``convert_*_weights`` of a rotary checkpoint's HF model (torch)."""
    import warnings

    import torch
    from transformer_lens.pretrained.weight_conversions import gemma, llama, mistral, neox, qwen2

    convert = {
        "gemma": gemma.convert_gemma_weights,
        "gemma2": gemma.convert_gemma_weights,
        "gpt_neox": neox.convert_neox_weights,
        "llama": llama.convert_llama_weights,
        "mistral": mistral.convert_mistral_weights,
        "qwen2": qwen2.convert_qwen2_weights,
    }[ckpt.family]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: v.clone() for k, v in convert(ckpt.hf_model, cfg).items()}


def tl_rotary_model(ckpt: Checkpoint, **flags: bool) -> Any:
    """TransformerLens's HookedTransformer of a rotary checkpoint, processed with ``flags``
    (``load_and_process_state_dict``'s).
    """
    if TL4:
        return bridge(ckpt.hf_model, **flags)
    import warnings

    import torch
    from transformer_lens import HookedTransformer

    cfg = tl_rotary_config(ckpt)
    state_dict = _tl_state_dict(ckpt, cfg)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
        model.load_and_process_state_dict(state_dict, **flags)
    return model.eval()


def tl_converted(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """TransformerLens's unprocessed weights of ``ckpt`` in lowrank's flat layout.

    3.9: its ``convert_*_weights`` of the HF model; 4.x: a bridge without processing.
    """
    if TL4:
        return tl_tree(bridge(ckpt.hf_model))
    import warnings

    import torch
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformer_lens.pretrained.weight_conversions.neo import convert_neo_weights

    if ckpt.family in ("gpt2", "gpt_neo"):
        cfg = tl_config(ckpt)
        convert = convert_gpt2_weights if ckpt.family == "gpt2" else convert_neo_weights
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = {k: v.clone() for k, v in convert(ckpt.hf_model, cfg).items()}
    else:
        cfg = tl_rotary_config(ckpt)
        state = _tl_state_dict(ckpt, cfg)
    model = types.SimpleNamespace(state_dict=lambda: state, cfg=cfg)
    return tl_tree(model)


def assert_matches_tl_conversion(ckpt: Checkpoint, ours: dict[str, Any]) -> None:
    """``ours`` (a flat unprocessed tree) is TransformerLens's conversion of ``ckpt`` exactly."""
    ref = tl_converted(ckpt)
    assert set(ref) == set(ours)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, ref[key], err_msg=key)


def assert_default_processing(ckpt: Checkpoint, tokens: np.ndarray, **steps: bool) -> Any:
    """``load_pretrained``'s default steps for ``ckpt`` are ``steps`` (TransformerLens's), and the
    model they give folds its norms, its value biases, and keeps HF's log-probabilities (1e-4).
    """
    from lowrank.models import config_from_hf, load_pretrained, processing_steps

    expected = dict(refactor_factored_attn_matrices=False, **steps)
    assert processing_steps(config_from_hf(ckpt.path)) == expected
    model = load_pretrained(ckpt.path)
    assert model.ln_folded and not model.params["blocks"]["attn"]["b_V"].any()
    ours, ref = log_softmax(model(tokens)), log_softmax(hf_logits(ckpt, tokens))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    return model


def canonical_shapes(
    n_layers: int,
    n_heads: int,
    d_model: int,
    d_head: int,
    d_mlp: int,
    d_vocab: int,
    n_ctx: int,
) -> dict[str, tuple[int, ...]]:
    """The documented tree layout, written out independently of lowrank's code."""
    L, H, d, dh, m, V = n_layers, n_heads, d_model, d_head, d_mlp, d_vocab
    return {
        "embed.W_E": (V, d),
        "pos_embed.W_pos": (n_ctx, d),
        "blocks.ln1.w": (L, d),
        "blocks.ln1.b": (L, d),
        "blocks.attn.W_Q": (L, H, d, dh),
        "blocks.attn.W_K": (L, H, d, dh),
        "blocks.attn.W_V": (L, H, d, dh),
        "blocks.attn.W_O": (L, H, dh, d),
        "blocks.attn.b_Q": (L, H, dh),
        "blocks.attn.b_K": (L, H, dh),
        "blocks.attn.b_V": (L, H, dh),
        "blocks.attn.b_O": (L, d),
        "blocks.ln2.w": (L, d),
        "blocks.ln2.b": (L, d),
        "blocks.mlp.W_in": (L, d, m),
        "blocks.mlp.b_in": (L, m),
        "blocks.mlp.W_out": (L, m, d),
        "blocks.mlp.b_out": (L, d),
        "ln_final.w": (d,),
        "ln_final.b": (d,),
        "unembed.W_U": (d, V),
        "unembed.b_U": (V,),
    }


def tl_stacked(tl_model: Any) -> dict[str, np.ndarray]:
    """A TransformerLens model's weights in lowrank's flat layout (layers stacked)."""
    return tl_tree(tl_model)


# Published hyper-parameters (config.json on the hub), as HF writes them.
GPT2_FAMILY = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
}
GPT_NEO_FAMILY = {
    "gpt-neo-125M": dict(num_layers=12, num_heads=12, hidden_size=768),
    "gpt-neo-1.3B": dict(num_layers=24, num_heads=16, hidden_size=2048),
    "gpt-neo-2.7B": dict(num_layers=32, num_heads=20, hidden_size=2560),
}


_QWEN2_5 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
_PYTHIA = {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}

#: Published config.json dicts of rotary models (written from the hub files), by name.
ROTARY_FAMILY: dict[str, dict[str, Any]] = {
    **LLAMA_3_1,
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32000,
    },
    "Qwen2.5-0.5B": {
        **_QWEN2_5,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
    },
    "Qwen2.5-7B": {
        **_QWEN2_5,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
    },
    "Qwen2.5-72B": {
        **_QWEN2_5,
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "max_window_layers": 80,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
    },
    "pythia-70m": {
        **_PYTHIA,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_attention_heads": 8,
        "num_hidden_layers": 6,
    },
    "pythia-1.4b": {
        **_PYTHIA,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
    },
    "pythia-12b": {
        **_PYTHIA,
        "hidden_size": 5120,
        "intermediate_size": 20480,
        "num_attention_heads": 40,
        "num_hidden_layers": 36,
        "vocab_size": 50688,
    },
}


def published_config(name: str) -> dict:
    """The config.json dict of a published model (GPT-2, GPT-Neo, :data:`ROTARY_FAMILY`)."""
    if name in ROTARY_FAMILY:
        return dict(ROTARY_FAMILY[name])
    if name in GPT2_FAMILY:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-05,
            "n_ctx": 1024,
            "n_positions": 1024,
            "vocab_size": 50257,
            **GPT2_FAMILY[name],
        }
    p = GPT_NEO_FAMILY[name]
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-05,
        "attention_types": [[["global", "local"], p["num_layers"] // 2]],
        "max_position_embeddings": 2048,
        "window_size": 256,
        "vocab_size": 50257,
        "intermediate_size": None,
        **p,
    }
