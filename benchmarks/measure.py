"""Timing and memory measurement of one call, for JAX (compiled) and torch callables."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def _release_free_heap() -> None:
    """Collect garbage and return freed heap pages to the OS, so RSS growth means new memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Peak increase of this process's resident set while the block runs (sampled every ~1 ms).

    ``peak`` is ``None`` where ``/proc/self/statm`` does not exist (not Linux).
    """

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval = interval
        self.peak: int | None = None

    def __enter__(self) -> RssPeak:
        _release_free_heap()
        self._base = _rss()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._base is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss()
            if rss is not None and self._max is not None:
                self._max = max(self._max, rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._base is not None:
            end = _rss() or 0
            self.peak = max(self._max or 0, end) - self._base


def _summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def xla_memory(compiled: Any) -> dict[str, int] | None:
    """Bytes from the compiled executable's memory analysis (where the backend has one)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    out = {
        name: int(getattr(m, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "temp", "alias")
        if hasattr(m, f"{name}_size_in_bytes")
    }
    out["extra"] = out.get("temp", 0) + out.get("output", 0)  # allocated by one call
    out["total"] = out["extra"] + out.get("argument", 0)
    return out


def device_memory_stats() -> dict[str, int] | None:
    """``jax.devices()[0].memory_stats()`` (GPU/TPU; ``None`` on CPU)."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def time_jax(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> dict[str, Any]:
    """Compile ``jax.jit(fn)`` for ``args``, run once (memory), then ``repeats`` timed calls."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    on_cpu = jax.devices()[0].platform == "cpu"
    with RssPeak() as rss:
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    result = {**_summary(times), "compile_s": compile_s, "xla_memory": xla_memory(compiled)}
    result["rss_peak_bytes"] = rss.peak if on_cpu else None
    result["device_memory_stats"] = device_memory_stats()
    result["peak_bytes"] = (result["xla_memory"] or {}).get("extra")
    return {"result": result, "output": out}


def time_torch(
    fn: Callable[[], Any], repeats: int, device: str, give_up_after: float
) -> dict[str, Any]:
    """One warm-up call (memory), then ``repeats`` timed calls of a zero-argument torch callable.

    If the warm-up alone takes longer than ``give_up_after`` seconds, no more calls are made and
    the warm-up is the only sample (noted in ``note``).
    """
    import torch

    cuda = device.startswith("cuda")

    def call() -> Any:
        with torch.no_grad():
            out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with RssPeak() as rss:
        start = time.perf_counter()
        out = call()
        warmup_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else rss.peak
    note = None
    times = []
    if warmup_s > give_up_after:
        times = [warmup_s]
        note = f"TL: one call only (warm-up took {warmup_s:.0f} s > {give_up_after:.0f} s)"
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    result = {
        **_summary(times),
        "warmup_s": warmup_s,
        "peak_bytes": peak,
        "peak_source": "cuda max_memory_allocated" if cuda else "rss",
    }
    return {"result": result, "output": out, "note": note}


def torch_matmul_flops(device: str, n: int = 1024) -> float:
    """Measured float32 matmul throughput (FLOP/s) of torch on ``device``, for cost estimates."""
    import torch

    a = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def torch_fill_bandwidth(device: str, n: int = 1 << 26) -> float:
    """Bytes/s at which torch allocates and writes fresh memory (page faults included)."""
    import torch

    best = float("inf")
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        x = torch.ones(n, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        del x
    return 4 * n / best


def available_memory(device: str) -> int:
    """Free memory in bytes: host MemAvailable, or free CUDA memory."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 1 << 62
