"""Dataset readers for disentanglement work: numpy, pillow and the standard library only (HDF5
files also need h5.py beside this file).

`load(source, limit=None, seed=0, **options) -> Dataset` reads a built-in name ("sprites" or
"shapes", rendered here; options as keywords or in the name: "sprites:positions=8,scales=3") or a
path: an .npz, .npy, .h5 or .hdf5 file (dSprites', 3dshapes', MPI3D's or your own `images` and
`factors`), a folder, .zip or .tar(.gz) of images (celebA, your own), cars3d's .mat files or their
tar, 3D faces' .pth file, SmallNORB's six files, or 3D chairs' rendered_chairs.tar or folder; each
reader's docstring and the README's data section say what is read. Options variant=color|noisy or
scream=PATH ("dsprites.npz:variant=color") draw 1-channel images as disentanglement_lib's dSprites
variants (DrawnImages). Option exclude=FACTOR=CLASS ("sprites:exclude=shape=2") leaves out the
images of one class of a factor, of any labelled dataset, before `limit` (_exclude). MPI3D and
SmallNORB also need fileformats.py beside this file.
`read_mat(source, name)` reads one numeric variable of a MATLAB v5 .mat file, without scipy.

Images are uint8 (N, H, W, C) as stored (memory-mapped, read-only arrays for .npy files, caches
and legacy .pth); binary 0/1 images are scaled to 0/255 in place. Factors are int64 class indices
(N, K); constant factors are dropped, including those that take one value in the subset `limit`
keeps (rng(seed).choice of that many rows without replacement, sorted). Every bad input raises
DataError naming the file and the problem.
"""
import colorsys
import contextlib
import errno
import fnmatch
import glob
import gzip
import hashlib
import importlib
import io
import mmap
import os
import pickletools
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import time
import typing
import zipfile
import zlib

import numpy as np
from PIL import Image, ImageOps


class DataError(ValueError):
    """A dataset file or name that cannot be read, or a file that cannot be written (WriteError);
    the message names the file and the problem."""


class WriteError(DataError, OSError):
    """A file that could not be written whole (disk full, a file size limit, no permission); the
    message names the file, and nothing half-written is left behind (write_atomically)."""


class Dataset:
    """Images as stored (uint8, (N, H, W, C)) with optional integer factors (int64, (N, K)).
    `preprocessing` says what was done to stored images to give these (decoded images: the crop
    and size, and why), "" when they are as stored."""

    def __init__(self, images, factors=None, factor_names=(), factor_sizes=(), name="",
                 preprocessing=""):
        self.images = images
        self.factors = factors
        self.name = name
        self.factor_names = list(factor_names)
        self.factor_sizes = [int(s) for s in factor_sizes]
        self.preprocessing = preprocessing

    def __len__(self):
        return len(self.images)

    def __repr__(self):
        shape = "x".join(str(s) for s in self.images.shape)
        return f"Dataset({self.name!r}, images {shape} {self.images.dtype}, factors {self.factor_names})"


def describe(dataset):
    """One line saying what a Dataset holds, e.g. "sprites: 737280 images 64x64x1 uint8, factors
    shape(3) scale(6) ..." (images, height x width x channels in pixels, each factor and its number
    of classes; "factors none" if unlabelled), then its preprocessing if any ("; celebA
    recognised ...: centre crop 148x148, resized to 64x64"). Raises ValueError if images are not
    (N, H, W, C)."""
    n, h, w, c = dataset.images.shape
    factors = " ".join(f"{k}({s})" for k, s in zip(dataset.factor_names, dataset.factor_sizes)) or "none"
    line = f"{dataset.name}: {n} images {h}x{w}x{c} uint8, factors {factors}"
    return line + (f"; {dataset.preprocessing}" if dataset.preprocessing else "")


# ---------------------------------------------------------------------------------------------
# entry point

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FAILURES = (OSError, EOFError, ValueError, KeyError, IndexError, SyntaxError, NotImplementedError, RuntimeError,
             OverflowError, MemoryError, struct.error, zlib.error, zipfile.BadZipFile, tarfile.TarError,
             Image.DecompressionBombError)  # not TypeError or AttributeError: those are bugs in our code


@contextlib.contextmanager
def _reading(path, problem):
    """Turn whatever a corrupt file makes the libraries raise into a DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except _FAILURES as e:
        raise DataError(f"{path}: {problem} ({type(e).__name__}: {e})") from e


def load(source, limit=None, seed=0, **options):
    """A Dataset (images uint8 (N, H, W, C); factors int64 (N, K) or None) from a built-in name,
    options as "sprites:positions=8" or keywords, or a file or folder (formats: module docstring);
    `limit` keeps that many rows, rng(seed)'s choice, sorted. Raises DataError naming the source and
    the problem (missing, unreadable, unknown format or option, wrong shapes), WriteError when a
    cache of decoded images cannot be written (disk full, ...)."""
    source = os.fspath(source)
    name, _, spec = source.partition(":")
    if name in _BUILTINS and not os.path.exists(source):
        reader, args = _BUILTINS[name], {**_parse_spec(spec, source), **options}
    elif spec and not os.path.exists(source) and os.path.exists(name):  # "dsprites.npz:variant=color"
        reader, args = _reader_for(name), {**_parse_spec(spec, source), **options, "path": name}
    else:
        reader, args = _reader_for(source), dict(options, path=source)
    variant = {key: args.pop(key) for key in ("variant", "scream") if key in args}
    exclude = args.pop("exclude", None)
    allowed = [option for option in _reader_options(reader) if option not in ("limit", "seed")]
    allowed += ["variant", "scream"]  # any 1-channel dataset: _variant
    allowed += ["exclude"]  # any labelled dataset: _exclude
    unknown = sorted(set(args) - set(allowed) - {"path"})
    if unknown:
        raise DataError(f"{source}: unknown option(s) {unknown}; valid: {allowed}")
    if limit is not None and int(limit) < 1:
        raise DataError(f"{source}: limit must be a positive number of images, not {limit}")
    if "limit" in _reader_options(reader) and exclude is None:  # reads only the rows kept
        args.update(limit=limit, seed=seed)
    dataset = reader(**args)
    if exclude is not None:  # before the limit: `limit` rows are kept of the others
        dataset = _exclude(dataset, source, exclude)
    dataset = _subset(dataset, limit, seed)
    return _variant(dataset, source, seed, **variant) if variant else dataset


def _exclude(dataset, source, spec):
    """The dataset without the images whose factor FACTOR is class CLASS (option
    exclude=FACTOR=CLASS, as "sprites:exclude=shape=2", the sprites without the heart). The factor
    sizes and the other images' class indices stay as they were, so a model trained on the rest
    is scored on the whole dataset under the same labels; a factor left with one class is dropped
    (as always). The kept images are copied into memory (a memory-mapped file is read). Raises
    DataError for unlabelled data, an unknown factor, a class out of range or that no image has,
    or nothing left."""
    factor, equals, value = str(spec).partition("=")
    where = f"{source}: option exclude={spec}"
    if not equals:
        raise DataError(f"{where}: expected exclude=FACTOR=CLASS, such as exclude=shape=2")
    if dataset.factors is None:
        raise DataError(f"{where}: the data has no factors to leave images out by")
    if factor not in dataset.factor_names:
        raise DataError(f"{where}: no factor {factor!r} (factors: "
                        f"{', '.join(dataset.factor_names)})")
    column = dataset.factor_names.index(factor)
    value = _check_int(source, f"exclude={factor}", value, 0, dataset.factor_sizes[column] - 1)
    keep = np.flatnonzero(dataset.factors[:, column] != value)
    if len(keep) == len(dataset):
        raise DataError(f"{where}: no image has {factor} {value}, so none is left out")
    if len(keep) == 0:
        raise DataError(f"{where}: every image has {factor} {value}, so none is left")
    return _dataset(dataset.images[keep], dataset.factors[keep], dataset.factor_names,
                    dataset.factor_sizes, dataset.name, dataset.preprocessing)


def _reader_options(reader):
    """The keyword options `reader` takes besides its path; "limit" and "seed" mark a reader that
    reads only the rows `limit` keeps. (A table in a function: the readers are defined below.)"""
    table = {
        _sprites: ("positions", "orientations", "scales", "shapes"),
        _shapes: ("hues", "scales", "shapes", "orientations"),
        _load_npz: (),
        _load_npy: (),
        _load_hdf5: ("limit", "seed"),
        _load_images: ("size", "crop", "cache_dir"),  # folders, zips, tars; cars3d's files too
        _load_faces: (),
        _load_mpi3d: (),
        _load_norb: ("cache_dir",),
        _load_chairs: ("cache_dir",),
    }
    return table[reader]


def _parse_spec(spec, source):
    """{key: value text} of "key=value,..." (the reader checks the values)."""
    pairs = [item.partition("=") for item in spec.split(",") if item]
    for key, eq, _ in pairs:
        if not eq:
            raise DataError(f"{source}: option {key!r} is not key=value")
    return {key.strip(): value for key, _, value in pairs}


def _reader_for(path):
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder, and not a built-in dataset "
                        f"(built-ins: {', '.join(_BUILTINS)}; a path must exist)")
    for is_kind, reader in [(_is_norb, _load_norb), (_is_chairs, _load_chairs)]:  # by name or layout
        if is_kind(path):
            return reader
    if os.path.isdir(path):  # images, in sub-folders too, or cars3d's .mat files: _image_contents
        return _load_images
    if path.lower().endswith(".npz") and _is_mpi3d(path):
        return _load_mpi3d
    suffixes = [(".npz", _load_npz), (".npy", _load_npy), ((".h5", ".hdf5"), _load_hdf5),
                ((".zip", ".tar.gz", ".tgz", ".tar"), _load_images),  # a tar of cars3d .mat files too
                ((".pth", ".pt"), _load_faces)]
    for endings, reader in suffixes:
        if path.lower().endswith(endings):
            return reader
    raise DataError(f"{path}: unknown kind of file; expected .npz, .npy, .h5, .hdf5, .zip, "
                    ".tar.gz, .pth/.pt, smallnorb-*.mat(.gz), or a folder of images, cars3d .mat "
                    "files, SmallNORB's files or 3D chairs' renders")


def _rows(count, limit, seed):
    """The sorted rows that `limit` keeps of `count` (rng(seed).choice without replacement), or
    None for all of them."""
    if limit is None or limit >= count:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, int(limit), replace=False))


def _subset(ds, limit, seed):
    """The rows `limit` keeps, through _dataset: a factor left with one value is dropped too."""
    rows = _rows(len(ds), limit, seed)
    if rows is None:
        return ds
    factors = None if ds.factors is None else ds.factors[rows]
    return _dataset(ds.images[rows], factors, ds.factor_names, ds.factor_sizes, ds.name,
                    ds.preprocessing)


def _dataset(images, factors, names, sizes, name, preprocessing=""):
    """A Dataset with constant factor columns (size 1 or a single value) dropped, unlabelled
    (factors None) when none is left: every reader builds its Dataset here."""
    keep = [] if factors is None else [
        k for k in range(factors.shape[1])
        if sizes[k] > 1 and len(factors) and factors[:, k].min() != factors[:, k].max()]
    if not keep:
        return Dataset(images, None, (), (), name, preprocessing)
    return Dataset(images, np.ascontiguousarray(factors[:, keep], dtype=np.int64),
                   [names[k] for k in keep], [sizes[k] for k in keep], name, preprocessing)


def _grid_factors(sizes):
    """Factor table of a full grid, rows in C order over `sizes`."""
    return np.indices(sizes, dtype=np.int64).reshape(len(sizes), -1).T


def _check_int(source, key, value, low, high):
    """`value` (a number or its text) as an int, if it is a whole number in low..high."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if not (number.is_integer() and low <= number <= high):
        raise DataError(f"{source}: option {key}={value!r} must be a whole number in {low}..{high}")
    return int(number)


