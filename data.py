"""Dataset readers for disentanglement work: numpy + pillow + the standard library only.

`load(source, limit=None, seed=0, **options) -> Dataset` reads a built-in name or a path:

- "sprites"  dSprites-like binary sprites rendered here (3 shapes x 6 scales x 40 orientations x
             32 x 32 positions, 64x64x1). Options: positions, orientations, scales, shapes.
- "shapes"   3dshapes-like RGB scenes rendered here (10 x 10 x 10 hues, 8 scales, 4 shapes,
             15 orientations, 64x64x3). Options: hues, scales, shapes, orientations.
             Options may also be given in the name: "sprites:positions=8,orientations=10".
- .npz       the published dSprites file (imgs + latents_classes; the pickled metadata entry is
             never read) or your own arrays: `images` (N,H,W[,C]) uint8 plus optional integer
             `factors` (N,K), `factor_names`, `factor_sizes`. Float images are rejected.
- .npy       an image array (N,H,W[,C]) uint8, memory-mapped.
- .h5/.hdf5  3dshapes and friends (see _load_hdf5).
- a folder or .zip of images (png/jpg/jpeg/bmp/gif/webp, sorted by name): centre square crop
             (`crop=None`: the short side; celebA's img_align_celeba defaults to crop=148, as
             torchvision CenterCrop(148)), then resized to `size` (64) with PIL's BILINEAR
             filter (what torchvision Resize uses on PIL images). Gray (mode L) images give C=1,
             anything else C=3. Decoded once into an uncompressed .npy cache beside the source
             (or in `cache_dir`), memory-mapped on later loads.
- cars3d     a folder of car_*_mesh.mat files or nips2015-analogy-data.tar.gz: each 128x128
             image resized to 64x64 with LANCZOS (as disentanglement_lib's thumbnail), factors
             elevation, azimuth, object (rows in that C order); cached like image folders.
- .pth/.pt   3D faces (basel_face_renders.pth), a torch-saved uint8 tensor (50,21,11,11,64,64)
             or (N,H,W), read from the file format without torch and without unpickling.

Caches are rebuilt when unreadable, older than their source or of the wrong shape; JPEGs are
decoded in full (PIL's draft() gained nothing measurable and would change the pixels).

Images are uint8 (N, H, W, C) as stored (memory-mapped, read-only arrays for .npy, caches and
legacy .pth); binary 0/1 images are scaled to 0/255 in place.
Factors are int64 class indices (N, K); constant factors are dropped. `limit` keeps a random
subset of that many rows (rng(seed).choice without replacement, sorted). Every bad input raises
DataError naming the file and the problem.
"""
import bisect
import colorsys
import contextlib
import fnmatch
import gzip
import inspect
import io
import itertools
import os
import pickletools
import struct
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib

import numpy as np
from PIL import Image


class DataError(ValueError):
    """A dataset file or name that cannot be read; the message names the file and the problem."""


class Dataset:
    """Images as stored (uint8, (N, H, W, C)) with optional integer factors (int64, (N, K))."""

    def __init__(self, images, factors=None, factor_names=(), factor_sizes=(), name=""):
        self.images = images
        self.factors = factors
        self.factor_names = list(factor_names)
        self.factor_sizes = [int(s) for s in factor_sizes]
        self.name = name

    def __len__(self):
        return len(self.images)

    def __repr__(self):
        shape = "x".join(str(s) for s in self.images.shape)
        return f"Dataset({self.name!r}, images {shape} {self.images.dtype}, factors {self.factor_names})"


def describe(ds):
    """One line: name, count, image shape and factors with their sizes."""
    n, h, w, c = ds.images.shape
    factors = " ".join(f"{k}({s})" for k, s in zip(ds.factor_names, ds.factor_sizes)) or "none"
    return f"{ds.name}: {n} images {h}x{w}x{c} uint8, factors {factors}"


# ---------------------------------------------------------------------------------------------
# entry point

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_FAILURES = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
             SyntaxError, NotImplementedError, RuntimeError, OverflowError, MemoryError,
             struct.error, zlib.error, zipfile.BadZipFile, tarfile.TarError,
             Image.DecompressionBombError)


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
    """Read a dataset from a built-in name (with optional "name:key=value,...") or a path."""
    source = os.fspath(source)
    name, _, spec = source.partition(":")
    if name in _BUILTINS and not os.path.exists(source):
        reader, args = _BUILTINS[name], {**_parse_spec(spec, source), **options}
    else:
        reader, args = _reader_for(source), dict(options, path=source)
    allowed = [p for p in inspect.signature(reader).parameters if p not in ("path", "limit", "seed")]
    unknown = sorted(set(args) - set(allowed) - {"path"})
    if unknown:
        raise DataError(f"{source}: unknown option(s) {unknown}; valid: {allowed}")
    if "limit" in inspect.signature(reader).parameters:  # readers that can read a subset
        args.update(limit=limit, seed=seed)
    return _subset(reader(**args), limit, seed, source)


def _parse_spec(spec, source):
    options = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise DataError(f"{source}: option {item!r} is not key=value")
        try:
            options[key.strip()] = int(value)
        except ValueError:
            try:
                options[key.strip()] = float(value)
            except ValueError:
                raise DataError(f"{source}: option {key}={value!r} is not a number") from None
    return options


def _reader_for(path):
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder, and not a built-in dataset "
                        f"(built-ins: {', '.join(_BUILTINS)}; a path must exist)")
    if os.path.isdir(path):
        names = os.listdir(path)
        if any(fnmatch.fnmatch(n, "car_*_mesh.mat") for n in names):
            return _load_cars3d
        if any(n.lower().endswith(_IMAGE_EXTS) for n in names):
            return _load_images
        raise DataError(f"{path}: folder holds neither images ({', '.join(_IMAGE_EXTS)}) "
                        "nor cars3d car_*_mesh.mat files")
    low = path.lower()
    for suffixes, reader in _SUFFIXES:
        if low.endswith(suffixes):
            return reader
    raise DataError(f"{path}: unknown kind of file; expected .npz, .npy, .h5, .hdf5, .zip, "
                    ".tar.gz, .pth/.pt, or a folder of images or cars3d .mat files")


def _subset(ds, limit, seed, source):
    if limit is None or limit >= len(ds):
        return ds
    if int(limit) < 1:
        raise DataError(f"{source}: limit must be a positive number of images, not {limit}")
    rows = np.sort(np.random.default_rng(seed).choice(len(ds), int(limit), replace=False))
    factors = None if ds.factors is None else ds.factors[rows]
    return Dataset(ds.images[rows], factors, ds.factor_names, ds.factor_sizes, ds.name)


def _dataset(images, factors, names, sizes, name):
    """A Dataset with constant factor columns (size 1 or a single value) dropped."""
    if factors is None:
        return Dataset(images, None, (), (), name)
    keep = [k for k in range(factors.shape[1]) if sizes[k] > 1 and
            (len(factors) == 0 or factors[:, k].min() != factors[:, k].max())]
    return Dataset(images, np.ascontiguousarray(factors[:, keep], dtype=np.int64),
                   [names[k] for k in keep], [sizes[k] for k in keep], name)


def _grid_factors(sizes):
    """Factor table of a full grid, rows in C order over `sizes`."""
    return np.indices(sizes, dtype=np.int64).reshape(len(sizes), -1).T


