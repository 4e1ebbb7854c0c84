#!/usr/bin/env python
"""Ray job entrypoint: ``dedup run`` with the Ray executor, for ``ray job submit`` and KubeRay.

    ray job submit --address http://HEAD:8265 -- \\
        python pipelines/ray_job.py 's3://bucket/shards/{00000..09999}.tar' \\
            --out s3://bucket/dedup-runs/laion-a --config pipelines/cluster-config.yaml

Takes exactly the arguments of ``dedup run`` (INPUT... --out RUN_DIR [--config FILE]
[--set section.key=value]... [--embedder SPEC] [--methods ...] [--force] [--json] ...) and
always uses ``--executor ray``. The Ray address comes from ``--ray-address``, else the
config's ``ray.address``, else ``RAY_ADDRESS`` (which ``ray job submit`` and KubeRay set for
the entrypoint), else a local Ray.

Exit status is ``dedup run``'s: 0 complete; 2 configuration error; 3 finished but partial
(failed shards or over the error budget: the manifest is written and marked partial). A
non-zero status marks the Ray job FAILED, so a RayJob with ``backoffLimit`` retries it on a
fresh cluster; the retry resumes from the run directory's ``done/`` markers and only redoes
the shards that are not done.

Keep RUN_DIR on storage every node and every retry can reach (s3://, gs://, a shared
volume): a retried RayJob gets a new cluster, and local disks go with the old one.
"""

from __future__ import annotations

import os
import sys


def build_argv(argv: list[str]) -> list[str]:
    """``dedup`` CLI arguments for a Ray run from the job's arguments."""
    if not argv or argv[0] in ("-h", "--help"):
        return ["run", "--help"]
    for i, a in enumerate(argv):
        if a == "--executor" or a.startswith("--executor="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if value != "ray":
                raise SystemExit(f"ray_job.py always runs with --executor ray (got --executor {value!r}); use `dedup run` otherwise")
    args = ["run", *argv]
    if not any(a == "--executor" or a.startswith("--executor=") for a in argv):
        args += ["--executor", "ray"]
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_argv(argv)
    print(
        f"dedup ray job: RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '(unset: local Ray)')} "
        f"submission={os.environ.get('RAY_JOB_SUBMISSION_ID', '-')} args={args}",
        file=sys.stderr,
        flush=True,
    )
    from dedup.cli import app

    app(args, prog_name="ray_job.py")  # exits with dedup run's status


if __name__ == "__main__":
    main()