# ---------------------------------------------------------------------------------------------
# built-ins, rendered here: sprites (dSprites-like) and shapes (3dshapes-like)

def _sprites(positions=32, orientations=40, scales=6, shapes=3):
    positions = _check_int("sprites", "positions", positions, 1, 32)
    orientations = _check_int("sprites", "orientations", orientations, 1, 360)
    scales = _check_int("sprites", "scales", scales, 1, 64)
    shapes = _check_int("sprites", "shapes", shapes, 1, 3)
    masks = _sprite_masks(shapes, np.linspace(0.5, 1, scales),
                          np.arange(orientations) * (2 * np.pi / orientations))
    # sprite centre at pixel coordinate 16 + offset, offset 0..32 (dSprites' position 0..1)
    offsets = np.round(np.linspace(0, 32, positions)).astype(int)
    out = np.zeros((shapes, scales, orientations, positions, positions, 64, 64), np.uint8)
    for i, x in enumerate(offsets):  # posX moves along columns, posY along rows
        for j, y in enumerate(offsets):
            out[:, :, :, i, j, y:y + 32, x:x + 32] = masks
    sizes = out.shape[:5]
    return _dataset(out.reshape(-1, 64, 64, 1), _grid_factors(sizes),
                    ["shape", "scale", "orientation", "posX", "posY"], sizes, "sprites")


def _heart(u, v):
    # ~18 px across at scale 1, centred on its bounding box; its area, 57/113/146 px at scale classes
    # 0/2/3, is published dSprites' heart's (55-57/112/145 px, measured) within 2%
    u, v = u / 7.85, v / 7.85 + 0.1
    return (u * u + v * v - 1) ** 3 - u * u * v ** 3 <= 0


_SPRITE_SHAPES = [lambda u, v: np.maximum(abs(u), abs(v)) <= 9.5,      # square, side 19
                  lambda u, v: (u / 13) ** 2 + (v / 7) ** 2 <= 1,       # ellipse, 13 x 7
                  _heart]


def _sprite_masks(n_shapes, scales, angles, ss=4):
    """(shape, scale, orientation, 32, 32) masks, 0/255, from a 4x4-supersampled grid."""
    t = (np.arange(32 * ss) + 0.5) / ss - 16
    x, y = t[None, :], -t[:, None]  # columns to the right, rows upwards
    c, s = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    u, v = c * x + s * y, c * y - s * x  # rotate the grid by -angle: the sprite turns by +angle
    masks = np.empty((n_shapes, len(scales), len(angles), 32, 32), np.uint8)
    for i, inside in enumerate(_SPRITE_SHAPES[:n_shapes]):
        for j, scale in enumerate(scales):
            cover = inside(u / scale, v / scale).reshape(len(angles), 32, ss, 32, ss).mean((2, 4))
            masks[i, j] = (cover >= 0.5) * 255
    return masks


def _shapes(hues=10, scales=8, shapes=4, orientations=15):
    hues = _check_int("shapes", "hues", hues, 1, 256)
    scales = _check_int("shapes", "scales", scales, 1, 64)
    shapes = _check_int("shapes", "shapes", shapes, 1, 4)
    orientations = _check_int("shapes", "orientations", orientations, 1, 360)
    weights = _scene_weights(np.linspace(0.75, 1.25, scales), shapes,
                             np.radians(np.linspace(-30, 30, orientations)))
    rgb = np.array([colorsys.hsv_to_rgb(h, 1, 1) for h in np.arange(hues) / hues], np.float32)
    # per region and hue: floor(255 * coverage * shade * colour); the three regions' coverages
    # sum to 1, so the three floored parts add up to at most 255
    floor, wall, obj = [(w[None, ..., None] * rgb[:, None, None, None] * 255).astype(np.uint8)
                        for w in weights]
    out = np.empty((hues, hues, hues) + floor.shape[1:], np.uint8)
    for f in range(hues):
        np.add(floor[f], wall[:, None], out=out[f])
        out[f] += obj[None]
    sizes = [hues, hues, hues, scales, shapes, orientations]
    return _dataset(out.reshape(-1, 64, 64, 3), _grid_factors(sizes),
                    ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"],
                    sizes, "shapes")


def _lambert(nx, ny, nz, light):
    return 0.35 + 0.65 * np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)


def _object(shape, x, y, a, phi, light):
    """Silhouette and shading of an object standing at x=0, y=0 (y up), size a, turned by phi."""
    if shape == 0:  # cube seen from the side: two faces split at the nearest vertical edge
        psi = np.pi / 4 + phi
        half, edge = a / 2 * (np.cos(psi) + np.sin(psi)), a / 2 * (np.sin(psi) - np.cos(psi))
        inside = (abs(x) <= half) & (y >= 0) & (y <= a)
        left = x < edge
        n = (np.where(left, -np.cos(psi), np.sin(psi)), 0, np.where(left, -np.sin(psi), -np.cos(psi)))
        return inside, _lambert(*n, light)
    if shape == 1:  # cylinder
        r, top, bottom = a / 2, a, 0
    elif shape == 2:  # sphere
        r, top, bottom = a / 2, a / 2, a / 2
    else:  # capsule
        r, top, bottom = 0.3 * a, 0.9 * a, 0.3 * a
    dy = 0 if shape == 1 else y - np.clip(y, bottom, top)  # offset from the central segment
    inside = (x * x + dy * dy <= r * r) & (y >= 0) & (y <= top + (0 if shape == 1 else r))
    nx, ny = np.clip(x / r, -1, 1), np.clip(dy / r, -1, 1)
    nz = -np.sqrt(np.clip(1 - nx * nx - ny * ny, 0, 1))
    return inside, _lambert(nx, ny, nz, light)


def _scene_weights(scales, n_shapes, angles, ss=2):
    """Per (scale, shape, orientation) scene: coverage x shade of floor, wall and object."""
    t = (np.arange(64 * ss) + 0.5) / ss
    X, Y = t[None, None, None, :], t[None, None, :, None]
    phi = angles[None, :, None, None]
    corner = 32 - 18 * phi / np.radians(30)  # the room's corner moves as the camera turns
    horizon = 34 + 0.2 * abs(X - corner)
    floor = Y >= horizon
    floor_shade = 0.5 + 0.5 * np.clip((Y - horizon) / (64 - horizon), 0, 1)
    wall_shade = np.where(X < corner, 0.95, 0.75)
    light = np.sin(0.7 - phi) * 0.8, 0.6, -np.cos(0.7 - phi) * 0.8
    a = 16 * scales[:, None, None, None]
    shape_shape = (len(scales), len(angles), 64 * ss, 64 * ss)
    parts = np.empty((3, len(scales), n_shapes, len(angles), 64, 64), np.float32)
    for k in range(n_shapes):
        inside, shade = _object(k, X - 32, 54 - Y, a, phi, light)
        inside = np.broadcast_to(inside, shape_shape)
        regions = (~inside & floor) * floor_shade, (~inside & ~floor) * wall_shade, inside * shade
        for i, w in enumerate(regions):
            w = np.broadcast_to(w, shape_shape).reshape(shape_shape[:2] + (64, ss, 64, ss))
            parts[i, :, k] = w.mean((3, 5))
    return [p.reshape(-1, 64, 64) for p in parts]


_BUILTINS = {"sprites": _sprites, "shapes": _shapes}


# ---------------------------------------------------------------------------------------------
# numpy files

_DSPRITES_NAMES = ["color", "shape", "scale", "orientation", "posX", "posY"]  # its latents_classes columns
_DSPRITES_VALUES = [np.ones(1), np.arange(1.0, 4.0), np.linspace(0.5, 1, 6),  # latents_values' grids
                    np.linspace(0, 2 * np.pi, 40), np.linspace(0, 1, 32), np.linspace(0, 1, 32)]

def _npy_member(zf, info, path):
    _zip_member_ok(info, path)
    with zf.open(info) as f:  # check the header against the member's size before allocating
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        if dtype.hasobject:
            raise DataError(f"{path}: array {info.filename} holds Python objects; not read")
        if int(np.prod(shape, dtype=object)) * dtype.itemsize != info.file_size - f.tell():
            raise DataError(f"{path}: array {info.filename} is truncated or has a bad header")
        f.seek(0)
        array = np.lib.format.read_array(f, allow_pickle=False)  # reads in chunks, no copy
        f.read()  # reach the member's end so zipfile checks its CRC
    return array


def _load_npz(path):
    """dSprites' .npz (imgs, and latents_classes or else latents_values, _dsprites_classes) or
    your own images, factors, factor_names and factor_sizes, read member by member, stored or
    deflated: nothing is ever unpickled."""
    wanted = ["imgs", "images", "latents_classes", "latents_values", "factors", "factor_names",
              "factor_sizes"]
    with _reading(path, "not a readable .npz file"), zipfile.ZipFile(path) as zf:
        members = {n[:-4]: zf.getinfo(n) for n in zf.namelist() if n.endswith(".npy")}
        arrays = {k: _npy_member(zf, members[k], path) for k in wanted if k in members}
    images = arrays.get("images", arrays.get("imgs"))
    if images is None:
        raise DataError(f"{path}: no 'images' (or dSprites 'imgs') array; found {sorted(members)}")
    factors = arrays.get("factors", arrays.get("latents_classes"))
    names, sizes = arrays.get("factor_names"), arrays.get("factor_sizes")
    if factors is not None and "latents_classes" in arrays and names is None and factors.ndim == 2 \
            and factors.shape[1] == 6:
        names = _DSPRITES_NAMES
    if factors is None and "latents_values" in arrays:
        factors = _dsprites_classes(path, "latents_values", arrays["latents_values"])
        names, sizes = _DSPRITES_NAMES, [len(grid) for grid in _DSPRITES_VALUES]
    with _reading(path, "arrays of the wrong kind"):
        return _checked(path, images, factors, names, sizes)


def _dsprites_classes(path, array_name, values):
    """dSprites' latents_classes (N, 6) int64 from its latents_values (N, 6): each value's index on
    the published grid of its column (_DSPRITES_VALUES), as the published file's own classes are.
    Raises DataError saying why not (the shape, or the first value off its grid)."""
    if values.ndim != 2 or values.shape[1] != 6 or values.dtype.kind not in "fiu":
        raise DataError(f"{path}: {array_name} is {values.dtype} {values.shape}; dSprites' has 6 "
                        f"numeric columns ({', '.join(_DSPRITES_NAMES)}) from which to derive the "
                        "classes (latents_classes is missing)")
    return _grid_classes(path, array_name, values, _DSPRITES_VALUES, _DSPRITES_NAMES, "dSprites")


