"""A small read-only HDF5 reader in pure Python: NumPy and the standard library only (no h5py,
no libhdf5), so this file can be copied alone into any project.

    import h5
    with h5.H5File("3dshapes.h5") as f:
        print(f.datasets())          # {'images': <H5Dataset 'images' (480000, 64, 64, 3) uint8>, ...}
        images = f["images"][:1000]  # numpy-style reads: ds[()], ds[:], ds[a:b], ds[i], ds[a:b, ...]
        labels = f["labels"][()]

It reads what h5py and libhdf5 (1.8 to 2.0) write: superblock versions 0 to 3, object header
versions 1 and 2, old-style (symbol table) and new-style (link messages, dense links) groups,
hard and soft links (followed, in either kind of group), compact, contiguous and chunked
datasets with every chunk index, the deflate (gzip), shuffle and fletcher32 filters, fill values;
integers, floats, fixed-length strings and enumerations (as their base integer; h5py's FALSE/TRUE
one for numpy bool as bool). Anything else (lzf, szip, blosc and other filters; compound,
variable-length and reference types; external and user-defined links; data kept in external
files; virtual datasets; shared header messages) is refused with an H5Error naming the object and
saying what it is: data that was not read is never returned as zeros.

Every reader below names the part of the HDF5 File Format Specification, Version 3.0, that it
follows (https://support.hdfgroup.org/documentation/hdf5/latest/_f_m_t3.html). Every field is
bounds-checked: a damaged file raises H5Error naming the file, never reads outside the file and
never allocates much more than the file could hold.
"""
import bisect
import contextlib
import itertools
import os
import zlib

import numpy as np

__all__ = ["H5File", "H5Group", "H5Dataset", "H5Error"]

SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_NODES = 1 << 20  # most B-tree nodes, heap blocks or header chunks walked for one structure

# object header message types (IV.A.2), and the flag of a message whose body is stored elsewhere
DATASPACE_MESSAGE, LINK_INFO_MESSAGE, DATATYPE_MESSAGE, OLD_FILL_VALUE_MESSAGE = 0x01, 0x02, 0x03, 0x04
FILL_VALUE_MESSAGE, LINK_MESSAGE, LAYOUT_MESSAGE, FILTER_PIPELINE_MESSAGE = 0x05, 0x06, 0x08, 0x0B
EXTERNAL_FILES_MESSAGE = 0x07
CONTINUATION_MESSAGE, SYMBOL_TABLE_MESSAGE, SHARED_MESSAGE_FLAG = 0x10, 0x11, 0x02

# datatype classes (IV.A.2.d)
FIXED_POINT, FLOATING_POINT, STRING, ENUMERATED = 0, 1, 3, 8
OTHER_CLASSES = {2: "time", 4: "bitfield", 5: "opaque", 6: "compound", 7: "reference",
                 9: "variable-length", 10: "array"}

# layout classes and chunk index types (IV.A.2.i; the indexes are described in Appendix C)
COMPACT, CONTIGUOUS, CHUNKED = 0, 1, 2
CHUNK_INDEXES = {1: "single chunk", 2: "implicit", 3: "fixed array", 4: "extensible array", 5: "v2 B-tree"}
V1_BTREE_INDEX = "v1 B-tree"  # the only index of layout messages before version 4

# filters (IV.A.2.l)
DEFLATE, SHUFFLE, FLETCHER32 = 1, 2, 3
FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset", 307: "bzip2",
           32000: "lzf", 32001: "blosc", 32004: "lz4", 32008: "bitshuffle", 32013: "zfp", 32015: "zstd"}

# link types (IV.A.2.g; an old-style group's soft link is a symbol table entry of cache type 2,
# III.C), the longest chain of soft links followed, B-tree node and record types (III.A.1,
# III.A.2), fractal heap IDs (III.G)
HARD_LINK, SOFT_LINK, EXTERNAL_LINK = 0, 1, 64
SOFT_LINK_CACHE_TYPE = 2
MAX_SOFT_LINKS = 32
GROUP_NODE, CHUNK_NODE = 0, 1
LINK_NAME_RECORD, FILTERED_CHUNK_RECORD = 5, 11
MANAGED_OBJECT = 0


class H5Error(ValueError):
    """A file that is not HDF5, is damaged, or uses a feature this reader does not support; the
    message names the file (and the object) and says which."""


class _Unreadable(Exception):
    """A problem met inside the reader; the public entry points turn it into H5Error naming the file."""


class _Unsupported(_Unreadable):
    """A well-formed structure of a kind this reader does not read."""


@contextlib.contextmanager
def _reporting(path, what=""):
    prefix = f"{path}: {what}: " if what else f"{path}: "
    try:
        yield
    except _Unreadable as problem:
        raise H5Error(f"{prefix}{problem}") from None
    except (OSError, OverflowError, MemoryError) as error:  # a read or an allocation the file asked for
        raise H5Error(f"{prefix}{type(error).__name__}: {error}") from error


