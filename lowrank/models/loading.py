"""load_pretrained: a local directory or hub id -> :class:`TransformerModel`.

The steps are separate public functions, so each can be replaced (a later sharded loader
places tensors straight from the memory-mapped files):

1. :func:`resolve_checkpoint` -- local directory, or a snapshot from the Hugging Face hub.
2. :func:`open_state_dict` -- a lazy mapping over ``model.safetensors`` (or its shards),
   read through memory mapping one tensor at a time.
3. :func:`convert_state_dict` -- HF tensors -> canonical NumPy tree (per family).
4. :func:`~lowrank.models.processing.process_params` -- fold/centre, on the host.
5. :func:`place_params` -- cast and put each leaf on a device (a ``place`` hook per leaf).

Host memory stays under twice the weights: converting holds the tree plus one tensor
(the file is memory-mapped, never read whole), each processing step adds only the leaves
it replaces (about 1.6x in all for GPT-2 shapes), and placing releases each host leaf once
it is on the device.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank.models._common import CheckpointError, Params
from lowrank.models.config import ModelConfig, _got, config_from_hf
from lowrank.models.gpt2 import convert_gpt2_state_dict
from lowrank.models.gpt_neo import convert_gpt_neo_state_dict
from lowrank.models.model import TransformerModel
from lowrank.models.processing import process_params

__all__ = [
    "EMBEDDED_MODEL",
    "available_locally",
    "CheckpointError",
    "StateDict",
    "convert_state_dict",
    "embedded_model_path",
    "load_pretrained",
    "load_tokenizer",
    "open_state_dict",
    "place_params",
    "read_config",
    "resolve_checkpoint",
]

#: Name of the small model shipped in ``lowrank/data`` (a 2-layer GPT-2 with an induction
#: circuit, see ``lowrank/data/induction-2l/README.md``); ``load_pretrained()`` loads it.
EMBEDDED_MODEL = "induction-2l"

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)

# Dtypes NumPy has no name for: safetensors' NumPy reader cannot return them, so they are
# read straight from a memory map with ml_dtypes' types (which jax.numpy re-exports).
_MEMMAP_DTYPES: dict[str, Any] = {
    "BF16": jnp.bfloat16,
    "F8_E4M3": jnp.float8_e4m3fn,
    "F8_E5M2": jnp.float8_e5m2,
}

#: ``place`` hook: (dotted leaf path, host array) -> placed array.
PlaceFn = Callable[[str, np.ndarray], Any]


# ----------------------------------------------------------------------- readers
class _SafetensorsFile:
    """One memory-mapped safetensors file."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self._header: dict[str, Any] | None = None
        try:
            self._handle: Any = safe_open(str(path), framework="numpy")
            self.keys = list(self._handle.keys())
        except Exception as err:
            raise CheckpointError(
                f"could not read safetensors file {str(path)!r}: {err}. The file is corrupt "
                "or truncated; delete it and download or save it again"
            ) from err

    def get(self, key: str) -> np.ndarray:
        try:
            dtype = self._handle.get_slice(key).get_dtype()
            if dtype in _MEMMAP_DTYPES:
                return self._memmap(key, _MEMMAP_DTYPES[dtype])
            return np.asarray(self._handle.get_tensor(key))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"could not read tensor {key!r} from safetensors file {str(self.path)!r}: {err}"
            ) from err

    def _memmap(self, key: str, dtype: Any) -> np.ndarray:
        if self._header is None:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._header = json.loads(f.read(n))
            self._data_start = 8 + n
        info = self._header[key]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise CheckpointError(
                f"safetensors file {str(self.path)!r}: tensor {key!r} has inconsistent offsets"
            )
        return np.memmap(
            self.path, dtype=dtype, mode="r", offset=self._data_start + start, shape=shape
        )

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)