def _grid_classes(path, array_name, values, grids, names, dataset):
    """Class indices int64 (N, K) of `values` (N, K): each value's nearest point of its column's
    grid (sorted), if within 5% of the grid's spacing (1e-6 for a grid of one point). Raises
    DataError naming the array, the row and column and the factor of the first value off its
    grid (NaN included)."""
    classes = np.empty(values.shape, np.int64)
    for k, grid in enumerate(grids):
        column = values[:, k].astype(np.float64)
        right = np.clip(np.searchsorted(grid, column), 1, max(len(grid) - 1, 1)) if len(grid) > 1 \
            else np.zeros(len(column), np.int64)
        left = np.maximum(right - 1, 0)
        nearest = np.where(np.abs(column - grid[left]) <= np.abs(grid[right] - column), left, right)
        tolerance = 0.05 * np.diff(grid).min() if len(grid) > 1 else 1e-6
        bad = np.flatnonzero(~(np.abs(column - grid[nearest]) <= tolerance))
        if bad.size:
            raise DataError(f"{path}: {array_name}[{bad[0]}, {k}] = {float(column[bad[0]])!r} is not a "
                            f"{dataset} {names[k]} value (the published grid: {len(grid)} values "
                            f"from {grid[0]:g} to {grid[-1]:g})")
        classes[:, k] = nearest
    return classes


def _load_npy(path):
    with _reading(path, "not a readable .npy file"):
        images = np.load(path, mmap_mode="r", allow_pickle=False)
        if images.dtype == np.uint8 and images.size and images.max() <= 1:
            images = np.load(path, allow_pickle=False)  # binary: scaled in memory, not on disk
        return _checked(path, images, None, None, None)


def _checked(path, images, factors, names, sizes):
    """The Dataset of validated arrays: images uint8 (N, H, W[, C]), N >= 1, binary 0/1 images
    scaled to 0/255 in place; factors (N, K) class indices >= 0 of any integer dtype (read as
    int64), with names and sizes (given, or factor0.. and max + 1)."""
    images = _checked_images(path, images)
    if factors is None:
        return _dataset(images, None, (), (), os.path.basename(path))
    if factors.dtype.kind not in "iu" or factors.ndim != 2 or len(factors) != len(images):
        raise DataError(f"{path}: factors are {factors.dtype} {factors.shape}; expected integers of shape "
                        f"({len(images)}, K), one row per image")
    bad_sizes = sizes is not None and (np.ndim(sizes) != 1 or np.asarray(sizes).dtype.kind not in "iu")
    if names is not None and np.ndim(names) != 1 or bad_sizes:
        raise DataError(f"{path}: factor_names should be a list of names and factor_sizes a list of integers")
    k = factors.shape[1]
    names = [f"factor{i}" for i in range(k)] if names is None else [str(s) for s in names]
    if len(names) != k or sizes is not None and len(sizes) != k:
        raise DataError(f"{path}: factor_names/factor_sizes do not fit factors of shape {factors.shape}")
    factors = _class_indices(path, factors, names)
    sizes = [int(s) for s in (sizes if sizes is not None else factors.max(0, initial=0) + 1)]
    if (factors.max(0, initial=0) >= sizes).any():
        raise DataError(f"{path}: factor_sizes {sizes} do not fit factors whose largest values are "
                        f"{factors.max(0).tolist()}")
    return _dataset(images, factors, names, sizes, os.path.basename(path))


def _checked_images(path, images):
    """uint8 images (N, H, W, C), N >= 1, C 1 or 3, binary 0/1 ones scaled to 0/255 in place."""
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images are {images.dtype}; expected uint8 0..255 "
                        "(convert with np.round(x * 255).astype(np.uint8))")
    if images.ndim in (3, 4) and len(images) == 0:
        raise DataError(f"{path}: no images (the images array has shape {images.shape})")
    if images.ndim == 3:
        images = images.reshape(images.shape + (1,))  # a view: adds the channel axis
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise DataError(f"{path}: images have shape {images.shape}; expected (N,H,W) or (N,H,W,C), C 1 or 3")
    if images.flags.writeable and images.size and images.max() <= 1:
        np.multiply(images, 255, out=images)
    return images


def _class_indices(path, factors, names):
    """Integer factors (N, K) of any dtype, N >= 1, as int64, if every value is a class index
    0, 1, ...; else DataError naming the factor, the row and the value."""
    if factors.size == 0:
        return factors.astype(np.int64)
    if factors.dtype == np.uint64 and factors.max() > np.iinfo(np.int64).max:
        column = int(np.argmax(factors.max(0)))
        raise DataError(f"{path}: factor {names[column]} holds {factors[:, column].max()}, too large "
                        "for a class index")
    factors = factors.astype(np.int64, copy=False)
    if factors.min() < 0:
        row, column = (int(i) for i in np.argwhere(factors < 0)[0])
        raise DataError(f"{path}: factor {names[column]} is {factors[row, column]} at row {row}; "
                        "factor values must be class indices 0, 1, 2, ... (negative values such as -1 "
                        "for 'unknown' are not)")
    return factors


# ---------------------------------------------------------------------------------------------
# HDF5 files (3dshapes, dSprites' .hdf5, your own); the format itself is read by h5.py

_SHAPES3D_NAMES = ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"]
_SHAPES3D_VALUES = [np.arange(10) / 10] * 3 + [np.linspace(0.75, 1.25, 8), np.arange(4.0), np.linspace(-30, 30, 15)]


def __getattr__(name):
    """`data.H5File` and `data.H5Error` are h5.py's, imported on first use (PEP 562)."""
    if name in ("H5File", "H5Error"):
        import h5
        return getattr(h5, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_hdf5(path, limit=None, seed=0):
    """3dshapes (`images` + `labels`), dSprites (`imgs` + `latents/classes`, or `latents/values`:
    _dsprites_classes) or your own uint8 `images` (N, H, W[, C]) and integer `factors` (N, K);
    only the rows `limit` keeps are read. The format is read by h5.py, beside this file."""
    try:
        import h5
    except ModuleNotFoundError as error:
        if error.name != "h5":
            raise
        raise DataError(f"{path}: reading .h5/.hdf5 files needs h5.py (the toolkit's HDF5 reader) "
                        "beside data.py") from error
    try:
        with h5.H5File(path) as f:
            found = f.datasets()
            image_name = _hdf5_images(path, f, found)
            count = found[image_name].shape[0]
            rows = _rows(count, limit, seed)
            images = found[image_name][() if rows is None else rows]
            factors, names, sizes = _hdf5_factors(path, found, image_name, count)
    except h5.H5Error as error:
        raise DataError(str(error)) from error
    if factors is not None and rows is not None:
        if sizes is None:  # the whole file's sizes
            sizes = factors.max(0, initial=0).astype(np.int64) + 1
        factors = factors[rows]
    return _checked(path, images, factors, names, sizes)


def _hdf5_images(path, f, found):
    """The name of the images dataset, "images" or "imgs"; an H5Error if it is a link or a
    dataset h5.py does not read (saying which), a DataError listing what there is otherwise."""
    for name in ("images", "imgs"):
        if name in found and found[name].dtype == np.uint8 and found[name].ndim in (3, 4):
            return name
        if name in f and name not in found:
            f[name]  # raises H5Error: an external link, a dangling soft link, ...
    listing = ", ".join(f"{n} {d.shape} {d.dtype}" for n, d in found.items()) or "no datasets"
    raise DataError(f"{path}: expected 3dshapes ('images' + 'labels'), dSprites ('imgs' + 'latents/"
                    f"classes') or a uint8 'images'/'imgs' dataset (N, H, W[, C]); found {listing}")


def _hdf5_factors(path, found, image_name, count):
    """(factors, names or None, sizes or None) of every row, from 3dshapes' `labels`, dSprites'
    `latents/classes` (or `latents/values`) or a `factors` dataset; (None, None, None) if none."""
    labels, classes = found.get("labels"), found.get("latents/classes")
    values = found.get("latents/values")
    if image_name == "images" and labels is not None and labels.shape == (count, 6):
        factors = _grid_classes(path, "labels", labels[()], _SHAPES3D_VALUES, _SHAPES3D_NAMES,
                                "3dshapes")
        return factors, _SHAPES3D_NAMES, [len(grid) for grid in _SHAPES3D_VALUES]
    if image_name == "imgs" and classes is not None:
        factors, names = classes[()], _DSPRITES_NAMES if classes.shape[1:] == (6,) else None
    elif image_name == "imgs" and values is not None:
        factors = _dsprites_classes(path, "latents/values", values[()])
        return factors, _DSPRITES_NAMES, [len(grid) for grid in _DSPRITES_VALUES]
    elif "factors" in found:
        factors, names = found["factors"][()], None
        factors = factors[:, None] if factors.ndim == 1 else factors  # a single factor
    else:
        return None, None, None
    if factors.ndim != 2 or len(factors) != count or factors.dtype.kind not in "iu":
        raise DataError(f"{path}: factors are {factors.dtype} {factors.shape}; expected integers of shape "
                        f"({count}, K), one row per image")
    return factors, names, None


# ---------------------------------------------------------------------------------------------
# writing files whole or not at all

def write_atomically(path, write, nbytes=0):
    """Write the file `path` whole or not at all; returns the real path written. write(f) fills a
    new temporary file in the same folder (f: a binary file open for writing and reading, with
    ordinary writes: never a memory map, whose full disk is SIGBUS), which then takes the
    target's place (os.replace): a reader sees the old file or the new one, never a part. A
    symbolic link given as `path` is written through to its target (the link stays). The file
    gets the permissions the umask gives any new file (0o666 & ~umask), not tempfile's 0o600.
    With `nbytes` > 0, a disk with less free space (shutil.disk_usage) is refused before anything
    is written. Raises WriteError naming `path` for any OSError ("disk full writing PATH (...)"
    for a full disk or quota); what write() raises otherwise passes through. The temporary file
    never stays behind."""
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    temporary = None
    try:
        free = shutil.disk_usage(folder).free
        if nbytes > free:
            raise OSError(errno.ENOSPC, f"needs {nbytes / 1e6:,.1f} MB, {free / 1e6:,.1f} MB free")
        fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                         dir=folder)
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
        temporary = None
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(_write_problem(path, error)) from error
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.remove(temporary)
    return target


def _write_problem(path, error):
    """The one line saying why `path` could not be written, from the OSError met."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full writing {path} ({error.strerror})"
    if error.errno == errno.EFBIG:
        return f"file size limit reached writing {path} ({error.strerror}; see ulimit -f)"
    return f"cannot write {path}: {error.strerror or error}"


def _umask():
    """The process's umask (os.umask reads it only by setting it: it is set back at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _npy_header(shape):
    """The bytes of an .npy header (format 1.0) for a C-order uint8 array of `shape`."""
    header = io.BytesIO()
    description = {"descr": "|u1", "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    np.lib.format.write_array_header_1_0(header, description)
    return header.getvalue()


def _write_npy(f, array):
    """Write uint8 `array` to the file f as an .npy, with ordinary writes of 64 MB at most."""
    flat = np.ascontiguousarray(array, np.uint8).reshape(-1)
    f.write(_npy_header(np.shape(array)))
    for start in range(0, len(flat), 1 << 26):
        f.write(flat[start:start + (1 << 26)].data)


# ---------------------------------------------------------------------------------------------
# decoded-image caches

_CACHE_FORMAT = 2  # part of every cache's name: bump it when decoding changes


def _cache_file(path, tag, cache_dir, members=()):
    """Where the decoded copy of `path` lives: beside it, else in cache_dir or ~/.cache, named
    <source name>.<tag>.<hash of its real path>-<hash of its content>.npy. The content hash covers
    _CACHE_FORMAT, `members` ((name, size, mtime_ns or CRC) of the files used; () for a tar, which
    is listed only to build a cache) and, for an archive, its own size and mtime_ns: a source
    changed in any of them gets a new cache file. Raises WriteError if cache_dir cannot be made."""
    if not os.path.isdir(path):
        stat = os.stat(path)
        members = (stat.st_size, stat.st_mtime_ns, members)
    if cache_dir is None:
        parent = os.path.dirname(os.path.abspath(path))
        cache_dir = parent if os.access(parent, os.W_OK) else os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "disentangle-data")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as error:
        raise WriteError(_write_problem(cache_dir, error)) from error
    source = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:8]
    content = hashlib.sha256(repr((_CACHE_FORMAT, members)).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(path))}.{tag}.{source}-{content}.npy")


