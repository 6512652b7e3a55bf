"""The one C++ extension that holds every CPU kernel (cpu_ops.cpp, cpu_avx2.cpp, cpu_avx512.cpp), built on first use.

torch.utils.cpp_extension.load compiles it once (~10 s; it needs a C++ compiler and ninja, `pip install ninja`) and
caches it under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), so later processes only load it. Each
function carries its own instruction-set target and checks the CPU before it runs, so no global -m flag is needed
and one build serves every x86-64 CPU. Where it cannot be built, `cpu_extension()` returns None and warns once,
saying why; the callers then use torch's own operations.
"""

import logging
import platform
import sys
import warnings
from pathlib import Path

import torch

log = logging.getLogger("qwen2audio")

SOURCES = ("cpu_ops.cpp", "cpu_avx2.cpp", "cpu_avx512.cpp")
_FLAGS = ["-O3", "-fopenmp"]  # -fopenmp: at::parallel_for runs on torch's OpenMP threads
_built: object | str | None = None  # torch.ops.qwen2audio_cpu, or why there is none


def unavailable_reason() -> str | None:
    """Why the extension cannot be used on this machine at all (not x86-64), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"its kernels are for x86-64 CPUs and this one is {platform.machine() or 'unknown'}"
    return None


def cpu_extension(verbose: bool = False) -> object | None:
    """The compiled operators (torch.ops.qwen2audio_cpu), or None (with one warning per process) where they cannot
    be built or used."""
    global _built
    if _built is None:
        _built = unavailable_reason() or _build(verbose)
        if isinstance(_built, str):
            warnings.warn(f"qwen2audio's CPU kernels are off, torch's own operations run instead: {_built}",
                          stacklevel=2)
    return None if isinstance(_built, str) else _built


def _build(verbose: bool) -> object | str:
    try:
        from torch.utils.cpp_extension import load

        if verbose and sys.stderr.isatty():  # a notice, as the progress bar: the first build takes a while
            print("loading qwen2audio's CPU kernels (the first use builds them: ~10 s, once) ...", file=sys.stderr,
                  flush=True)
        folder = Path(__file__).parent
        load("qwen2audio_cpu_kernels", [str(folder / s) for s in SOURCES], extra_cflags=_FLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)  # registers torch.ops.qwen2audio_cpu
        return torch.ops.qwen2audio_cpu
    except Exception as e:  # no compiler, no ninja, no headers: fall back, saying why
        last = (str(e).strip().splitlines() or [""])[-1]
        return (f"the extension could not be built ({type(e).__name__}: {last}); it needs a C++ compiler and ninja "
                "(pip install ninja)")
