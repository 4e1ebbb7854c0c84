"""Outputs never overlap inputs: `dedup run` and `dedup apply` refuse every output location that
is, contains or lies inside an input or the run directory — written plainly, through `..`,
through a symbolic link, nested or as a parent — before anything is written; no user file is
replaced without --overwrite. (The adversarial pass: `dedup apply inp/run --out inp/` replaced
4 of 5 input shards, two of them with empty tars.)"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from typer.testing import CliRunner

from dedup.cli import app

HASHES = "exact,phash,dhash"


def _tree(root) -> dict[str, tuple[int, str]]:
    """Every file under root: size and content hash (what 'nothing changed' means)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (os.path.getsize(p), hashlib.sha256(f.read()).hexdigest())
    return out


def _invoke(*args: str):
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stderr if hasattr(res, "stderr") else res.output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, synth_shards):
    """A user's folder: inp/ holds the shards (copied), inp/run is a run INSIDE the input folder
    (as in the report: nothing forbids a user from trying it, so it is made by hand here)."""
    shards, _truth = synth_shards
    root = tmp_path_factory.mktemp("safety")
    inp = root / "inp"
    shutil.copytree(shards, inp)
    code, err = _invoke("run", str(inp), "--out", str(root / "run"), "--methods", HASHES, "-q", "--no-report", "-w", "1")
    assert code == 0, err
    os.symlink(inp, root / "link-to-inp")
    os.symlink(root / "run", root / "link-to-run")
    return root


APPLY_OUTS = [
    ("equal", "inp"),
    ("equal-dotdot", "inp/../inp"),
    ("equal-trailing-slash", "inp/"),
    ("nested", "inp/clean"),
    ("nested-deep", "inp/a/b/c"),
    ("parent", "."),
    ("symlink-equal", "link-to-inp"),
    ("symlink-nested", "link-to-inp/clean"),
    ("run-equal", "run"),
    ("run-nested", "run/clean"),
    ("run-symlink", "link-to-run/clean"),
    ("run-dotdot", "inp/../run/x"),
]


@pytest.mark.parametrize("name,out", APPLY_OUTS, ids=[n for n, _ in APPLY_OUTS])
def test_apply_refuses_outputs_overlapping_inputs_or_run(workspace, name, out, monkeypatch):
    monkeypatch.chdir(workspace)
    before = _tree(workspace)
    code, err = _invoke("apply", "run", "--out", out)
    assert code == 2, err
    assert "error:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert _tree(workspace) == before, "a refused apply wrote or replaced a file"


@pytest.mark.parametrize("name,out", [(n, o) for n, o in APPLY_OUTS if not n.startswith("run")],
                         ids=[n for n, _ in APPLY_OUTS if not n.startswith("run")])
def test_run_refuses_outputs_overlapping_inputs(workspace, name, out, monkeypatch):
    monkeypatch.chdir(workspace)
    before = _tree(workspace)
    code, err = _invoke("run", "inp", "--out", out, "--methods", HASHES, "-q")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert _tree(workspace) == before


def test_run_refuses_an_input_file_given_directly_as_out_parent(workspace, monkeypatch):
    """A single .tar input: its directory may hold the run (it is not an input), but --out may
    not be the shard itself, nor contain it."""
    monkeypatch.chdir(workspace)
    before = _tree(workspace)
    for out in ("inp/shard-00000.tar", "inp", "."):
        code, err = _invoke("run", "inp/shard-00000.tar", "--out", out, "--methods", HASHES, "-q")
        assert code == 2, (out, err)
    assert _tree(workspace) == before


