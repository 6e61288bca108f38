"""Optional C++ codec kernels (``csrc/cpu/codec.cpp``), built on first use, torch otherwise.

Why a plain shared library through ctypes rather than a torch extension: it compiles in about a
second with any g++ (no torch headers, no ABI coupling to the installed torch), and ctypes drops
the GIL during calls. The kernels are bit-for-bit equal to the torch reference (tested), so the
choice changes speed only.

Build: ``$CXX`` or ``g++``/``c++`` with ``-O3 -march=native -ffp-contract=off``, into
``$KVLAYER_EXT_CACHE``, else ``$TORCH_EXTENSIONS_DIR/kvlayer``, else ``ext/`` in kvlayer's cache dir
(``~/.cache/kvlayer``; see ``kvlayer.assets``). The file name hashes the source, flags, compiler and CPU flags,
so a changed source or another CPU (``-march=native``) gets its own build; it is published with
an atomic rename, so concurrent first uses are safe. ``KVLAYER_NO_EXT=1`` forces the torch path;
no compiler, no sources (a non-editable install) or a failed build fall back to torch with the
reason in ``backend_info()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kvlayer import assets


def source_dir(kind: str) -> Path:
    """``csrc/<kind>`` (``cpu``, ``cuda``) of a source tree, else the copy a wheel ships as ``kvlayer/_csrc/<kind>``."""
    tree = Path(__file__).resolve().parents[2] / "csrc" / kind
    return tree if tree.is_dir() else Path(__file__).resolve().parents[1] / "_csrc" / kind


SOURCE = source_dir("cpu") / "codec.cpp"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-ffp-contract=off", "-fno-math-errno"]
ABI_VERSION = 2
_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

_override: list[str | None] = [None]


def cache_dir() -> Path:
    """Where compiled kernels go: ``$KVLAYER_EXT_CACHE``, else ``$TORCH_EXTENSIONS_DIR/kvlayer``,
    else ``ext/`` in kvlayer's cache dir (``kvlayer.assets.cache_dir``)."""
    if os.environ.get("KVLAYER_EXT_CACHE"):
        return Path(os.environ["KVLAYER_EXT_CACHE"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "kvlayer"
    return assets.cache_dir() / "ext"


def find_compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return shutil.which(cxx)
    return shutil.which("g++") or shutil.which("c++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_id(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return cxx


def cached_build(stem: str, key_parts: list[bytes], command: Callable[[str], list[str]], what: str,
                 force: bool = False) -> Path:
    """Compile once into the cache: ``<cache_dir>/<stem>_<digest of key_parts>.so``.

    ``command(tmp)`` is the compiler command writing ``tmp``; the result is published with an
    atomic rename, so concurrent first uses are safe and a changed source gets its own file.
    """
    digest = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    out = cache_dir() / f"{stem}_{digest}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run(command(tmp), capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {what} failed: {r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build(force: bool = False) -> Path:
    """Compile the kernels into the cache (or find the cached build); raise RuntimeError on failure."""
    if not SOURCE.exists():
        raise RuntimeError(f"kernel source {SOURCE} not found (non-editable install?)")
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    key = [SOURCE.read_bytes(), " ".join(FLAGS).encode(), _compiler_id(cxx).encode(), _cpu_flags().encode()]
    return cached_build("kvlayer_codec", key, lambda tmp: [cxx, *FLAGS, str(SOURCE), "-o", tmp], SOURCE.name, force)


def _bind(lib: ctypes.CDLL) -> None:
    p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.kvl_abi_version.restype = i
    lib.kvl_quantize.argtypes = [p, i, i, i, i, i, i, i, i, i, p, p, p, p, p]
    lib.kvl_quantize.restype = i
    lib.kvl_dequantize.argtypes = [p, p, p, p, p, i, i, i, i, i, i, i, i, i, p]
    lib.kvl_dequantize.restype = i
    lib.kvl_fp8_encode.argtypes = [p, i, i, i, i, i, i, p, p]
    lib.kvl_fp8_encode.restype = i
    lib.kvl_fp8_decode.argtypes = [p, p, i, i, i, i, i, i, p]
    lib.kvl_fp8_decode.restype = i
    lib.kvl_shuffle.argtypes = [p, p, sz, i]
    lib.kvl_shuffle.restype = None
    lib.kvl_unshuffle.argtypes = [p, p, sz, i]
    lib.kvl_unshuffle.restype = None


class LazyLibrary:
    """A compiled kernel library, opened once per process on first use. ``get()`` is None, and
    ``reason`` says why, when it cannot be: ``disable_env`` set, no compiler, a failed build."""

    def __init__(self, opener: Callable[[], tuple[ctypes.CDLL, Path]], disable_env: str) -> None:
        self._opener, self._disable_env = opener, disable_env
        self._lock = threading.Lock()
        self._tried = False
        self.lib: ctypes.CDLL | None = None
        self.path = ""
        self.reason = "not loaded yet"

    def get(self) -> ctypes.CDLL | None:
        if self._tried:
            return self.lib
        with self._lock:
            if not self._tried:
                try:
                    if os.environ.get(self._disable_env, "") not in ("", "0"):
                        raise RuntimeError(f"disabled by {self._disable_env}")
                    lib, path = self._opener()
                    self.lib, self.path = lib, str(path)
                except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as e:
                    self.reason = str(e)
                self._tried = True
        return self.lib


def _open() -> tuple[ctypes.CDLL, Path]:
    path = build()
    lib = ctypes.CDLL(str(path))
    _bind(lib)
    if lib.kvl_abi_version() != ABI_VERSION:
        raise RuntimeError("kernel ABI version mismatch")
    return lib, path


LIBRARY = LazyLibrary(_open, "KVLAYER_NO_EXT")


def load() -> ctypes.CDLL | None:
    """The kernel library, building it on first call; None (reason in ``backend_info``) if unavailable."""
    return LIBRARY.get()


def _active() -> ctypes.CDLL | None:
    if _override[0] == "torch":
        return None
    lib = load()
    if lib is None and _override[0] == "cpp":
        raise RuntimeError(f"C++ codec kernels unavailable: {LIBRARY.reason}")
    return lib


def backend_info() -> dict[str, Any]:
    """Which codec backend runs: ``{"backend": "cpp"|"torch", "path"|"reason": ...}``."""
    lib = load()
    if lib is None:
        return {"backend": "torch", "reason": LIBRARY.reason}
    return {"backend": "cpp", "path": LIBRARY.path, "compiler": _compiler_id(find_compiler() or "")}


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``"torch"`` or ``"cpp"`` (None = automatic) inside the block; for tests and benchmarks.

    Process-wide, not thread-local: do not use while other threads encode.
    """
    if name not in (None, "torch", "cpp"):
        raise ValueError(f"backend {name!r}: expected None, 'torch' or 'cpp'")
    prev = _override[0]
    _override[0] = name
    try:
        yield
    finally:
        _override[0] = prev


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# ----------------------------------------------------------------------------- kernel entry points
# Each returns False/None when the torch path must run instead.


def quantize(x: torch.Tensor, lay: Any, views: tuple[torch.Tensor, ...]) -> bool:
    lib = _active()
    if lib is None or x.dtype not in _DT or not x.is_contiguous():
        return False
    ks, kz, vs, vz, codes = views
    rc = lib.kvl_quantize(
        _ptr(x), _DT[x.dtype], lay.L, lay.P, lay.T, lay.H, lay.D, lay.bits, lay.gk, lay.gv,
        _ptr(ks), _ptr(kz), _ptr(vs), _ptr(vz), _ptr(codes),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"kvl_quantize failed ({rc})")
    return True


def dequantize(views: tuple[torch.Tensor, ...], lay: Any, dtype: torch.dtype) -> torch.Tensor | None:
    lib = _active()
    if lib is None or dtype not in _DT:
        return None
    ks, kz, vs, vz, codes = views
    out = torch.empty((lay.L, lay.P, lay.T, lay.H, lay.D), dtype=dtype)
    rc = lib.kvl_dequantize(
        _ptr(ks), _ptr(kz), _ptr(vs), _ptr(vz), _ptr(codes), _DT[dtype],
        lay.L, lay.P, lay.T, lay.H, lay.D, lay.bits, lay.gk, lay.gv, _ptr(out),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"kvl_dequantize failed ({rc})")
    return out


def fp8_encode(x5: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor) -> bool:
    lib = _active()
    if lib is None or x5.dtype not in _DT or not x5.is_contiguous():
        return False
    L, P, T, H, D = x5.shape
    lib.kvl_fp8_encode(_ptr(x5), _DT[x5.dtype], L, P, T, H, D, _ptr(scales), _ptr(codes))
    return True


def fp8_decode(scales: torch.Tensor, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    lib = _active()
    if lib is None or dtype not in _DT:
        return None
    L, P, T, H, D = codes.shape
    out = torch.empty((L, P, T, H, D), dtype=dtype)
    lib.kvl_fp8_decode(_ptr(scales), _ptr(codes), _DT[dtype], L, P, T, H, D, _ptr(out))
    return out


def shuffle(src: torch.Tensor, typesize: int, inverse: bool = False) -> torch.Tensor | None:
    """Byte-(un)shuffle a flat contiguous uint8 tensor; None when the kernels are unavailable."""
    lib = _active()
    if lib is None:
        return None
    dst = torch.empty_like(src)
    fn = lib.kvl_unshuffle if inverse else lib.kvl_shuffle
    fn(_ptr(src), _ptr(dst), src.numel(), typesize)
    return dst
