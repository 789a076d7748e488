"""The project's only ctypes code: libbpf.so.1 (system libbpf1) and a few libc calls.

Kept tiny on purpose: open/load/attach a BPF object, read program stats, enter a network
namespace, open a file confined to a directory (openat2), drop capabilities. Everything
above works with plain ints and bytes. libbpf 1.x conventions: pointer returning calls give
NULL and set errno; int returning calls give -errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import sys

from mace_tools.errors import MaceError

_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_c_int = ctypes.c_int

CLONE_NEWNET = 0x40000000
LIBBPF = "libbpf.so.1"

# libbpf_print_fn_t: int (*)(enum libbpf_print_level, const char *, va_list)
_PRINT_FN = ctypes.CFUNCTYPE(_c_int, _c_int, _c_char_p, _c_void_p)


class _Lib:
    """Lazily bound libbpf with argument types declared once."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(LIBBPF, use_errno=True)
        except OSError as exc:
            raise MaceError(
                f"{LIBBPF} not found: install the system libbpf (Debian: apt-get install libbpf1)"
            ) from exc
        sig = {
            "bpf_object__open_file": (_c_void_p, [_c_char_p, _c_void_p]),
            "bpf_object__load": (_c_int, [_c_void_p]),
            "bpf_object__close": (None, [_c_void_p]),
            "bpf_object__find_map_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
            "bpf_object__find_program_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
            "bpf_map__initial_value": (_c_void_p, [_c_void_p, ctypes.POINTER(ctypes.c_size_t)]),
            "bpf_map__fd": (_c_int, [_c_void_p]),
            "bpf_map__max_entries": (ctypes.c_uint32, [_c_void_p]),
            "bpf_map__reuse_fd": (_c_int, [_c_void_p, _c_int]),
            "bpf_map__inner_map": (_c_void_p, [_c_void_p]),
            "bpf_map__type": (_c_int, [_c_void_p]),
            "bpf_map__key_size": (ctypes.c_uint32, [_c_void_p]),
            "bpf_map__value_size": (ctypes.c_uint32, [_c_void_p]),
            "bpf_map__map_flags": (ctypes.c_uint32, [_c_void_p]),
            "bpf_program__attach": (_c_void_p, [_c_void_p]),
            "bpf_program__fd": (_c_int, [_c_void_p]),
            "bpf_link_create": (_c_int, [_c_int, _c_int, _c_int, _c_void_p]),
            "bpf_link__destroy": (_c_int, [_c_void_p]),
            "bpf_map_lookup_elem": (_c_int, [_c_int, _c_void_p, _c_void_p]),
            "bpf_map_update_elem": (_c_int, [_c_int, _c_void_p, _c_void_p, ctypes.c_uint64]),
            "bpf_map_delete_elem": (_c_int, [_c_int, _c_void_p]),
            "bpf_map_get_next_key": (_c_int, [_c_int, _c_void_p, _c_void_p]),
            "bpf_map_create": (_c_int, [_c_int, _c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                        ctypes.c_uint32, _c_void_p]),
            "bpf_link_get_next_id": (_c_int, [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]),
            "bpf_prog_get_next_id": (_c_int, [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]),
            "bpf_link_get_fd_by_id": (_c_int, [ctypes.c_uint32]),
            "bpf_prog_get_fd_by_id": (_c_int, [ctypes.c_uint32]),
            "bpf_map_get_fd_by_id": (_c_int, [ctypes.c_uint32]),
            "bpf_link__fd": (_c_int, [_c_void_p]),
            "bpf_raw_tracepoint_open": (_c_int, [_c_char_p, _c_int]),
            "bpf_obj_get_info_by_fd": (
                _c_int, [_c_int, _c_void_p, ctypes.POINTER(ctypes.c_uint32)]),
            "libbpf_num_possible_cpus": (_c_int, []),
            "libbpf_set_print": (_c_void_p, [_c_void_p]),
        }
        for name, (restype, argtypes) in sig.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self.lib = lib
        self._printer = _install_printer(lib)