def _check_int(source, key, value, low, high):
    if value != int(value) or not low <= value <= high:
        raise DataError(f"{source}: option {key}={value} must be an integer in {low}..{high}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# built-in: sprites (dSprites-like)

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
    u, v = u / 6.6, v / 6.6 + 0.1  # ~15 px across at scale 1, centred on its bounding box
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


# ---------------------------------------------------------------------------------------------
# built-in: shapes (3dshapes-like)

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

def _npz_arrays(path, keys):
    """The named arrays of an .npz (and all the names it holds), read member by member;
    nothing is ever unpickled."""
    with _reading(path, "not a readable .npz file"), zipfile.ZipFile(path) as zf:
        members = {n[:-4]: zf.getinfo(n) for n in zf.namelist() if n.endswith(".npy")}
        return {k: _npy_member(zf, members[k], path) for k in keys if k in members}, sorted(members)


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
    with zf.open(info) as f:
        array = np.lib.format.read_array(f, allow_pickle=False)  # reads in chunks, no copy
        f.read()  # reach the member's end so zipfile checks its CRC
    return array


def _load_npz(path):
    arrays, found = _npz_arrays(path, ["imgs", "images", "latents_classes", "factors",
                                       "factor_names", "factor_sizes"])
    images = arrays.get("images", arrays.get("imgs"))
    if images is None:
        raise DataError(f"{path}: no 'images' (or dSprites 'imgs') array; found {found}")
    factors = arrays.get("factors", arrays.get("latents_classes"))
    names, sizes = arrays.get("factor_names"), arrays.get("factor_sizes")
    if factors is not None and "latents_classes" in arrays and names is None and factors.ndim == 2 \
            and factors.shape[1] == 6:
        names = ["color", "shape", "scale", "orientation", "posX", "posY"]  # dSprites layout
    with _reading(path, "arrays of the wrong kind"):
        return _checked(path, images, factors, names, sizes)


def _load_npy(path):
    with _reading(path, "not a readable .npy file"):
        images = np.load(path, mmap_mode="r", allow_pickle=False)
        if images.dtype == np.uint8 and images.size and images.max() <= 1:
            images = np.load(path, allow_pickle=False)  # binary: scaled in memory, not on disk
        return _checked(path, images, None, None, None)


def _checked(path, images, factors, names, sizes):
    """Validate shapes and types; binary 0/1 images are scaled to 0/255 in place."""
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images are {images.dtype}; expected uint8 0..255 "
                        "(convert with np.round(x * 255).astype(np.uint8))")
    if images.ndim == 3:
        images = images.reshape(images.shape + (1,))  # a view: adds the channel axis
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise DataError(f"{path}: images have shape {images.shape}; expected (N,H,W) or (N,H,W,C), C 1 or 3")
    if images.flags.writeable and images.size and images.max() <= 1:
        np.multiply(images, 255, out=images)
    if factors is None:
        return _dataset(images, None, (), (), os.path.basename(path))
    if factors.dtype.kind not in "iu" or factors.ndim != 2 or len(factors) != len(images):
        raise DataError(f"{path}: factors {factors.dtype} {factors.shape} should be integers (N, K), N = {len(images)}")
    k, n = factors.shape[1], len(factors)
    names = [f"factor{i}" for i in range(k)] if names is None else [str(s) for s in names]
    sizes = [int(s) for s in (factors.max(0) + 1 if n else [1] * k)] if sizes is None else \
        [int(s) for s in sizes]
    if len(names) != k or len(sizes) != k or n and ((factors.min(0) < 0).any() or (factors.max(0) >= sizes).any()):
        raise DataError(f"{path}: factor_names/factor_sizes do not fit factors of shape {factors.shape}")
    return _dataset(images, factors, names, sizes, os.path.basename(path))


# ---------------------------------------------------------------------------------------------
# decoded-image caches

def _cache_file(path, tag, cache_dir):
    """Where the decoded copy of `path` lives: beside it, else in cache_dir or ~/.cache."""
    base = os.path.basename(os.path.normpath(path))
    for ext in (".tar.gz", ".tgz", ".tar", ".zip"):
        if base.lower().endswith(ext):
            base = base[:-len(ext)]
    if cache_dir is None:
        parent = os.path.dirname(os.path.abspath(path))
        cache_dir = parent if os.access(parent, os.W_OK) else os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "disentangle-data")
    os.makedirs(cache_dir, exist_ok=True)
    return os.path.join(cache_dir, f"{base}.{tag}.npy")


def _read_cache(cache, path, shape_ok):
    """The cache memory-mapped, or None if missing, older than path, unreadable or misshapen."""
    if not os.path.exists(cache):
        return None
    try:
        array = np.load(cache, mmap_mode="r", allow_pickle=False)
        fresh = os.path.getmtime(cache) >= os.path.getmtime(path)
        if array.dtype == np.uint8 and shape_ok(array.shape) and fresh:
            return array
        problem = "is older than its source" if not fresh else f"has shape {array.shape}"
    except (OSError, ValueError, EOFError) as e:
        problem = f"is unreadable ({e})"
    print(f"cache {cache} {problem}: rebuilding", file=sys.stderr)
    return None


def _write_cache(cache, shape, fill):
    """fill(out) writes into a memory-mapped temporary .npy (and may return a smaller view of it
    to keep instead); the cache appears only once complete, so an interrupted decode leaves none."""
    fd, tmp = tempfile.mkstemp(suffix=".tmp.npy", dir=os.path.dirname(cache))
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        keep = fill(out)
        if keep is not None and keep is not out:
            keep = np.ascontiguousarray(keep)
            del out
            np.save(tmp, keep)
        else:
            out.flush()
            del out
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with _reading(cache, "cache just written is unreadable"):
        return np.load(cache, mmap_mode="r", allow_pickle=False)


class _Progress:
    """Count, rate and ETA on stderr: in place on a terminal, else a line every ~10%."""

    def __init__(self, total, what, unit="images"):
        self.total, self.what, self.unit, self.start, self.shown = total, what, unit, time.time(), -1
        self.tty = sys.stderr.isatty()

    def __call__(self, done):
        step = done * 10 // max(self.total, 1)
        if (self.tty and done % 200 and done != self.total) or (not self.tty and step == self.shown):
            return
        self.shown = step
        rate = done / max(time.time() - self.start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        start, end = ("\r", "\n" if done == self.total else "") if self.tty else ("", "\n")
        print(f"{start}decoding {self.what}: {done}/{self.total} "
              f"{rate:.0f} {self.unit}/s, ETA {eta:.0f} s", end=end, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# folders and zips of images (celebA and anything else)

def _decode_image(source, size, crop):
    """(size, size, C) uint8 from an image file/stream: centre crop, then BILINEAR resize."""
    with Image.open(source) as im:
        gray = im.mode == "L"
        w, h = im.size
        side = min(crop or min(w, h), w, h)
        left, top = int(round((w - side) / 2)), int(round((h - side) / 2))  # as torchvision
        im = im.crop((left, top, left + side, top + side)).convert("L" if gray else "RGB")
        if side != size:
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im), gray


def _load_images(path, size=64, crop="default", cache_dir=None):
    is_zip = not os.path.isdir(path)
    if is_zip:
        with _reading(path, "not a readable zip file"), zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(_IMAGE_EXTS))
    else:
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(_IMAGE_EXTS))
    if not names:
        raise DataError(f"{path}: no images ({', '.join(_IMAGE_EXTS)}) found")
    size = _check_int(path, "size", size, 1, 4096)
    if crop == "default":  # celebA's customary CenterCrop(148)
        crop = 148 if os.path.basename(os.path.normpath(path)).startswith("img_align_celeba") else None
    crop = None if crop is None else _check_int(path, "crop", crop, 1, 1 << 16)
    tag = f"{size}x{size}" + (f"-crop{crop}" if crop else "")

    cache = _cache_file(path, tag, cache_dir)
    images = _read_cache(cache, path, lambda s: s[:3] == (len(names), size, size))
    if images is None:
        images = _write_cache(cache, (len(names), size, size, 3),
                              lambda out: _decode_all(path, is_zip, names, size, crop, out))
    return Dataset(images, None, (), (), os.path.basename(os.path.normpath(path)))


def _decode_all(path, is_zip, names, size, crop, out):
    """Decode every image into out (N, size, size, 3); out[..., :1] if all were gray."""
    progress, grays = _Progress(len(names), path), []
    with (zipfile.ZipFile(path) if is_zip else contextlib.nullcontext()) as zf:
        for i, name in enumerate(names):
            where = f"{path}:{name}" if is_zip else os.path.join(path, name)
            with _reading(where, "unreadable image"):  # zf.read() checks the CRC
                source = io.BytesIO(zf.read(_zip_member_ok(zf.getinfo(name), path))) if is_zip else where
                pixels, gray = _decode_image(source, size, crop)
            out[i] = pixels[..., None] if gray else pixels
            grays.append(gray)
            progress(i + 1)
    return out[..., :1] if all(grays) else out


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


