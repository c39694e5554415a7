"""A contained adapter over pyfuse3 3.5 internals: what pyfuse3 cannot do through its API.

1. **Our own slots in libfuse's ops table.** libfuse copies ``fuse_lowlevel_ops`` into the session at
   ``fuse_session_new``; after ``pyfuse3.init`` we find that copy (pyfuse3 keeps the session pointer
   and its own table in module statics, located through the extension's ELF symbol table), check it is
   byte-identical to pyfuse3's table, and change five slots:
   - ``fallocate`` and ``lseek`` (pyfuse3 has neither: punch-hole / zero-range, loop discard and
     SEEK_DATA/SEEK_HOLE would get ENOSYS);
   - ``read`` and ``write``: ctypes callbacks instead of pyfuse3's coroutines (no coroutine, no
     allocation per read: one reused buffer); a big write is finished (pwrite + reply) by a worker
     thread without crossing back into trio;
   - ``write_buf`` cleared: libfuse then stops splicing write payloads through a pipe (one copy less).
   The callbacks run inside ``fuse_session_process_buf`` on the trio thread, synchronously; replies go
   out through libfuse's ``fuse_reply_*`` (thread-safe), so an op that completes later (a sync mirror's
   Completion) replies from whichever thread completes it, and never before.

2. **The request loop** (loop.py) calls libfuse itself instead of ``pyfuse3.main``; what pyfuse3's
   handlers leave in its ``py_retval`` static (the coroutine its loop would await) is taken from there
   with ``take_retval``.

Everything here is version-checked (``check_support``: pyfuse3 in ``SUPPORTED_PYFUSE3``, libfuse >= 3.4,
the lseek slot only from libfuse 3.8, then the table layout) and refuses loudly rather than guessing:
``serve_fuse`` turns a refusal into a mount error (pyfuse3's own handlers alone would silently lose
fallocate/lseek and the speed).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pyfuse3

log = logging.getLogger("blockdev.fuse")

# The pyfuse3 releases whose internals this adapter was written against (pyproject.toml pins the same).
SUPPORTED_PYFUSE3 = frozenset({"3.5.0"})
# libfuse 3 (fuse_lowlevel.h) only ever appends to fuse_lowlevel_ops; slot indices, 0-based.
SLOT_READ = 15
SLOT_WRITE = 16
SLOT_WRITE_BUF = 36
SLOT_FALLOCATE = 40
SLOT_COPY_FILE_RANGE = 42  # appended in libfuse 3.4
SLOT_LSEEK = 43  # appended in libfuse 3.8: older sessions have no such slot (nor fuse_reply_lseek)
MIN_LIBFUSE = (3, 4)
LSEEK_LIBFUSE = (3, 8)
# Slots pyfuse3 3.5 fills and leaves empty: a cheap check that we found the right table.
_PYFUSE3_FILLED = (0, 2, 4, 15, 16, 35, 36, 38, 41)
_PYFUSE3_EMPTY = (1, 21, 31, 32, 33, 34, 37, 39, SLOT_FALLOCATE, SLOT_COPY_FILE_RANGE, SLOT_LSEEK)



class AdapterError(RuntimeError):
    """The pyfuse3/libfuse in use does not look like the one this adapter was written for."""


# -- locating pyfuse3's statics --------------------------------------------------------------------
def elf_symbols(path: str, wanted: set[str]) -> dict[str, int]:
    """st_value of each ``wanted`` symbol in the static symbol table (.symtab) of an ELF64 file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise AdapterError(f"{path}: not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[str, int] = {}
    for _name, sh_type, _fl, _addr, off, size, link, _info, _al, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        stroff = sections[link][4]
        for pos in range(off, off + size, entsize or 24):
            st_name, _i, _o, _shndx, value, _size = struct.unpack_from("<IBBHQQ", data, pos)
            end = data.index(b"\0", stroff + st_name)
            name = data[stroff + st_name:end].decode("ascii", "replace")
            if name in wanted:
                found[name] = value
    missing = wanted - found.keys()
    if missing:
        raise AdapterError(f"{path}: symbols not found (stripped build?): {sorted(missing)}")
    return found


@dataclass(frozen=True)
class Pyfuse3Statics:
    """Addresses of pyfuse3's module-level C variables in this process."""

    session: int  # address of `struct fuse_session *session`
    fuse_ops: int  # address of pyfuse3's `struct fuse_lowlevel_ops fuse_ops`
    py_retval: int  # address of `object py_retval`: the coroutine a handler leaves to be awaited

    @classmethod
    def locate(cls) -> Pyfuse3Statics:
        check_support()
        path = pyfuse3.__file__
        names = {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session", "__pyx_v_7pyfuse3_fuse_ops",
                 "__pyx_v_7pyfuse3_py_retval"}
        syms = elf_symbols(path, names)
        lib = ctypes.CDLL(path)  # the already-loaded extension: dlopen returns the same handle
        base = ctypes.cast(lib.PyInit_pyfuse3, ctypes.c_void_p).value - syms["PyInit_pyfuse3"]
        return cls(session=base + syms["__pyx_v_7pyfuse3_session"],
                   fuse_ops=base + syms["__pyx_v_7pyfuse3_fuse_ops"],
                   py_retval=base + syms["__pyx_v_7pyfuse3_py_retval"])


# -- libfuse entry points ------------------------------------------------------------------------------
def libfuse_path() -> str:
    return ctypes.util.find_library("fuse3") or "libfuse3.so.3"


_libfuse = ctypes.CDLL(libfuse_path(), use_errno=True)
_libfuse.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
_libfuse.fuse_reply_err.restype = ctypes.c_int
_reply_lseek = getattr(_libfuse, "fuse_reply_lseek", None)  # libfuse >= 3.8
if _reply_lseek is not None:
    _reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    _reply_lseek.restype = ctypes.c_int
_libfuse.fuse_reply_buf.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libfuse.fuse_reply_buf.restype = ctypes.c_int
_libfuse.fuse_reply_write.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libfuse.fuse_reply_write.restype = ctypes.c_int
_libfuse.fuse_session_fd.argtypes = [ctypes.c_void_p]
_libfuse.fuse_session_fd.restype = ctypes.c_int
_libfuse.fuse_session_exited.argtypes = [ctypes.c_void_p]
_libfuse.fuse_session_exited.restype = ctypes.c_int
_libfuse.fuse_pkgversion.restype = ctypes.c_char_p

# void (*read)(fuse_req_t, fuse_ino_t, size_t size, off_t off, struct fuse_file_info *)
_READ_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64,
                           ctypes.c_void_p)
