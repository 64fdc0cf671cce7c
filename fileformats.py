"""Raw file formats that datasets are published in, read with NumPy and the standard library only,
so this file can be copied alone into any project.

    import fileformats
    images = fileformats.npz_rows("mpi3d_real.npz", "images")   # images[index] reads those rows
    fileformats.npz_members("mpi3d_real.npz")
    # {'images': ((1036800, 64, 64, 3), dtype('uint8'), True)}: stored, so read in place
    cat = fileformats.read_norb("smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat.gz")
    for start, block in fileformats.norb_blocks("smallnorb-...-training-dat.mat", rows=1000): ...

- NumPy's .npz archives (a zip of .npy files). `np.load(path, mmap_mode="r")` memory-maps .npy
  files but reads every .npz member into memory. A member stored without compression (ZIP_STORED,
  as `np.savez` writes) lies in the zip as it is: its data starts after its local file header
  (PKWARE's APPNOTE.TXT, section 4.3.7) and the .npy header (NumPy's "NPY format", versions 1.0
  to 3.0). `npz_rows` gives it as StoredRows, which reads the rows asked for with os.pread (the
  process then holds only those), `npz_array` as an np.memmap. Deflated members
  (`np.savez_compressed`) are read in full.
- NORB's binary matrices (LeCun et al. 2004, "small NORB" page, "file format"): a little-endian
  int32 magic number giving the element type, an int32 ndim, max(3, ndim) int32 dimensions (unused
  ones are 1), then the elements in C order; plain or gzip-compressed (.gz).

Every function raises FormatError (a ValueError) naming the file and what is wrong: not the
format, truncated, or a size that does not fit; nothing is allocated beyond what the file holds.
"""
import gzip
import os
import struct
import zipfile
import zlib

import numpy as np

__all__ = ["FormatError", "npz_members", "npz_array", "npz_rows", "StoredRows",
           "NORB_TYPES", "read_norb", "norb_blocks"]