def _cached(cache, shape_ok, build, nbytes=0):
    """The array of the cache file `cache`, memory-mapped read-only: the one there if it reads as
    uint8 of a shape that shape_ok(shape) accepts, else the .npy that build(f) writes through
    write_atomically (`nbytes`: the space it needs, checked first). Raises WriteError if it cannot
    be written (disk full, ...), DataError if it cannot be read back."""
    array = _read_cache(cache, shape_ok)
    if array is None:
        write_atomically(cache, build, nbytes)
        with _reading(cache, "cache just written is unreadable"):
            array = np.load(cache, mmap_mode="r", allow_pickle=False)
    return array


def _read_cache(cache, shape_ok):
    """The cache memory-mapped, or None if missing, unreadable or misshapen; the caches of the
    same source and tag with another content hash are stale: removed, and said so."""
    if not os.path.exists(cache):
        for old in glob.glob(glob.escape(cache.rsplit("-", 1)[0]) + "-*.npy"):
            print(f"cache {old} is stale (its source changed): rebuilding", file=sys.stderr)
            with contextlib.suppress(OSError):
                os.remove(old)
        return None
    try:
        array = np.load(cache, mmap_mode="r", allow_pickle=False)
        if array.dtype == np.uint8 and shape_ok(array.shape):
            return array
        problem = f"has shape {array.shape}"
    except (OSError, ValueError, EOFError) as e:
        problem = f"is unreadable ({e})"
    print(f"cache {cache} {problem}: rebuilding", file=sys.stderr)
    return None


def _progress(total, what, unit="images"):
    """report(done): count, rate and ETA on stderr, in place on a terminal, else a line every ~10%."""
    start, tty, shown = time.time(), sys.stderr.isatty(), -1

    def report(done):
        nonlocal shown
        step = done * 10 // max(total, 1)
        if (tty and done % 200 and done != total) or (not tty and step == shown):
            return
        shown, rate = step, done / max(time.time() - start, 1e-9)
        begin, end = ("\r", "\n" if done == total else "") if tty else ("", "\n")
        print(f"{begin}decoding {what}: {done}/{total} {rate:.0f} {unit}/s, "
              f"ETA {(total - done) / max(rate, 1e-9):.0f} s", end=end, file=sys.stderr, flush=True)
    return report


# ---------------------------------------------------------------------------------------------
# folders, zips and tars of images (celebA, cars3d's .mat files and anything else)

class _Contents(typing.NamedTuple):
    """What a folder, zip or tar holds, decided once, before anything is decoded (_image_contents)."""
    path: str
    kind: str  # "folder", "zip", "tar" of images; "cars3d folder", "cars3d tar" of car_*_mesh.mat
    files: list  # sorted (name in the source, size, mtime_ns or CRC) of its images or .mat files
    hidden: int  # hidden or system entries left out (_hidden)
    celeba: bool  # celebA's aligned images (_is_celeba)


def _load_images(path, size=64, crop="default", cache_dir=None):
    """A folder, zip or tar of images, decoded once (_decode_image: centre crop `crop`, resized to
    `size`) into a cache (_cache_file), or of cars3d's .mat files (_load_cars3d). The default crop
    is celebA's customary 148 for celebA's aligned images, recognised by their files (_is_celeba)
    however they are given, else the centre square; the Dataset's `preprocessing` says which."""
    size = _check_int(path, "size", size, 1, 4096)
    crop = crop if crop in ("default", None) else _check_int(path, "crop", crop, 1, 1 << 16)
    if not os.path.isdir(path) and not path.lower().endswith(".zip"):
        found = _tar_cache(path, size, crop, cache_dir)  # a tar is read through only to build one
        if found is not None:
            return found
    contents = _image_contents(path)
    if contents.kind.startswith("cars3d"):
        if size != 64 or crop != "default":
            raise DataError(f"{path}: holds cars3d, read at 64x64; options size and crop do not apply")
        return _load_cars3d(contents, cache_dir)
    _say_what_was_skipped(contents)
    members = () if contents.kind == "tar" else contents.files
    cache = _cache_file(path, _image_tag(size, crop, contents.celeba), cache_dir, members)
    count, crop = len(contents.files), _crop_used(crop, contents.celeba)
    images = _cached(cache, lambda s: _decoded_shape(s, size) and s[0] == count,
                     lambda f: _write_decoded(f, contents, size, crop),
                     nbytes=len(_npy_header((count, size, size, 3))) + count * size * size * 3)
    return _images_dataset(path, images, crop, contents.celeba)


def _say_what_was_skipped(contents):
    """A line on stderr counting the hidden entries skipped; DataError if no image is left."""
    skipped = f"{contents.hidden} hidden or system entries"
    if not contents.files:
        cars = " or cars3d car_*_mesh.mat files" if contents.kind != "zip" else ""
        raise DataError(f"{contents.path}: no images ({', '.join(_IMAGE_EXTS)}){cars} found"
                        + (f" ({skipped} skipped)" if contents.hidden else ""))
    if contents.hidden:
        print(f"{contents.path}: skipped {skipped} (dot-files, ._* and __MACOSX/ from macOS, "
              "Thumbs.db, desktop.ini)", file=sys.stderr)


def _image_tag(size, crop, celeba):
    """The cache tag of images decoded at `size` with the `crop` option, and what it decided:
    "64x64" (the default: the centre square), "64x64-celeba148" (the default on celebA),
    "64x64-crop120" (crop=120), "64x64-nocrop" (crop=None). Other options, other tags: a tar's
    cache is found by the options alone (_tar_cache)."""
    if crop == "default":
        return f"{size}x{size}" + ("-celeba148" if celeba else "")
    return f"{size}x{size}-" + (f"crop{crop}" if crop else "nocrop")


def _crop_used(crop, celeba):
    """The side of the centre crop, or None for the centre square, that the `crop` option means."""
    if crop == "default":
        return 148 if celeba else None  # celebA's customary CenterCrop(148)
    return crop


def _decoded_shape(shape, size):
    """Whether a cache's shape is that of decoded images, (N, size, size, 1 or 3)."""
    return len(shape) == 4 and shape[1:3] == (size, size) and shape[3] in (1, 3)


def _images_dataset(path, images, crop, celeba):
    """The unlabelled Dataset of decoded images, saying how they were decoded."""
    size = images.shape[1]
    how = f"centre crop {crop}x{crop}" if crop else "centre square crop"
    if celeba and crop == 148:
        how = ("celebA's aligned images (recognised by their NNNNNN.jpg names and 178x218 size): "
               "centre crop 148x148 as torchvision's CenterCrop(148)")
    preprocessing = f"{how}, resized to {size}x{size} (bilinear)"
    return _dataset(images, None, (), (), os.path.basename(os.path.normpath(path)), preprocessing)


def _tar_cache(path, size, crop, cache_dir):
    """The Dataset of a tar from a cache built earlier, or None. The tar's size and mtime and the
    options find it: each tag the options allow is tried (_image_tag; "cars3d-64x64" with the
    default options), so that a tar, gigabytes and often gzipped, is read through only to build."""
    for celeba in (False, True):
        cache = _cache_file(path, _image_tag(size, crop, celeba), cache_dir)
        images = _read_cache(cache, lambda s: _decoded_shape(s, size))
        if images is not None:
            return _images_dataset(path, images, _crop_used(crop, celeba), celeba)
    if size == 64 and crop == "default":
        grid = _read_cache(_cache_file(path, "cars3d-64x64", cache_dir), _cars3d_shape)
        if grid is not None:
            return _cars3d_dataset(grid)
    return None


def _image_contents(path):
    """The _Contents of a folder, .zip or .tar(.gz): cars3d's car_*_mesh.mat files (at the top of
    a folder, anywhere in a tar) or else its images, with symbolic links followed in a folder;
    listed and classified once (a tar is read through for it). Nothing is decoded."""
    if os.path.isdir(path):
        cars = sorted(name for name in os.listdir(path) if _is_car(name))
        if cars:
            stats = [os.stat(os.path.join(path, name)) for name in cars]
            files = [(name, s.st_size, s.st_mtime_ns) for name, s in zip(cars, stats)]
            return _Contents(path, "cars3d folder", files, 0, False)
        files, hidden = _folder_files(path)
        images = _images_among(files)
        return _Contents(path, "folder", images, hidden,
                         _is_celeba(images, lambda name: os.path.join(path, name)))
    if path.lower().endswith(".zip"):
        with _reading(path, "not a readable zip file"), zipfile.ZipFile(path) as zf:
            files = [(i.filename, i.file_size, i.CRC) for i in zf.infolist() if not i.is_dir()]
            images = _images_among([f for f in files if not _hidden(f[0])])

            def member(name):
                return io.BytesIO(zf.read(_zip_member_ok(zf.getinfo(name), path)))
            celeba = _is_celeba(images, member)
        return _Contents(path, "zip", images, sum(_hidden(f[0]) for f in files), celeba)
    return _tar_contents(path)


def _tar_contents(path):
    """The _Contents of a tar, from one pass through it (keeping the bytes of one NNNNNN.jpg
    member, in case the images are celebA's)."""
    files, sample = [], []
    for member, data in _tar_files(path, lambda name: not sample and _CELEBA_NAME.fullmatch(name)):
        files.append((member.name, member.size, member.mtime))
        if data is not None:
            sample.append(data)
    hidden = sum(_hidden(f[0]) for f in files)
    files = [f for f in files if not _hidden(f[0])]
    cars = sorted(f for f in files if _is_car(f[0]))
    if cars:
        return _Contents(path, "cars3d tar", cars, hidden, False)
    images = _images_among(files)
    celeba = _is_celeba(images, lambda name: io.BytesIO(sample[0]))  # every name matched: sampled
    return _Contents(path, "tar", images, hidden, celeba)


def _images_among(files):
    """The image files among (name, size, stamp) entries, sorted by name (a name twice: the last)."""
    return sorted({f[0]: f for f in files if f[0].lower().endswith(_IMAGE_EXTS)}.values())


_CELEBA_NAME = re.compile(r"(?:.*/)?\d{6}\.jpg")  # celebA's image names, 000001.jpg to 202599.jpg


def _is_celeba(images, open_one):
    """Whether (name, size, stamp) images are celebA's aligned ones (img_align_celeba), whatever the
    folder or archive is called or where in it they are: every name NNNNNN.jpg, and one of them
    (open_one(name): a path or stream) 178 pixels wide and 218 high."""
    names = [name for name, _, _ in images]
    if not names or not all(_CELEBA_NAME.fullmatch(name) for name in names):
        return False
    try:
        with Image.open(open_one(names[0])) as im:
            return im.size == (178, 218)
    except _FAILURES:
        return False  # an unreadable image is named when it is decoded


def _hidden(name):
    """Whether a '/'-separated name is, or lies in, what systems add beside images: dot-files
    (macOS's ._ AppleDouble files too), __MACOSX/, Thumbs.db, desktop.ini."""
    system = ("__macosx", "thumbs.db", "desktop.ini")
    return any(p.startswith(".") and p not in (".", "..") or p.lower() in system for p in name.split("/"))


