"""Tests of h5.py alone: it is meant to be copied alone into any project, so it is tested without
the rest of the toolkit (numpy and pytest; h5py only writes inputs, and its tests skip without it).

    python3 -m pytest -q test_h5.py
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import h5

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
_spec = importlib.util.spec_from_file_location("make_h5_fixtures", os.path.join(FIX, "make_h5_fixtures.py"))
mk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mk)  # numpy only at import time; h5py is imported inside its main()
BASIC = ["basic_earliest.h5", "basic_latest.h5"]


def expected():
    out = {}
    for name, (arr, _) in mk.arrays().items():
        out[name] = mk.fill_expected() if name == "fill_chunked" else arr
    return out


def _same(got, want):
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype.newbyteorder("=") and got.dtype.isnative
    assert got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize("fname", BASIC)
@pytest.mark.parametrize("name", list(expected()))
def test_reads_match(fname, name):
    want = expected()[name]
    with h5.H5File(os.path.join(FIX, fname)) as f:
        ds = f[name]
        assert ds.shape == want.shape and ds.dtype == want.dtype.newbyteorder("=")
        _same(ds[()], want)
        if want.ndim == 0:
            return
        n = want.shape[0]
        for key in [slice(None), slice(1, n - 1), slice(n // 2, n + 5), slice(0, n, 3), 0, n - 1, -1, -n,
                    (slice(1, 3), Ellipsis), (Ellipsis, 0), [0, n - 1], np.arange(1, n), []]:
            _same(ds[key], want[key])
        if want.ndim >= 2:
            m = want.shape[1]
            for key in [(n - 1, m - 1), (-1, slice(1, m)), (slice(None, None, 2), slice(1, None, 3)), (1, 2, ...)]:
                _same(ds[key], want[key])
        with pytest.raises(IndexError):
            ds[n]


@pytest.mark.parametrize("fname", BASIC)
def test_bool_reads_as_bool_and_other_enums_as_integers(fname):
    with h5.H5File(os.path.join(FIX, fname)) as f:  # h5py writes bool as an int8 enum FALSE = 0, TRUE = 1
        assert f["bool"].dtype == np.bool_ and f["bool"][()].tolist() == [True, False, False, True, True]
        assert f["bool_chunked"][2:4, 1:].tolist() == [[False, True, False, False], [False, False, True, False]]
        assert f["enum_off_on"].dtype == np.int8 and f["enum_off_on"][()].tolist() == [1, 0, 0, 1]


def test_chunk_indexes_and_layouts():
    with h5.H5File(os.path.join(FIX, "basic_latest.h5")) as f:
        assert f["chunked_gzip"].chunks == (7, 4, 3) and f["contig_i32"].chunks is None
        assert f["compact_u8"].chunks is None and f["scalar_f64"].shape == ()
        kinds = {n: f[n].chunk_index for n in ["single_plain", "single_gzip", "implicit", "fa_plain", "fa_paged",
                                               "ea_plain", "ea_gzip", "bt2_plain", "bt2_gzip", "compact_u8"]}
        assert kinds == {"single_plain": "single chunk", "single_gzip": "single chunk", "implicit": "implicit",
                         "fa_plain": "fixed array", "fa_paged": "fixed array", "ea_plain": "extensible array",
                         "ea_gzip": "extensible array", "bt2_plain": "v2 B-tree", "bt2_gzip": "v2 B-tree",
                         "compact_u8": None}
        assert len(f["ea_many"].stored_chunks()) == 700 and f["ea_many"].chunk_index == "extensible array"
    path = os.path.join(FIX, "basic_earliest.h5")
    with h5.H5File(path) as f:
        assert f["deep_btree"].chunk_index == "v1 B-tree" and len(f["deep_btree"].stored_chunks()) == 3000
    assert b"TREE\x01\x01" in open(path, "rb").read()  # a chunk B-tree node at level 1: the tree is deeper than one node


@pytest.mark.parametrize("fname", BASIC)
def test_groups(fname):
    with h5.H5File(os.path.join(FIX, fname)) as f:
        assert "a" in f and "a/b/c/data" in f and "a/b/nope" not in f and "nope" not in f
        assert "b/c" in f["a"] and "/a/b" in f["a"] and "/b" not in f["a"]  # "/..." from the root
        assert f["a"]["b"].keys() == ["c"] and f["a/b"]["c/data"].shape == (3, 4) and f["a/b"]["/a/b/c/data"].ndim == 2
        assert f["many"].keys() == ["d%02d" % i for i in range(40)]
        for i in (0, 17, 39):
            _same(f["many"]["d%02d" % i][()], np.array([i, i * i], np.int32))
        assert set(f.keys()) == {k.split("/")[0] for k in expected()}
        assert sorted(f.datasets()) == sorted(expected()) and f.datasets()["a/b/c/data"] is f["a/b/c/data"]
        assert sorted(f["many"].datasets()) == ["d%02d" % i for i in range(40)]
        with pytest.raises(KeyError):
            f["a/b/missing"]


@pytest.mark.parametrize("fname", BASIC)
def test_fill_values(fname):
    with h5.H5File(os.path.join(FIX, fname)) as f:
        d = f["fill_chunked"]
        assert list(d.stored_chunks()) == [(0, 0), (15, 5)]  # only the two written chunks exist
        assert (d[5:15] == mk.FILL).all() and d[7, 3] == mk.FILL
        _same(f["fill_contig"][1:3], np.full((2, 5), 2.5))


def _flip(tmp_path, fname, name, at):
    src = os.path.join(FIX, fname)
    with h5.H5File(src) as f:
        offset, size = next(iter(f[name].stored_chunks().values()))
    b = bytearray(open(src, "rb").read())
    b[offset + at(size)] ^= 0x5A
    p = tmp_path / fname
    p.write_bytes(bytes(b))
    return p


@pytest.mark.parametrize("fname", BASIC)
def test_fletcher32(tmp_path, fname):
    with h5.H5File(os.path.join(FIX, fname)) as f:  # libhdf5 wrote the checksums: ours must agree
        _same(f["fletcher"][()], expected()["fletcher"])
        _same(f["fletcher_odd"][()], expected()["fletcher_odd"])  # 21-byte chunks: the odd last byte
    for name in ["fletcher", "fletcher_gzip", "fletcher_odd"]:
        p = _flip(tmp_path, fname, name, lambda n: n // 3)
        with h5.H5File(p) as f, pytest.raises(h5.H5Error, match=f"{fname}: dataset '{name}': .*fletcher32"):
            f[name][()]


def test_unsupported_filter_and_deflate_corruption(tmp_path):
    with h5.H5File(os.path.join(FIX, "lzf.h5")) as f:
        assert f["images"].shape == (4, 4, 4)
        with pytest.raises(h5.H5Error, match=r"lzf\.h5: dataset 'images': uses filter 32000 \(lzf\), which is not"):
            f["images"][()]
    p = _flip(tmp_path, "basic_earliest.h5", "chunked_gzip", lambda n: n // 2)
    with h5.H5File(p) as f, pytest.raises(h5.H5Error, match="chunked_gzip"):
        f["chunked_gzip"][()]


def test_index_lists_must_be_sorted_and_distinct():
    with h5.H5File(os.path.join(FIX, "basic_latest.h5")) as f:
        ds, want = f["chunked_gzip"], expected()["chunked_gzip"]
        _same(ds[[3, 8, 9, 40]], want[[3, 8, 9, 40]])  # sorted, distinct: read
        for key in ([5, 2], [2, 2], np.array([0, 9, 4])):  # h5py refuses these too
            with pytest.raises(h5.H5Error, match="chunked_gzip.*not supported.*increasing"):
                ds[key]
        with pytest.raises(IndexError):
            ds[[1, 50]]
        with pytest.raises(TypeError):
            ds[:, [0, 1]]  # index lists on the first axis only
        mask = np.arange(len(want)) % 3 == 1  # a boolean mask reads its True rows, as in h5py
        _same(ds[mask], want[mask])
        with pytest.raises(IndexError, match="boolean mask of 3 entries"):
            ds[np.array([True, False, True])]


def _read_all(path):
    with h5.H5File(path) as f:
        return {n: d[()] for n, d in f.datasets().items()}


@pytest.mark.parametrize("fname", ["basic_earliest.h5", "basic_latest.h5", "dsprites_small.h5"])
def test_fuzz_truncate_and_flip(tmp_path, fname):
    src = os.path.join(FIX, fname)
    good, raw = _read_all(src), open(src, "rb").read()
    rng = np.random.default_rng(0)
    p = tmp_path / fname
    for cut in rng.integers(0, len(raw), 30):
        p.write_bytes(raw[:cut])
        try:
            got = _read_all(p)
        except h5.H5Error:
            continue
        for n, a in got.items():  # whatever still reads must be exactly right
            assert np.array_equal(a, good[n]) and a.dtype == good[n].dtype
    for at in rng.integers(0, len(raw), 30):
        b = bytearray(raw)
        b[at] ^= 1 << int(rng.integers(8))
        p.write_bytes(bytes(b))
        try:
            got = _read_all(p)  # a flipped raw-data byte may legitimately change values; only H5Error may escape
        except h5.H5Error:
            continue
        assert all(isinstance(a, np.ndarray) for a in got.values())


def test_bad_keys():
    with h5.H5File(os.path.join(FIX, "basic_latest.h5")) as f:
        ds = f["contig_i32"]
        with pytest.raises(IndexError):
            ds[1, 2, 3]
        with pytest.raises(IndexError):
            ds[::-1]
        with pytest.raises(TypeError):
            ds["x"]
    with pytest.raises(h5.H5Error, match="nowhere.h5: cannot open"):
        h5.H5File(os.path.join(FIX, "nowhere.h5"))


def test_h5_stands_alone(tmp_path):
    """h5.py copied alone imports nothing but numpy and the standard library, and reads."""
    (tmp_path / "h5.py").write_bytes(open(os.path.join(HERE, "h5.py"), "rb").read())
    code = ("import sys\nbefore = set(sys.modules)\nimport h5\n"
            "imported = {m.split('.')[0] for m in set(sys.modules) - before}\n"
            "print(sorted(imported - set(sys.stdlib_module_names) - {'h5', 'numpy'}))\n"
            f"print(h5.H5File({os.path.join(FIX, 'basic_earliest.h5')!r})['contig_i32'][1, :3])\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["[]", "[-20 -19 -18]"]


def _linked_file(tmp_path, libver):
    """An h5py file (old-style groups with libver "earliest", link messages with "latest") of one
    dataset reached through every kind of link; returns its path and the dataset's values."""
    h5py = pytest.importorskip("h5py")
    values = np.arange(6, dtype=np.int16).reshape(2, 3) - 2
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["data"] = np.arange(5)
    path = tmp_path / f"links_{libver}.h5"
    with h5py.File(path, "w", libver=libver) as f:
        f["g/x"] = values
        f["absolute"] = h5py.SoftLink("/g/x")
        f["g/relative"] = h5py.SoftLink("x")  # from its own group
        f["chain"] = h5py.SoftLink("/absolute")  # a soft link to a soft link
        f["group_link"] = h5py.SoftLink("/g")
        f["hard"] = f["g/x"]  # a second hard link to the same object
        f["loop"] = h5py.SoftLink("/loop")
        f["dangling"] = h5py.SoftLink("/nowhere")
        f["external"] = h5py.ExternalLink("other.h5", "/data")
        f.create_dataset("external_storage", (4,), "u1", external=[(str(tmp_path / "raw.bin"), 0, 4)])
        f["external_storage"][:] = [1, 2, 3, 4]
    return path, values