def _install_printer(lib: ctypes.CDLL) -> object:
    """Silence libbpf unless MACE_DEBUG is set: its messages are for developers, not users."""
    if not os.environ.get("MACE_DEBUG"):
        lib.libbpf_set_print(None)
        return None
    libc = ctypes.CDLL(None)
    libc.vsnprintf.argtypes = [_c_char_p, ctypes.c_size_t, _c_char_p, _c_void_p]

    def _print(level: int, fmt: bytes, args: int) -> int:
        buf = ctypes.create_string_buffer(2048)
        libc.vsnprintf(buf, len(buf), fmt, args)
        sys.stderr.write("libbpf: " + buf.value.decode(errors="replace"))
        return 0

    printer = _PRINT_FN(_print)
    lib.libbpf_set_print(ctypes.cast(printer, _c_void_p))
    return printer  # keep the callback alive


_lib: _Lib | None = None


def libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib.lib


def last_errno() -> int:
    return ctypes.get_errno()


def map_declared(map_ptr: int) -> tuple[int, int, int, int, int]:
    """A map as an object declares it, before load: (type, key size, value size, max
    entries, flags)."""
    lib = libbpf()
    return (lib.bpf_map__type(map_ptr), lib.bpf_map__key_size(map_ptr),
            lib.bpf_map__value_size(map_ptr), lib.bpf_map__max_entries(map_ptr),
            lib.bpf_map__map_flags(map_ptr))


def map_initial_value(map_ptr: int) -> memoryview:
    """Writable view of a global-data map (.rodata/.bss) before load, as skeletons use it."""
    size = ctypes.c_size_t(0)
    addr = libbpf().bpf_map__initial_value(map_ptr, ctypes.byref(size))
    if not addr:
        raise MaceError("BPF object has no initial value for its .rodata map")
    return memoryview((ctypes.c_char * size.value).from_address(addr)).cast("B")


class _ProgInfo(ctypes.Structure):
    # Leading fields of struct bpf_prog_info (uapi); the kernel fills what fits info_len.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible_etc", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
    ]


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded program; both 0 unless kernel.bpf_stats_enabled=1."""
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if libbpf().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size)) != 0:
        return (0, 0)
    return (info.run_time_ns, info.run_cnt)


def _check(ret: int, what: str) -> int:
    """libbpf's low-level calls return -errno (or a negative value and errno)."""
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47  # uapi enum bpf_attach_type (kernel >= 6.6)


def tcx_attach(prog_fd: int, ifindex: int, attach_type: int) -> int:
    """A tcx link (the fd) of a SCHED_CLS program on a device of the caller's netns.
    (libbpf 1.1 has no bpf_program__attach_tcx; its bpf_link_create passes the type on.)"""
    return _check(libbpf().bpf_link_create(prog_fd, ifindex, attach_type, None),
                  "tcx link")


def raw_tp_attach(prog_fd: int) -> int:
    """A link (the fd) of a loaded tp_btf program, attached to the tracepoint it was
    loaded for: no verifier run. Attaching within an RCU grace period of the last detach
    from that tracepoint waits for one (~4 ms here), else ~0.2 ms."""
    return _check(libbpf().bpf_raw_tracepoint_open(None, prog_fd), "tracepoint link")


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """bpf_map_update_elem(fd, key, value, flags); OSError on failure (EEXIST: the key was
    there already, with BPF_NOEXIST). The sizes must be the map's (map_sizes)."""
    _check(libbpf().bpf_map_update_elem(fd, key, value, flags), "map update")


def map_sizes(fd: int) -> tuple[int, int]:
    """(key_size, value_size) of a map: struct bpf_map_info's third and fourth words."""
    info = _info(fd, 80)
    return (int.from_bytes(info[8:12], sys.byteorder), int.from_bytes(info[12:16], sys.byteorder))