def _read_mat(source, name, where=None):
    """Variable `name` of a MATLAB v5 .mat file (a path or its bytes), with MATLAB's shape and
    indexing (a[i, j] is MATLAB's a(i+1, j+1)); stored types are converted to the class's."""
    where = where or (source if isinstance(source, str) else "<mat bytes>")
    with _reading(where, "not a readable MATLAB v5 .mat file"):
        if isinstance(source, str):
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
        if kind >> 16:  # small element: 2-byte size, 2-byte type and <= 4 bytes of data in 8 bytes
            kind, nbytes = kind & 0xFFFF, kind >> 16
            if nbytes > 4:
                raise DataError(f"{where}: corrupt small element at offset {pos}")
            yield kind, buf[pos + 4:pos + 4 + nbytes]
            pos += 8
            continue
        if pos + 8 + nbytes > len(buf):
            raise DataError(f"{where}: truncated (element of {nbytes} bytes at offset {pos})")
        yield kind, buf[pos + 8:pos + 8 + nbytes]
        pos += 8 + nbytes + (0 if kind == _MI_COMPRESSED else -nbytes % 8)


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
    """(elevation, azimuth, 64, 64, 3) uint8 from cars3d's `im` (H, W, 3, azimuth, elevation)."""
    if im.ndim != 5 or im.shape[2] != 3 or not np.array_equal(im, im.astype(np.uint8)):
        raise DataError(f"{where}: 'im' is {im.dtype} {im.shape}; expected uint8 (H, W, 3, azimuth, elevation)")
    views = np.empty((im.shape[4], im.shape[3], 64, 64, 3), np.uint8)
    for e in range(im.shape[4]):
        for a in range(im.shape[3]):
            view = Image.fromarray(np.ascontiguousarray(im[:, :, :, a, e], dtype=np.uint8))
            views[e, a] = np.asarray(view.resize((64, 64), Image.LANCZOS))
    return views


def _tar_mats(path):
    """(file name, im) of each car_*_mesh.mat in a .tar(.gz), read in memory, not extracted."""
    with _reading(path, "not a readable tar archive"):
        gz = path.lower().endswith(("gz", ".tgz"))
        with (gzip.open if gz else open)(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and fnmatch.fnmatch(base, "car_*_mesh.mat"):
                    data = tar.extractfile(member).read()
                    yield base, _read_mat(data, "im", f"{path}:{member.name}")
            while raw.read(1 << 20):  # to the end, so that gzip checks its CRC
                pass


def _car_grid(path, in_tar, files):
    """(elevation, azimuth, object, 64, 64, 3), objects in file-name order."""
    progress = _Progress(len(files), path, "files") if files else lambda done: None
    cars = _tar_mats(path) if in_tar else ((n, _read_mat(os.path.join(path, n), "im")) for n in files)
    views = {}
    for name, im in cars:
        views[name] = _car_views(im, f"{path}:{name}")
        progress(len(views))
    if not views or len({v.shape for v in views.values()}) != 1:
        raise DataError(f"{path}: no car_*_mesh.mat files, or their grids differ")
    return np.stack([views[name] for name in sorted(views)], axis=2)


def _load_cars3d(path, cache_dir=None):
    in_tar = not os.path.isdir(path)
    files = [] if in_tar else sorted(n for n in os.listdir(path) if fnmatch.fnmatch(n, "car_*_mesh.mat"))
    cache = _cache_file(path, "cars3d-64x64", cache_dir)
    grid = _read_cache(cache, path, lambda s: len(s) == 6 and s[3:] == (64, 64, 3)
                       and (in_tar or s[2] == len(files)))
    if grid is None:
        views = _car_grid(path, in_tar, files)
        grid = _write_cache(cache, views.shape, lambda out: np.copyto(out, views))
    sizes = grid.shape[:3]
    return _dataset(grid.reshape(-1, 64, 64, 3), _grid_factors(sizes),
                    ["elevation", "azimuth", "object"], sizes, "cars3d")


# ---------------------------------------------------------------------------------------------
# torch-saved tensors (3D faces), read without torch and without unpickling

class _Global(str):
    """A pickle GLOBAL, recorded by name; never imported."""


class _Call(tuple):
    """(callable, args) from REDUCE/NEWOBJ; never called."""


class _PersId(tuple):
    """(persistent id,) from BINPERSID: torch's reference to a storage."""


class _Bounded:
    """Reads capped at the file's end, so a corrupt length cannot make Python allocate gigabytes."""

    def __init__(self, f, end):
        self.f, self.end = f, end

    def read(self, n=-1):
        left = self.end - self.f.tell()
        return self.f.read(left if n < 0 else min(n, left))

    def readline(self):
        return self.f.readline(min(1 << 16, self.end - self.f.tell()))


_LITERALS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT",
             "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BINSTRING",
             "SHORT_BINSTRING", "STRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}


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
        elif n in _CONSTANTS:
            stack.append(_CONSTANTS[n])
        elif n in ("EMPTY_LIST", "EMPTY_DICT"):
            stack.append([] if n == "EMPTY_LIST" else {})
        elif n == "MARK":
            marks.append(len(stack))
        elif n in ("TUPLE", "LIST", "DICT"):
            items = since_mark()
            stack.append({"TUPLE": tuple, "LIST": list}[n](items) if n != "DICT"
                         else dict(zip(items[::2], items[1::2])))
        elif n in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = tuple(stack[-int(n[-1]):])
            del stack[-int(n[-1]):]
            stack.append(items)
        elif n in ("APPEND", "APPENDS"):
            items = since_mark() if n == "APPENDS" else [stack.pop()]
            stack[-1].extend(items)
        elif n in ("SETITEM", "SETITEMS"):
            items = since_mark() if n == "SETITEMS" else [stack.pop(-2), stack.pop()]
            stack[-1].update(zip(items[::2], items[1::2]))
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


_STORAGE_DTYPES = {"ByteStorage": "u1", "UntypedStorage": "u1", "CharStorage": "i1",
                   "ShortStorage": "i2", "IntStorage": "i4", "LongStorage": "i8",
                   "HalfStorage": "f2", "FloatStorage": "f4", "DoubleStorage": "f8"}


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
    dtype = _STORAGE_DTYPES.get(pid[1].rsplit(".", 1)[-1], pid[1])
    if dtype != "u1":
        raise DataError(f"{where}: tensor of {dtype}; expected uint8 images")
    if not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)) or len(size) != len(stride):
        raise DataError(f"{where}: corrupt tensor size/stride")
    expected = 1
    for n, s in zip(size[::-1], stride[::-1]):
        if n != 1 and s != expected:
            raise DataError(f"{where}: tensor is not contiguous (stride {stride})")
        expected *= n
    if offset + expected > pid[4]:
        raise DataError(f"{where}: tensor runs past its storage")
    return pid[2], pid[4], offset, tuple(size)


def _torch_legacy(path):
    """The tensor of a legacy torch.save file: magic, version, sys info, object, storage keys,
    then each storage as an 8-byte element count and its raw bytes."""
    end = os.path.getsize(path)
    with open(path, "rb") as raw:
        f = _Bounded(raw, end)
        if _walk_pickle(f, path) != 0x1950a86a20f9469cfc6c or _walk_pickle(f, path) != 1001:
            raise DataError(f"{path}: not a torch file (no torch magic number)")
        _walk_pickle(f, path)  # sys info
        key, numel, offset, size = _tensor_spec(_walk_pickle(f, path), path)
        if _walk_pickle(f, path) != [key]:
            raise DataError(f"{path}: unexpected storages")
        start = raw.tell() + 8
        if start > end or struct.unpack("<q", raw.read(8))[0] != numel or start + numel != end:
            raise DataError(f"{path}: storage of {numel} bytes is truncated or has a bad length")
    storage = np.memmap(path, np.uint8, "r", offset=start, shape=(numel,))
    return storage[offset:offset + int(np.prod(size))].reshape(size)