# void (*write)(fuse_req_t, fuse_ino_t, const char *buf, size_t size, off_t off, struct fuse_file_info *)
_WRITE_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_int64, ctypes.c_void_p)
# void (*fallocate)(fuse_req_t, fuse_ino_t, int mode, off_t, off_t length, struct fuse_file_info *)
_FALLOCATE_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                                ctypes.c_int64, ctypes.c_void_p)
# void (*lseek)(fuse_req_t, fuse_ino_t, off_t off, int whence, struct fuse_file_info *)
_LSEEK_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int,
                            ctypes.c_void_p)


_incref = ctypes.pythonapi.Py_IncRef
_incref.argtypes = [ctypes.py_object]
_decref = ctypes.pythonapi.Py_DecRef
_decref.argtypes = [ctypes.py_object]


def libfuse_version() -> str:
    return _libfuse.fuse_pkgversion().decode()


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("."):
        digits = "".join(c for c in p if c.isdigit())  # "3.14.0", "3.10.0rc1"
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@dataclass(frozen=True)
class Support:
    """What the pyfuse3 and libfuse in this process allow the adapter to do."""

    pyfuse3: str
    libfuse: str
    lseek: bool  # SEEK_DATA/SEEK_HOLE can be offered (libfuse >= 3.8 has the slot)

    @property
    def slots(self) -> int:
        """How many fuse_lowlevel_ops slots this libfuse's session holds (of those we know)."""
        return SLOT_LSEEK + 1 if self.lseek else SLOT_COPY_FILE_RANGE + 1