def map_delete(fd: int, key: bytes) -> bool:
    """bpf_map_delete_elem; False if the key was not there."""
    ret = libbpf().bpf_map_delete_elem(fd, key)
    if ret in (-errno.ENOENT,) or (ret == -1 and ctypes.get_errno() == errno.ENOENT):
        return False
    _check(ret, "map delete")
    return True


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value at key, or None if there is none. The kernel writes the map's own value
    size: a map whose sizes are not (len(key), value_size) is refused (OSError), never
    read into a buffer it would overrun."""
    if map_sizes(fd) != (len(key), value_size):
        raise OSError(errno.EINVAL, f"map lookup: sizes {map_sizes(fd)} are not "
                      f"{(len(key), value_size)}")
    value = ctypes.create_string_buffer(value_size)
    ret = libbpf().bpf_map_lookup_elem(fd, key, value)
    if ret in (-errno.ENOENT,) or (ret == -1 and ctypes.get_errno() == errno.ENOENT):
        return None
    _check(ret, "map lookup")
    return value.raw


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (a snapshot: entries may come and go meanwhile); OSError
    if its keys are not key_size bytes."""
    if map_sizes(fd)[0] != key_size:
        raise OSError(errno.EINVAL, f"map keys: key size {map_sizes(fd)[0]} is not {key_size}")
    keys: list[bytes] = []
    prev: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while libbpf().bpf_map_get_next_key(fd, prev, nxt) == 0:
        keys.append(nxt.raw)
        prev = nxt.raw
        if len(keys) > 1 << 20:  # a map cannot hold more; never loop forever
            break
    return keys


BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH_OF_MAPS = 1, 2, 13
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_MMAPABLE = 1 << 10


class _MapCreateOpts(ctypes.Structure):
    # struct bpf_map_create_opts (libbpf 1.x bpf.h)
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64), ("numa_node", ctypes.c_uint32),
                ("map_ifindex", ctypes.c_uint32)]


def map_create(map_type: int, name: bytes, key_size: int, value_size: int,
               max_entries: int, flags: int = 0, inner_map_fd: int = 0) -> int:
    """A new BPF map; its fd. inner_map_fd: a map of maps' template of its maps."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags,
                          inner_map_fd=inner_map_fd)
    return _check(libbpf().bpf_map_create(map_type, name, key_size, value_size, max_entries,
                                          ctypes.byref(opts)), "map create")


def ringbuf_create(name: bytes, size: int) -> int:
    """A new BPF ring buffer map of size bytes; its fd."""
    return map_create(BPF_MAP_TYPE_RINGBUF, name, 0, 0, size)


def _ids(fn: str) -> list[int]:
    """Every id, walked with bpf_*_get_next_id; PermissionError without CAP_SYS_ADMIN."""
    ids: list[int] = []
    nxt = ctypes.c_uint32(0)
    while (ret := getattr(libbpf(), fn)(nxt.value, ctypes.byref(nxt))) == 0:
        ids.append(nxt.value)
    err = -ret if ret != -1 else ctypes.get_errno()
    if err != errno.ENOENT:
        raise OSError(err, f"{fn}: {os.strerror(err)}")
    return ids


def link_ids() -> list[int]:
    """The ids of every BPF link on the host (a snapshot)."""
    return _ids("bpf_link_get_next_id")


def prog_ids() -> list[int]:
    """The ids of every loaded BPF program on the host (a snapshot)."""
    return _ids("bpf_prog_get_next_id")


def prog_id(prog_fd: int) -> int:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size)),
           "program info")
    return info.id


def _fd_by_id(fn: str, obj_id: int) -> int | None:
    """An fd of the link/prog/map with that id, None if it is gone meanwhile."""
    fd = getattr(libbpf(), fn)(obj_id)
    if fd < 0:
        err = -fd if fd != -1 else ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise OSError(err, f"{fn}({obj_id}): {os.strerror(err)}")
    return fd


def link_fd(link_id: int) -> int | None:
    return _fd_by_id("bpf_link_get_fd_by_id", link_id)


def prog_fd(prog_id: int) -> int | None:
    return _fd_by_id("bpf_prog_get_fd_by_id", prog_id)


def map_fd(map_id: int) -> int | None:
    return _fd_by_id("bpf_map_get_fd_by_id", map_id)


def _info(fd: int, size: int) -> bytes:
    """struct bpf_*_info of a link or map (the leading `size` bytes)."""
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    _check(libbpf().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(length)), "object info")
    return buf.raw


def link_prog_id(link_fd: int) -> int:
    """struct bpf_link_info: type, id, prog_id, ..."""
    return int.from_bytes(_info(link_fd, 64)[8:12], sys.byteorder)


def map_id(map_fd: int) -> int:
    """struct bpf_map_info's id (its second word)."""
    return int.from_bytes(_info(map_fd, 80)[4:8], sys.byteorder)


