"""Preflight: can an embedder's weights be had here without waiting on the network?

open_clip resolves a hub tag through huggingface_hub, whose retries on an unreachable hub took
minutes per process (every worker retried). An air-gapped machine must instead learn at once,
before any work, how to run offline. :func:`preflight` runs in ``run_pipeline``, ``calibrate``
and :func:`dedup.compute.embedders.make_embedder`.
"""

from __future__ import annotations

import os

from dedup.errors import ConfigError

HUB_PROBE_TIMEOUT = 4.0  # seconds, all of the probe (DNS included)
_TRUTHY = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads its boolean variables
_REACHED: set[str] = set()  # endpoints this process has already reached


def _offline_env() -> str | None:
    """The variable that puts huggingface_hub offline, if one is set."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in _TRUTHY:
            return name
    return None


def open_clip_weights(arch: str, tag: str) -> tuple[str | None, str]:
    """(cached weights file or None, where open_clip would download them from) for a hub tag.

    Mirrors ``open_clip.pretrained.download_pretrained`` with no ``cache_dir`` (as
    :class:`OpenClipEmbedder` calls it): an ``hf_hub`` entry ``org/repo/`` means
    ``open_clip_pytorch_model.bin`` of that repo (its ``.safetensors`` alternative first),
    looked up in the huggingface_hub cache (``HF_HUB_CACHE`` / ``HF_HOME``); a plain ``url``
    goes to ``~/.cache/clip/<basename>``.
    """
    from open_clip import pretrained as ocp

    cfg = ocp.get_pretrained_cfg(arch, tag)
    if cfg.get("file"):
        return (cfg["file"] if os.path.isfile(cfg["file"]) else None), cfg["file"]
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub and ocp.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename]
        if getattr(ocp, "_has_safetensors", False) and hasattr(ocp, "_get_safe_alternatives"):
            names = [*ocp._get_safe_alternatives(filename), filename]
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found, ""
        endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
        return None, endpoint.rstrip("/")
    if url:
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return (target if os.path.isfile(target) else None), url
    return None, ""


def _unreachable(url: str, timeout: float) -> str | None:
    """None when a server answers ``url`` (any HTTP status) within ``timeout`` seconds, else why
    not. Runs in a daemon thread so a hanging DNS lookup cannot stretch the wait."""
    import threading
    import urllib.error
    import urllib.request

    box: dict[str, str] = {}

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            box["ok"] = ""
        except urllib.error.HTTPError:
            box["ok"] = ""  # the server answered
        except Exception as e:  # noqa: BLE001 - refused, DNS failure, timeout, TLS: all "cannot reach"
            box["why"] = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"

    t = threading.Thread(target=probe, name="dedup-hub-probe", daemon=True)
    t.start()
    t.join(timeout)
    if "ok" in box:
        return None
    return box.get("why") or f"no answer within {timeout:g} s"


def offline_hint(arch: str) -> str:
    from dedup.compute.embedders import SSCD_HINT

    return (
        f"to run offline use a local checkpoint (--embedder open_clip:{arch}:/path/to/open_clip_pytorch_model.bin), "
        f"or set HF_HUB_OFFLINE=1 with a cache filled on a machine with network (HF_HOME), "
        f"or use --embedder sscd (offline copy-detection model: {SSCD_HINT})"
    )


def preflight(spec: str, *, timeout: float = HUB_PROBE_TIMEOUT) -> None:
    """Fail fast, with one line saying what to do, when the model of ``spec`` cannot be loaded
    here. Call once before any work; :func:`make_embedder` calls it too.

    Validates the spec (missing files are :class:`ConfigError`). For an open_clip hub tag:
    fine if the weights are in the local cache; else fails at once if HF_HUB_OFFLINE /
    TRANSFORMERS_OFFLINE is set, and otherwise probes where they would come from
    (``HF_ENDPOINT`` or https://huggingface.co) for at most ``timeout`` seconds.
    """
    from dedup.compute.embedders import parse_spec

    p = parse_spec(spec)
    if p[0] != "open_clip" or p[2] == "none" or os.path.isfile(p[2]):
        return
    _, arch, tag = p
    cached, source = open_clip_weights(arch, tag)
    if cached or not source:
        return  # in the cache, or nothing to download (open_clip will say what is wrong)
    offline = _offline_env()
    if offline:
        why = f"{offline} is set and they are not in the local cache"
    elif source in _REACHED:
        return
    else:
        reason = _unreachable(source, timeout)
        if reason is None:
            _REACHED.add(source)
            return
        why = f"they are not in the local cache and {source} cannot be reached ({reason})"
    raise ConfigError(f"embedder {spec!r} needs the open_clip weights {arch}/{tag}, but {why}; {offline_hint(arch)}")
