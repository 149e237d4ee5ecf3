"""libkrun's C API through cffi in ABI mode: ``ffi.cdef`` + ``ffi.dlopen``, no compiler needed.

Why ABI mode: libkrun is rarely packaged (Fedora yes, Debian no), so the plugin must install
everywhere and find the library at run time, reporting "not found" instead of failing to build.

The declarations below are the subset boxlite uses, written from libkrun's ``include/libkrun.h``
(every call returns ``int32_t``: >= 0 on success, a negative errno on failure). Functions that
only newer libkrun releases export (``krun_add_disk2``, ``krun_add_virtiofs3``,
``krun_add_vsock_port2``, ``krun_disable_implicit_*``, ``krun_has_feature``, ...) are declared
too: with ``ffi.dlopen`` a declared-but-missing symbol only fails when it is looked up, so
:meth:`KrunLibrary.has` tells which ones this copy of the library has.
"""

from __future__ import annotations

import ctypes.util
import errno
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from boxlite_core.errors import EngineError

ENV_LIBRARY = "BOXLITE_LIBKRUN_PATH"

CDEF = """
int32_t krun_set_log_level(uint32_t level);
int32_t krun_create_ctx(void);
int32_t krun_free_ctx(uint32_t ctx_id);
int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib);
int32_t krun_set_root(uint32_t ctx_id, const char *root_path);
int32_t krun_set_root_disk(uint32_t ctx_id, const char *disk_path);
int32_t krun_add_disk(uint32_t ctx_id, const char *block_id, const char *disk_path,
                      bool read_only);
int32_t krun_add_disk2(uint32_t ctx_id, const char *block_id, const char *disk_path,
                       uint32_t disk_format, bool read_only);
int32_t krun_add_virtiofs(uint32_t ctx_id, const char *c_tag, const char *c_path);
int32_t krun_add_virtiofs2(uint32_t ctx_id, const char *c_tag, const char *c_path,
                           uint64_t shm_size);
int32_t krun_add_virtiofs3(uint32_t ctx_id, const char *c_tag, const char *c_path,
                           uint64_t shm_size, bool read_only);
int32_t krun_add_vsock_port(uint32_t ctx_id, uint32_t port, const char *c_filepath);
int32_t krun_add_vsock_port2(uint32_t ctx_id, uint32_t port, const char *c_filepath,
                             bool listen);
int32_t krun_add_vsock(uint32_t ctx_id, uint32_t tsi_features);
int32_t krun_disable_implicit_vsock(uint32_t ctx_id);
int32_t krun_disable_implicit_console(uint32_t ctx_id);
int32_t krun_set_exec(uint32_t ctx_id, const char *exec_path, const char *const argv[],
                      const char *const envp[]);
int32_t krun_set_env(uint32_t ctx_id, const char *const envp[]);
int32_t krun_set_workdir(uint32_t ctx_id, const char *workdir_path);
int32_t krun_set_kernel(uint32_t ctx_id, const char *kernel_path, uint32_t kernel_format,
                        const char *initramfs, const char *cmdline);
int32_t krun_set_console_output(uint32_t ctx_id, const char *c_filepath);
int32_t krun_has_feature(uint64_t feature);
int32_t krun_start_enter(uint32_t ctx_id);
"""

#: Calls that do not take the context id as their first argument.
NO_CTX_CALLS = frozenset({"krun_set_log_level", "krun_create_ctx", "krun_has_feature"})
#: Without these the library is not a usable libkrun at all.
REQUIRED_SYMBOLS = ("krun_create_ctx", "krun_set_vm_config", "krun_start_enter")
#: Arguments declared as NULL-terminated string arrays (``const char *const x[]``).
_STRING_ARRAY_ARGS = {"krun_set_exec": (1, 2), "krun_set_env": (0,)}

# Constants from libkrun.h.
KRUN_DISK_FORMAT = {"raw": 0, "qcow2": 1}
KRUN_KERNEL_FORMAT = {
    "raw": 0,
    "elf": 1,
    "pe_gz": 2,
    "image_bz2": 3,
    "image_gz": 4,
    "image_zstd": 5,
}
KRUN_FEATURE_BLK = 1

_LIB_NAMES = {
    "linux": ("libkrun.so.1", "libkrun.so"),
    "darwin": ("libkrun.1.dylib", "libkrun.dylib"),
}
_FW_NAMES = {
    "linux": ("libkrunfw.so.5", "libkrunfw.so.4"),
    "darwin": ("libkrunfw.5.dylib", "libkrunfw.4.dylib"),
}
SEARCH_DIRS = (
    "/usr/lib64",
    "/usr/local/lib64",
    "/usr/local/lib",
    "/opt/homebrew/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib",
)