def _folder_files(folder):
    """(name under the top folder, size, mtime_ns) of every file, sub-folders included, also
    through symbolic links as torchvision's ImageFolder (os.walk(followlinks=True)), each real
    folder once, so that a link loop ends; and the number of hidden entries skipped (a hidden
    folder counts once, and is not entered)."""
    files, hidden, visited = [], 0, set()
    for where, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(where)
        if real in visited:  # reached again through a link: a loop, or a second link to it
            folders.clear()
            continue
        visited.add(real)
        hidden += sum(map(_hidden, folders + names))
        folders[:] = sorted(name for name in folders if not _hidden(name))  # walked in name order
        prefix = os.path.relpath(where, folder).replace(os.sep, "/") + "/"
        for name in names:
            file = os.path.join(where, name)
            if not _hidden(name) and os.path.isfile(file):  # a broken link is not a file
                stat = os.stat(file)
                files.append(((prefix + name).removeprefix("./"), stat.st_size, stat.st_mtime_ns))
    return files, hidden


def _write_decoded(f, contents, size, crop):
    """Decode every image of `contents` (_decode_image) into the file f as an .npy (N, size, size,
    3), rows in name order, each written where it belongs as it is decoded (a tar's come in
    archive order); rewritten as (N, size, size, 1) if every image is gray (one gray image among
    colour ones is repeated in the three channels)."""
    names = [name for name, _, _ in contents.files]
    header = _npy_header((len(names), size, size, 3))
    row_bytes = size * size * 3
    gray = np.zeros(len(names), bool)
    progress = _progress(len(names), contents.path)
    f.write(header)
    for done, (i, where, source) in enumerate(_image_streams(contents, names), 1):
        with _reading(where, "unreadable image"):
            pixels, gray[i] = _decode_image(source, size, crop, where)
        f.seek(len(header) + i * row_bytes)
        f.write(np.broadcast_to(pixels.reshape(size, size, -1), (size, size, 3)).tobytes())
        progress(done)
    if gray.all():
        _keep_first_channel(f, len(names), size, len(header))


def _keep_first_channel(f, count, size, start):
    """Rewrite the .npy in f, (count, size, size, 3) from offset `start` with three equal channels,
    as (count, size, size, 1), in place: blocks of rows move to lower offsets (the new header is
    no longer), never over rows still to be read."""
    header = _npy_header((count, size, size, 1))
    pixels = size * size
    block = max(1, (1 << 24) // (3 * pixels))
    for first in range(0, count, block):
        rows = min(block, count - first)
        f.seek(start + first * 3 * pixels)
        colour = np.frombuffer(f.read(rows * 3 * pixels), np.uint8)
        f.seek(len(header) + first * pixels)
        f.write(colour[::3].tobytes())
    f.seek(0)
    f.write(header)
    f.truncate(len(header) + count * pixels)


def _image_streams(contents, names):
    """(row, name for messages, file name or stream) of each image, in the order the source reads best."""
    path = contents.path
    if contents.kind == "folder":
        yield from ((i, os.path.join(path, n), os.path.join(path, n)) for i, n in enumerate(names))
    elif contents.kind == "zip":
        with _reading(path, "not a readable zip file"), zipfile.ZipFile(path) as zf:
            for i, name in enumerate(names):
                with _reading(f"{path}:{name}", "unreadable image"):  # zf.read() checks the CRC
                    data = zf.read(_zip_member_ok(zf.getinfo(name), path))
                yield i, f"{path}:{name}", io.BytesIO(data)
    else:
        row = {n: i for i, n in enumerate(names)}
        for member, data in _tar_files(path, row.__contains__):
            if data is not None:
                yield row[member.name], f"{path}:{member.name}", io.BytesIO(data)


def _decode_image(source, size, crop, where):
    """(size, size) uint8 if gray (by mode or because every pixel is), else (size, size, 3), and
    whether gray, from an image file or stream: EXIF orientation applied, 8 bits per channel
    (_eight_bit), centre crop (as torchvision's CenterCrop), then PIL's BILINEAR resize. JPEGs are
    decoded in full (PIL's draft() gained nothing measurable and would change the pixels)."""
    with Image.open(source) as im:
        wide = im.mode.startswith("I;16") or im.mode == "I" and im.format == "PNG"  # PNG: <= 16 bits
        im = _eight_bit(ImageOps.exif_transpose(im), wide, where)
    w, h = im.size
    side = min(crop or min(w, h), w, h)
    left, top = int(round((w - side) / 2)), int(round((h - side) / 2))
    im = im.crop((left, top, left + side, top + side))
    pixels = np.asarray(im if side == size else im.resize((size, size), Image.BILINEAR))
    if pixels.ndim == 3 and (pixels == pixels[..., :1]).all():
        pixels = pixels[..., 0]
    return pixels, pixels.ndim == 2


def _eight_bit(im, wide, where):
    """Mode L or RGB: 16-bit gray (`wide`) scaled v -> round(v / 257); alpha and transparent
    colours composited onto black, c -> round(c * alpha / 255); modes I and F (32-bit integer,
    float: no fixed range) refused. Pillow itself keeps the high byte of 16-bit colour (v >> 8)."""
    if wide:
        v = np.asarray(im, np.int64)
        gray = ((v + 128) // 257).astype(np.uint8)
        if isinstance(im.info.get("transparency"), int):
            gray[v == im.info["transparency"]] = 0
        return Image.fromarray(gray)
    if im.mode in ("I", "F"):
        raise DataError(f"{where}: Pillow mode {im.mode} (32-bit {'integer' if im.mode == 'I' else 'float'} "
                        "pixels) has no fixed range; save the image with 8 or 16 bits per channel")
    if "transparency" in im.info or im.mode in ("PA", "La", "RGBa"):
        im = im.convert("LA" if im.mode in ("1", "L", "La") else "RGBA")
    if im.mode in ("LA", "RGBA"):
        pixels = np.asarray(im, np.uint32)
        blend = ((pixels[..., :-1] * pixels[..., -1:] + 127) // 255).astype(np.uint8)
        return Image.fromarray(blend[..., 0] if im.mode == "LA" else blend)
    return im if im.mode in ("L", "RGB") else im.convert("L" if im.mode == "1" else "RGB")


def _zip_member_ok(info, path):
    """Refuse member sizes a corrupt directory made up, before anything is allocated for them."""
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else 1100  # deflate expands <= 1032x
    if info.compress_size > os.path.getsize(path) or info.file_size > ratio * info.compress_size + 1024:
        raise DataError(f"{path}: member {info.filename} claims an impossible size")
    return info


# ---------------------------------------------------------------------------------------------
# MATLAB v5 files and cars3d

_MAT_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MAT_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4",
                14: "i8", 15: "u8"}
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15


def read_mat(source, name, where=None):
    """Variable `name` of a MATLAB v5 .mat file (MathWorks' "MAT-File Format", Level 5, compressed
    or not), read without scipy. `source` is a path or the file's bytes; `where` names it in errors.
    Returns an array of MATLAB's shape (2-D at least; a[i, j] is MATLAB's a(i+1, j+1)) and class
    (double -> float64, single -> float32, int8..uint64 and logical alike) whatever type stores it.
    Raises DataError naming the file if it is not a v5 file (v7.3 files are HDF5), is truncated or
    corrupt, or has no such variable or not a real numeric one (complex, sparse, char, cell, struct)."""
    is_path = not isinstance(source, (bytes, bytearray, memoryview))
    where = where or (os.fspath(source) if is_path else "<mat bytes>")
    with _reading(where, "not a readable MATLAB v5 .mat file"):
        if is_path:
            with open(source, "rb") as f:
                source = f.read()
        buf = memoryview(source)
        if len(buf) < 128 or bytes(buf[126:128]) not in (b"IM", b"MI"):
            version = " (v7.3 files are HDF5; not supported)" if b"7.3" in bytes(buf[:116]) else ""
            raise DataError(f"{where}: not a MATLAB v5 .mat file{version}")
        order = "<" if bytes(buf[126:128]) == b"IM" else ">"
        for kind, body in _mat_elements(buf, 128, order, where):
            if kind == _MI_COMPRESSED:
                kind, body = _mat_inflate(body, name, order, where)
            if kind == _MI_MATRIX and body is not None:
                cls, is_complex, dims, var, parts = _mat_header(body, order, where)
                if var == name:
                    return _mat_array(cls, is_complex, dims, parts, order, f"{where}: variable {name}")
    raise DataError(f"{where}: no variable {name!r}")


def _mat_elements(buf, pos, order, where):
    """(type, payload) of the data elements in buf[pos:], small-element format included."""
    while pos < len(buf):
        if pos + 8 > len(buf):
            raise DataError(f"{where}: truncated (partial element tag at offset {pos})")
        kind, nbytes = struct.unpack_from(order + "II", buf, pos)
        start, end = pos + 8, pos + 8 + nbytes + (0 if kind == _MI_COMPRESSED else -nbytes % 8)
        if kind >> 16:  # a small element: 2-byte size, 2-byte type and up to 4 bytes of data, in 8 bytes
            kind, nbytes, start, end = kind & 0xFFFF, kind >> 16, pos + 4, pos + 8
        if start + nbytes > min(end, len(buf)):
            raise DataError(f"{where}: truncated or corrupt element of {nbytes} bytes at offset {pos}")
        yield kind, buf[start:start + nbytes]
        pos = end


def _mat_inflate(body, name, order, where):
    """The element inside a miCOMPRESSED one; its payload only if it is the variable wanted."""
    inflate = zlib.decompressobj()
    head = inflate.decompress(body, 256)  # tag, flags, dims and name: enough to skip others
    kind, nbytes = struct.unpack_from(order + "II", head)
    if kind != _MI_MATRIX or _mat_header(head[8:], order, where)[3] != name:
        return kind, None
    rest = inflate.decompress(inflate.unconsumed_tail, 8 + nbytes - len(head) + 8)
    if not inflate.eof or inflate.unconsumed_tail or len(head) + len(rest) < 8 + nbytes:
        raise DataError(f"{where}: compressed variable {name!r} is truncated or corrupt")
    return kind, memoryview(head + rest)[8:8 + nbytes]


def _mat_header(body, order, where):
    """(class, complex?, dims, name, remaining elements) of a miMATRIX payload (or its prefix:
    the elements are read lazily)."""
    parts = _mat_elements(memoryview(body), 0, order, where)
    flags, dims, name = (next(parts, (None, b"")) for _ in range(3))
    if flags[0] != _MI_UINT32 or len(flags[1]) < 8 or dims[0] != _MI_INT32 or name[0] != _MI_INT8:
        raise DataError(f"{where}: malformed matrix element")
    flag = struct.unpack_from(order + "I", flags[1])[0]
    shape = tuple(int(d) for d in np.frombuffer(dims[1], order + "i4"))
    return flag & 0xFF, bool(flag & 0x800), shape, bytes(name[1]).decode("latin-1"), parts


def _mat_array(cls, is_complex, dims, parts, order, where):
    if cls not in _MAT_CLASSES or is_complex or len(dims) < 2 or min(dims) < 0:
        raise DataError(f"{where}: not a real numeric array (class {cls}, dims {dims})")
    kind, data = next(parts, (None, b""))
    if kind not in _MAT_TYPES:
        raise DataError(f"{where}: unknown storage type {kind}")
    stored = np.dtype(order + _MAT_TYPES[kind])
    count = int(np.prod(dims, dtype=object))
    if len(data) != count * stored.itemsize:
        raise DataError(f"{where}: {len(data)} bytes do not fit shape {dims} of {stored}")
    return np.frombuffer(data, stored).astype(_MAT_CLASSES[cls]).reshape(dims, order="F")


def _car_views(im, where):
    """(elevation, azimuth, 64, 64, 3) uint8 from cars3d's `im` (H, W, 3, azimuth, elevation), each
    view resized with LANCZOS (as disentanglement_lib's thumbnail)."""
    if im.ndim != 5 or im.shape[2] != 3 or not np.array_equal(im, im.astype(np.uint8)):
        raise DataError(f"{where}: 'im' is {im.dtype} {im.shape}; expected uint8 (H, W, 3, azimuth, elevation)")
    views = np.empty((im.shape[4], im.shape[3], 64, 64, 3), np.uint8)
    for e in range(im.shape[4]):
        for a in range(im.shape[3]):
            view = Image.fromarray(np.ascontiguousarray(im[:, :, :, a, e], dtype=np.uint8))
            views[e, a] = np.asarray(view.resize((64, 64), Image.LANCZOS))
    return views


def _tar_files(path, wanted=lambda name: False):
    """(member, its bytes if wanted(its name) else None) for each file in a .tar/.tar.gz/.tgz,
    streamed in archive order (nothing is extracted) and read to the end (gzip checks its CRC)."""
    with _reading(path, "not a readable tar archive"):
        gz = path.lower().endswith(("gz", ".tgz"))
        with (gzip.open if gz else open)(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    yield member, tar.extractfile(member).read() if wanted(member.name) else None
            while raw.read(1 << 20):
                pass


def _is_car(name):
    """Whether a file is cars3d's: car_*_mesh.mat, not hidden."""
    return fnmatch.fnmatch(os.path.basename(name), "car_*_mesh.mat") and not _hidden(name)


def _car_grid(contents):
    """(elevation, azimuth, object, 64, 64, 3) of cars3d's .mat files in `contents`, objects in
    file-name order; the .mat files of a tar are read in memory, not extracted."""
    path, names = contents.path, [name for name, _, _ in contents.files]
    progress = _progress(len(names), path, "files")
    if contents.kind == "cars3d tar":
        cars = ((member.name, read_mat(data, "im", f"{path}:{member.name}"))
                for member, data in _tar_files(path, _is_car) if data is not None)
    else:
        cars = ((name, read_mat(os.path.join(path, name), "im")) for name in names)
    views = {}
    for name, im in cars:
        views[name] = _car_views(im, f"{path}:{name}")
        progress(len(views))
    if not views or len({v.shape for v in views.values()}) != 1:
        raise DataError(f"{path}: no car_*_mesh.mat files, or their grids differ")
    return np.stack([views[name] for name in sorted(views)], axis=2)


def _load_cars3d(contents, cache_dir=None):
    """cars3d (Reed et al. 2015) from the car_*_mesh.mat files of a folder or tar (_Contents),
    decided by _image_contents: every view resized to 64x64 (_car_views), decoded once into a
    cache; factors elevation, azimuth, object."""
    members = contents.files if contents.kind == "cars3d folder" else ()
    cache = _cache_file(contents.path, "cars3d-64x64", cache_dir, members)
    count = len(contents.files)
    grid = _cached(cache, lambda s: _cars3d_shape(s) and s[2] == count,
                   lambda f: _write_npy(f, _car_grid(contents)))
    return _cars3d_dataset(grid)


def _cars3d_shape(shape):
    """Whether a cache's shape is cars3d's, (elevation, azimuth, object, 64, 64, 3)."""
    return len(shape) == 6 and shape[3:] == (64, 64, 3)


def _cars3d_dataset(grid):
    """The Dataset of a cars3d grid (elevation, azimuth, object, 64, 64, 3), rows in C order."""
    sizes = grid.shape[:3]
    return _dataset(grid.reshape(-1, 64, 64, 3), _grid_factors(sizes),
                    ["elevation", "azimuth", "object"], sizes, "cars3d",
                    "cars3d: each view resized to 64x64 (LANCZOS)")


# ---------------------------------------------------------------------------------------------
# torch-saved tensors (3D faces), read without torch and without unpickling

class _Global(str):
    """A pickle GLOBAL, recorded by name; never imported."""


class _Call(tuple):
    """(callable, args) from REDUCE/NEWOBJ; never called."""


class _PersId(tuple):
    """(persistent id,) from BINPERSID: torch's reference to a storage."""


_LITERALS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT",
             "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BINSTRING",
             "SHORT_BINSTRING", "STRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_NEW_OBJECTS = {"NONE": lambda: None, "NEWTRUE": lambda: True, "NEWFALSE": lambda: False,
                "EMPTY_TUPLE": tuple, "EMPTY_LIST": list, "EMPTY_DICT": dict}


def _walk_pickle(f, where):
    """Evaluate one pickle symbolically: literals and containers are built; globals, calls and
    persistent ids are only recorded (_Global, _Call, _PersId). Nothing is imported or run."""
    stack, memo, marks = [], {}, []

    def since_mark():
        items = stack[marks[-1]:]
        del stack[marks.pop():]
        return items
    for op, arg, _ in pickletools.genops(f):
        n = op.name
        if n in _LITERALS:
            stack.append(arg)
        elif n in _NEW_OBJECTS:
            stack.append(_NEW_OBJECTS[n]())
        elif n == "MARK":
            marks.append(len(stack))
        elif n in ("TUPLE", "LIST", "DICT"):
            items = since_mark()
            stack.append({"TUPLE": tuple, "LIST": list}[n](items) if n != "DICT" else _pairs(items, where))
        elif n in ("TUPLE1", "TUPLE2", "TUPLE3"):
            marks.append(len(stack) - int(n[-1]))
            stack.append(tuple(since_mark()))
        elif n in ("APPEND", "APPENDS"):
            items = since_mark() if n == "APPENDS" else [stack.pop()]
            _top(stack, list, where).extend(items)
        elif n in ("SETITEM", "SETITEMS"):
            items = since_mark() if n == "SETITEMS" else [stack.pop(-2), stack.pop()]
            _top(stack, dict, where).update(_pairs(items, where))
        elif n in ("GLOBAL", "STACK_GLOBAL"):
            name = arg.replace(" ", ".") if n == "GLOBAL" else f"{stack.pop(-2)}.{stack.pop()}"
            stack.append(_Global(name))
        elif n == "BINPERSID":
            stack.append(_PersId((stack.pop(),)))
        elif n in ("REDUCE", "NEWOBJ"):
            args = stack.pop()
            stack.append(_Call((stack.pop(), args)))
        elif n in ("BUILD", "POP"):
            stack.pop()
        elif n in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            memo[len(memo) if n == "MEMOIZE" else arg] = stack[-1]
        elif n in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[arg])
        elif n == "STOP":
            return stack.pop()
        elif n not in ("PROTO", "FRAME"):
            raise DataError(f"{where}: unexpected pickle opcode {n}")
    raise DataError(f"{where}: pickle ends before STOP")


def _top(stack, kind, where):
    """The list or dict an APPEND or SETITEM adds to; a damaged pickle may leave anything there."""
    if not stack or not isinstance(stack[-1], kind):
        raise DataError(f"{where}: damaged pickle (items added to something not a {kind.__name__})")
    return stack[-1]


def _pairs(items, where):
    try:
        return dict(zip(items[::2], items[1::2]))
    except TypeError:  # an unhashable key: only a damaged pickle has one
        raise DataError(f"{where}: damaged pickle (a dictionary key that cannot be one)") from None


def _tensor_spec(obj, where):
    """(storage key, numel, offset, size) of the one contiguous uint8 tensor a pickle rebuilds."""
    if not (isinstance(obj, _Call) and obj[0] == "torch._utils._rebuild_tensor_v2"
            and isinstance(obj[1], tuple) and len(obj[1]) >= 4):
        raise DataError(f"{where}: does not hold a single tensor")
    pid, offset, size, stride = obj[1][:4]
    pid = pid[0] if isinstance(pid, _PersId) else ()
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _Global) and isinstance(pid[2], str) and isinstance(pid[4], int)):
        raise DataError(f"{where}: tensor without a recognisable storage")
    if pid[1].rsplit(".", 1)[-1] not in ("ByteStorage", "UntypedStorage"):
        raise DataError(f"{where}: tensor in a {pid[1]}; expected uint8 images (a torch.ByteStorage)")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))):
        raise DataError(f"{where}: corrupt tensor size/stride")
    c_order = [int(np.prod(size[k + 1:], dtype=object)) for k in range(len(size))]  # contiguous strides
    if any(n != 1 and s != c for n, s, c in zip(size, stride, c_order)):
        raise DataError(f"{where}: tensor is not contiguous (stride {stride})")
    if offset + int(np.prod(size, dtype=object)) > pid[4]:
        raise DataError(f"{where}: tensor runs past its storage")
    return pid[2], pid[4], offset, tuple(size)