def check_support() -> Support:
    """The versions in use, or AdapterError saying which one is not supported and what is."""
    version = getattr(pyfuse3, "__version__", "?")
    if version not in SUPPORTED_PYFUSE3:
        raise AdapterError(f"pyfuse3 {version} is not supported (the FUSE adapter needs pyfuse3 "
                           f"{' or '.join(sorted(SUPPORTED_PYFUSE3))}: pip install 'pyfuse3==3.5.0')")
    lib = libfuse_version()
    have = _version_tuple(lib)
    if have[:1] != (3,) or have < MIN_LIBFUSE:
        raise AdapterError(f"libfuse {lib} is not supported (the FUSE adapter needs libfuse 3.4 or later)")
    return Support(pyfuse3=version, libfuse=lib, lseek=have >= LSEEK_LIBFUSE and _reply_lseek is not None)


class ReplyGate:
    """Closed when the session goes away: a reply after that (a Completion finishing during the
    daemon's shutdown) must not reach libfuse, whose request and session memory is freed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = True
        self.owed = 0  # requests dispatched through us and not yet replied to (shutdown drains them)

    def close(self) -> None:
        with self.lock:
            self.open = False


class Reply:
    """Exactly one reply to one FUSE request, from any thread (libfuse's reply calls are thread-safe)."""

    __slots__ = ("_gate", "_req")

    def __init__(self, req: int, gate: ReplyGate) -> None:
        self._req = req
        self._gate = gate
        with gate.lock:
            gate.owed += 1

    def _send(self, fn: Callable[..., int], *args: int) -> None:
        gate = self._gate
        with gate.lock:
            req, self._req = self._req, 0
            if req:
                gate.owed -= 1
                if gate.open:
                    fn(req, *args)

    def error(self, err: int) -> None:
        """Reply with ``err`` (0 is success for ops that return no data)."""
        self._send(_libfuse.fuse_reply_err, err)

    def written(self, count: int) -> None:
        self._send(_libfuse.fuse_reply_write, count)

    def offset(self, pos: int) -> None:
        assert _reply_lseek is not None  # the lseek slot is only installed when libfuse has it
        self._send(_reply_lseek, pos)

    def data(self, buf: bytearray, n: int) -> None:
        """Reply with ``buf[:n]`` (libfuse writes it to /dev/fuse before returning: buf is free after)."""
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf)) if n else 0
        self._send(_libfuse.fuse_reply_buf, addr, n)


class Handlers(Protocol):
    """What the adapter calls; each replies through ``reply`` now or later (another thread may)."""

    def read_direct(self, inode: int, size: int, offset: int, reply: Reply) -> None: ...

    def write_direct(self, inode: int, data: memoryview, offset: int, reply: Reply) -> None:
        """``data`` is libfuse's request buffer: valid only until this call returns."""

    def fallocate(self, inode: int, mode: int, offset: int, length: int, reply: Reply) -> None: ...
    def lseek(self, inode: int, offset: int, whence: int, reply: Reply) -> None: ...