class FormatError(ValueError):
    """A file that is not what its reader expects; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# NumPy .npz archives

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra-field lengths at 26 and 28
_LOCAL_SIGNATURE = b"PK\x03\x04"


def _npy_header(f, where):
    """(shape, fortran_order, dtype) of the .npy stream f, left positioned at its data."""
    try:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read(f)
    except (ValueError, OSError, EOFError, SyntaxError) as error:
        raise FormatError(f"{where}: not a .npy array ({error})") from error
    if dtype.hasobject:
        raise FormatError(f"{where}: holds Python objects; not read (it would need unpickling)")
    return tuple(shape), fortran_order, dtype


def _open_zip(path):
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise FormatError(f"{path}: not a readable .npz (zip) file ({error})") from error


def _member(zf, path, name):
    try:
        return zf.getinfo(name + ".npy")
    except KeyError:
        found = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
        raise FormatError(f"{path}: no array {name!r} (found {found})") from None


def npz_members(path):
    """{name: (shape, dtype, stored)} of every .npy member of the .npz at `path`, from their headers
    only (no data is read); `stored` is True where the member is uncompressed, so that `npz_array`
    memory-maps it. Raises FormatError if the file is not a zip of .npy files."""
    with _open_zip(path) as zf:
        members = {}
        for info in zf.infolist():
            if info.filename.endswith(".npy"):
                where = f"{path}: member {info.filename}"
                with zf.open(info) as f:
                    shape, _, dtype = _npy_header(f, where)
                members[info.filename[:-4]] = (shape, dtype, info.compress_type == zipfile.ZIP_STORED)
    return members


def npz_array(path, name, mmap_mode="r"):
    """Array `name` of the .npz at `path`: a read-only np.memmap into the file when the member is
    stored uncompressed and mmap_mode is "r" (nothing is read until used), else read in full
    (deflated members, mmap_mode None). Shape and dtype as saved. Raises FormatError if the file or
    member is missing, corrupt or truncated, or holds Python objects."""
    located = _locate(path, name, read=mmap_mode is None)
    if isinstance(located, np.ndarray):
        return located
    offset, shape, fortran_order, dtype = located
    if int(np.prod(shape, dtype=object)) == 0:
        return np.empty(shape, dtype, order="F" if fortran_order else "C")
    return np.memmap(path, dtype, mmap_mode, offset=offset, shape=shape,
                     order="F" if fortran_order else "C")


def npz_rows(path, name):
    """Array `name` of the .npz at `path` as StoredRows (rows read from the file when indexed) when
    the member is stored uncompressed in C order with at least one dimension; otherwise read in
    full (an ndarray). Raises FormatError as npz_array."""
    located = _locate(path, name, read=False)
    if isinstance(located, np.ndarray):
        return located
    offset, shape, fortran_order, dtype = located
    if fortran_order or not shape:
        return npz_array(path, name, None)
    return StoredRows(path, offset, dtype, shape)


def _locate(path, name, read):
    """(offset, shape, fortran_order, dtype) of a stored member's data inside the file, or the
    array itself if the member is deflated or `read`."""
    with _open_zip(path) as zf:
        info = _member(zf, path, name)
        where = f"{path}: member {info.filename}"
        stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1  # 1: encrypted
        if read or not stored:
            return _read_member(zf, info, where)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(_exact(f, _LOCAL_HEADER.size, where))
        if signature != _LOCAL_SIGNATURE:
            raise FormatError(f"{where}: no local file header at offset {info.header_offset}")
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        f.seek(start)
        shape, fortran_order, dtype = _npy_header(f, where)
        offset = f.tell()
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if offset + nbytes != start + info.file_size or start + info.file_size > os.path.getsize(path):
        raise FormatError(f"{where}: {info.file_size} bytes do not hold a {dtype} array of shape "
                          f"{shape} (truncated or a bad header)")
    return offset, shape, fortran_order, dtype


class StoredRows:
    """A read-only array of `shape` and `dtype` stored in C order at byte `offset` of the file at
    `path`, read row by row when indexed: `rows[i]`, `rows[a:b]`, `rows[index_array]` (with
    further indexes after a comma) return ndarrays holding only those rows, read with os.pread
    (consecutive rows in one call). Unlike np.memmap, the process's memory (RSS) then holds only
    what was asked for: a memory map also counts the page-cache pages mapped around each row
    touched (with large folios on Linux 6.x, up to 2 MB per row). np.asarray reads every row."""

    def __init__(self, path, offset, dtype, shape):
        self.path, self.offset, self.dtype, self.shape = path, offset, np.dtype(dtype), tuple(shape)
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.nbytes = self.row_bytes * self.shape[0]
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, slice):
            index = np.arange(*rows.indices(len(self)))
        else:
            index = np.arange(len(self))[rows]  # bounds, negatives and boolean masks as numpy
        out = self._read(np.atleast_1d(index))
        if np.ndim(index) == 0:
            return out[0][rest] if rest else out[0]
        return out[(slice(None),) + rest] if rest else out

    def _read(self, index):
        out = np.empty((len(index),) + self.shape[1:], self.dtype)
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        breaks = np.flatnonzero(np.diff(index) != 1) + 1  # runs of consecutive rows
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(index)]):
            at = self.offset + int(index[start]) * self.row_bytes
            done, want = start * self.row_bytes, stop * self.row_bytes
            while done < want:  # one call reads at most ~2 GB
                got = os.preadv(self._fd, [buffer[done:want]], at)
                if got <= 0:
                    raise FormatError(f"{self.path}: ends inside row {index[start]} (file changed?)")
                done, at = done + got, at + got
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _read_member(zf, info, where):
    """A deflated (or unmapped) member read in full; zipfile checks its CRC at the end."""
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else 1100  # deflate expands <= 1032x
    if info.file_size > ratio * info.compress_size + 1024:  # before allocating what it claims
        raise FormatError(f"{where}: claims {info.file_size} bytes from {info.compress_size} (corrupt)")
    try:
        with zf.open(info) as f:
            shape, fortran_order, dtype = _npy_header(f, where)
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if nbytes != info.file_size - f.tell():
                raise FormatError(f"{where}: {info.file_size} bytes do not hold a {dtype} array "
                                  f"of shape {shape} (truncated or a bad header)")
            array = np.empty(shape, dtype, order="F" if fortran_order else "C")
            view = memoryview(array.reshape(-1, order="A").view(np.uint8))
            done = 0
            while done < nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise FormatError(f"{where}: ends after {done} of {nbytes} bytes")
                done += got
            f.read()  # reach the end so that zipfile checks the CRC
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as error:
        raise FormatError(f"{where}: unreadable ({type(error).__name__}: {error})") from error
    return array


def _exact(f, count, where):
    data = f.read(count)
    if len(data) != count:
        raise FormatError(f"{where}: truncated (wanted {count} bytes, the file ends after {len(data)})")
    return data


# ---------------------------------------------------------------------------------------------
# NORB binary matrices

NORB_TYPES = {  # magic number -> element type; 0x1E3D4C52 ("packed") is not used by small NORB
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C55: np.dtype("u1"),
    0x1E3D4C56: np.dtype("<i2"),
}


def _norb_header(f, where):
    """(dtype, shape) of the NORB matrix stream f, left positioned at its first element."""
    magic, ndim = struct.unpack("<iI", _exact(f, 8, where))
    if magic not in NORB_TYPES:
        raise FormatError(f"{where}: not a NORB binary matrix (magic number {magic:#x})")
    if ndim > 32:
        raise FormatError(f"{where}: corrupt header ({ndim} dimensions)")
    dims = struct.unpack(f"<{max(3, ndim)}i", _exact(f, 4 * max(3, ndim), where))
    if min(dims, default=0) < 0:
        raise FormatError(f"{where}: corrupt header (dimensions {dims})")
    return NORB_TYPES[magic], dims[:ndim]


def _open_norb(path):
    try:
        f = open(path, "rb")
        if f.read(2) == b"\x1f\x8b":  # gzip's magic bytes, whatever the name says
            f.close()
            return gzip.open(path, "rb"), True
        f.seek(0)
        return f, False
    except OSError as error:
        raise FormatError(f"{path}: cannot be read ({error})") from error


def read_norb(path, mmap_mode="r"):
    """The NORB binary matrix at `path` (plain or gzip-compressed; the gzip magic bytes decide, not
    the name) as an array of its dtype and shape: a read-only np.memmap for a plain file when
    mmap_mode is "r", else read in full. Raises FormatError if it is not a NORB matrix, is
    truncated or has bytes beyond its data."""
    f, compressed = _open_norb(path)
    try:
        with f:
            dtype, shape = _norb_header(f, path)
            offset, count = f.tell(), int(np.prod(shape, dtype=object))
            if not compressed and mmap_mode is not None:
                if offset + count * dtype.itemsize != os.path.getsize(path):
                    raise FormatError(f"{path}: {os.path.getsize(path) - offset} bytes of data do not "
                                      f"hold a {dtype} matrix of shape {shape}")
                return np.memmap(path, dtype, mmap_mode, offset=offset, shape=shape)
            data = f.read(count * dtype.itemsize + 1)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise FormatError(f"{path}: unreadable ({type(error).__name__}: {error})") from error
    if len(data) != count * dtype.itemsize:
        raise FormatError(f"{path}: {len(data)} bytes of data do not hold a {dtype} matrix "
                          f"of shape {shape}")
    return np.frombuffer(data, dtype).reshape(shape)


def norb_blocks(path, rows=1024):
    """(shape, blocks) of the NORB matrix at `path`: its full shape, and a generator of (start,
    array) with up to `rows` consecutive entries of the first axis each, read as they are
    consumed (a .gz is decompressed as it goes, never held whole). Raises FormatError as
    read_norb, the size check of a .gz at its end."""
    f, _ = _open_norb(path)
    try:
        dtype, shape = _norb_header(f, path)
    except BaseException:
        f.close()
        raise
    if not shape:
        f.close()
        raise FormatError(f"{path}: a 0-dimensional matrix has no rows")
    row_bytes = int(np.prod(shape[1:], dtype=object)) * dtype.itemsize

    def blocks():
        with f:
            try:
                for start in range(0, shape[0], rows):
                    count = min(rows, shape[0] - start)
                    data = f.read(count * row_bytes)
                    if len(data) != count * row_bytes:
                        row = start + len(data) // max(row_bytes, 1)
                        raise FormatError(f"{path}: truncated at row {row} "
                                          f"of {shape[0]}")
                    yield start, np.frombuffer(data, dtype).reshape((count,) + tuple(shape[1:]))
                if f.read(1):
                    raise FormatError(f"{path}: bytes beyond the {dtype} matrix of shape {shape}")
            except (OSError, EOFError, zlib.error) as error:
                raise FormatError(f"{path}: unreadable ({type(error).__name__}: {error})") from error
    return shape, blocks()
