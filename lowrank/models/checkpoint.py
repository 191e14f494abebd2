"""Checkpoint files: safetensors and (opt-in) pickle readers, shard indexes, a lazy state dict.

:func:`open_state_dict` maps a checkpoint directory's HF keys to NumPy arrays, each read on
access through memory mapping; a shard index may only name files inside the directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowrank.models._common import CheckpointError

__all__ = [
    "CONFIG_FILE",
    "PICKLE_FILE",
    "PICKLE_INDEX",
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX",
    "TOKENIZER_FILES",
    "StateDict",
    "open_state_dict",
    "read_shard_index",
]

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


# safetensors dtype names NumPy knows (the rest read as ``np.void``: not a float).
_SAFETENSORS_DTYPES: dict[str, Any] = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


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

    def dtype(self, key: str) -> np.dtype[Any]:
        """The stored dtype of ``key``, read from the header (no tensor data)."""
        name = self._handle.get_slice(key).get_dtype()
        if name in _MEMMAP_DTYPES:
            return np.dtype(_MEMMAP_DTYPES[name])
        return np.dtype(_SAFETENSORS_DTYPES.get(name, np.void))

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

    def dtype(self, key: str) -> np.dtype[Any]:
        """The dtype :meth:`get` returns for ``key`` (bfloat16 is read as float32)."""
        import torch

        t = self._sd[key]
        if t.dtype == torch.bfloat16:
            return np.dtype(np.float32)
        return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)

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

    def dtype(self, key: str) -> np.dtype[Any]:
        """The dtype ``self[key]`` has, from the file's header where it has one."""
        return self._key_to_file[key].dtype(key)

    @property
    def files(self) -> list[Path]:
        """Paths of the checkpoint files the mapping reads from."""
        return [f.path for f in self._files]

    def close(self) -> None:
        """Close every open checkpoint file."""
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


def read_shard_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name -> shard file name (validated).

    Raises:
        CheckpointError: an unreadable file, or no non-empty ``weight_map`` of names.
    """
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
    weight_map = read_shard_index(index)
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