def _torch_zip(path):
    """The tensor of a zip-format torch.save file: <archive>/data.pkl and <archive>/data/<key>."""
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
        storage = np.frombuffer(zf.read(info), np.uint8)  # read() checks the CRC
    return storage[offset:offset + int(np.prod(size))].reshape(size)


def _load_faces(path):
    with _reading(path, "not a readable torch file"):
        images = _torch_zip(path) if zipfile.is_zipfile(path) else _torch_legacy(path)
    grid = images.shape[:-2]
    if len(grid) == 1 and grid[0] == 50 * 21 * 11 * 11:
        grid = (50, 21, 11, 11)  # the published faces, flattened
    elif images.ndim == 4 and images.shape[1] == 1:
        grid = images.shape[:1]  # (N, 1, H, W)
    if len(grid) not in (1, 4):
        raise DataError(f"{path}: tensor of shape {images.shape}; expected (N, H, W) or "
                        "(identity, azimuth, elevation, lighting, H, W)")
    flat = images.reshape((-1,) + images.shape[-2:] + (1,))
    if len(grid) == 1:
        return _dataset(flat, None, (), (), os.path.basename(path))
    return _dataset(flat, _grid_factors(grid), ["identity", "azimuth", "elevation", "lighting"],
                    grid, os.path.basename(path))


# ---------------------------------------------------------------------------------------------
# HDF5: a small read-only reader (superblocks v0-v3, object headers v1/v2, symbol-table and link
# groups, contiguous/compact/chunked layouts with every chunk index; deflate, shuffle, fletcher32)

_H5_SIG = b"\x89HDF\r\n\x1a\n"
_H5_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset", 307: "bzip2",
               32000: "lzf", 32001: "blosc", 32004: "lz4", 32008: "bitshuffle", 32013: "zfp", 32015: "zstd"}
_H5_CLASSES = {2: "time", 3: "string", 4: "bitfield", 5: "opaque", 6: "compound", 7: "reference",
               9: "variable-length", 10: "array"}
_H5_MAX_NODES = 1 << 20  # bound on B-tree nodes / heap blocks / header chunks walked for one structure


class _H5Bad(Exception):
    """A malformed structure; becomes a DataError with the file and dataset names at the public boundary."""


@contextlib.contextmanager
def _h5_guard(path, what=""):
    try:
        yield
    except DataError:
        raise
    except (_H5Bad, struct.error, zlib.error, ValueError, IndexError, KeyError, TypeError, OverflowError,
            MemoryError, RecursionError, OSError) as e:
        msg = str(e) or type(e).__name__
        sep = " " if msg.startswith(("uses ", "has ")) else ": "  # "dataset 'x' uses filter ..."
        raise DataError(f"{path}: {what + sep if what else ''}{msg}") from None


class _H5Cur:
    """Bounds-checked little-endian cursor over bytes; `so`/`sl` are the file's offset and length sizes."""
    __slots__ = ("b", "p", "so", "sl")

    def __init__(self, b, p=0, so=8, sl=8):
        self.b, self.p, self.so, self.sl = b, p, so, sl

    def take(self, n):
        p = self.p
        if n < 0 or p + n > len(self.b):
            raise _H5Bad("a structure runs past its end (truncated or corrupt)")
        self.p = p + n
        return self.b[p:p + n]

    def u(self, n):
        return int.from_bytes(self.take(n), "little")

    def addr(self):
        return self.u(self.so)

    def len(self):
        return self.u(self.sl)

    def sig(self, s):
        if self.take(len(s)) != s:
            raise _H5Bad(f"bad signature, expected {s.decode()}")


def _h5_log2(n, what):
    if n <= 0 or n & (n - 1):
        raise _H5Bad(f"{what} {n} is not a power of two")
    return n.bit_length() - 1