def test_run_against_refuses_out_inside_previous_run(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    before = _tree(workspace)
    code, err = _invoke("run", "inp", "--out", "run/next", "--against", "run", "--methods", HASHES, "-q")
    assert code == 2, err
    assert _tree(workspace) == before


def test_keep_list_never_replaces_an_input_or_run_file(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    before = _tree(workspace)
    for target in ("inp/shard-00000.tar", "link-to-inp/shard-00001.tar", "run/manifest.parquet", "run", "inp"):
        for extra in ([], ["--overwrite"]):
            code, err = _invoke("apply", "run", "--keep-list", target, *extra)
            assert code == 2, (target, extra, err)
    assert _tree(workspace) == before


def test_existing_files_are_replaced_only_with_overwrite(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("my notes\n")
    code, err = _invoke("apply", str(workspace / "run"), "--keep-list", "keep.txt")
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "keep.txt").read_text() == "my notes\n"
    # a directory of the user's own files (a clean shard's name among them) is not an apply output
    user = tmp_path / "mine"
    user.mkdir()
    (user / "shard-00000.tar").write_bytes(b"the user's own tar")
    code, err = _invoke("apply", str(workspace / "run"), "--out", str(user))
    assert code == 2 and "--overwrite" in err
    assert (user / "shard-00000.tar").read_bytes() == b"the user's own tar"
    # with the flag both are written, and a rerun into the apply's own output resumes
    code, err = _invoke("apply", str(workspace / "run"), "--out", str(user), "--keep-list", "keep.txt", "--overwrite")
    assert code == 0, err
    assert (user / "shard-00000.tar").read_bytes() != b"the user's own tar"
    assert (tmp_path / "keep.txt").read_text() != "my notes\n"
    code, err = _invoke("apply", str(workspace / "run"), "--out", str(user))
    assert code == 0, err


def test_run_out_at_a_directory_of_user_files_is_refused(workspace, tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "notes.txt").write_text("x")
    before = _tree(tmp_path)
    code, err = _invoke("run", str(workspace / "inp"), "--out", str(user), "--methods", HASHES, "-q")
    assert code == 2 and "not a dedup run" in err
    assert _tree(tmp_path) == before
    # an empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _invoke("run", str(workspace / "inp"), "--out", str(empty), "--methods", HASHES, "-q", "--no-report", "-w", "1")
    assert code == 0, err


def test_reusing_a_run_directory_with_other_inputs_is_refused(workspace, tmp_path):
    """The old shards' features would stay behind and the manifest be replaced; --force replaces
    the run and removes the features of shards that are no longer inputs."""
    run = tmp_path / "run"
    one = workspace / "inp" / "shard-00000.tar"
    two = workspace / "inp" / "shard-00001.tar"
    code, err = _invoke("run", str(one), str(two), "--out", str(run), "--methods", HASHES, "-q", "--no-report", "-w", "1")
    assert code == 0, err
    before = _tree(run)
    code, err = _invoke("run", str(one), "--out", str(run), "--methods", HASHES, "-q", "--no-report")
    assert code == 2 and "other inputs" in err and "--force" in err, err
    assert _tree(run) == before
    code, err = _invoke("run", str(one), "--out", str(run), "--methods", HASHES, "-q", "--no-report", "--force", "-w", "1")
    assert code == 0, err
    assert sorted(p.name for p in (run / "features").iterdir()) == ["shard-00000.parquet"]
    # the same inputs spelled another way are the same run (resume, not a refusal)
    code, err = _invoke("run", str(workspace / "inp" / ".." / "inp" / "shard-00000.tar"), "--out", str(run),
                        "--methods", HASHES, "-q", "--no-report", "-w", "1")
    assert code == 0, err


def test_apply_never_writes_tars_beside_a_single_input_shard(workspace, tmp_path, monkeypatch):
    """A run of one .tar file: its run directory may sit beside it (a run writes no .tar), but
    clean shards may not, since a later `dedup run` of that folder would read them."""
    monkeypatch.chdir(workspace)
    code, err = _invoke("run", "inp/shard-00000.tar", "--out", "inp/one-run", "--methods", HASHES, "-q", "--no-report", "-w", "1")
    assert code == 0, err
    before = _tree(workspace)
    for out in ("inp/clean", "inp/one-run/clean", "link-to-inp/clean"):
        code, err = _invoke("apply", "inp/one-run", "--out", out)
        assert code == 2, (out, err)
    assert _tree(workspace) == before
    shutil.rmtree(workspace / "inp" / "one-run")