class _TorchFile:
    """One ``pytorch_model.bin`` shard, unpickled with ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path) -> None:
        import torch

        self.path = path
        try:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"could not read PyTorch file {str(path)!r}: {err}") from err
        if not isinstance(sd, Mapping):
            raise CheckpointError(
                f"PyTorch file {str(path)!r} holds a {type(sd).__name__}, not a state dict"
            )
        self._sd: Any = sd
        self.keys = list(sd.keys())

    def get(self, key: str) -> np.ndarray:
        import torch

        t = self._sd[key]
        if t.dtype == torch.bfloat16:
            t = t.float()
        return np.asarray(t.detach().numpy())

    def close(self) -> None:
        self._sd = {}


class StateDict(Mapping[str, np.ndarray]):
    """Read-only mapping from HF keys to NumPy arrays, each read on access.

    Use as a context manager (or call :meth:`close`) to release the file handles.
    """

    def __init__(self, files: list[Any], key_to_file: dict[str, Any]) -> None:
        self._files = files
        self._key_to_file = key_to_file

    def __getitem__(self, key: str) -> np.ndarray:
        return self._key_to_file[key].get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_to_file)

    def __len__(self) -> int:
        return len(self._key_to_file)

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> StateDict:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name -> shard file name."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(
            f"could not read shard index {str(path)!r}: {type(err).__name__}: {err}"
        ) from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _malformed_index(path, "no weight_map object")
    for k, v in weight_map.items():
        if not (k and isinstance(v, str) and v):
            raise _malformed_index(path, f"entry {k!r}: {v!r}")
    return weight_map


def _malformed_index(path: Path, found: str) -> CheckpointError:
    return CheckpointError(
        f'malformed shard index {str(path)!r}: expected a non-empty "weight_map" object '
        f"mapping tensor names to shard file names (non-empty strings); found {found}"
    )


def _allowed_roots(directory: Path) -> list[Path]:
    """Where the files a shard index names may lie (after resolving symlinks).

    The checkpoint directory; for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<commit>``), whose files are symlinks into
    ``models--org--name/blobs``, that repository's blobs too.
    """
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    return roots


def _shard_path(directory: Path, roots: list[Path], index: Path, name: str) -> Path:
    """``directory / name``, if it resolves into ``roots`` (never says what is outside)."""
    path = directory / name
    try:
        target = path.resolve()
        inside = any(target.is_relative_to(root) for root in roots)
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise CheckpointError(
            f"shard index {str(index)!r} names {name!r}, which is not a file inside the "
            f"checkpoint directory {str(directory)!r}; shards must be named relative to it"
        )
    return path


def _open_files(paths: list[Path], opener: Callable[[Path], Any]) -> list[Any]:
    files = []
    try:
        for path in paths:
            if not path.is_file():
                raise CheckpointError(f"missing checkpoint file {str(path)!r}")
            files.append(opener(path))
    except BaseException:
        for f in files:
            f.close()
        raise
    return files


def _sharded(directory: Path, index_name: str, opener: Callable[[Path], Any]) -> StateDict:
    index = directory / index_name
    weight_map = _read_index(index)
    names = sorted(set(weight_map.values()))
    roots = _allowed_roots(directory)
    files = _open_files([_shard_path(directory, roots, index, n) for n in names], opener)
    by_name = dict(zip(names, files, strict=True))
    key_to_file = {}
    for key, name in weight_map.items():
        f = by_name[name]
        if key not in f.keys:
            for g in files:
                g.close()
            raise CheckpointError(
                f"shard index {str(index)!r} lists tensor {key!r} in "
                f"{name!r}, but that file does not hold it"
            )
        key_to_file[key] = f
    return StateDict(files, key_to_file)


def _single(path: Path, opener: Callable[[Path], Any]) -> StateDict:
    f = opener(path)
    return StateDict([f], {k: f for k in f.keys})


def open_state_dict(directory: str | os.PathLike[str], *, allow_pickle: bool = False) -> StateDict:
    """A lazy state dict over the weights in ``directory``.

    Reads ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``
    (memory-mapped). ``pytorch_model.bin`` (or its index) is used only when there are no
    safetensors and ``allow_pickle=True``; it is read with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: no weights, pickle weights without ``allow_pickle``, a missing
            shard, or a corrupt file.
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"open_state_dict: {str(d)!r} is not a directory")
    if (d / SAFETENSORS_INDEX).is_file():
        return _sharded(d, SAFETENSORS_INDEX, _SafetensorsFile)
    if (d / SAFETENSORS_FILE).is_file():
        return _single(d / SAFETENSORS_FILE, _SafetensorsFile)
    pickled = [n for n in (PICKLE_INDEX, PICKLE_FILE) if (d / n).is_file()]
    if pickled and not allow_pickle:
        raise CheckpointError(
            f"{str(d)!r} has only PyTorch pickle weights ({pickled[0]}), no model.safetensors. "
            "Unpickling can run arbitrary code, so it is off by default: if you trust the "
            "files, pass allow_pickle=True (command line: --allow-pickle; they are then read "
            "with torch.load(weights_only=True)), or convert them to safetensors"
        )
    if PICKLE_INDEX in pickled:
        return _sharded(d, PICKLE_INDEX, _TorchFile)
    if PICKLE_FILE in pickled:
        return _single(d / PICKLE_FILE, _TorchFile)
    found = sorted(p.name for p in d.iterdir())
    raise CheckpointError(
        f"no weights in {str(d)!r}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} "
        f"(or {PICKLE_FILE} with allow_pickle=True, command line --allow-pickle); "
        f"the directory holds {found}"
    )