def _torch_legacy(path):
    """(storage, offset, size) of the tensor of a legacy torch.save file: magic, version, sys
    info, object, storage keys, then each storage as an 8-byte element count and its raw bytes."""
    # memory-mapped, reads stop at the file's end: a corrupt length cannot allocate gigabytes
    with open(path, "rb") as raw, mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as f:
        if _walk_pickle(f, path) != 0x1950a86a20f9469cfc6c or _walk_pickle(f, path) != 1001:
            raise DataError(f"{path}: not a torch file (no torch magic number)")
        _walk_pickle(f, path)  # sys info
        key, numel, offset, size = _tensor_spec(_walk_pickle(f, path), path)
        if _walk_pickle(f, path) != [key]:
            raise DataError(f"{path}: unexpected storages")
        start = f.tell() + 8
        if start > len(f) or struct.unpack("<q", f.read(8))[0] != numel or start + numel != len(f):
            raise DataError(f"{path}: storage of {numel} bytes is truncated or has a bad length")
    return np.memmap(path, np.uint8, "r", offset=start, shape=(numel,)), offset, size


def _torch_zip(path):
    """(storage, offset, size) of the tensor of a zip-format torch.save file: <archive>/data.pkl
    and <archive>/data/<key>."""
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise DataError(f"{path}: a zip file, but not a torch file (no data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]
        data_pkl = zf.read(_zip_member_ok(zf.getinfo(pickles[0]), path))
        key, numel, offset, size = _tensor_spec(_walk_pickle(io.BytesIO(data_pkl), path), path)
        info = _zip_member_ok(zf.getinfo(f"{prefix}data/{key}"), path)
        if info.file_size != numel:
            raise DataError(f"{path}: storage {key} has {info.file_size} bytes, expected {numel}")
        return np.frombuffer(zf.read(info), np.uint8), offset, size  # read() checks the CRC


def _load_faces(path):
    with _reading(path, "not a readable torch file"):
        storage, offset, size = _torch_zip(path) if zipfile.is_zipfile(path) else _torch_legacy(path)
    images = storage[offset:offset + int(np.prod(size))].reshape(size)
    grid = images.shape[:-2]
    if len(grid) == 1 and grid[0] == 50 * 21 * 11 * 11:
        grid = (50, 21, 11, 11)  # the published faces, flattened
    elif images.ndim == 4 and images.shape[1] == 1:
        grid = images.shape[:1]  # (N, 1, H, W)
    if len(grid) not in (1, 4):
        raise DataError(f"{path}: tensor of shape {images.shape}; expected (N, H, W) or "
                        "(identity, azimuth, elevation, lighting, H, W)")
    flat = images.reshape((-1,) + images.shape[-2:] + (1,))
    factors = _grid_factors(grid) if len(grid) == 4 else None
    names = ["identity", "azimuth", "elevation", "lighting"]
    return _dataset(flat, factors, names, grid, os.path.basename(path))


# ---------------------------------------------------------------------------------------------
# raw formats (fileformats.py beside this file): MPI3D's .npz, SmallNORB's binary matrices

def _fileformats(path):
    """fileformats.py, the raw-format reader beside this file, imported only when needed."""
    try:
        return importlib.import_module(f"{__package__}.fileformats" if __package__ else "fileformats")
    except ModuleNotFoundError as error:
        raise DataError(f"{path}: reading this file needs fileformats.py (the toolkit's reader of "
                        "raw formats) beside data.py") from error


def _rows_of(cache, rows):
    """A cache .npy (memory-mapped, C order) as `rows` images of it read when drawn
    (fileformats.StoredRows), so that memory holds only those: a memory map also holds the
    page-cache folios around each row touched (up to 2 MB a row on Linux 6.x, the whole cache in
    a few thousand draws). The memory map itself (reshaped) when fileformats.py is not beside."""
    shape = (rows,) + cache.shape[-3:] if cache.ndim > 4 else cache.shape
    try:
        formats = _fileformats(cache.filename)
    except DataError:
        return cache.reshape(shape)
    return formats.StoredRows(cache.filename, cache.offset, cache.dtype, shape)


@contextlib.contextmanager
def _formats_errors():
    """fileformats.FormatError (a ValueError naming the file) as a DataError."""
    try:
        yield
    except DataError:
        raise
    except ValueError as error:
        if type(error).__name__ != "FormatError":
            raise
        raise DataError(str(error)) from error


_MPI3D_NAMES = ["object_color", "object_shape", "object_size", "camera_height",
                "background_color", "horizontal_axis", "vertical_axis"]
_MPI3D_GRIDS = {  # rows of a published file -> its factor grid, rows in C order over it
    1_036_800: (6, 6, 2, 3, 3, 40, 40),  # mpi3d_toy, mpi3d_realistic, mpi3d_real
    460_800: (4, 4, 2, 3, 3, 40, 40),  # real3d_complicated_shapes_ordered (MPI3D-complex)
}
_MPI3D_FILES = ("mpi3d_", "real3d_complicated")  # how the published files' names begin


def _is_mpi3d(path):
    """Whether an .npz is named like MPI3D's published files or holds one array, `images`, as they
    do; the row count decides the rest (_load_mpi3d)."""
    if os.path.basename(path).lower().startswith(_MPI3D_FILES):
        return True
    with contextlib.suppress(OSError, zipfile.BadZipFile, EOFError):
        with zipfile.ZipFile(path) as zf:
            return zf.namelist() == ["images.npy"]
    return False


def _load_mpi3d(path):
    """MPI3D (Gondal et al. 2019): `images` (N, H, W, 3) uint8, left in the file when the member
    is stored (np.savez, as published: fileformats.StoredRows reads the rows drawn, never the
    whole array) and read otherwise; factors from the row: N = 1,036,800 is
    the 6x6x2x3x3x40x40 grid of mpi3d_toy/realistic/real, N = 460,800 the 4x4x2x3x3x40x40 grid of
    real3d_complicated_shapes_ordered (rr-learning/disentanglement_dataset's README:
    array.reshape([6,6,2,3,3,40,40,64,64,3])). An .npz of another count or kind that is not named
    like a published file is read as any other .npz (_load_npz)."""
    named = os.path.basename(path).lower().startswith(_MPI3D_FILES)
    try:
        formats = _fileformats(path)
    except DataError:
        if named:
            raise
        return _load_npz(path)  # data.py alone: any images-only .npz, read in full
    with _formats_errors():
        members = formats.npz_members(path)
        shape, dtype, _ = members.get("images", ((), None, False))
        grid = _MPI3D_GRIDS.get(shape[0] if shape else -1)
        if grid is None or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or len(members) != 1:
            if not named:
                return _load_npz(path)
            raise DataError(f"{path}: holds {', '.join(f'{k} {v[1]} {v[0]}' for k, v in members.items())}; "
                            "MPI3D's files hold one array, images, uint8 of 1,036,800 (toy, realistic, "
                            "real) or 460,800 (complex shapes) rows of (64, 64, 3)")
        images = formats.npz_rows(path, "images")  # rows read when drawn: memory holds only those
    return _dataset(images, _grid_factors(grid), _MPI3D_NAMES, grid, os.path.basename(path))


_NORB_SPLITS = ("5x46789x9x18x6x2x96x96-training", "5x01235x9x18x6x2x96x96-testing")
_NORB_NAMES = ["category", "instance", "elevation", "azimuth", "lighting"]
_NORB_SIZES = [5, 10, 9, 18, 6]


def _is_norb(path):
    """A SmallNORB file (smallnorb-...-{dat,cat,info}.mat[.gz]) or a folder holding them."""
    names = os.listdir(path) if os.path.isdir(path) else [os.path.basename(path)]
    return any(fnmatch.fnmatch(n.lower(), "smallnorb-*.mat*") for n in names)


def _norb_files(path):
    """{(split, kind): path} of the six published files in `path`'s folder, plain or .gz."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    files, missing = {}, []
    for split in _NORB_SPLITS:
        for kind in ("dat", "cat", "info"):
            name = f"smallnorb-{split}-{kind}.mat"
            found = [n for n in (name, name + ".gz") if os.path.isfile(os.path.join(folder, n))]
            if found:
                files[split, kind] = os.path.join(folder, found[0])
            else:
                missing.append(name)
    if missing:
        raise DataError(f"{folder}: SmallNORB needs its six files (plain or .gz) in one folder; "
                        f"missing {', '.join(missing)}")
    return folder, files


def _norb_factors(files, formats):
    """(category, instance, elevation, azimuth / 2, lighting) int64 (N, 5), training then testing."""
    parts = []
    for split in _NORB_SPLITS:
        cat, info = (formats.read_norb(files[split, k], None) for k in ("cat", "info"))
        if cat.ndim != 1 or info.ndim != 2 or info.shape != (len(cat), 4):
            raise DataError(f"{files[split, 'info']}: cat {cat.shape} and info {info.shape} do not "
                            "fit (N,) and (N, 4)")
        parts.append(np.column_stack([cat, info]).astype(np.int64))
    factors = np.concatenate(parts)
    if (factors[:, 3] % 2).any():
        raise DataError(f"{files[_NORB_SPLITS[0], 'info']}: odd azimuths; SmallNORB's are 0, 2, ..., 34")
    factors[:, 3] //= 2
    bad = np.flatnonzero(((factors < 0) | (factors >= _NORB_SIZES)).any(1))
    if bad.size:
        raise DataError(f"{files[_NORB_SPLITS[0], 'info']}: row {bad[0]} has factors "
                        f"{factors[bad[0]].tolist()} outside SmallNORB's {_NORB_SIZES}")
    return factors


def _norb_images(files, formats, out):
    """The first image of each stereo pair, resized to 64x64 with PIL's LANCZOS (disentanglement_
    lib's ANTIALIAS), into out (N, 64, 64, 1); the .dat files are streamed in blocks."""
    progress, row = _progress(len(out), "SmallNORB"), 0
    for split in _NORB_SPLITS:
        shape, blocks = formats.norb_blocks(files[split, "dat"], rows=512)
        rows = len(formats.read_norb(files[split, "cat"], None))
        if len(shape) != 4 or shape[1] != 2 or shape[0] != rows:
            raise DataError(f"{files[split, 'dat']}: shape {shape}; expected ({rows}, 2, H, W): "
                            "a stereo pair per row of its -cat file")
        for _, block in blocks:
            for pair in block:
                image = Image.fromarray(np.ascontiguousarray(pair[0], dtype=np.uint8))
                out[row, :, :, 0] = np.asarray(image.resize((64, 64), Image.LANCZOS))
                row += 1
            progress(row)
    return out


def _load_norb(path, cache_dir=None):
    """SmallNORB (LeCun et al. 2004) as disentanglement_lib's `norb`: both splits, training first;
    images (48600, 64, 64, 1) uint8, decoded once into a cache; factors category (5), instance
    (10: training has 4, 6, 7, 8, 9, testing 0, 1, 2, 3, 5, as info stores them), elevation (9),
    azimuth (18: info's 0, 2, ..., 34 halved), lighting (6). `path`: the folder or one file."""
    formats = _fileformats(path)
    folder, files = _norb_files(path)
    with _formats_errors():
        factors = _norb_factors(files, formats)
        stats = sorted((os.path.basename(p), s.st_size, s.st_mtime_ns)
                       for p in files.values() for s in [os.stat(p)])
        cache = _cache_file(folder, "smallnorb-64x64", cache_dir, stats)
        shape = (len(factors), 64, 64, 1)
        images = _cached(cache, lambda s: s == shape,
                         lambda f: _write_npy(f, _norb_images(files, formats, np.empty(shape, np.uint8))))
    return _dataset(_rows_of(images, len(images)), factors, _NORB_NAMES, _NORB_SIZES, "smallnorb")


# ---------------------------------------------------------------------------------------------
# 3D chairs (Aubry et al. 2014): rendered_chairs/<chair>/renders/image_XXX_pYYY_tZZZ_r096.png

_CHAIR_VIEW = re.compile(r"(?:^|/)([^/]+)/renders/image_\d+_p(\d+)_t(\d+)_r\d+\.png$")
_CHAIR_CROP = 2 / 3  # of the side, centred: 400 of the renders' 600 pixels, the chair without margin


def _is_chairs(path):
    """rendered_chairs.tar (by name) or a folder whose sub-folders hold renders/image_*.png."""
    base = os.path.basename(os.path.normpath(path)).lower()
    if not os.path.isdir(path):
        return base.startswith("rendered_chairs") and base.endswith((".tar", ".tar.gz", ".tgz"))
    with os.scandir(path) as entries:
        for entry in entries:
            renders = os.path.join(entry.path, "renders")
            if entry.is_dir() and os.path.isdir(renders):
                return any(_CHAIR_VIEW.search(f"{entry.name}/renders/{n}") for n in os.listdir(renders))
    return False


def _chair_grid(path, names):
    """(rows: the file names in (chair, azimuth, elevation) order, sizes) from the renders' names:
    chairs are their folders (sorted), azimuth the t values and elevation the p values (sorted).
    Raises DataError if a chair lacks a view or has one twice."""
    views = {}
    for name in names:
        match = _CHAIR_VIEW.search(name)
        if match:
            chair, p, t = match.group(1), int(match.group(2)), int(match.group(3))
            if views.setdefault((chair, t, p), name) != name:
                raise DataError(f"{path}: two renders of chair {chair} at p{p:03d} t{t:03d}")
    if not views:
        raise DataError(f"{path}: no <chair>/renders/image_*_p*_t*_r*.png files (3D chairs' layout)")
    axes = [sorted({key[k] for key in views}) for k in range(3)]
    sizes = tuple(len(a) for a in axes)
    if len(views) != np.prod(sizes):
        counts = {}
        for chair, _, _ in views:
            counts[chair] = counts.get(chair, 0) + 1
        short = min(counts, key=counts.get)
        raise DataError(f"{path}: chair {short} has {counts[short]} views; every chair needs all "
                        f"{sizes[1]} azimuths x {sizes[2]} elevations")
    rows = [views[c, t, p] for c in axes[0] for t in axes[1] for p in axes[2]]
    return rows, sizes


def _chair_image(source, where):
    """(64, 64) uint8 gray of a render: alpha composited on white, the centred square of 2/3 of
    the side, resized with PIL's LANCZOS, converted to gray with PIL's "L" (ITU-R 601-2 luma)."""
    with _reading(where, "unreadable image"), Image.open(source) as im:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im).convert("L")
        w, h = im.size
        side = max(1, round(min(w, h) * _CHAIR_CROP))
        left, top = (w - side) // 2, (h - side) // 2
        return np.asarray(im.crop((left, top, left + side, top + side)).resize((64, 64), Image.LANCZOS))


