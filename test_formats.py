"""Tests of fileformats.py alone (NumPy and pytest only): python3 -m pytest -q test_formats.py"""
import gzip
import struct
import zipfile

import numpy as np
import pytest

import fileformats


# ---------------------------------------------------------------------------------------------
# .npz members

def test_npz_stored_members_are_memory_mapped_in_place(tmp_path):
    path = tmp_path / "a.npz"
    images = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    floats = np.asfortranarray(np.linspace(-1, 1, 12).reshape(3, 4))
    np.savez(path, images=images, floats=floats, empty=np.zeros((0, 3), np.int64))
    got = fileformats.npz_array(path, "images")
    assert isinstance(got, np.memmap) and not got.flags.writeable
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(fileformats.npz_array(path, "floats"), floats)
    assert fileformats.npz_array(path, "empty").shape == (0, 3)
    members = fileformats.npz_members(path)
    assert members["images"] == ((5, 4, 4, 3), np.dtype(np.uint8), True)
    # the mapped bytes are the member's own: where the .npy data lies inside the zip
    raw = path.read_bytes()
    assert raw.find(images.tobytes()) == got.offset


def test_npz_deflated_members_are_read_in_full(tmp_path):
    path = tmp_path / "c.npz"
    labels = np.arange(100, dtype=np.int32).reshape(50, 2)
    np.savez_compressed(path, labels=labels)
    got = fileformats.npz_array(path, "labels")
    assert not isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, labels)
    assert fileformats.npz_members(path)["labels"][2] is False


def test_npz_refuses_objects_missing_members_and_truncation(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, names=np.array(["a", None], dtype=object))
    with pytest.raises(fileformats.FormatError, match="Python objects"):
        fileformats.npz_array(path, "names")
    with pytest.raises(fileformats.FormatError, match="no array 'images'"):
        fileformats.npz_array(path, "images")
    good = tmp_path / "t.npz"
    np.savez(good, images=np.ones((100, 8, 8), np.uint8))
    lying = tmp_path / "lying.npz"  # the .npy header claims more rows than the member holds
    lying.write_bytes(good.read_bytes().replace(b"(100, 8, 8)", b"(900, 8, 8)"))
    with pytest.raises(fileformats.FormatError, match="lying.npz: member images.npy: .* do not hold"):
        fileformats.npz_array(lying, "images")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(fileformats.FormatError, match="cut.npz: not a readable"):
        fileformats.npz_array(cut, "images")
    (tmp_path / "no.npz").write_bytes(b"not a zip at all")
    with pytest.raises(fileformats.FormatError, match="not a readable"):
        fileformats.npz_members(tmp_path / "no.npz")


def test_npz_rows_reads_only_the_rows_asked_for(tmp_path):
    path = tmp_path / "r.npz"
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 3, 2), dtype=np.uint8)
    np.savez(path, images=images, fortran=np.asfortranarray(images[:, :, :, 0]))
    rows = fileformats.npz_rows(path, "images")
    assert isinstance(rows, fileformats.StoredRows)
    assert rows.shape == images.shape and rows.dtype == np.uint8 and len(rows) == 50
    assert rows.nbytes == images.nbytes and rows.ndim == 4
    for key in [7, -1, slice(3, 9), slice(None, None, 4), np.array([4, 5, 6, 20, 2, 3]),
                np.arange(50) % 3 == 0, (np.array([1, 2]), slice(None), 1), (4, 2)]:
        np.testing.assert_array_equal(rows[key], images[key])
    np.testing.assert_array_equal(np.asarray(rows), images)
    with pytest.raises(IndexError):
        rows[50]
    fortran = fileformats.npz_rows(path, "fortran")  # not C order: read in full
    assert isinstance(fortran, np.ndarray) and np.array_equal(fortran, images[:, :, :, 0])


# ---------------------------------------------------------------------------------------------
# NORB binary matrices, written here from the format's description (small NORB's page)

MAGIC = {"u1": 0x1E3D4C55, "<i4": 0x1E3D4C54, "<f4": 0x1E3D4C51, "<f8": 0x1E3D4C53, "<i2": 0x1E3D4C56}


def write_norb(path, array, compress=False):
    dims = list(array.shape) + [1] * (3 - array.ndim)  # at least three dimensions are stored
    header = struct.pack(f"<iI{len(dims)}i", MAGIC[array.dtype.str.replace("|", "")], array.ndim, *dims)
    (gzip.open if compress else open)(path, "wb").write(header + array.tobytes())


@pytest.mark.parametrize("compress", [False, True])
def test_norb_matrices_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    arrays = {"dat": rng.integers(0, 256, (7, 2, 9, 9), dtype=np.uint8),
              "cat": np.array([0, 4, 2, 1, 3, 3, 0], "<i4"),
              "info": rng.integers(0, 34, (7, 4)).astype("<i4"),
              "float": rng.standard_normal((3, 5)).astype("<f4"),
              "double": rng.standard_normal(4).astype("<f8"),
              "short": rng.integers(-500, 500, (2, 3, 4, 5, 6)).astype("<i2")}
    for name, array in arrays.items():
        path = tmp_path / f"{name}.mat"
        write_norb(path, array, compress)
        got = fileformats.read_norb(path)
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert isinstance(got, np.memmap) != compress
        shape, blocks = fileformats.norb_blocks(path, rows=3)
        starts, parts = zip(*blocks)
        assert shape == array.shape and starts == tuple(range(0, len(array), 3))
        np.testing.assert_array_equal(np.concatenate(parts), array)


@pytest.mark.parametrize("compress", [False, True])
def test_norb_refuses_damaged_files(tmp_path, compress):
    path = tmp_path / "m.mat"
    write_norb(path, np.zeros((10, 4, 4), np.uint8), compress)
    raw = gzip.decompress(path.read_bytes()) if compress else path.read_bytes()
    for name, damaged, problem in [("short.mat", raw[:-5], "do not hold|truncated"),
                                   ("long.mat", raw + b"x", "do not hold|beyond"),
                                   ("magic.mat", b"\0\0\0\0" + raw[4:], "not a NORB"),
                                   ("header.mat", raw[:10], "truncated")]:
        bad = tmp_path / name
        bad.write_bytes(gzip.compress(damaged) if compress else damaged)
        with pytest.raises(fileformats.FormatError, match=problem):
            fileformats.read_norb(bad)
        with pytest.raises(fileformats.FormatError, match=problem):
            list(fileformats.norb_blocks(bad)[1])


def test_fileformats_stands_alone(tmp_path):
    """fileformats.py copied alone imports nothing but numpy and the standard library, and reads."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "fileformats.py").write_bytes(open(os.path.join(here, "fileformats.py"), "rb").read())
    np.savez(tmp_path / "a.npz", images=np.arange(6, dtype=np.uint8).reshape(3, 2))
    code = ("import sys\nbefore = set(sys.modules)\nimport fileformats\n"
            "imported = {m.split('.')[0] for m in set(sys.modules) - before}\n"
            "print(sorted(imported - set(sys.stdlib_module_names) - {'fileformats', 'numpy'}))\n"
            "print(fileformats.npz_rows('a.npz', 'images')[[0, 2]].tolist())\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["[]", "[[0, 1], [4, 5]]"]
