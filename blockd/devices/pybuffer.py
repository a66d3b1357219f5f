"""CPython's buffer protocol through ctypes: the address of any buffer, without copying.

Used where the kernel needs raw addresses (O_DIRECT alignment checks, io_uring
iovecs).  ``PyObject_GetBuffer`` works for bytes, bytearray, mmap and
memoryview slices alike, read-only ones included; every successful
``get_buffer`` must be paired with ``release_buffer``.
"""

from __future__ import annotations

import ctypes

__all__ = ["PYBUF_SIMPLE", "PYBUF_WRITABLE", "PyBuffer", "get_buffer", "release_buffer"]

PYBUF_SIMPLE = 0
PYBUF_WRITABLE = 1


class PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable ABI since 3.11)."""

    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_void_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


# Pointers are passed as c_void_p so callers may hand in byref(view) or a raw
# address inside a preallocated array of PyBuffer structs.
get_buffer = ctypes.pythonapi.PyObject_GetBuffer
get_buffer.argtypes = (ctypes.py_object, ctypes.c_void_p, ctypes.c_int)
get_buffer.restype = ctypes.c_int

release_buffer = ctypes.pythonapi.PyBuffer_Release
release_buffer.argtypes = (ctypes.c_void_p,)
release_buffer.restype = None