def map_name(map_fd: int) -> str:
    """struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name."""
    return _info(map_fd, 80)[24:40].split(b"\0", 1)[0].decode(errors="replace")


def prog_name_and_maps(prog_fd: int) -> tuple[str, list[int]]:
    """A program's name and the ids of the maps it uses."""
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size)),
           "program info")
    count = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    info2 = _ProgInfo()
    info2.nr_map_ids = count
    info2.map_ids = ctypes.addressof(ids)
    size = ctypes.c_uint32(ctypes.sizeof(info2))
    _check(libbpf().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info2), ctypes.byref(size)),
           "program info")
    return info.name.decode(errors="replace"), list(ids[:min(count, info2.nr_map_ids)])


def setns(fd: int) -> None:
    """Move the calling thread into the netns open at fd (Python 3.11 has no os.setns)."""
    if hasattr(os, "setns"):  # Python >= 3.12
        try:
            os.setns(fd, CLONE_NEWNET)
        except OSError as exc:
            raise _setns_error(exc.errno) from exc
        return
    if _c().setns(fd, CLONE_NEWNET) != 0:
        raise _setns_error(ctypes.get_errno())


def _setns_error(err: int) -> MaceError:
    hint = " (needs CAP_SYS_ADMIN)" if err == errno.EPERM else ""
    return MaceError(f"cannot enter network namespace: {os.strerror(err)}{hint}")


# openat2(2): struct open_how and its RESOLVE_* flags (linux/openat2.h, kernel >= 5.6).
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
# New syscalls share one number on every architecture since 5.1 (alpha aside); an
# architecture not listed fails closed (ENOSYS), never into an unconfined open.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "arm64": 437, "riscv64": 437,
                "ppc64le": 437, "s390x": 437}


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(dirfd, path, {flags, 0, resolve}): a new fd, or OSError (ENOSYS if the kernel
    or this architecture has no openat2)."""
    number = _SYS_OPENAT2.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)
    how = _OpenHow(flags, 0, resolve)
    syscall = _c().syscall
    syscall.restype = ctypes.c_long
    fd = syscall(ctypes.c_long(number), _c_int(dirfd), os.fsencode(path), ctypes.byref(how),
                 ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


# Capabilities (linux/capability.h) and prctl (linux/prctl.h).
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_NO_NEW_PRIVS = 38


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", _c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_privileges() -> None:
    """Give up every capability for good, as iputils does once its sockets are open.

    no_new_privs first, so no later execve (setuid, file capabilities, or uid 0's implicit
    full set) can bring any back; then empty effective, permitted and inheritable sets (the
    ambient set follows permitted). Capabilities are per thread: call it while the process
    has one thread, as mace-ping and mace-traceroute do.
    """
    libc = _c()
    if libc.prctl(_c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise MaceError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    empty = (_CapData * 2)()  # version 3 takes two 32-bit halves; zeroed: no capability
    if libc.capset(ctypes.byref(header), empty) != 0:
        raise MaceError(f"cannot drop capabilities: {os.strerror(ctypes.get_errno())}")