@pytest.mark.parametrize("libver", ["earliest", "latest"])
def test_soft_and_hard_links_are_followed(tmp_path, libver):
    path, values = _linked_file(tmp_path, libver)
    with h5.H5File(path) as f:
        for name in ("g/x", "absolute", "g/relative", "chain", "group_link/x", "hard", "/chain"):
            _same(f[name][()], values)
        assert f["g/relative"][1, 2] == values[1, 2] == 3
        assert f["absolute"] is f["g/x"] and f["hard"] is f["g/x"]  # one object, whichever link
        assert "chain" in f and "group_link/relative" in f
        # every dataset reached by a hard or soft link, each group walked once (group_link is g);
        # the links it cannot follow are left out, the dataset whose data is elsewhere is listed
        assert sorted(f.datasets()) == ["absolute", "chain", "external_storage", "g/relative", "g/x", "hard"]


@pytest.mark.parametrize("libver", ["earliest", "latest"])
def test_links_and_storage_it_cannot_read_are_refused_by_name(tmp_path, libver):
    path, _ = _linked_file(tmp_path, libver)
    refused = {"external": "object 'external': is an external link to other.h5:/data, which this reader "
                           "does not follow",
               "loop": "object 'loop': is a soft link to '/loop' through more than 32 soft links",
               "dangling": "object 'dangling': is a soft link to '/nowhere', which does not exist"}
    with h5.H5File(path) as f:
        for name, message in refused.items():
            with pytest.raises(h5.H5Error) as caught:
                f[name]
            assert str(caught.value).startswith(f"{path}: {message}")
        stored_elsewhere = f["external_storage"]  # its shape is known; its data is not read as zeros
        assert stored_elsewhere.shape == (4,) and stored_elsewhere.dtype == np.uint8
        with pytest.raises(h5.H5Error, match=r"dataset 'external_storage': keeps its data in external files"):
            stored_elsewhere[()]