class Adapter:
    """Installed once per mount, after ``pyfuse3.init``; ``uninstall`` before ``pyfuse3.close``."""

    def __init__(self, handlers: Handlers, support: Support | None = None) -> None:
        self.support = support or check_support()
        self._statics = Pyfuse3Statics.locate()
        self._handlers = handlers
        # The C function pointers must outlive the session: keep them on self.
        self._c_write = _WRITE_T(self._on_write)
        self._c_read = _READ_T(self._on_read)
        self._c_fallocate = _FALLOCATE_T(self._on_fallocate)
        self._c_lseek = _LSEEK_T(self._on_lseek)
        self.session = 0
        self._ops = 0
        self._saved: dict[int, int | None] = {}
        self.gate = ReplyGate()
        self._retval = ctypes.c_void_p.from_address(self._statics.py_retval)  # a live view of the static

    def install(self) -> None:
        """Point the write, fallocate and lseek slots of the live session's ops table at our handlers."""
        self.session = ctypes.c_void_p.from_address(self._statics.session).value or 0
        if not self.session:
            raise AdapterError("pyfuse3 has no session: call pyfuse3.init first")
        self._ops = self._find_ops_copy()
        self.take_retval()  # pyfuse3's own loop leaves its last (awaited) coroutine there
        slots = (ctypes.c_void_p * self.support.slots).from_address(self._ops)
        new = {
            # Without write_buf libfuse neither asks for splice reads nor uses them: a write's payload
            # is read straight into the request buffer instead of into a pipe and out again.
            SLOT_WRITE_BUF: None,
            # Writes skip pyfuse3's coroutine and the trio hop: big ones go to a worker thread that
            # replies itself (see VolumeFiles.write_direct).
            SLOT_WRITE: ctypes.cast(self._c_write, ctypes.c_void_p).value,
            SLOT_READ: ctypes.cast(self._c_read, ctypes.c_void_p).value,
            SLOT_FALLOCATE: ctypes.cast(self._c_fallocate, ctypes.c_void_p).value,
        }
        if self.support.lseek:  # an older session has no lseek slot: writing it would corrupt the next field
            new[SLOT_LSEEK] = ctypes.cast(self._c_lseek, ctypes.c_void_p).value
        for slot, ptr in new.items():
            self._saved[slot] = slots[slot]
            slots[slot] = ptr

    def _find_ops_copy(self) -> int:
        """Address of libfuse's copy of pyfuse3's ops table inside the session struct."""
        n = self.support.slots
        size = n * ctypes.sizeof(ctypes.c_void_p)
        table = ctypes.string_at(self._statics.fuse_ops, size)
        ptrs = struct.unpack(f"<{n}Q", table)
        if not all(ptrs[i] for i in _PYFUSE3_FILLED) or any(ptrs[i] for i in _PYFUSE3_EMPTY if i < n):
            raise AdapterError("pyfuse3's fuse_lowlevel_ops does not have the expected layout")
        # struct fuse_session starts with a few scalars and pointers, then `op` (libfuse 3.x fuse_i.h).
        head = ctypes.string_at(self.session, 256 + size)
        hits = [off for off in range(0, 256, 8) if head[off:off + size] == table]
        if len(hits) != 1:
            raise AdapterError(f"libfuse session: ops table found {len(hits)} times, expected once")
        return self.session + hits[0]

    def uninstall(self) -> None:
        """Before ``pyfuse3.close``: no more replies through us, pyfuse3's table back as it was."""
        self.gate.close()
        if self._ops:
            slots = (ctypes.c_void_p * self.support.slots).from_address(self._ops)
            for slot, ptr in self._saved.items():
                slots[slot] = ptr
            self._ops = 0

    def take_retval(self) -> object | None:
        """What pyfuse3's handler for the request just processed left to be awaited, reset to None.

        This is what pyfuse3's own loop does with its ``py_retval``; the static owns one reference,
        which moves to None here (the caller gets its own reference to the object).
        """
        slot = self._retval
        ptr = slot.value
        if not ptr or ptr == id(None):
            return None
        obj = ctypes.cast(ptr, ctypes.py_object).value
        _incref(None)
        slot.value = id(None)
        _decref(obj)
        return obj

    def fd(self) -> int:
        return _libfuse.fuse_session_fd(self.session)

    # -- callbacks from libfuse (trio thread, inside fuse_session_process_buf) --------------------
    def _on_write(self, req: int, ino: int, buf: int, size: int, offset: int, _fi: int) -> None:
        view = memoryview((ctypes.c_char * size).from_address(buf)).cast("B") if size else memoryview(b"")
        self._dispatch(req, "write", self._handlers.write_direct, ino, view, offset)

    def _on_read(self, req: int, ino: int, size: int, offset: int, _fi: int) -> None:
        self._dispatch(req, "read", self._handlers.read_direct, ino, size, offset)

    def _on_fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, _fi: int) -> None:
        self._dispatch(req, "fallocate", self._handlers.fallocate, ino, mode, offset, length)

    def _on_lseek(self, req: int, ino: int, offset: int, whence: int, _fi: int) -> None:
        self._dispatch(req, "lseek", self._handlers.lseek, ino, offset, whence)

    def _dispatch(self, req: int, what: str, handler: Callable[..., None], *args: object) -> None:
        """Call ``handler(*args, reply)``. A ctypes callback must not raise: the kernel would wait
        for a reply forever, so every failure becomes an error reply."""
        reply = Reply(req, self.gate)
        try:
            handler(*args, reply)
        except pyfuse3.FUSEError as e:
            reply.error(e.errno)
        except BaseException:
            log.exception("%s handler failed", what)
            reply.error(errno.EIO)