def _chair_sources(path, rows):
    """(row, name, file or stream) of each render, streamed from a tar in archive order."""
    if os.path.isdir(path):
        yield from ((i, n, os.path.join(path, n)) for i, n in enumerate(rows))
        return
    row = {n: i for i, n in enumerate(rows)}
    for member, data in _tar_files(path, row.__contains__):
        if data is not None:
            yield row[member.name], f"{path}:{member.name}", io.BytesIO(data)


def _load_chairs(path, cache_dir=None):
    """3D chairs (Aubry et al. 2014) from rendered_chairs.tar or its extracted folder: 1,393
    chairs x 62 views as published, (N, 64, 64, 1) uint8 gray (_chair_image), decoded once into
    a cache of shape (chair, azimuth, elevation, 64, 64, 1) (a cached tar is not read again);
    factors chair (folder, sorted), azimuth (31: t), elevation (2: p) from the names."""
    in_tar = not os.path.isdir(path)
    listing = None if in_tar else sorted(_folder_files(path)[0])
    cache = _cache_file(path, "chairs-64x64-gray", cache_dir, listing)
    grid = _read_cache(cache, lambda s: len(s) == 6 and s[3:] == (64, 64, 1)) if in_tar else None
    if grid is None:
        names = [m.name for m, _ in _tar_files(path)] if in_tar else [f[0] for f in listing]
        rows, sizes = _chair_grid(path, names)
        shape = sizes + (64, 64, 1)
        grid = _cached(cache, lambda s: s == shape,
                       lambda f: _write_npy(f, _chair_images(path, rows, np.empty(shape, np.uint8))))
    sizes = grid.shape[:3]
    images = _rows_of(grid, int(np.prod(sizes)))
    return _dataset(images, _grid_factors(sizes), ["chair", "azimuth", "elevation"],
                    sizes, "chairs3d")