class H5File:
    """`with H5File(path) as f: f["images"][a:b]` -- read-only access to groups and numeric datasets."""

    def __init__(self, path):
        self.path, self._fd = os.fspath(path), None
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise DataError(f"{self.path}: cannot open ({e.strerror})") from None
        self._size = os.fstat(self._fd).st_size
        self._objs, self._hdrs = {}, {}
        try:
            with _h5_guard(self.path):
                self._superblock()
                self._root = self._obj(self._root_addr, "/")
        except BaseException:
            self.close()
            raise

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getitem__(self, name):
        return self._root[name]

    def __contains__(self, name):
        return name in self._root

    def keys(self):
        return self._root.keys()

    # -- raw access -----------------------------------------------------------------------------
    def _read(self, addr, n):
        if self._fd is None:
            raise _H5Bad("file is closed")
        if addr < 0 or n < 0 or addr >= self._undef or self._base + addr + n > self._size:
            raise _H5Bad(f"offset {addr} + {n} bytes is past the end of the file ({self._size} bytes)")
        b = os.pread(self._fd, n, self._base + addr)
        if len(b) != n:
            raise _H5Bad(f"short read at offset {addr}")
        return b

    def _readmax(self, addr, n):
        """Up to n bytes at addr (fewer near the end of the file) for structures of not-yet-known size."""
        if addr >= self._undef or self._base + addr >= self._size:
            raise _H5Bad(f"offset {addr} is past the end of the file ({self._size} bytes)")
        return self._read(addr, min(n, self._size - self._base - addr))

    def _cur(self, b, p=0):
        return _H5Cur(b, p, self._so, self._sl)

    def _superblock(self):
        base = 0
        while self._size >= base + 48 and os.pread(self._fd, 8, base) != _H5_SIG:
            base = 512 if base == 0 else base * 2
        if self._size < base + 48:
            raise _H5Bad("not an HDF5 file (no superblock signature found)")
        b = os.pread(self._fd, 200, base)
        v = b[8]
        if v in (0, 1):
            so, sl = b[13], b[14]
            p = 24 + (4 if v == 1 else 0)
        elif v in (2, 3):
            so, sl, p = b[9], b[10], 12
        else:
            raise _H5Bad(f"unsupported superblock version {v}")
        if so not in (2, 4, 8) or sl not in (2, 4, 8):
            raise _H5Bad(f"bad offset/length sizes {so}/{sl} in the superblock")
        self._so, self._sl, self._base, self._undef = so, sl, 0, (1 << 8 * so) - 1
        c = self._cur(b, p)
        self._base = c.addr()
        if self._base >= self._size:
            raise _H5Bad("superblock base address is past the end of the file")
        if v < 2:
            c.take(3 * so + so)  # free space, end of file, driver info; root entry's link-name offset
            self._root_addr = c.addr()
        else:
            c.take(2 * so)  # superblock extension, end of file
            self._root_addr = c.addr()

    # -- object headers -------------------------------------------------------------------------
    def _header(self, addr):
        """List of (type, body) messages of the object header at addr, continuations followed."""
        if addr in self._hdrs:
            return self._hdrs[addr]
        b = self._readmax(addr, 16)
        msgs, todo, seen = [], [], set()
        if b[:4] == b"OHDR":
            c = self._cur(self._readmax(addr, 64), 4)
            if c.u(1) != 2:
                raise _H5Bad("bad object header version")
            flags = c.u(1)
            c.take((16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0))
            n = c.u(1 << (flags & 3))
            todo.append((addr + c.p, n, 2))
        elif b[0] == 1:
            todo.append((addr + 16, int.from_bytes(b[8:12], "little"), 1))
            flags = 0
        else:
            raise _H5Bad(f"no object header at offset {addr}")
        while todo:
            a, n, v = todo.pop(0)
            if (a, n) in seen or len(seen) > 1000:
                raise _H5Bad("object header continuations form a cycle")
            seen.add((a, n))
            c = self._cur(self._read(a, n))
            if v == 3:
                c.sig(b"OCHK")
            end = n - (4 if v == 3 else 0)
            hsz = 8 if v == 1 else 4 + (2 if flags & 4 else 0)
            while c.p + hsz <= end:
                if v == 1:
                    typ, size, _ = c.u(2), c.u(2), c.take(4)
                else:
                    typ, size, _ = c.u(1), c.u(2), c.take(hsz - 3)
                body = c.take(size)
                if typ == 0x10:
                    cc = self._cur(body)
                    todo.append((cc.addr(), cc.len(), 1 if v == 1 else 3))
                else:
                    msgs.append((typ, body))
        self._hdrs[addr] = msgs
        return msgs

    def _obj(self, addr, name):
        if addr not in self._objs:
            msgs = self._header(addr)
            cls = H5Dataset if any(t == 8 for t, _ in msgs) else H5Group
            self._objs[addr] = cls(self, addr, name, msgs)
        return self._objs[addr]

    # -- groups ---------------------------------------------------------------------------------
    def _links(self, msgs):
        links = {}
        for typ, body in msgs:
            if typ == 0x11:
                c = self._cur(body)
                links.update(self._symtab(c.addr(), c.addr()))
            elif typ == 6:
                links.update([self._link(body)])
            elif typ == 2:
                c = self._cur(body, 2 + (8 if body[1] & 1 else 0))
                heap, bt = c.addr(), c.addr()
                if heap != self._undef:
                    links.update(self._dense_links(heap, bt))
        return links

    def _link(self, b):
        c = self._cur(b)
        if c.u(1) != 1:
            raise _H5Bad("bad link message version")
        flags = c.u(1)
        kind = c.u(1) if flags & 8 else 0
        c.take((8 if flags & 4 else 0) + (1 if flags & 16 else 0))
        name = c.take(c.u(1 << (flags & 3))).decode("utf-8", "replace")
        return name, (c.addr() if kind == 0 else {1: "soft", 64: "external"}.get(kind, f"type-{kind}"))

    def _symtab(self, btree, heap):
        c = self._cur(self._readmax(heap, 64))
        c.sig(b"HEAP")
        c.take(4)
        size, _, data = c.len(), c.len(), c.addr()
        names, links = self._read(data, size), {}
        for _, snod in self._bt1(btree, 0, 0):
            c = self._cur(self._readmax(snod, 8 + 65536 * (2 * self._so + 24)))
            c.sig(b"SNOD")
            c.take(2)
            for _ in range(c.u(2)):
                off, addr = c.len(), c.addr()
                c.take(24)
                links[names[off:names.index(b"\0", off)].decode("utf-8", "replace")] = addr
        return links

    def _bt1(self, addr, ntype, ndims):
        """(key, child) pairs of the leaves of a v1 B-tree (type 0: groups, 1: chunks with ndims)."""
        ks = self._sl if ntype == 0 else 8 + 8 * ndims
        out, todo, seen = [], [(addr, None)], set()
        while todo:
            a, want = todo.pop()
            if a in seen or len(seen) > _H5_MAX_NODES:
                raise _H5Bad("v1 B-tree has a cycle")
            seen.add(a)
            c = self._cur(self._readmax(a, 24 + 2 * self._so))
            c.sig(b"TREE")
            typ, level, n = c.u(1), c.u(1), c.u(2)
            if typ != ntype or (want is not None and level != want):
                raise _H5Bad("v1 B-tree node of the wrong type or level")
            p = 8 + 2 * self._so
            c = self._cur(self._read(a, p + n * (ks + self._so) + ks), p)
            for _ in range(n):
                key, child = c.take(ks), c.addr()
                (out.append((key, child)) if level == 0 else todo.append((child, level - 1)))
        return out

    def _bt2(self, addr):
        """All records of a v2 B-tree, as (type, list of bytes)."""
        c = self._cur(self._readmax(addr, 64))
        c.sig(b"BTHD")
        c.take(1)
        typ, nsize, rsize, depth = c.u(1), c.u(4), c.u(2), c.u(2)
        c.take(2)
        root, nroot, total = c.addr(), c.u(2), c.len()
        if rsize == 0 or nsize < 10 + rsize or depth > 32 or nsize > self._size:
            raise _H5Bad("bad v2 B-tree header")
        enc = lambda n: max(1, (n.bit_length() - 1) // 8 + 1)
        maxn = [(nsize - 10) // rsize]
        cum, csz, nsz = [maxn[0]], [0], enc(maxn[0])
        for d in range(1, depth + 1):
            ptr = self._so + nsz + (csz[d - 1] if d > 1 else 0)
            maxn.append((nsize - 10 - ptr) // (rsize + ptr))
            cum.append((maxn[d] + 1) * cum[d - 1] + maxn[d])
            csz.append(enc(cum[d]))
        recs, todo, seen = [], [(root, nroot, depth)] if root != self._undef else [], set()
        while todo:
            a, n, d = todo.pop()
            if a in seen or len(seen) > _H5_MAX_NODES or n > maxn[d] or len(recs) > total:
                raise _H5Bad("v2 B-tree is inconsistent (cycle or bad record count)")
            seen.add(a)
            c = self._cur(self._read(a, nsize))
            c.sig(b"BTLF" if d == 0 else b"BTIN")
            c.take(2)
            recs.extend(c.take(rsize) for _ in range(n))
            if d:
                for _ in range(n + 1):
                    child, cn = c.addr(), c.u(nsz)
                    c.take(csz[d - 1] if d > 1 else 0)
                    todo.append((child, cn, d - 1))
        return typ, recs

    def _dense_links(self, heap, bt):
        blocks, offsize = self._fheap(heap)
        starts = [b[0] for b in blocks]
        typ, recs = self._bt2(bt)
        links = {}
        for r in recs:
            hid = r[4:] if typ == 5 else r[8:]  # name index (hash) or creation order index records
            if hid[0] & 0x30:
                raise _H5Bad("huge/tiny fractal heap objects are not supported for links")
            off = int.from_bytes(hid[1:1 + offsize], "little")
            i = bisect.bisect_right(starts, off) - 1
            if i < 0 or off >= blocks[i][0] + blocks[i][2]:
                raise _H5Bad(f"fractal heap offset {off} is in no block")
            boff, a, size = blocks[i]
            name, target = self._link(self._read(a + off - boff, boff + size - off))
            links[name] = target
        return links

    def _fheap(self, addr):
        """Direct blocks of a fractal heap as sorted (heap offset, file address, size), and the offset size."""
        c = self._cur(self._readmax(addr, 256))
        c.sig(b"FRHP")
        c.take(1)
        _, filt, flags = c.u(2), c.u(2), c.u(1)
        c.take(4 + self._sl + self._so + self._sl + self._so + 8 * self._sl)
        width, start, maxdir, maxbits, _ = c.u(2), c.len(), c.len(), c.u(2), c.u(2)
        root, rows = c.addr(), c.u(2)
        if filt:
            raise _H5Bad("filtered fractal heaps are not supported")
        lw, ls = _h5_log2(width, "heap width"), _h5_log2(start, "heap block size")
        maxdrows = _h5_log2(maxdir, "heap block size") - ls + 2
        offsize, blocks = (maxbits + 7) // 8, []
        if rows > 64 or maxbits > 64:
            raise _H5Bad("bad fractal heap header")

        def direct(a, size):
            c = self._cur(self._readmax(a, 5 + self._so + offsize))
            c.sig(b"FHDB")
            c.take(1 + self._so)
            blocks.append((c.u(offsize), a, size))

        def indirect(a, nrows, depth):
            if depth > 8 or len(blocks) > _H5_MAX_NODES:
                raise _H5Bad("fractal heap is too deep")
            c = self._cur(self._read(a, 5 + self._so + offsize + nrows * width * self._so), 5 + self._so + offsize)
            for r in range(nrows):
                size = start if r == 0 else start << (r - 1)
                for _ in range(width):
                    child = c.addr()
                    if child == self._undef:
                        continue
                    if r < maxdrows:
                        direct(child, size)
                    else:
                        indirect(child, size.bit_length() - 1 - ls - lw + 1, depth + 1)

        if root != self._undef:
            direct(root, start) if rows == 0 else indirect(root, rows, 0)
        blocks.sort()
        return blocks, offsize


class H5Group:
    """A group: `keys()`, `name in g`, `g["a/b"]`."""

    def __init__(self, file, addr, name, msgs):
        self.file, self.name = file, name
        self._links = file._links(msgs)

    def keys(self):
        return sorted(self._links)

    def __iter__(self):
        return iter(self._links)

    def __len__(self):
        return len(self._links)

    def __contains__(self, name):
        *head, last = [p for p in name.split("/") if p] or [""]
        try:
            g = self["/".join(head)] if head else self
        except (KeyError, DataError):
            return False
        return isinstance(g, H5Group) and (last in g._links or not last)

    def __getitem__(self, name):
        obj = self
        for part in [p for p in name.split("/") if p]:
            if not isinstance(obj, H5Group) or part not in obj._links:
                raise KeyError(f"{self.file.path}: no object named {name!r}")
            target = obj._links[part]
            full = obj.name.rstrip("/") + "/" + part
            if isinstance(target, str):
                raise DataError(f"{self.file.path}: {full!r} is a {target} link, which is not supported")
            with _h5_guard(self.file.path, f"object {full!r}"):
                obj = self.file._obj(target, full)
        return obj


def _h5_dtype(b):
    c = _H5Cur(b)
    cv = c.u(1)
    cls, bits, size = cv & 15, c.u(3), c.u(4)
    if cls == 8:
        return _h5_dtype(b[8:])
    if cls == 3:
        return np.dtype(f"S{size}")
    if cls not in (0, 1):
        raise _H5Bad(f"has a {_H5_CLASSES.get(cls, f'class-{cls}')} datatype, which is not supported")
    if cls == 1 and (bits & 0x40 or size not in (2, 4, 8)) or cls == 0 and size not in (1, 2, 4, 8):
        raise _H5Bad(f"has an unsupported {size}-byte {'float' if cls else 'integer'} format")
    kind = "f" if cls == 1 else "i" if bits & 8 else "u"
    return np.dtype(f"{'>' if bits & 1 else '<'}{kind}{size}")


class H5Dataset:
    """A dataset: `.shape`, `.dtype`, `.chunks`, and reads like `ds[()]`, `ds[a:b]`, `ds[i, j]`, `ds[a:b, ...]`."""

    def __init__(self, file, addr, name, msgs):
        self.file, self.name, self._cmap, self._lru = file, name, None, {}
        m = {}
        for typ, body in msgs:
            m.setdefault(typ, body)
        if 1 not in m or 3 not in m:
            raise _H5Bad("dataset has no dataspace or datatype message")
        self._fdtype = _h5_dtype(m[3])
        self.dtype = self._fdtype.newbyteorder("=") if self._fdtype.kind in "iuf" else self._fdtype
        self.shape, self._maxshape = self._space(m[1])
        self._fill = self._fillvalue(m.get(5), m.get(4))
        self._filters = self._pipeline(m[11]) if 11 in m else []
        self._layout(m[8])

    def _space(self, b):
        c = self.file._cur(b)
        v, rank, flags = c.u(1), c.u(1), c.u(1)
        c.take(5 if v == 1 else 1)
        if v not in (1, 2) or rank > 32:
            raise _H5Bad("bad dataspace message")
        dims = tuple(c.len() for _ in range(rank))
        maxd = tuple(c.len() for _ in range(rank)) if flags & 1 else dims
        if int(np.prod(dims, dtype=float)) * self._fdtype.itemsize > 1 << 50:
            raise _H5Bad(f"absurd dataset shape {dims}")
        return dims, maxd

    def _fillvalue(self, new, old):
        val = None
        if new is not None:
            c = self.file._cur(new)
            v = c.u(1)
            if v == 3:
                if c.u(1) & 0x20:
                    val = c.take(c.u(4))
            else:
                c.take(2)
                if c.u(1) or v == 1:
                    val = c.take(c.u(4)) if c.p + 4 <= len(new) else None
        if val is None and old is not None:
            c = self.file._cur(old)
            val = c.take(c.u(4))
        if not val or len(val) != self._fdtype.itemsize:
            return np.zeros((), self.dtype)
        return np.frombuffer(val, self._fdtype)[0]

    def _pipeline(self, b):
        c = self.file._cur(b)
        v, n = c.u(1), c.u(1)
        c.take(6 if v == 1 else 0)
        out = []
        for _ in range(n):
            fid = c.u(2)
            nl = c.u(2) if v == 1 or fid >= 256 else 0
            c.take(2)
            nv = c.u(2)
            c.take((nl + 7) // 8 * 8 if v == 1 else nl)
            out.append((fid, [c.u(4) for _ in range(nv)]))
            c.take(4 if v == 1 and nv % 2 else 0)
        return out

    def _layout(self, b):
        c, f = self.file._cur(b), self.file
        v = c.u(1)
        self.chunks, self._index, self._addr, self._data = None, "contiguous", f._undef, None
        if v in (1, 2):
            nd, cls = c.u(1), c.u(1)
            c.take(5)
            self._addr = c.addr() if cls else f._undef
            dims = [c.u(4) for _ in range(nd)]
            if cls == 0:
                self._data = c.take(c.u(4))
        elif v >= 3:
            cls = c.u(1)
            if cls == 0:
                self._data = c.take(c.u(2))
            elif cls == 1:
                self._addr = c.addr()
            elif cls == 2 and v == 3:
                nd, self._addr = c.u(1), c.addr()
                dims = [c.u(4) for _ in range(nd)]
            elif cls == 2:
                flags, nd, enc = c.u(1), c.u(1), c.u(1)
                dims = [c.u(enc) for _ in range(nd)]
                idx = c.u(1)
                self._index = {1: "single", 2: "implicit", 3: "farray", 4: "earray", 5: "btree2"}.get(idx)
                if self._index is None:
                    raise _H5Bad(f"unknown chunk index type {idx}")
                self._single = (c.len(), c.u(4)) if idx == 1 and flags & 2 else None
                c.take({3: 1, 4: 5, 5: 6}.get(idx, 0))
                self._addr = c.addr()
            else:
                raise _H5Bad(f"layout class {cls} (virtual?) is not supported")
        else:
            raise _H5Bad(f"unsupported layout message version {v}")
        if self._data is not None:
            self._index = "compact"
        elif cls == 2:
            if v < 4:
                self._index = "btree1"
            if len(dims) != len(self.shape) + 1 or not all(dims[:-1]):
                raise _H5Bad("chunk dimensions do not match the dataspace")
            self.chunks = tuple(dims[:-1])
        self._cshape = self.chunks or self.shape
        self._cbytes = int(np.prod(self._cshape, dtype=np.int64)) * self._fdtype.itemsize

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a scalar dataset")
        return self.shape[0]

    def __repr__(self):
        return f"<H5Dataset {self.name!r} shape {self.shape} {self.dtype}>"

    def __getitem__(self, key):
        sel, final = self._select(key)
        with _h5_guard(self.file.path, f"dataset {self.name.lstrip('/')!r}"):
            return self._readsel(sel).reshape(final)

    def _select(self, key):
        """Per dimension (start, step, count) or a sorted index array (first dimension only)."""
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            raise IndexError("an index can only have a single ellipsis")
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (len(self.shape) - len(key) + 1) + key[i + 1:]
        if len(key) > len(self.shape):
            raise IndexError(f"too many indices for a dataset of shape {self.shape}")
        key += (slice(None),) * (len(self.shape) - len(key))
        sel, final = [], []
        for d, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 1:
                    raise IndexError("negative or zero slice steps are not supported")
                cnt = len(range(start, stop, step))
                sel.append((start, step, cnt))
                final.append(cnt)
            elif isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
                i = int(k) + (n if k < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {int(k)} is out of range for axis {d} with size {n}")
                sel.append((i, 1, 1))
            elif d == 0 and isinstance(k, (list, np.ndarray)):
                a = np.asarray(k, dtype=np.int64).ravel()
                if a.size and (a[0] < 0 or a[-1] >= n or (np.diff(a) <= 0).any()):
                    raise IndexError("index arrays must be increasing and within range")
                sel.append(a)
                final.append(a.size)
            else:
                raise TypeError(f"unsupported index {k!r}: use integers, slices, ... or a sorted index list")
        return sel, tuple(final)

    def _readsel(self, sel):
        outshape = [len(s) if isinstance(s, np.ndarray) else s[2] for s in sel]
        if self.dtype.kind not in "iufS":
            raise _H5Bad(f"datatype {self.dtype} is not supported")
        unsupported = [fid for fid, _ in self._filters if fid not in (1, 2, 3)]
        if unsupported:
            fid = unsupported[0]
            raise _H5Bad(f"uses filter {fid} ({_H5_FILTERS.get(fid, 'unknown')}), which is not supported")
        nbytes = int(np.prod(outshape, dtype=np.int64)) * self.dtype.itemsize
        if nbytes > max(1 << 28, 256 * self.file._size):
            raise _H5Bad(f"a read of {nbytes} bytes is implausibly large for a {self.file._size}-byte file")
        out = np.empty(outshape, self.dtype)
        if out.size == 0:
            return out
        cmap, cs = self._chunkmap(), self._cshape
        ranges = []
        for s, c in zip(sel, cs):
            first, last = (s[0], s[-1]) if isinstance(s, np.ndarray) else (s[0], s[0] + (s[2] - 1) * s[1])
            ranges.append(range(first // c, last // c + 1))
        touched = int(np.prod([len(r) for r in ranges]))
        for idx in itertools.product(*ranges):
            src, dst = [], []
            for s, c, i in zip(sel, cs, idx):
                o = i * c
                if isinstance(s, np.ndarray):
                    lo, hi = np.searchsorted(s, [o, o + c])
                    part = s[lo:hi] - o
                    contiguous = hi > lo and part[-1] - part[0] == hi - lo - 1
                    src.append(slice(int(part[0]), int(part[-1]) + 1) if contiguous else part)
                    dst.append(slice(int(lo), int(hi)))
                else:
                    start, step, cnt = s
                    lo = max(o, start)
                    lo = start + -(-(lo - start) // step) * step
                    hi = min(o + c, start + (cnt - 1) * step + 1)
                    src.append(slice(lo - o, hi - o, step))
                    dst.append(slice((lo - start) // step, (lo - start) // step + len(range(lo, hi, step))))
            if any(d.start >= d.stop for d in dst):
                continue
            ent = cmap.get(idx)
            if ent is None:
                out[tuple(dst)] = self._fill
            else:
                out[tuple(dst)] = self._chunk(idx, ent, touched <= 4)[tuple(src)]
        return out

    def _chunkmap(self):
        """{scaled chunk coordinates: (address, stored bytes, filter mask)}, built once per dataset."""
        if self._cmap is not None:
            return self._cmap
        f, rank, ix = self.file, len(self.shape), self._index
        zero = (0,) * rank
        if ix == "compact":
            cmap = {zero: ("compact", len(self._data), 0)}
        elif ix == "contiguous":
            cmap = {} if self._addr == f._undef else {zero: (self._addr, self._cbytes, 0)}
        elif self._addr == f._undef:
            cmap = {}
        elif ix == "single":
            cmap = {zero: (self._addr,) + (self._single or (self._cbytes, 0))}
        elif ix == "btree1":
            cmap = {}
            for key, child in f._bt1(self._addr, 1, rank + 1):
                off = struct.unpack_from(f"<II{rank}Q", key)
                cmap[tuple(o // c for o, c in zip(off[2:], self.chunks))] = (child, off[0], off[1])
        elif ix == "btree2":
            typ, recs = f._bt2(self._addr)
            cmap = {}
            for r in recs:
                c = f._cur(r)
                a = c.addr()
                n, mask = (c.u(len(r) - f._so - 4 - 8 * rank), c.u(4)) if typ == 11 else (self._cbytes, 0)
                cmap[tuple(c.u(8) for _ in range(rank))] = (a, n, mask)
        else:
            elems = self._implicit() if ix == "implicit" else self._farray() if ix == "farray" else self._earray()
            cmap = {self._unravel(i): e for i, e in elems if e[0] != f._undef}
        self._cmap = cmap
        return cmap

    def _grid(self):
        unlimited = (1 << 8 * self.file._sl) - 1
        return [-(-m // c) if m != unlimited else None for m, c in zip(self._maxshape, self.chunks)]

    def _unravel(self, i):
        """Linear chunk index -> scaled coordinates (an unlimited dimension is the slowest-varying one)."""
        g = self._grid()
        u = next((d for d, n in enumerate(g) if n is None), None)
        order = ([u] if u is not None else []) + [d for d in range(len(g)) if d != u]
        sc = [0] * len(g)
        for d in reversed(order):
            sc[d], i = (i % g[d], i // g[d]) if g[d] else (i, 0)
        return tuple(sc)

    def _implicit(self):
        n = int(np.prod(self._grid(), dtype=np.int64))
        if n * self._cbytes > self.file._size:
            raise _H5Bad("implicit chunk index extends past the end of the file")
        return [(i, (self._addr + i * self._cbytes, self._cbytes, 0)) for i in range(n)]

    def _elem(self, c, esize, filtered):
        a = c.addr()
        if filtered:
            return a, c.u(esize - self.file._so - 4), c.u(4)
        return a, self._cbytes, 0

    def _farray(self):
        f = self.file
        c = f._cur(f._readmax(self._addr, 64))
        c.sig(b"FAHD")
        c.take(1)
        client, esize, pbits, n, dblk = c.u(1), c.u(1), c.u(1), c.len(), c.addr()
        if n * esize > f._size or pbits > 32:
            raise _H5Bad("fixed array header is corrupt")
        pre = 6 + f._so
        if n <= 1 << pbits:
            c = f._cur(f._read(dblk, pre + n * esize), pre)
            return [(i, self._elem(c, esize, client)) for i in range(n)]
        psz, npages = 1 << pbits, -(-n >> pbits)
        bm = f._read(dblk + pre, (npages + 7) // 8)
        out, pos = [], dblk + pre + len(bm) + 4
        for p in range(npages):
            k = min(psz, n - p * psz)
            if bm[p // 8] & (0x80 >> (p % 8)):
                c = f._cur(f._read(pos, k * esize))
                out.extend((p * psz + j, self._elem(c, esize, client)) for j in range(k))
            pos += k * esize + 4
        return out

    def _earray(self):
        f = self.file
        c = f._cur(f._readmax(self._addr, 128))
        c.sig(b"EAHD")
        c.take(1)
        client, esize, maxbits, iblk, minel, minptr, pbits = (c.u(1) for _ in range(7))
        for _ in range(4):
            c.len()
        nset = max(c.len(), c.len())
        ib = c.addr()
        nsblks = 1 + maxbits - _h5_log2(minel, "extensible array block size")
        isb = 2 * _h5_log2(minptr, "extensible array pointer count")
        if nset * esize > f._size or maxbits > 64 or pbits > 32:
            raise _H5Bad("extensible array header is corrupt")
        pre, aoff = 6 + f._so, (maxbits + 7) // 8
        nd = 2 * (minptr - 1)
        c = f._cur(f._read(ib, pre + iblk * esize + nd * f._so + max(0, nsblks - isb) * f._so), pre)
        out = [(i, self._elem(c, esize, client)) for i in range(iblk)]
        daddrs = [c.addr() for _ in range(nd)]
        saddrs = [c.addr() for _ in range(max(0, nsblks - isb))]
        start = iblk
        for u in range(nsblks):
            if start >= nset:
                break
            ndb, nel = 1 << (u // 2), minel << ((u + 1) // 2)
            paged = nel > 1 << pbits
            npg = -(-nel >> pbits) if paged else 0
            if u < isb:
                addrs, bms = daddrs[:ndb], [None] * ndb
                daddrs = daddrs[ndb:]
            else:
                sa = saddrs[u - isb]
                if sa == f._undef:
                    start += ndb * nel
                    continue
                bml = (npg + 7) // 8 if paged else 0
                sc = f._cur(f._read(sa, pre + aoff + ndb * (bml + f._so)), pre + aoff)
                bms = [sc.take(bml) for _ in range(ndb)]
                addrs = [sc.addr() for _ in range(ndb)]
            for a, bm in zip(addrs, bms):
                if a != f._undef and start < nset:
                    out.extend(self._dblock(a, start, nel, pre + aoff, esize, client, pbits if paged else None, bm))
                start += nel
        return out

    def _dblock(self, a, start, nel, pre, esize, client, pbits, bm):
        f = self.file
        if pbits is None:
            c = f._cur(f._read(a, pre + nel * esize), pre)
            return [(start + i, self._elem(c, esize, client)) for i in range(nel)]
        out, psz, pos = [], 1 << pbits, a + pre + 4
        for p in range(-(-nel >> pbits)):
            k = min(psz, nel - p * psz)
            if bm is None or bm[p // 8] & (0x80 >> (p % 8)):
                c = f._cur(f._read(pos, k * esize))
                out.extend((start + p * psz + j, self._elem(c, esize, client)) for j in range(k))
            pos += k * esize + 4
        return out

    def _chunk(self, idx, ent, cache):
        """One chunk as an array of the chunk shape, decoded through the filter pipeline."""
        if idx in self._lru:
            return self._lru[idx]
        addr, n, mask = ent
        if addr == "compact":
            b = self._data
        elif self._index == "contiguous":
            if self.file._base + addr + n > self.file._size:
                raise _H5Bad("contiguous data runs past the end of the file")
            mm = np.memmap(self.file.path, self._fdtype, "r", self.file._base + addr, self.shape or (1,))
            return mm.reshape(self.shape)
        else:
            if n > max(2 * self._cbytes + 1024, 1 << 20):
                raise _H5Bad(f"chunk {idx} claims {n} stored bytes for a {self._cbytes}-byte chunk")
            b = self.file._read(addr, n)
        for i in reversed(range(len(self._filters))):
            if not mask >> i & 1:
                b = self._unfilter(self._filters[i], b, idx)
        if len(b) < self._cbytes:
            raise _H5Bad(f"chunk {idx} decodes to {len(b)} bytes, expected {self._cbytes}")
        arr = np.frombuffer(b, self._fdtype, int(np.prod(self._cshape))).reshape(self._cshape)
        if cache:
            self._lru = dict(list(self._lru.items())[-3:]) | {idx: arr}
        return arr

    def _unfilter(self, flt, b, idx):
        fid, vals = flt
        if fid == 1:
            d = zlib.decompressobj()
            b = d.decompress(b, self._cbytes + 8)
            if not d.eof:
                raise _H5Bad(f"chunk {idx} is not a complete deflate stream (or decodes to too many bytes)")
            return b
        if fid == 2:
            es = vals[0] if vals else self._fdtype.itemsize
            n = len(b) // es
            if es <= 1 or n == 0:
                return b
            body = np.frombuffer(b, np.uint8, n * es).reshape(es, n).T.tobytes()
            return body + bytes(b[n * es:])
        if len(b) < 4:
            raise _H5Bad(f"chunk {idx} is too short for its fletcher32 checksum")
        data, stored = memoryview(b)[:-4], int.from_bytes(b[-4:], "little")
        s1, s2 = _h5_fletcher32(data)
        if (stored & 0xFFFF) % 65535 != s1 or (stored >> 16) % 65535 != s2:
            raise _H5Bad(f"chunk {idx} fails its fletcher32 checksum (data corrupt)")
        return data


def _h5_fletcher32(b):
    """HDF5's Fletcher-32 over big-endian 16-bit words (an odd last byte is the high byte), sums mod 65535."""
    n = len(b)
    w = np.frombuffer(b, ">u2", n // 2).astype(np.uint64)
    if n % 2:
        w = np.append(w, np.uint64(b[n - 1] << 8))
    weights = (len(w) - np.arange(len(w), dtype=np.uint64)) % np.uint64(65535)
    return int(w.sum()) % 65535, int((w * weights).sum()) % 65535


def _h5_datasets(group, out=None, depth=0):
    """name -> dataset for every dataset below group (hard links, bounded depth)."""
    out = {} if out is None else out
    for k in group.keys():
        try:
            obj = group[k]
        except (KeyError, DataError):
            continue
        if isinstance(obj, H5Dataset):
            out.setdefault(obj.name.lstrip("/"), obj)
        elif depth < 16:
            _h5_datasets(obj, out, depth + 1)
    return out


def _h5_grid_index(path, col, values, grid, name):
    d = np.abs(values[:, None] - grid[None, :])
    idx = d.argmin(1)
    tol = 0.05 * (np.diff(grid).min() if len(grid) > 1 else 1.0)
    bad = np.flatnonzero(d[np.arange(len(values)), idx] > tol)
    if bad.size:
        raise DataError(f"{path}: labels[{bad[0]}, {col}] = {float(values[bad[0]])!r} is not a 3dshapes {name} value")
    return idx


def _load_hdf5(path, limit=None, seed=0):
    """Read 3dshapes, dSprites or a plain `images`/`imgs` (+ `factors`) HDF5 file into a Dataset."""
    path = os.fspath(path)
    with H5File(path) as f:
        found = _h5_datasets(f._root)
        img_name = next((n for n in ("images", "imgs") if n in found), None)
        img = found.get(img_name)
        if img is None or img.dtype != np.uint8 or img.ndim not in (3, 4):
            listing = ", ".join(f"{n} {d.shape} {d.dtype}" for n, d in found.items()) or "no datasets"
            raise DataError(f"{path}: expected 3dshapes ('images' + 'labels'), dSprites ('imgs' + 'latents/classes') "
                            f"or a uint8 'images'/'imgs' dataset of shape (N, H, W[, C]); found {listing}")
        n = img.shape[0]
        rows = slice(None)
        if limit is not None and limit < n:
            rows = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
        images = img[rows]
        if images.ndim == 3:
            images = images[..., None]
        factors, names, sizes, name = None, [], [], os.path.splitext(os.path.basename(path))[0]
        if img_name == "images" and "labels" in found and found["labels"].shape == (n, 6):
            labels = found["labels"][()].astype(np.float64)[rows]
            names = ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"]
            grids = [np.arange(10) / 10] * 3 + [np.linspace(0.75, 1.25, 8), np.arange(4.0), np.linspace(-30, 30, 15)]
            factors = np.stack([_h5_grid_index(path, k, labels[:, k], g, names[k]) for k, g in enumerate(grids)], 1)
            sizes, name = [10, 10, 10, 8, 4, 15], "3dshapes"
        elif img_name == "imgs" and "latents/classes" in found:
            classes = found["latents/classes"][()].astype(np.int64)
            if classes.ndim != 2 or classes.shape[0] != n or classes.shape[1] < 2:
                raise DataError(f"{path}: latents/classes has shape {classes.shape}, expected ({n}, 6)")
            keep = [k for k in range(classes.shape[1]) if k != 0]
            sizes = list(classes[:, keep].max(0) + 1)
            factors = classes[rows][:, keep]
            names = ["shape", "scale", "orientation", "posX", "posY"] if len(keep) == 5 else [f"f{k}" for k in keep]
            name = "dsprites"
        elif "factors" in found and found["factors"].dtype.kind in "iu" and found["factors"].shape[:1] == (n,):
            all_f = found["factors"][()].astype(np.int64).reshape(n, -1)
            factors, sizes = all_f[rows], list(all_f.max(0) + 1)
            names = [f"factor{k}" for k in range(all_f.shape[1])]
        if name == "dsprites" and images.size and images.max() <= 1:
            np.multiply(images, 255, out=images)
        if factors is not None:
            factors = np.ascontiguousarray(factors, dtype=np.int64)
        return Dataset(images, factors, names, sizes, name)


# readers by file suffix (after all readers are defined)
_SUFFIXES = [(".npz", _load_npz), (".npy", _load_npy), ((".h5", ".hdf5"), _load_hdf5),
             (".zip", _load_images), ((".tar.gz", ".tgz", ".tar"), _load_cars3d),
             ((".pth", ".pt"), _load_faces)]