# ----------------------------------------------------------------------- hub
_BAD_REVISION_CHARS = frozenset("\\~^:?*[")


def _check_revision(revision: Any) -> None:
    """``revision`` is ``None`` or a branch, tag or commit name safe to use as a cache path.

    Git's ref-name rules, so that it can never leave the hub cache: no ``..``, no
    component starting with ``.``, no leading, trailing or doubled ``/``, no whitespace,
    control characters, backslashes or ``~^:?*[``. ``refs/pr/1`` is allowed.
    """
    if revision is None:
        return
    ok = (
        isinstance(revision, str)
        and 0 < len(revision) <= 255
        and ".." not in revision
        and not any(
            c.isspace() or not c.isprintable() or c in _BAD_REVISION_CHARS for c in revision
        )
        and all(part and not part.startswith(".") for part in revision.split("/"))
    )
    if not ok:
        raise ValueError(
            "revision must be a branch or tag name (such as 'main', 'v1.0' or 'refs/pr/1') "
            f"or a commit hash, got {_got(revision)}"
        )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")
        or name in (".", "..")
    )


def _hub_offline() -> bool:
    import huggingface_hub.constants as hc

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in ("1", "ON", "YES", "TRUE") or bool(hc.HF_HUB_OFFLINE)


def _hub_cache_dir() -> str:
    """The hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    import huggingface_hub.constants as hc

    return str(hc.HF_HUB_CACHE)


def _hub_patterns(allow_pickle: bool) -> list[str]:
    patterns = [CONFIG_FILE, "model*.safetensors", SAFETENSORS_INDEX, *TOKENIZER_FILES]
    if allow_pickle:
        patterns += ["pytorch_model*.bin", PICKLE_INDEX]
    return patterns


def _download(name: str, revision: str | None, cache_dir: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    offline = _hub_offline()
    cache = cache_dir or _hub_cache_dir()
    local = "a local directory holding config.json and model.safetensors"
    try:
        path = snapshot_download(
            repo_id=name,
            revision=revision,
            cache_dir=cache,
            allow_patterns=_hub_patterns(allow_pickle),
            local_files_only=offline,
        )
    except HFValidationError as err:
        raise CheckpointError(
            f"{name!r} is neither an existing local directory nor a valid Hugging Face hub id "
            f"('name' or 'org/name'); pass the path of {local}"
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(
            f"{name!r} is not a local directory and the Hugging Face hub has no repository "
            f"of that name (or it is private: log in with `hf auth login`); pass the path "
            f"of {local}"
        ) from err
    except Exception as err:
        if offline:
            raise CheckpointError(
                f"{name!r} is not a local directory, and it is not in the Hugging Face cache "
                f"({cache}) while the hub is offline (HF_HUB_OFFLINE is set). To fix: "
                f"download it once with network access and HF_HUB_OFFLINE unset, e.g. "
                f"`hf download {name} config.json model.safetensors` or by calling "
                f"load_pretrained({name!r}) online; or pass the path of {local}"
            ) from err
        raise CheckpointError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). {name!r} is not a local directory either. To fix: check the network "
            f"connection and retry, or pass the path of {local}"
        ) from err
    return Path(path)


def embedded_model_path() -> Path:
    """The directory of the embedded model :data:`EMBEDDED_MODEL` inside the package."""
    from importlib.resources import files

    path = Path(str(files("lowrank") / "data" / EMBEDDED_MODEL))
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"the embedded model {EMBEDDED_MODEL!r} is missing from this installation "
            f"(expected {str(path)!r}); reinstall lowrank, or rebuild it with "
            f"'python -m lowrank.data.train_embedded --out {str(path)!r}'"
        )
    return path


def available_locally(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> bool:
    """Whether ``load_pretrained(name_or_path)`` can find its files without the network.

    True for a local directory holding ``config.json``, for :data:`EMBEDDED_MODEL`, and for a
    hub id whose config and safetensors weights are in the Hugging Face cache. Never
    downloads anything: notebooks use it to pick a real model when one is present.
    """
    _check_revision(revision)
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if (path / CONFIG_FILE).is_file():
        return True
    if path.is_dir() and _looks_like_path(name):
        return False
    if name == EMBEDDED_MODEL:
        try:
            embedded_model_path()
        except CheckpointError:
            return False
        return True
    if _looks_like_path(name):
        return False
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    cache = os.fspath(cache_dir) if cache_dir is not None else _hub_cache_dir()

    def cached(filename: str) -> bool:
        try:
            found = try_to_load_from_cache(name, filename, cache_dir=cache, revision=revision)
        except HFValidationError:
            return False
        return isinstance(found, str)

    return cached(CONFIG_FILE) and (cached(SAFETENSORS_FILE) or cached(SAFETENSORS_INDEX))


def resolve_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """The local directory of a checkpoint: ``name_or_path`` itself, or a hub snapshot.

    A hub id (``"gpt2"``, ``"EleutherAI/gpt-neo-125M"``) is fetched with
    ``huggingface_hub.snapshot_download`` (config, safetensors and tokenizer files only;
    pickle weights too when ``allow_pickle``), from the cache when offline. The name
    :data:`EMBEDDED_MODEL` (``"induction-2l"``) means the model shipped with the package.
    A local directory wins over a hub id or the embedded model of the same name only when it
    holds a ``config.json`` (so a report folder named ``gpt2`` never hides the model ``gpt2``);
    names that look like paths (``./gpt2``, ``/data/gpt2``) are always local.

    Raises:
        CheckpointError: not a directory and not fetchable (the message says what to do).
        ValueError: ``revision`` is not a branch, tag or commit name.
    """
    _check_revision(revision)
    name = os.fspath(name_or_path)
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"expected a directory or hub id, got {name_or_path!r}")
    path = Path(name).expanduser()
    bare_name = not _looks_like_path(name)
    if path.is_dir() and not (bare_name and not (path / CONFIG_FILE).is_file()):
        return path
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"{name!r} is a file; pass the directory that holds config.json and model.safetensors"
        )
    if not bare_name:
        raise CheckpointError(f"no such directory: {name!r}")
    if name == EMBEDDED_MODEL:
        return embedded_model_path()
    try:
        return _download(
            name, revision, None if cache_dir is None else os.fspath(cache_dir), allow_pickle
        )
    except CheckpointError as err:
        if not path.is_dir():
            raise
        raise CheckpointError(
            f"the local folder {name!r} holds no config.json, so it was taken as a hub id: {err}"
        ) from err


# ----------------------------------------------------------------------- steps
def read_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The :class:`ModelConfig` of the checkpoint in ``directory`` (its ``config.json``)."""
    path = Path(directory).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"missing file {str(path)!r}: a checkpoint needs its config.json")
    try:
        return config_from_hf(path)
    except ValueError as err:
        where = "" if str(path) in str(err) else f" (in {str(path)!r})"
        raise CheckpointError(f"{err}{where}") from err