def _chair_images(path, rows, out):
    """Each render of `rows` decoded into its place of out (chair, azimuth, elevation, 64, 64, 1)."""
    flat, progress = out.reshape(-1, 64, 64, 1), _progress(len(rows), path)
    for done, (i, where, source) in enumerate(_chair_sources(path, rows), 1):
        flat[i, :, :, 0] = _chair_image(source, where)
        progress(done)
    return out


# ---------------------------------------------------------------------------------------------
# dSprites variants of disentanglement_lib (Locatello et al. 2019): colour, noise, scream

class DrawnImages:
    """uint8 images (N, H, W, C) made from stored ones only when rows are drawn: `images[index]`
    (an int, a slice, an int array, with optional further indexes) returns the rows
    draw(stored[rows], rows) computes, so no copy of the whole data set is ever made. Has the
    `shape`, `dtype`, `ndim`, `nbytes` and `len()` of the array it stands for; np.asarray of it
    computes every row (a full copy: avoid)."""

    def __init__(self, stored, shape, draw):
        self.stored, self.shape, self.draw = stored, tuple(shape), draw
        self.dtype, self.ndim = np.dtype(np.uint8), len(shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, slice):
            index = np.arange(*rows.indices(len(self)))
        else:
            index = np.arange(len(self))[rows]  # checks bounds, allows negatives and masks
        batch = self.draw(self.stored[np.atleast_1d(index)], np.atleast_1d(index))
        if np.ndim(index) == 0:
            return batch[0][rest] if rest else batch[0]
        return batch[(slice(None),) + rest] if rest else batch

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([self[start:start + 4096] for start in range(0, len(self), 4096)])
        return out if dtype is None else out.astype(dtype)


def _variant(dataset, source, seed, variant=None, scream=None):
    """The dataset with its 1-channel images drawn as disentanglement_lib's dSprites variants, in
    colour (N, H, W, 3): "color" (the sprite times a colour with every channel uniform in
    [0.5, 1]), "noisy" (the background uniform noise in 0..255 per pixel and channel; the sprite
    white), or scream=PATH (the background a random 64x64 patch of the picture, thumbnailed to fit
    350x274, averaged with a random colour; the sprite that background inverted). Each image's
    colour, noise or patch is fixed by (seed, row)."""
    if variant not in (None, "color", "noisy"):
        raise DataError(f"{source}: option variant={variant!r}: expected color or noisy (or scream=PATH)")
    if (variant is None) == (scream is None):
        raise DataError(f"{source}: give one of variant=color, variant=noisy or scream=PATH")
    n, h, w, c = dataset.images.shape
    if c != 1:
        raise DataError(f"{source}: the dSprites variants need 1-channel (binary) images; these have {c}")
    if variant == "color":
        colours = np.random.default_rng(seed).uniform(0.5, 1, (n, 3)).astype(np.float32)
        draw = lambda batch, rows: np.rint(batch * colours[rows][:, None, None, :]).astype(np.uint8)
    elif variant == "noisy":
        draw = lambda batch, rows: np.maximum(batch, np.stack(
            [np.random.default_rng([seed, r]).integers(0, 256, (h, w, 3), np.uint8) for r in rows]))
    else:
        draw = _scream_draw(_scream_picture(scream, h, w), seed)
    images = DrawnImages(dataset.images, (n, h, w, 3), draw)
    return Dataset(images, dataset.factors, dataset.factor_names, dataset.factor_sizes,
                   f"{dataset.name}:{variant or 'scream'}")


def _scream_picture(path, h, w):
    """The picture as disentanglement_lib prepares The Scream: thumbnail to fit 350x274, RGB uint8."""
    with _reading(path, "not a readable picture (option scream)"), Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((350, 274))
        picture = np.asarray(im)
    if picture.shape[0] <= h or picture.shape[1] <= w:
        raise DataError(f"{path}: the scream picture is {picture.shape[1]}x{picture.shape[0]} once fitted "
                        f"to 350x274; it must be larger than the {w}x{h} images")
    return picture


def _scream_draw(picture, seed):
    def draw(batch, rows):
        b, h, w, _ = batch.shape
        out = np.empty((b, h, w, 3), np.uint8)
        for i, row in enumerate(rows):
            rng = np.random.default_rng([seed, row])
            top, left = rng.integers(0, picture.shape[0] - h), rng.integers(0, picture.shape[1] - w)
            colour = rng.uniform(0, 255, 3)
            background = np.rint((picture[top:top + h, left:left + w] + colour) / 2).astype(np.uint8)
            out[i] = np.where(batch[i] == 255, 255 - background, background)
        return out
    return draw


# ============================================================================= pairs (weak supervision)

class PairSampler:
    """Pairs of rows whose factors differ in exactly k factors (Locatello et al. 2020's weak supervision).

    factors (N, K) int64 class indices with factor_sizes (K,), as a Dataset holds them: a full grid
    (the built-ins, dSprites, 3dshapes, cars3d, 3D faces) or any table (a --limit subset, your own
    factors, with combinations missing or repeated). Rows are found by their factor tuple, read as
    one mixed-radix number, sorted once here (O(N log N) time, two int64 arrays of N); draws are
    row indices, no image is read or copied. k in 1..K'-1 is how many factors differ, K' the
    factors with more than one value; k = 0 draws it uniformly from 1..K'-1 for each pair, the
    paper's "k = rnd". (disentanglement_lib's pairs change 1 or k factors, a coin flip, to values
    drawn from all of theirs, the old one included; ours differ in exactly k, as the paper says.)
    Raises DataError, one line starting with `where`, for unlabelled data (factors None), factors
    outside their sizes, fewer than 2 varying factors, or k out of range.
    """

    MAX_TRIES = 100

    def __init__(self, factors, factor_sizes, k=1, where="dataset"):
        if factors is None:
            raise DataError(f"{where}: has no factors (unlabelled); pairs that share factors need them")
        factors = np.asarray(factors)
        self.sizes = np.asarray(factor_sizes, dtype=np.int64)
        if factors.ndim != 2 or factors.shape[1] != len(self.sizes) or len(factors) == 0:
            raise DataError(f"{where}: factors of shape {factors.shape} for {len(self.sizes)} factor sizes")
        if (factors < 0).any() or (factors >= self.sizes).any():
            raise DataError(f"{where}: factor values outside 0..factor_sizes - 1")
        self.varying = self.sizes > 1
        count = int(self.varying.sum())
        if count < 2:
            raise DataError(f"{where}: pairs need at least 2 factors that vary, it has {count}")
        if not 0 <= k < count:
            raise DataError(f"{where}: k must be 0 (random) or 1..{count - 1} for its {count} "
                            f"varying factors, got {k}")
        self.k, self.where = k, where
        self.factors = factors.astype(np.int64, copy=False)
        self.strides = np.ones(len(self.sizes), dtype=np.int64)
        cells = 1
        for i in reversed(range(len(self.sizes))):  # C order: a full grid's key is its row
            self.strides[i], cells = cells, cells * int(self.sizes[i])
        if cells > 2 ** 62:
            raise DataError(f"{where}: {cells} factor combinations are too many to index")
        keys = self.factors @ self.strides
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]

    def draw(self, count, rng):
        """(first, second), each (count,) int64 row indices; deterministic given rng.

        first is uniform over the rows; second's factors differ from first's in exactly k of them,
        chosen uniformly, each taking one of its other values uniformly (a row among equals
        uniformly). Where a table lacks that row, the factors and values are drawn again, and
        after MAX_TRIES // 2 tries the first row too. rng: a numpy Generator, whose state is all
        a resumed run needs to draw the same pairs. Raises DataError if a pair is still missing
        after MAX_TRIES tries (a table too sparse for this k).
        """
        first = rng.integers(len(self.factors), size=count)
        ks = rng.integers(1, int(self.varying.sum()), size=count) if self.k == 0 else np.full(count, self.k)
        second = np.full(count, -1)
        for attempt in range(self.MAX_TRIES):
            missing = np.flatnonzero(second < 0)
            if len(missing) == 0:
                return first, second
            if attempt >= self.MAX_TRIES // 2:
                first[missing] = rng.integers(len(self.factors), size=len(missing))
            second[missing] = self._partners(first[missing], ks[missing], rng)
        raise DataError(f"{self.where}: no row differs from row {first[second < 0][0]} in exactly "
                        f"{ks[second < 0][0]} factors after {self.MAX_TRIES} tries: the factor "
                        "table is too sparse for pairs with this k")

    def _partners(self, rows, ks, rng):
        """For each row, a row differing in ks factors drawn once at random, or -1 if none has them."""
        values = self.factors[rows]
        scores = np.where(self.varying, rng.random(values.shape), np.inf)
        ranks = np.argsort(np.argsort(scores, axis=1), axis=1)
        changed = ranks < ks[:, None]  # ks distinct varying factors per row
        offsets = rng.integers(1, np.maximum(self.sizes, 2), size=values.shape)
        wanted = np.where(changed, (values + offsets) % self.sizes, values) @ self.strides
        start = np.searchsorted(self.sorted_keys, wanted, "left")
        end = np.searchsorted(self.sorted_keys, wanted, "right")
        pick = start + (rng.random(len(rows)) * (end - start)).astype(np.int64)
        return np.where(end > start, self.order[np.minimum(pick, len(self.order) - 1)], -1)