def describe_errno(rc: int) -> str:
    """``-22`` → ``"-22 (EINVAL: Invalid argument)"``: the number and what it means."""
    code = -rc
    name = errno.errorcode.get(code, "E?")
    return f"{rc} ({name}: {os.strerror(code)})"


class KrunCallError(EngineError):
    """A krun call returned a negative errno (or a required symbol is missing)."""

    def __init__(self, call: str, rc: int | None, detail: str = "") -> None:
        self.call = call
        self.rc = rc
        what = f"{call} failed: {describe_errno(rc)}" if rc is not None else f"{call} failed"
        super().__init__(what + (f"; {detail}" if detail else ""))


def _platform_key() -> str:
    return "darwin" if sys.platform == "darwin" else "linux"


@functools.lru_cache(maxsize=8)
def _ctypes_find(name: str) -> str | None:
    """ctypes' own search (ldconfig cache, gcc): cached, since it runs helper programs (~15 ms)."""
    return ctypes.util.find_library(name)


def candidate_paths(names: Sequence[str], find_name: str) -> list[str]:
    """Where to look, in order: the common directories, then ctypes' search for ``find_name``."""
    out = [str(Path(d) / n) for d in SEARCH_DIRS for n in names]
    found = _ctypes_find(find_name)
    if found:
        out.append(found)
    return out


def find_library(env: dict[str, str] | None = None) -> tuple[str | None, list[str]]:
    """Return (path of libkrun or None, the places searched), honouring BOXLITE_LIBKRUN_PATH.

    A bare soname from find_library (``libkrun.so.1``) is returned as is: dlopen resolves it.
    """
    environ = os.environ if env is None else env
    override = environ.get(ENV_LIBRARY)
    if override:
        return (override if Path(override).is_file() else None), [override]
    searched: list[str] = []
    for path in candidate_paths(_LIB_NAMES[_platform_key()], "krun"):
        searched.append(path)
        if "/" not in path or Path(path).is_file():
            return path, searched
    return None, searched


def find_firmware(library: str | None = None) -> str | None:
    """Path of libkrunfw (the bundled guest kernel), looked for next to libkrun first."""
    names = _FW_NAMES[_platform_key()]
    dirs = [str(Path(library).parent)] if library and "/" in library else []
    for d in dirs:
        for n in names:
            if (Path(d) / n).is_file():
                return str(Path(d) / n)
    for path in candidate_paths(names, "krunfw"):
        if "/" not in path or Path(path).is_file():
            return path
    return None


class KrunLibrary:
    """A dlopen'ed libkrun. Converts Python values to C and negative returns to errors."""

    def __init__(self, path: str) -> None:
        from cffi import FFI  # imported here: the plugin must import without cffi's cost

        self.path = path
        self.ffi = FFI()
        self.ffi.cdef(CDEF)
        try:
            self.lib: Any = self.ffi.dlopen(path)
        except OSError as exc:
            raise EngineError(f"cannot load libkrun from {path}: {exc}") from exc
        missing = [s for s in REQUIRED_SYMBOLS if not self.has(s)]
        if missing:
            raise EngineError(
                f"{path} is not a usable libkrun: missing {', '.join(missing)}; "
                "install libkrun >= 1.9 or point BOXLITE_LIBKRUN_PATH at it"
            )

    def has(self, name: str) -> bool:
        """True if this copy of libkrun exports ``name`` (optional newer API)."""
        try:
            getattr(self.lib, name)
        except AttributeError:
            return False
        return True

    def _convert(self, name: str, args: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        keep: list[Any] = []  # cdata that must outlive the call
        out: list[Any] = []
        arrays = _STRING_ARRAY_ARGS.get(name, ())
        for i, value in enumerate(args):
            if i in arrays:
                if value is None:
                    out.append(self.ffi.NULL)
                    continue
                items = [self.ffi.new("char[]", os.fsencode(v)) for v in value]
                keep.extend(items)
                arr = self.ffi.new("char *[]", [*items, self.ffi.NULL])
                keep.append(arr)
                out.append(arr)
            elif isinstance(value, str):
                out.append(os.fsencode(value))
            elif value is None:
                out.append(self.ffi.NULL)
            else:
                out.append(value)
        return out, keep

    def call(self, name: str, *args: Any, ctx: int | None = None) -> int:
        """Call ``name`` (context first when it takes one); raise KrunCallError when < 0."""
        try:
            fn = getattr(self.lib, name)
        except AttributeError:
            raise KrunCallError(
                name, None, f"this libkrun ({self.path}) does not export it; upgrade libkrun"
            ) from None
        c_args, _keep = self._convert(name, args)
        if name not in NO_CTX_CALLS:
            if ctx is None:
                raise ValueError(f"{name} needs a context id")
            c_args.insert(0, ctx)
        rc = int(fn(*c_args))
        if rc < 0:
            raise KrunCallError(name, rc)
        return rc
