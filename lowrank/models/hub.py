"""Checkpoint names -> local directories: the embedded model, local folders, the hub cache.

:func:`resolve_checkpoint` decides whether a name is a local directory, the embedded model or
a Hugging Face hub id, fetches hub ids with ``huggingface_hub`` (from the cache when offline),
and says exactly what to do when it cannot.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowrank.models._common import CheckpointError
from lowrank.models.checkpoint import (
    CONFIG_FILE,
    PICKLE_INDEX,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    read_shard_index,
)
from lowrank.models.config import _got

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_MODELS",
    "available_locally",
    "embedded_model_path",
    "resolve_checkpoint",
]

#: Name of the default small model shipped in ``lowrank/data`` (a 2-layer GPT-2 with an
#: induction circuit, see ``lowrank/data/induction-2l/README.md``); ``load_pretrained()``
#: loads it.
EMBEDDED_MODEL = "induction-2l"

#: Names of all models shipped in ``lowrank/data``: :data:`EMBEDDED_MODEL` and
#: ``"induction-2l-rope"``, an attention-only Llama (RMSNorm, RoPE, grouped-query attention)
#: with an induction circuit (``lowrank/data/induction-2l-rope/README.md``).
EMBEDDED_MODELS: tuple[str, ...] = (EMBEDDED_MODEL, "induction-2l-rope")

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


def embedded_model_path(name: str | None = None) -> Path:
    """The directory of the embedded model ``name`` inside the package.

    Args:
        name: one of :data:`EMBEDDED_MODELS`; ``None`` for :data:`EMBEDDED_MODEL`.

    Raises:
        ValueError: ``name`` is not an embedded model's name.
        CheckpointError: the model's files are missing from this installation.
    """
    if name is None:
        name = EMBEDDED_MODEL
    elif name not in EMBEDDED_MODELS:
        raise ValueError(f"name must be one of the embedded models {EMBEDDED_MODELS}, got {name!r}")
    # Beside this module's package, not importlib.resources.files("lowrank"): a folder named
    # lowrank/ in the working directory can shadow the package's name (python -m lowrank run
    # from a clone's parent) but not this file's location.
    path = Path(__file__).resolve().parents[1] / "data" / name
    if not (path / CONFIG_FILE).is_file():
        model = "" if name == EMBEDDED_MODEL else f"--model {name} "
        raise CheckpointError(
            f"the embedded model {name!r} is missing from this installation "
            f"(expected {str(path)!r}); reinstall lowrank, or rebuild it with "
            f"'python -m lowrank.data.train_embedded {model}--out {str(path)!r}'"
        )
    return path


def available_locally(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> bool:
    """Whether ``load_pretrained(name_or_path)`` can find its files without the network.

    True for a local directory holding ``config.json``, for :data:`EMBEDDED_MODELS`, and for a
    hub id whose config and safetensors weights (``model.safetensors``, or a shard index and
    every shard it names) are in the Hugging Face cache. Never
    downloads anything: notebooks use it to pick a real model when one is present.
    """
    _check_revision(revision)
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if (path / CONFIG_FILE).is_file():
        return True
    if path.is_dir() and _looks_like_path(name):
        return False
    if name in EMBEDDED_MODELS:
        try:
            embedded_model_path(name)
        except CheckpointError:
            return False
        return True
    if _looks_like_path(name):
        return False
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    cache = os.fspath(cache_dir) if cache_dir is not None else _hub_cache_dir()

    def cached(filename: str) -> str | None:
        try:
            found = try_to_load_from_cache(name, filename, cache_dir=cache, revision=revision)
        except HFValidationError:
            return None
        return found if isinstance(found, str) else None

    if cached(CONFIG_FILE) is None:
        return False
    if cached(SAFETENSORS_FILE) is not None:
        return True
    index = cached(SAFETENSORS_INDEX)
    return index is not None and _shards_cached(Path(index), cached)


def _shards_cached(index: Path, cached: Callable[[str], str | None]) -> bool:
    """Whether every shard a cached ``model.safetensors.index.json`` names is cached too.

    A name that is not a plain relative path inside the repository counts as missing.
    """
    try:
        names = set(read_shard_index(index).values())
    except CheckpointError:
        return False
    return all(
        not Path(n).is_absolute() and ".." not in Path(n).parts and cached(n) is not None
        for n in names
    )


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
    pickle weights too when ``allow_pickle``), from the cache when offline. The names of
    :data:`EMBEDDED_MODELS` (``"induction-2l"``, ``"induction-2l-rope"``) mean the models
    shipped with the package. A local directory wins over a hub id or an embedded model of
    the same name only when it holds a ``config.json`` (so a report folder named ``gpt2``
    never hides the model ``gpt2``); names that look like paths (``./gpt2``, ``/data/gpt2``)
    are always local.

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
    if name in EMBEDDED_MODELS:
        return embedded_model_path(name)
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