class _Cursor:
    """Reads little-endian fields one after another from `data`, never past its end; addresses
    and lengths have the file's sizes (II.A, "Size of Offsets" and "Size of Lengths")."""
    __slots__ = ("data", "position", "offset_size", "length_size")

    def __init__(self, data, position=0, offset_size=8, length_size=8):
        self.data, self.position = data, position
        self.offset_size, self.length_size = offset_size, length_size

    def bytes(self, count):
        start = self.position
        if count < 0 or start + count > len(self.data):
            raise _Unreadable("a structure runs past its end (the file is truncated or damaged)")
        self.position = start + count
        return self.data[start:start + count]

    def integer(self, size):
        return int.from_bytes(self.bytes(size), "little")

    def address(self):
        return self.integer(self.offset_size)

    def length(self):
        return self.integer(self.length_size)

    def name(self, padding=1):
        """A null-terminated name, its field padded to a multiple of `padding` bytes."""
        end = self.data.find(b"\0", self.position)
        if end < 0:
            raise _Unreadable("a name runs past the end of its structure")
        text = self.data[self.position:end]
        self.bytes(-(-(end + 1 - self.position) // padding) * padding)
        return text.decode("utf-8", "replace")


def _log2(value, what):
    if value <= 0 or value & (value - 1):
        raise _Unreadable(f"{what} {value} is not a power of two")
    return value.bit_length() - 1


def _bytes_for(count):
    """Bytes of the smallest field that holds `count` (how v2 B-trees size their record counts)."""
    return max(1, (count.bit_length() + 7) // 8)


class _SoftLink(str):
    """The path a soft link names (from the root if it starts with "/", else from its group)."""


class _OtherLink(str):
    """What a link this reader does not follow is ("an external link to FILE:/PATH", ...)."""


class H5Group:
    """A group: `g.keys()`, `name in g`, `g["a/b"]` (a path below the group, or from the root
    when it starts with "/"), `g.datasets()`. A missing name raises KeyError."""

    def __init__(self, file, name, links):
        self.file, self.name, self._links = file, name, links

    def keys(self):
        return sorted(self._links)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self._links)

    def __repr__(self):
        return f"<H5Group {self.name!r} ({len(self)} members)>"

    def __contains__(self, name):
        parent, _, last = name.rstrip("/").rpartition("/")
        try:
            group = self[parent or ("/" if name.startswith("/") else "")]  # "/x" is looked up from the root
        except KeyError:
            return False
        return isinstance(group, H5Group) and (not last or last in group._links)

    def __getitem__(self, name):
        node = self.file if name.startswith("/") else self
        for part in [part for part in name.split("/") if part]:
            if not isinstance(node, H5Group) or part not in node._links:
                raise KeyError(f"{self.file.path}: no object named {name!r}")
            node = node._member(part)
        return node

    def datasets(self):
        """{path below this group ("group/name"): H5Dataset} of every dataset reached by hard or
        soft links (each group walked once), leaving out links and objects of kinds this reader does
        not read (opening one says which)."""
        found, pending, walked = {}, [("", self)], {self}
        while pending:
            prefix, group = pending.pop()
            for name in group.keys():
                member = group._member(name, skip_unsupported=True)
                if isinstance(member, H5Dataset):
                    found[prefix + name] = member
                elif member is not None and member not in walked:  # each group once
                    walked.add(member)
                    pending.append((prefix + name + "/", member))
        return dict(sorted(found.items()))

    def _member(self, name, skip_unsupported=False):
        """The object the link `name` leads to; for a link or object of a kind this reader does
        not read, None with skip_unsupported, else an H5Error saying what it is."""
        path = f"{self.name.rstrip('/')}/{name}"
        with _reporting(self.file.path, f"object {path.lstrip('/')!r}"):
            try:
                return self._target(name, 0)
            except _Unsupported:
                if not skip_unsupported:
                    raise

    def _target(self, name, hops):
        """The object the link `name` leads to, soft links followed (`hops`: those followed so
        far, to end a loop); _Unsupported for other links, a dangling soft link or a loop."""
        target = self._links[name]
        if isinstance(target, _OtherLink):
            raise _Unsupported(f"is {target}, which this reader does not follow")
        if not isinstance(target, _SoftLink):
            return self.file._object(target, f"{self.name.rstrip('/')}/{name}")
        if hops >= MAX_SOFT_LINKS:
            raise _Unsupported(f"is a soft link to {target!r} through more than {MAX_SOFT_LINKS} "
                               "soft links (a loop?)")
        node = self.file if target.startswith("/") else self
        for part in [part for part in target.split("/") if part not in ("", ".")]:
            if not isinstance(node, H5Group) or part not in node._links:
                raise _Unsupported(f"is a soft link to {target!r}, which does not exist")
            node = node._target(part, hops + 1)
        return node


class H5File(H5Group):
    """An HDF5 file opened for reading, and its root group: `f["name"]`, `f["group/name"]`,
    `"name" in f`, `f.keys()`, `f.datasets()`. Close it with `close()` or a `with` statement.

    Raises H5Error (naming the file) when the file cannot be opened, is not HDF5 or is damaged.
    """

    def __init__(self, path):
        self.path, self._objects = os.fspath(path), {}
        try:
            self._file = open(self.path, "rb")
        except OSError as error:
            raise H5Error(f"{self.path}: cannot open ({error.strerror or error})") from error
        try:
            with _reporting(self.path):
                self._size = os.fstat(self._file.fileno()).st_size
                root = self._superblock()
                super().__init__(self, "/", self._group_links(self._header_messages(root)))
                self._objects[root] = self
        except BaseException:
            self.close()
            raise

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<H5File {self.path!r}>"

    # -- reading bytes --------------------------------------------------------------------------
    def _read(self, address, count):
        """`count` bytes at `address` (relative to the base address, II.A)."""
        if self._file.closed:
            raise _Unreadable("the file is closed")
        if count < 0 or address >= self._undefined or self._base + address + count > self._size:
            raise _Unreadable(f"offset {address} + {count} bytes runs past the {self._size}-byte file")
        self._file.seek(self._base + address)
        data = self._file.read(count)
        if len(data) != count:
            raise _Unreadable(f"short read at offset {address}")
        return data

    def _cursor(self, data, position=0):
        return _Cursor(data, position, self._offset_size, self._length_size)

    def _structure(self, address, size, signature=b""):
        """A cursor after `signature` over the `size` bytes at `address`, fewer at the end of the
        file (a structure's size is known only once its start is read)."""
        if address >= self._undefined or self._base + address >= self._size:
            raise _Unreadable(f"offset {address} is past the end of the file ({self._size} bytes)")
        cursor = self._cursor(self._read(address, min(size, self._size - self._base - address)))
        if cursor.bytes(len(signature)) != signature:
            raise _Unreadable(f"expected a {signature.decode()} structure here (a damaged file?)")
        return cursor

    def _superblock(self):
        """The root group's address, from II.A "Disk Format: Level 0A - Format Signature and
        Superblock" (versions 0 to 3), found at 0, 512, 1024, ... after a user block."""
        for start in [0] + [512 << k for k in range(64)]:
            self._file.seek(start)
            cursor = _Cursor(self._file.read(200), 8)
            if len(cursor.data) < 48:
                raise _Unreadable("not an HDF5 file (no superblock signature found)")
            if cursor.data[:8] == SIGNATURE:
                break
        version = cursor.integer(1)
        if version > 3:
            raise _Unsupported(f"superblock version {version} is not supported")
        cursor.bytes(4 if version < 2 else 0)  # free-space, root entry and shared header versions, reserved
        offset_size, length_size = cursor.integer(1), cursor.integer(1)
        cursor.bytes((9, 13, 1, 1)[version])  # reserved, group K values, flags, [chunk K]; or flags
        if offset_size not in (2, 4, 8) or length_size not in (2, 4, 8):
            raise _Unreadable(f"bad sizes of offsets/lengths {offset_size}/{length_size} in the superblock")
        self._offset_size = cursor.offset_size = offset_size
        self._length_size = cursor.length_size = length_size
        self._undefined = (1 << 8 * offset_size) - 1  # the "undefined address", all bits set
        self._base = cursor.address()
        if self._base >= self._size:
            raise _Unreadable("the superblock's base address is past the end of the file")
        # versions 0, 1: free-space, end of file and driver addresses, then the root's symbol table
        # entry (III.C) with its link name offset first; versions 2, 3: extension, end of file addresses
        cursor.bytes(3 * offset_size + length_size if version < 2 else 2 * offset_size)
        return cursor.address()

    # -- objects --------------------------------------------------------------------------------
    def _header_messages(self, address):
        """[(message type, body or None when shared)] of the object header at `address`, reading
        IV.A.1.a/IV.A.1.b "Version 1/2 Data Object Header Prefix" and following IV.A.2.q "The
        Object Header Continuation Message" into further chunks."""
        cursor = self._structure(address, 48)
        version = 2 if cursor.bytes(4) == b"OHDR" else 1
        cursor.position = 4 if version == 2 else 0
        if cursor.integer(1) != version:
            raise _Unreadable(f"no object header (of a known version) at offset {address}")
        if version == 1:
            cursor.bytes(7)  # reserved, number of messages, reference count
            chunks, flags = [(address + 16, cursor.integer(4))], 0  # the messages are 8-byte aligned
        else:
            flags = cursor.integer(1)
            cursor.bytes((16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0))  # times, attribute limits
            size = cursor.integer(1 << (flags & 3))
            chunks = [(address + cursor.position, size)]
        # each message: its type (2 bytes in version 1, else 1), size and flags, then 3 reserved
        # bytes (version 1) or its creation order if the header's flags say so (version 2)
        prefix = 8 if version == 1 else 4 + (2 if flags & 0x04 else 0)
        messages, seen = [], set()
        while chunks:
            where, size = chunks.pop(0)
            if (where, size) in seen or len(seen) > 1000:
                raise _Unreadable("object header continuations form a cycle")
            seen.add((where, size))
            continued = version == 2 and len(seen) > 1  # OCHK, the messages, a checksum
            cursor = self._structure(where, size, b"OCHK" if continued else b"")
            while cursor.position + prefix <= size - (4 if continued else 0):
                kind, length = cursor.integer(3 - version), cursor.integer(2)
                shared = cursor.integer(1) & SHARED_MESSAGE_FLAG
                cursor.bytes(prefix - 6 + version)
                body = cursor.bytes(length)
                if kind == CONTINUATION_MESSAGE:
                    continuation = self._cursor(body)
                    chunks.append((continuation.address(), continuation.length()))
                else:
                    messages.append((kind, None if shared else body))
        return messages

    def _object(self, address, name):
        """The group or dataset whose object header is at `address` (a dataset has a layout)."""
        if address not in self._objects:
            messages = self._header_messages(address)
            if any(kind == LAYOUT_MESSAGE for kind, _ in messages):
                self._objects[address] = H5Dataset(self, name, messages)
            else:
                self._objects[address] = H5Group(self, name, self._group_links(messages))
        return self._objects[address]

    # -- groups ---------------------------------------------------------------------------------
    def _group_links(self, messages):
        """{name: object header address, _SoftLink or _OtherLink} of a group, old style (a symbol table) or new style (link messages, or dense link storage)."""
        readers = {SYMBOL_TABLE_MESSAGE: self._symbol_table, LINK_MESSAGE: lambda body: [self._link(body)],
                   LINK_INFO_MESSAGE: self._dense_links}
        links = {}
        for kind, body in messages:
            if kind in readers and body is None:
                raise _Unsupported("a group uses shared header messages, which are not supported")
            links.update(readers[kind](body) if kind in readers else {})
        return links

    def _symbol_table(self, body):
        """Links of an old-style group: IV.A.2.r "The Symbol Table Message" gives a v1 B-tree of
        III.B "Group Symbol Table Nodes", whose III.C "Symbol Table Entry" names are in a local heap."""
        cursor = self._cursor(body)
        btree, heap = cursor.address(), cursor.address()
        names, links = self._local_heap(heap), {}
        entry_size = self._length_size + self._offset_size + 24
        for _, node in self._v1_btree(btree, GROUP_NODE):
            cursor = self._structure(node, 8, b"SNOD")
            cursor.bytes(2)  # version, reserved
            count = cursor.integer(2)
            cursor = self._cursor(self._read(node + 8, count * entry_size))
            for _ in range(count):
                name_offset, header = cursor.length(), cursor.address()
                cache_type = cursor.integer(4)
                cursor.bytes(4)  # reserved
                scratch = self._cursor(cursor.bytes(16))  # a soft link: where its value is in the heap
                name = self._cursor(names, min(name_offset, len(names))).name()
                links[name] = header
                if cache_type == SOFT_LINK_CACHE_TYPE:
                    links[name] = _SoftLink(self._cursor(names, min(scratch.integer(4), len(names))).name())
        return links

    def _local_heap(self, address):
        """The data segment of III.D "Disk Format: Level 1D - Local Heaps"."""
        cursor = self._structure(address, 8 + 2 * self._length_size + self._offset_size, b"HEAP")
        cursor.bytes(4)  # version, reserved
        size, _ = cursor.length(), cursor.length()  # data segment size, free list head
        return self._read(cursor.address(), size)

    def _link(self, body):
        """(name, target) from IV.A.2.g "The Link Message": an object header address (a hard
        link), a _SoftLink, or an _OtherLink saying what an external or user-defined link is."""
        cursor = self._cursor(body)
        if cursor.integer(1) != 1:
            raise _Unreadable("a link message has an unknown version")
        flags = cursor.integer(1)
        kind = cursor.integer(1) if flags & 0x08 else HARD_LINK
        cursor.bytes((8 if flags & 0x04 else 0) + (1 if flags & 0x10 else 0))  # creation order, character set
        name = cursor.bytes(cursor.integer(1 << (flags & 3))).decode("utf-8", "replace")
        if kind == HARD_LINK:
            return name, cursor.address()
        value = cursor.bytes(cursor.integer(2))
        if kind == SOFT_LINK:
            return name, _SoftLink(value.decode("utf-8", "replace"))
        if kind == EXTERNAL_LINK:  # version and flags, then the file's name and the object's path
            file_name, _, path = value[1:].rstrip(b"\0").partition(b"\0")
            return name, _OtherLink(f"an external link to {file_name.decode('utf-8', 'replace')}:"
                                    f"{path.decode('utf-8', 'replace')}")
        return name, _OtherLink(f"a user-defined link (type {kind})")

    def _dense_links(self, body):
        """Links kept in a fractal heap and indexed by name in a v2 B-tree, as IV.A.2.c "The Link
        Info Message" says (each heap object is a link message)."""
        cursor = self._cursor(body)
        if cursor.integer(1) != 0:
            raise _Unreadable("a link info message has an unknown version")
        cursor.bytes(8 if cursor.integer(1) & 0x01 else 0)  # maximum creation index
        heap, btree = cursor.address(), cursor.address()
        if heap == self._undefined:
            return {}
        blocks, heap_offset_size = self._fractal_heap(heap)
        starts = [start for start, _, _ in blocks]
        record_type, records = self._v2_btree(btree)
        links = {}
        for record in records:  # hash + heap ID, or creation order + heap ID
            cursor = self._cursor(record, 4 if record_type == LINK_NAME_RECORD else 8)
            if cursor.integer(1) >> 4 & 3 != MANAGED_OBJECT:
                raise _Unsupported("links stored as huge or tiny fractal heap objects are not supported")
            offset = cursor.integer(heap_offset_size)
            i = bisect.bisect_right(starts, offset) - 1
            if i < 0 or offset >= blocks[i][0] + blocks[i][2]:
                raise _Unreadable(f"fractal heap offset {offset} is in no block")
            start, address, size = blocks[i]
            links.update([self._link(self._read(address + offset - start, start + size - offset))])
        return links

    def _fractal_heap(self, address):
        """The direct blocks of a fractal heap, sorted (heap offset, file address, size), and the size
        of heap offsets in bytes, from III.G "Disk Format: Level 1G - Fractal Heap" (all its blocks)."""
        cursor = self._structure(address, 256, b"FRHP")
        cursor.bytes(3)  # version, heap ID length
        filtered = cursor.integer(2)  # the size of the filter information
        cursor.bytes(5 + 10 * self._length_size + 2 * self._offset_size)  # flags, counts, sizes, free space
        width, start_size, max_direct = cursor.integer(2), cursor.length(), cursor.length()
        max_heap_bits = cursor.integer(2)
        cursor.bytes(2)  # starting number of rows
        root, root_rows = cursor.address(), cursor.integer(2)
        if filtered:
            raise _Unsupported("filtered fractal heaps are not supported")
        if root_rows > 64 or max_heap_bits > 64:
            raise _Unreadable("the fractal heap header is damaged")
        log_width, log_start = _log2(width, "heap table width"), _log2(start_size, "heap block size")
        direct_rows = _log2(max_direct, "heap block size") - log_start + 2
        heap_offset_size, blocks = (max_heap_bits + 7) // 8, []
        block_prefix = 5 + self._offset_size + heap_offset_size  # signature, version, header, block offset

        def direct(address, size):
            cursor = self._structure(address, block_prefix, b"FHDB")
            cursor.bytes(1 + self._offset_size)  # version, heap header address
            blocks.append((cursor.integer(heap_offset_size), address, size))

        def indirect(address, rows, depth):
            if depth > 8 or len(blocks) > MAX_NODES:
                raise _Unreadable("the fractal heap is too deep")
            cursor = self._structure(address, block_prefix + rows * width * self._offset_size, b"FHIB")
            cursor.bytes(block_prefix - 4)
            for row in range(rows):
                size = start_size if row == 0 else start_size << (row - 1)
                for child in [cursor.address() for _ in range(width)]:
                    if child != self._undefined and row < direct_rows:
                        direct(child, size)
                    elif child != self._undefined:
                        indirect(child, size.bit_length() - log_start - log_width, depth + 1)

        if root != self._undefined:
            direct(root, start_size) if root_rows == 0 else indirect(root, root_rows, 0)
        return sorted(blocks), heap_offset_size

    # -- B-trees --------------------------------------------------------------------------------
    def _v1_btree(self, address, node_type, rank=0):
        """(key bytes, child address) of every entry in the leaves of a tree from III.A.1 "Disk
        Format: Level 1A1 - Version 1 B-trees"; a key is a heap offset (group nodes) or a chunk's
        size, filter mask and offsets (chunk nodes of a dataset of `rank` dimensions)."""
        key_size = self._length_size if node_type == GROUP_NODE else 8 + 8 * (rank + 1)
        header_size = 8 + 2 * self._offset_size  # signature, type, level, entries, two siblings
        entries, pending, seen = [], [(address, None)], set()
        while pending:
            address, level_wanted = pending.pop()
            if address in seen or len(seen) > MAX_NODES:
                raise _Unreadable("a version 1 B-tree has a cycle")
            seen.add(address)
            cursor = self._structure(address, header_size, b"TREE")
            kind, level, count = cursor.integer(1), cursor.integer(1), cursor.integer(2)
            if kind != node_type or level_wanted not in (None, level):
                raise _Unreadable("a version 1 B-tree node has the wrong type or level")
            size = header_size + count * (key_size + self._offset_size) + key_size
            cursor = self._cursor(self._read(address, size), header_size)
            for _ in range(count):
                key, child = cursor.bytes(key_size), cursor.address()
                (entries.append((key, child)) if level == 0 else pending.append((child, level - 1)))
        return entries

    def _v2_btree(self, address):
        """(record type, [record bytes]) of every record in a tree from III.A.2 "Disk Format:
        Level 1A2 - Version 2 B-trees" (header, internal and leaf nodes)."""
        cursor = self._structure(address, 64, b"BTHD")
        cursor.bytes(1)  # version
        record_type, node_size, record_size = cursor.integer(1), cursor.integer(4), cursor.integer(2)
        depth = cursor.integer(2)
        cursor.bytes(2)  # split and merge percentages
        root, root_count, total = cursor.address(), cursor.integer(2), cursor.length()
        if record_size == 0 or node_size < 10 + record_size or depth > 32 or node_size > self._size:
            raise _Unreadable("the v2 B-tree header is damaged")
        # the most records a node at each depth holds (10 bytes: signature, version, type, checksum),
        # the records below it, and the sizes of the record counts in child pointers
        most = [(node_size - 10) // record_size]
        below, count_size, total_size = [most[0]], _bytes_for(most[0]), [0]
        for level in range(1, depth + 1):
            pointer = self._offset_size + count_size + total_size[level - 1]
            most.append((node_size - 10 - pointer) // (record_size + pointer))
            below.append((most[level] + 1) * below[level - 1] + most[level])
            total_size.append(_bytes_for(below[level]))
        records, seen = [], set()
        pending = [(root, root_count, depth)] if root != self._undefined else []
        while pending:
            address, count, level = pending.pop()
            if address in seen or len(seen) > MAX_NODES or count > most[level] or len(records) > total:
                raise _Unreadable("a v2 B-tree is inconsistent (a cycle or a bad record count)")
            seen.add(address)
            cursor = self._structure(address, node_size, b"BTLF" if level == 0 else b"BTIN")
            cursor.bytes(2)  # version, type
            records.extend(cursor.bytes(record_size) for _ in range(count))
            for _ in range(count + 1 if level else 0):
                child, child_count = cursor.address(), cursor.integer(count_size)
                cursor.bytes(total_size[level - 1])
                pending.append((child, child_count, level - 1))
        return record_type, records


def _datatype(body):
    """(dtype as stored, dtype as read) from IV.A.2.d "The Datatype Message": fixed-point and
    IEEE floating-point numbers of either byte order, fixed-length strings, and enumerations as
    their base integer, except h5py's bool (an 8-bit enumeration FALSE = 0, TRUE = 1), read as bool."""
    cursor = _Cursor(body)
    class_and_version, bits, size = cursor.integer(1), cursor.integer(3), cursor.integer(4)
    kind, version, members = class_and_version & 15, class_and_version >> 4, bits & 0xFFFF
    enumeration = kind == ENUMERATED
    if enumeration:  # its base type follows
        kind, bits, size = cursor.integer(1) & 15, cursor.integer(3), cursor.integer(4)
        if kind != FIXED_POINT:
            raise _Unsupported("has an enumeration of non-integers, which is not supported")
        cursor.bytes(4)  # the base type's bit offset and precision
    stored = _number_or_string(kind, bits, size)
    if enumeration and members == 2 and size == 1:  # names (padded to 8 bytes before version 3), values
        names = [cursor.name(8 if version < 3 else 1) for _ in range(2)]
        if dict(zip(names, cursor.bytes(2))) == {"FALSE": 0, "TRUE": 1}:
            return stored, np.dtype(bool)
    return stored, stored.newbyteorder("=")


def _number_or_string(kind, bits, size):
    big_endian = ">" if bits & 0x01 else "<"
    if kind == FIXED_POINT and size in (1, 2, 4, 8):
        return np.dtype(f"{big_endian}{'i' if bits & 0x08 else 'u'}{size}")
    if kind == FLOATING_POINT and size in (2, 4, 8) and not bits & 0x40:  # 0x40: VAX byte order
        return np.dtype(f"{big_endian}f{size}")
    if kind == STRING and 0 < size < 1 << 31:
        return np.dtype(f"S{size}")
    if kind in (FIXED_POINT, FLOATING_POINT, STRING):
        what = {FIXED_POINT: "integer", FLOATING_POINT: "float", STRING: "string"}[kind]
        raise _Unsupported(f"has an unsupported {size}-byte {what} format")
    raise _Unsupported(f"has a {OTHER_CLASSES.get(kind, f'class-{kind}')} datatype, which is not supported")


def _fletcher32(data):
    """(sum1, sum2) of HDF5's Fletcher-32 checksum (as libhdf5's H5_checksum_fletcher32): 16-bit
    big-endian words, an odd last byte taken as a high byte, both running sums modulo 65535."""
    words = np.frombuffer(data, ">u2", len(data) // 2).astype(np.uint64)
    if len(data) % 2:
        words = np.append(words, np.uint64(data[-1] << 8))
    weights = (len(words) - np.arange(len(words), dtype=np.uint64)) % np.uint64(65535)
    return int(words.sum()) % 65535, int((words * weights).sum()) % 65535


class H5Dataset:
    """A dataset: `.name`, `.shape`, `.ndim`, `.size`, `.dtype`, `.chunks` and `.chunk_index` (None
    unless chunked; one of CHUNK_INDEXES or "v1 B-tree"), `.stored_chunks()`, and numpy-style reads
    into a new array: `ds[()]`, `ds[:]`, `ds[a:b]`, `ds[i, j]`, `ds[a:b, ...]`, positive steps,
    and on the first axis a sorted list of distinct indices (`ds[[2, 5, 9]]`) or a boolean mask of
    the axis' length (`ds[mask]`, its True rows). A bad index raises
    IndexError or TypeError as in numpy; an unsorted index list (h5py refuses those too) or a
    damaged or unsupported dataset raises H5Error naming the file and the dataset."""

    def __init__(self, file, name, messages):
        self.file, self.name = file, name
        first = dict(reversed(messages))  # the first message of each type
        if DATASPACE_MESSAGE not in first or DATATYPE_MESSAGE not in first:
            raise _Unreadable("a dataset has no dataspace or no datatype message")
        read = (DATASPACE_MESSAGE, DATATYPE_MESSAGE, FILL_VALUE_MESSAGE, OLD_FILL_VALUE_MESSAGE,
                LAYOUT_MESSAGE, FILTER_PIPELINE_MESSAGE)
        if any(first.get(kind, b"") is None for kind in read):
            raise _Unsupported("uses shared header messages (a committed datatype?), which are not supported")
        self._stored_dtype, self.dtype = _datatype(first[DATATYPE_MESSAGE])
        self.shape, self._max_shape = self._dataspace(first[DATASPACE_MESSAGE])
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape, dtype=np.int64))
        self._fill = self._fill_value(first.get(FILL_VALUE_MESSAGE), first.get(OLD_FILL_VALUE_MESSAGE))
        self._filters = self._filter_pipeline(first.get(FILTER_PIPELINE_MESSAGE))
        self._layout(first[LAYOUT_MESSAGE])
        self._external = EXTERNAL_FILES_MESSAGE in first  # IV.A.2.h: its data is in other files
        self._chunk_table, self._recent_chunks = None, {}

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a scalar dataset")
        return self.shape[0]

    def __repr__(self):
        return f"<H5Dataset {self.name.lstrip('/')!r} {self.shape} {self.dtype}>"

    def __getitem__(self, key):
        with _reporting(self.file.path, f"dataset {self.name.lstrip('/')!r}"):
            selection, shape = self._selection(key)
            return self._read(selection).reshape(shape)

    def stored_chunks(self):
        """{first element of the chunk: (byte offset in the file, stored size in bytes)} of every chunk
        written to the file (the others read as the fill value); {} unless the dataset is chunked."""
        if self.chunks is None:
            return {}
        with _reporting(self.file.path, f"dataset {self.name.lstrip('/')!r}"):
            table = self._chunks()
        return {tuple(i * c for i, c in zip(index, self.chunks)): (self.file._base + address, size)
                for index, (address, size, _) in sorted(table.items())}

    # -- the messages that describe a dataset ---------------------------------------------------
    def _dataspace(self, body):
        """(shape, maximum shape) from IV.A.2.b "The Dataspace Message" (versions 1 and 2)."""
        cursor = self.file._cursor(body)
        version, rank, flags = cursor.integer(1), cursor.integer(1), cursor.integer(1)
        cursor.bytes(5 if version == 1 else 1)  # reserved; or the dataspace type
        if version not in (1, 2) or rank > 32:
            raise _Unreadable("the dataspace message is damaged")
        shape = tuple(cursor.length() for _ in range(rank))
        maximum = tuple(cursor.length() for _ in range(rank)) if flags & 0x01 else shape
        if float(np.prod(shape, dtype=float)) * self._stored_dtype.itemsize > 2 ** 50:
            raise _Unreadable(f"has an absurd shape {shape}")
        return shape, maximum

    def _fill_value(self, new, old):
        """The value of elements never written, from IV.A.2.f "The Data Storage - Fill Value
        Message" (versions 1 to 3) or else IV.A.2.e "... Fill Value (Old) Message"; zero if neither."""
        value = None
        if new is not None:
            cursor = self.file._cursor(new)
            version = cursor.integer(1)
            if version == 3:
                defined = cursor.integer(1) & 0x20
            else:
                cursor.bytes(2)  # allocation time, write time
                defined = (cursor.integer(1) or version == 1) and cursor.position + 4 <= len(new)
            value = cursor.bytes(cursor.integer(4)) if defined else None
        if value is None and old is not None:
            cursor = self.file._cursor(old)
            value = cursor.bytes(cursor.integer(4))
        if not value or len(value) != self._stored_dtype.itemsize:
            return np.zeros((), self.dtype)
        return np.frombuffer(value, self._stored_dtype)[0].astype(self.dtype)

    def _filter_pipeline(self, body):
        """[(filter id, client values)] from IV.A.2.l "The Data Storage - Filter Pipeline
        Message" (versions 1 and 2), in the order they were applied when writing."""
        if body is None:
            return []
        cursor = self.file._cursor(body)
        version, count = cursor.integer(1), cursor.integer(1)
        cursor.bytes(6 if version == 1 else 0)  # reserved
        filters = []
        for _ in range(count):
            identifier = cursor.integer(2)
            name_length = cursor.integer(2) if version == 1 or identifier >= 256 else 0
            cursor.bytes(2)  # flags
            values = cursor.integer(2)
            cursor.bytes(-(-name_length // 8) * 8 if version == 1 else name_length)  # the name
            filters.append((identifier, [cursor.integer(4) for _ in range(values)]))
            cursor.bytes(4 if version == 1 and values % 2 else 0)  # padding
        return filters

    def _layout(self, body):
        """Where the data is, from IV.A.2.i "The Data Layout Message" (versions 1 to 5): compact
        data in the message itself, one contiguous block, or chunks found through an index."""
        cursor, undefined = self.file._cursor(body), self.file._undefined
        version = cursor.integer(1)
        self.chunks = self.chunk_index = self._compact_data = self._single_chunk = None
        self._address, dimensions = undefined, []  # _single_chunk: (stored size, filter mask) if filtered
        if version in (1, 2):
            rank, layout = cursor.integer(1), cursor.integer(1)
            cursor.bytes(5)  # reserved
            self._address = cursor.address() if layout != COMPACT else undefined
            dimensions = [cursor.integer(4) for _ in range(rank)]
            if layout == COMPACT:
                self._compact_data = cursor.bytes(cursor.integer(4))
            elif layout == CHUNKED:
                self.chunk_index = V1_BTREE_INDEX
        elif version in (3, 4, 5):  # version 5 (libhdf5 2.0) is laid out as version 4
            layout = cursor.integer(1)
            if layout == COMPACT:
                self._compact_data = cursor.bytes(cursor.integer(2))
            elif layout == CONTIGUOUS:
                self._address = cursor.address()
            elif layout == CHUNKED and version == 3:
                rank, self._address = cursor.integer(1), cursor.address()
                dimensions, self.chunk_index = [cursor.integer(4) for _ in range(rank)], V1_BTREE_INDEX
            elif layout == CHUNKED:
                flags, rank, size = cursor.integer(1), cursor.integer(1), cursor.integer(1)
                dimensions, index = [cursor.integer(size) for _ in range(rank)], cursor.integer(1)
                if index not in CHUNK_INDEXES:
                    raise _Unsupported(f"has an unknown chunk index type {index}")
                self.chunk_index = CHUNK_INDEXES[index]
                if self.chunk_index == "single chunk" and flags & 0x02:  # a filtered single chunk
                    self._single_chunk = (cursor.length(), cursor.integer(4))
                # the index's parameters: page bits; or five sizes; or node size, split and merge percentages
                cursor.bytes({"fixed array": 1, "extensible array": 5, "v2 B-tree": 6}.get(self.chunk_index, 0))
                self._address = cursor.address()
            else:
                raise _Unsupported(f"has layout class {layout} (a virtual dataset?), which is not supported")
        else:
            raise _Unsupported(f"has a layout message of unsupported version {version}")
        if self.chunk_index is not None:  # the chunk's dimensions, then the size of one element
            if len(dimensions) != len(self.shape) + 1 or not all(dimensions[:-1]):
                raise _Unreadable("its chunk dimensions do not match its dataspace")
            self.chunks = tuple(dimensions[:-1])
        self._chunk_shape = self.chunks or self.shape
        self._chunk_bytes = int(np.prod(self._chunk_shape, dtype=np.int64)) * self._stored_dtype.itemsize

    # -- selections and reads -------------------------------------------------------------------
    def _selection(self, key):
        """One `range` or sorted index array per dimension, and the shape of the result."""
        key = key if isinstance(key, tuple) else (key,)
        ellipses = [i for i, k in enumerate(key) if k is Ellipsis]
        if len(ellipses) > 1 or len(key) - len(ellipses) > len(self.shape):
            raise IndexError(f"too many indices (or more than one '...') for a dataset of shape {self.shape}")
        at = ellipses[0] if ellipses else len(key)  # what '...' or the end of the key stands for: full slices
        key = key[:at] + (slice(None),) * (len(self.shape) - len(key) + len(ellipses)) + key[at + 1:]
        selection, shape = [], []
        for axis, (item, length) in enumerate(zip(key, self.shape)):
            listed = np.asarray(item) if axis == 0 and isinstance(item, (list, np.ndarray)) else None
            if isinstance(item, slice):
                wanted = range(*item.indices(length))
                if wanted.step < 1:
                    raise IndexError("negative or zero slice steps are not supported")
                shape.append(len(wanted))
            elif isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
                i = int(item) + (length if item < 0 else 0)
                if not 0 <= i < length:
                    raise IndexError(f"index {int(item)} is out of range for axis {axis} with size {length}")
                wanted = range(i, i + 1)
            elif listed is not None and listed.ndim == 1 and listed.dtype == bool:  # a mask, as in h5py
                if len(listed) != length:
                    raise IndexError(f"a boolean mask of {len(listed)} entries for axis 0 of size {length}")
                wanted = np.flatnonzero(listed)
                shape.append(len(wanted))
            elif listed is not None and listed.ndim == 1 and (listed.dtype.kind in "iu" or listed.size == 0):
                wanted = listed.astype(np.int64)
                if wanted.size and (wanted.min() < 0 or wanted.max() >= length):
                    raise IndexError(f"an index in the list is out of range 0..{length - 1} for axis 0")
                if (np.diff(wanted) <= 0).any():
                    raise _Unsupported("this selection is not supported: an index list must be increasing, "
                                       "without repeats, as in h5py (read np.unique of it, then reorder)")
                shape.append(len(wanted))
            else:
                described = f"array {listed.dtype} {listed.shape}" if listed is not None else repr(item)[:80]
                raise TypeError(f"unsupported index ({described}) on axis {axis}: use integers, slices, ..., "
                                "or on the first axis a sorted index list or a boolean mask")
            selection.append(wanted)
        return selection, tuple(shape)

    def _read(self, selection):
        if self.file._file.closed:
            raise _Unreadable("the file is closed")
        if self._external:
            raise _Unsupported("keeps its data in external files (IV.A.2.h, an External Data Files "
                               "message), which this reader does not read")
        for number, _ in self._filters:
            if number not in (DEFLATE, SHUFFLE, FLETCHER32):
                name = FILTERS.get(number, "unknown")
                raise _Unsupported(f"uses filter {number} ({name}), which is not supported")
        shape = [len(wanted) for wanted in selection]
        size = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        if size > max(1 << 28, 256 * self.file._size):
            raise _Unreadable(f"a read of {size} bytes is implausibly large for a {self.file._size}-byte file")
        out = np.empty(shape, self.dtype)
        if out.size == 0:
            return out
        table, chunk_shape = self._chunks(), self._chunk_shape
        touched = [np.unique(wanted // c).tolist() if isinstance(wanted, np.ndarray) else
                   range(wanted[0] // c, wanted[-1] // c + 1) for wanted, c in zip(selection, chunk_shape)]
        keep = int(np.prod([len(t) for t in touched])) <= 4  # small reads keep their chunks for the next one
        for index in itertools.product(*touched):
            parts = [_within(wanted, i * c, c) for wanted, i, c in zip(selection, index, chunk_shape)]
            if None not in parts:
                target, source = tuple(p[0] for p in parts), tuple(p[1] for p in parts)
                entry = table.get(index)
                out[target] = self._fill if entry is None else self._chunk(index, entry, keep)[source]
        return out

    def _chunk(self, index, entry, keep):
        """One chunk, decoded through the filter pipeline, as an array of the chunk shape; the
        data of a dataset not chunked: from its layout message (compact) or memory-mapped."""
        if self._compact_data is not None:
            if len(self._compact_data) < self._chunk_bytes:
                raise _Unreadable("its compact data is shorter than its shape")
            return np.frombuffer(self._compact_data, self._stored_dtype, self.size).reshape(self.shape)
        if self.chunks is None:
            if self.file._base + self._address + self._chunk_bytes > self.file._size:
                raise _Unreadable("its contiguous data runs past the end of the file")
            return np.memmap(self.file.path, self._stored_dtype, "r", self.file._base + self._address,
                             self.shape or (1,)).reshape(self.shape)
        if index in self._recent_chunks:
            return self._recent_chunks[index]
        address, size, filter_mask = entry
        if size > max(2 * self._chunk_bytes + 1024, 1 << 20):
            raise _Unreadable(f"chunk {index} claims {size} stored bytes for a {self._chunk_bytes}-byte chunk")
        data = self.file._read(address, size)
        for i in reversed(range(len(self._filters))):  # undo the filters in reverse order
            if not filter_mask >> i & 1:
                data = self._unfilter(self._filters[i], data, index)
        if len(data) < self._chunk_bytes:
            raise _Unreadable(f"chunk {index} decodes to {len(data)} bytes, expected {self._chunk_bytes}")
        count = int(np.prod(self._chunk_shape))
        chunk = np.frombuffer(data, self._stored_dtype, count).reshape(self._chunk_shape)
        if keep:
            self._recent_chunks = dict(list(self._recent_chunks.items())[-3:]) | {index: chunk}
        return chunk

    def _unfilter(self, chunk_filter, data, index):
        """Undo one filter of IV.A.2.l: deflate (zlib), shuffle (bytes grouped by their position
        in an element), fletcher32 (a checksum appended to the data)."""
        identifier, values = chunk_filter
        if identifier == DEFLATE:
            inflater = zlib.decompressobj()
            try:
                data = inflater.decompress(data, self._chunk_bytes + 8)
            except zlib.error as error:
                raise _Unreadable(f"chunk {index} is not valid deflate data ({error})") from None
            if not inflater.eof:
                raise _Unreadable(f"chunk {index} is not a complete deflate stream (or decodes to too many bytes)")
            return data
        if identifier == SHUFFLE:
            element = values[0] if values else self._stored_dtype.itemsize
            count = len(data) // element if element else 0
            if element <= 1 or count == 0:
                return data
            shuffled = np.frombuffer(data, np.uint8, count * element).reshape(element, count)
            return shuffled.T.tobytes() + bytes(data[count * element:])
        if len(data) < 4:
            raise _Unreadable(f"chunk {index} is too short for its fletcher32 checksum")
        body, stored = memoryview(data)[:-4], int.from_bytes(data[-4:], "little")
        first, second = _fletcher32(body)
        if (stored & 0xFFFF) % 65535 != first or (stored >> 16) % 65535 != second:
            raise _Unreadable(f"chunk {index} fails its fletcher32 checksum (the data is damaged)")
        return body

    # -- chunk indexes --------------------------------------------------------------------------
    def _chunks(self):
        """{chunk position in the chunk grid: (address, stored size, filter mask)} of the chunks
        in the file, read once from whichever index the layout names."""
        if self._chunk_table is None:
            self._chunk_table = dict(self._index())
        return self._chunk_table

    def _index(self):
        """(chunk position, (address, stored size, filter mask)) of each chunk in the index; the
        data of a dataset not chunked is one chunk (unless never written)."""
        rank, plain = len(self.shape), (self._chunk_bytes, 0)
        if self._address == self.file._undefined and self._compact_data is None:
            return
        if self.chunk_index in (None, "single chunk"):  # Appendix C, "The Single Chunk Index"
            yield (0,) * rank, (self._address,) + (self._single_chunk or plain)
        elif self.chunk_index == V1_BTREE_INDEX:  # keys: stored size, filter mask, element offsets
            for key, address in self.file._v1_btree(self._address, CHUNK_NODE, rank):
                cursor = self.file._cursor(key)
                size, mask = cursor.integer(4), cursor.integer(4)
                yield tuple(cursor.integer(8) // c for c in self.chunks), (address, size, mask)
        elif self.chunk_index == "v2 B-tree":  # Appendix C, "The Version 2 B-trees Index"
            record_type, records = self.file._v2_btree(self._address)
            for record in records:  # address, [stored size, filter mask], position
                cursor = self.file._cursor(record)
                address, size_bytes = cursor.address(), len(record) - self.file._offset_size - 4 - 8 * rank
                filtered = record_type == FILTERED_CHUNK_RECORD
                size, mask = (cursor.integer(size_bytes), cursor.integer(4)) if filtered else plain
                yield tuple(cursor.integer(8) for _ in range(rank)), (address, size, mask)
        else:
            entries = {"implicit": self._implicit_index, "fixed array": self._fixed_array,
                       "extensible array": self._extensible_array}[self.chunk_index]()
            yield from ((self._grid_position(i), entry) for i, entry in entries
                        if entry[0] != self.file._undefined)

    def _grid(self):
        """Chunks along each axis, None along an unlimited one (a maximum size of all ones)."""
        unlimited = (1 << 8 * self.file._length_size) - 1
        return [-(-m // c) if m != unlimited else None for m, c in zip(self._max_shape, self.chunks)]

    def _grid_position(self, i):
        """The chunk-grid position of the i-th element of an array index, in C order over the
        grid with an unlimited axis (at most one) made the slowest."""
        grid = self._grid()
        order, position = sorted(range(len(grid)), key=lambda axis: grid[axis] is not None), [0] * len(grid)
        for axis in reversed(order):
            position[axis], i = (i % grid[axis], i // grid[axis]) if grid[axis] else (i, 0)
        return tuple(position)

    def _implicit_index(self):
        """Appendix C, "The Implicit Index": every chunk allocated, one after another."""
        grid = self._grid()
        if None in grid:
            raise _Unreadable("has an implicit chunk index on an unlimited axis")
        count = int(np.prod(grid, dtype=np.int64))
        if count * self._chunk_bytes > self.file._size:
            raise _Unreadable("its implicit chunk index extends past the end of the file")
        return [(i, (self._address + i * self._chunk_bytes, self._chunk_bytes, 0)) for i in range(count)]

    def _entries(self, cursor, first, count, entry_size, filtered):
        """[(first + j, (address, stored size, filter mask))] of `count` chunk entries of a fixed
        or extensible array; unfiltered chunks store only the address."""
        entries = []
        for j in range(count):
            address = cursor.address()
            size = cursor.integer(entry_size - self.file._offset_size - 4) if filtered else self._chunk_bytes
            entries.append((first + j, (address, size, cursor.integer(4) if filtered else 0)))
        return entries

    def _pages(self, address, first, count, page_bits, entry_size, filtered, bitmap):
        """Entries `first`.. of `count` in pages of 2**page_bits entries, each page followed by a checksum;
        a page whose bit is clear in the bitmap (None: read at `address`, then a checksum) is not stored."""
        pages, page_size = -(-count >> page_bits), 1 << page_bits
        if bitmap is None:
            bitmap = self.file._read(address, (pages + 7) // 8)
            address += len(bitmap) + 4
        entries = []
        for page in range(pages):
            size = min(page_size, count - page * page_size)
            if bitmap[page // 8] & (0x80 >> (page % 8)):
                cursor = self.file._cursor(self.file._read(address, size * entry_size))
                entries += self._entries(cursor, first + page * page_size, size, entry_size, filtered)
            address += size * entry_size + 4
        return entries

    def _fixed_array(self):
        """[(i, entry)] from Appendix C, "The Fixed Array Index": a header (FAHD) and one data
        block (FADB) of entries, split into pages with a bitmap of the pages in use when large."""
        cursor = self.file._structure(self._address, 64, b"FAHD")
        cursor.bytes(1)  # version
        filtered, entry_size, page_bits = cursor.integer(1), cursor.integer(1), cursor.integer(1)
        count, block = cursor.length(), cursor.address()
        if count * entry_size > self.file._size or page_bits > 32:
            raise _Unreadable("its fixed array header is damaged")
        paged = count > 1 << page_bits  # one page (and no bitmap) when small
        start = block + 6 + self.file._offset_size  # after signature, version, client, header address
        return self._pages(start, 0, count, page_bits, entry_size, filtered, None if paged else b"\xff")

    def _extensible_array(self):
        """[(i, entry)] from Appendix C, "The Extensible Array Index": a header (EAHD), an index block
        (EAIB) holding the first entries and the addresses of data blocks (EADB) and secondary blocks
        (EASB); super block u has 2**(u//2) data blocks of min_elements * 2**((u+1)//2) entries each."""
        file, offset_size = self.file, self.file._offset_size
        cursor = file._structure(self._address, 128, b"EAHD")
        cursor.bytes(1)  # version
        filtered, entry_size, max_bits, index_elements, min_elements, min_pointers, page_bits = \
            (cursor.integer(1) for _ in range(7))
        cursor.bytes(4 * file._length_size)  # numbers and sizes of secondary and data blocks
        count = max(cursor.length(), cursor.length())  # maximum index set, number of elements
        index_block = cursor.address()
        super_blocks = 1 + max_bits - _log2(min_elements, "extensible array block size")
        direct_super_blocks = 2 * _log2(min_pointers, "extensible array pointer count")
        if count * entry_size > file._size or max_bits > 64 or page_bits > 32:
            raise _Unreadable("its extensible array header is damaged")
        header = 6 + offset_size  # signature, version, client, header address
        prefix = header + (max_bits + 7) // 8  # of data and secondary blocks: the header, the block's offset
        data_pointers, secondary = 2 * (min_pointers - 1), max(0, super_blocks - direct_super_blocks)
        size = header + index_elements * entry_size + (data_pointers + secondary) * offset_size
        cursor = file._cursor(file._read(index_block, size), header)
        entries = self._entries(cursor, 0, index_elements, entry_size, filtered)
        data_blocks = [cursor.address() for _ in range(data_pointers)]
        secondary_blocks = [cursor.address() for _ in range(secondary)]
        first = index_elements
        for u in range(super_blocks):
            if first >= count:
                break
            blocks, size = 1 << (u // 2), min_elements << ((u + 1) // 2)
            paged = size > 1 << page_bits  # a data block of one page has no bitmap
            bitmap_size = (-(-size >> page_bits) + 7) // 8 if paged else 0
            addresses, bitmaps = [file._undefined] * blocks, [None] * blocks
            if u < direct_super_blocks:
                addresses, data_blocks = data_blocks[:blocks], data_blocks[blocks:]
            elif secondary_blocks[u - direct_super_blocks] != file._undefined:
                where = secondary_blocks[u - direct_super_blocks]
                cursor = file._cursor(file._read(where, prefix + blocks * (bitmap_size + offset_size)), prefix)
                bitmaps = [cursor.bytes(bitmap_size) for _ in range(blocks)]
                addresses = [cursor.address() for _ in range(blocks)]
            for address, bitmap in zip(addresses, bitmaps):
                if address != file._undefined and first < count:  # a paged block's checksum comes first
                    entries += self._pages(address + prefix + (4 if paged else 0), first, size, page_bits,
                                           entry_size, filtered, bitmap or b"\xff" * max(1, bitmap_size))
                first += size
        return entries


def _within(wanted, start, size):
    """(where in the output, where in the chunk) of the indices of `wanted` (a range or a sorted
    index array) that fall in the chunk [start, start + size); None when there are none."""
    if isinstance(wanted, range):
        first = max(0, -(-(start - wanted.start) // wanted.step))
        stop = min(len(wanted), -(-(start + size - wanted.start) // wanted.step))
        if first >= stop:
            return None
        begin = wanted[first] - start
        return slice(first, stop), slice(begin, begin + (stop - first - 1) * wanted.step + 1, wanted.step)
    first, stop = (int(i) for i in np.searchsorted(wanted, [start, start + size]))
    if first >= stop:
        return None
    part = wanted[first:stop] - start
    if part[-1] - part[0] == stop - first - 1:  # a run of neighbours: a slice is faster
        return slice(first, stop), slice(int(part[0]), int(part[-1]) + 1)
    return slice(first, stop), part