def convert_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """HF state dict -> canonical tree, with the converter of ``config.family``."""
    if config.family == "gpt2":
        return convert_gpt2_state_dict(state_dict, config, dtype=dtype)
    return convert_gpt_neo_state_dict(state_dict, config, dtype=dtype)


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def place_params(params: Params, *, dtype: Any = None, place: PlaceFn | None = None) -> Params:
    """Cast each leaf to ``dtype`` on the host and hand it to ``place`` (a device put).

    Args:
        params: a tree of NumPy arrays.
        dtype: target dtype (``None`` keeps each leaf's dtype).
        place: ``place(path, array) -> jax.Array`` with ``path`` like ``"blocks.attn.W_Q"``;
            default ``jax.device_put`` onto the default device. Use it to shard.
    """
    put: PlaceFn = place if place is not None else (lambda _path, x: jax.device_put(x))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    del params  # when the caller holds no other reference, host leaves go as they are placed
    paths = [path for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    del flat
    placed = []
    for i, path in enumerate(paths):
        x, leaves[i] = leaves[i], None
        if dtype is not None and x.dtype != dtype:
            x = x.astype(dtype)
        placed.append(put(_dotted(path), x))
        del x
    return jax.tree_util.tree_unflatten(treedef, placed)


def load_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained(directory)`` if tokenizer files exist, else ``None``.

    Never raises: a tokenizer that fails to load gives a warning and ``None``.
    """
    d = Path(directory).expanduser()
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d))
    except Exception as err:
        warnings.warn(
            f"could not load the tokenizer in {str(d)!r} ({type(err).__name__}: {err}); "
            "the model is loaded without one",
            stacklevel=2,
        )
        return None


def _check_dtype(dtype: Any) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"load_pretrained: dtype must be a float dtype, got {dtype!r}") from None
    if dt not in (np.dtype(jnp.bfloat16), np.float16, np.float32, np.float64):
        raise TypeError(
            f"load_pretrained: dtype must be bfloat16, float16, float32 or float64, got {dt}"
        )
    if dt == np.float64 and jax.dtypes.canonicalize_dtype(np.float64) != np.float64:
        raise ValueError(
            "load_pretrained: dtype float64 needs jax_enable_x64 "
            "(jax.config.update('jax_enable_x64', True))"
        )
    return dt


def load_pretrained(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
    dtype: Any = jnp.float32,
    allow_pickle: bool = False,
    place: PlaceFn | None = None,
    tokenizer: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TransformerModel:
    """Load a GPT-2 or GPT-Neo checkpoint as a :class:`TransformerModel`.

    Args:
        name_or_path: a local directory (``config.json`` + ``model.safetensors`` or a
            sharded ``model.safetensors.index.json``) or a Hugging Face hub id. ``None``
            (or :data:`EMBEDDED_MODEL`, ``"induction-2l"``) loads the small model shipped
            with the package, offline.
        fold_ln, center_writing_weights, center_unembed, fold_value_biases,
            refactor_factored_attn_matrices: TransformerLens's processing steps (see
            :mod:`lowrank.models.processing`); processing runs in float32 (float64 for
            ``dtype=float64``) before the cast to ``dtype``.
        dtype: parameter dtype on the device.
        allow_pickle: allow ``pytorch_model.bin`` when no safetensors exist (read with
            ``torch.load(weights_only=True)``).
        place: per-leaf device placement hook, see :func:`place_params`.
        tokenizer: load the tokenizer when its files are present (``False`` skips it).
        revision, cache_dir: for hub ids.

    Raises:
        CheckpointError: missing/corrupt files, a bad config.json, bad keys, shapes or
            dtypes, shards outside the checkpoint, unreachable hub ids.
        ValueError: unsupported architecture; a ``revision`` that is not a branch, tag or
            commit name.
    """
    dt = _check_dtype(dtype)
    directory = resolve_checkpoint(
        EMBEDDED_MODEL if name_or_path is None else name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        allow_pickle=allow_pickle,
    )
    config = read_config(directory)
    compute = np.float64 if dt == np.float64 else np.float32
    # One expression, so no local name keeps the unprocessed tree alive while processing
    # (each step frees the leaves it replaced) or the host tree while placing.
    with open_state_dict(directory, allow_pickle=allow_pickle) as state_dict:
        params = place_params(
            process_params(
                convert_state_dict(state_dict, config, dtype=compute),
                fold_ln=fold_ln,
                center_writing_weights=center_writing_weights,
                center_unembed=center_unembed,
                fold_value_biases=fold_value_biases,
                refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            ),
            dtype=dt,
            place=place,
        )
    tok = load_tokenizer(directory) if tokenizer else None
    return TransformerModel(params=params, config=config, tokenizer=tok)
