"""Run nft transactions in-process through libnftables (ctypes), or `nft -f -`.

Spawning `nft -f` costs ~56 ms per change on this machine, most of it process
start-up; the same transaction through libnftables.so.1 in-process takes
20-30 ms. Only six C functions are needed, so this is a few lines of ctypes
rather than a dependency (Debian's python3-nftables does the same).

Namespaces: a context opens its netlink socket when it is created
(nft_ctx_new, in nftables 1.0.6), and a netlink socket belongs for life to the
network namespace of the thread that opened it. So a context acts on the
namespace that the creating thread was in at creation time, wherever it is
used afterwards. Create it inside the node's namespace (the proxy daemon has
entered it for good; a test uses netemu.netns.inside). The `nft -f -` fallback
instead runs in the namespace of the thread that calls run(), because a child
process inherits the calling thread's namespace.

A context is not thread-safe: use one per thread, or serialise calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess

NFT_CTX_DEFAULT = 0


class NftError(RuntimeError):
    """nft rejected a transaction; nothing of it was applied."""


def _load() -> ctypes.CDLL | None:
    for name in ("libnftables.so.1", ctypes.util.find_library("nftables")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            fn.restype = ctypes.c_char_p
            fn.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        return lib
    return None


_lib = _load()


def available() -> bool:
    """True when libnftables can be used in-process."""
    return _lib is not None


class LibNft:
    """An in-process nft context bound to the creating thread's namespace."""

    def __init__(self) -> None:
        if _lib is None:
            raise NftError("libnftables.so.1 not found")
        ctx = _lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx = ctx
        # Capture output and errors in memory instead of the process's stdout/stderr.
        _lib.nft_ctx_buffer_output(ctx)
        _lib.nft_ctx_buffer_error(ctx)

    def run(self, text: str) -> str:
        """Run TEXT (one transaction, nft -f syntax); return nft's output."""
        if self._ctx is None:
            raise NftError("nft context is closed")
        rc = _lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
        out = (_lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        err = (_lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(err.strip() or f"nft failed ({rc})")
        return out

    def close(self) -> None:
        if self._ctx is not None:
            _lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> "LibNft":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten context must not leak its socket
        try:
            self.close()
        except Exception:
            pass


class NftProcess:
    """Fallback: one `nft -f -` process per transaction, in the caller's namespace."""

    def run(self, text: str) -> str:
        proc = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NftError(proc.stderr.strip() or f"nft failed ({proc.returncode})")
        return proc.stdout

    def close(self) -> None:
        pass

    def __enter__(self) -> "NftProcess":
        return self

    def __exit__(self, *exc) -> None:
        pass


def open_nft(prefer_library: bool = True) -> LibNft | NftProcess:
    """A runner for nft transactions: libnftables if present, else `nft -f -`."""
    if prefer_library and available():
        return LibNft()
    return NftProcess()
