"""Run configuration: frozen, nested, validated; loaded from YAML/JSON plus ``--set`` overrides.

Every knob has a default, so ``dedup run INPUT --out RUN`` works with no file. The hash of
the parts that change per-sample features (:func:`features_hash`) is stored in every features
file and done marker, so a resumed run never mixes features computed differently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dedup.compute.threshold import FALSE_PAIR_RATE
from dedup.errors import ConfigError
from dedup.records import METHODS

# Recommended cosine thresholds per embedder family, measured in docs/quality.md.
# Copy-detection descriptors put unrelated photos near 0 and edited copies above ~0.8;
# CLIP-like models put unrelated photos much higher, so they need a far stricter threshold.
DEFAULT_THRESHOLDS = {"sscd": 0.60, "sscd-distilled": 0.60, "onnx": 0.60, "open_clip": 0.95, "torchscript": 0.90, "pixel": 0.95}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputConfig(_Section):
    image_exts: tuple[str, ...] = Field(
        ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ico"),
        description="member extensions that hold the sample's image, in order of preference (last component: v2.jpg counts as jpg)",
    )

    @field_validator("image_exts")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(e.lower().lstrip(".") for e in v)
        if not out or not all(out):
            raise ValueError("at least one (non-empty) image extension is required, e.g. [jpg, png]")
        return out


class DecodeConfig(_Section):
    max_pixels: int = Field(89_478_485, gt=0, description="decompression-bomb guard; never disabled")
    formats: tuple[str, ...] = Field(
        ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"),
        description="Pillow formats accepted (detected from the bytes, not the extension); others get status unsupported_format",
    )
    draft: bool = Field(True, description="JPEG DCT-domain downscaling to the size the signals need")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from PIL import Image

        Image.init()
        known = set(Image.OPEN) | set(Image.MIME)  # MIME adds formats opened by another plugin (MPO)
        out = tuple(f.upper() for f in v)
        bad = [f for f in out if f not in known]
        if bad:
            raise ValueError(f"unknown Pillow format(s) {bad}; Pillow here reads {sorted(known)}")
        if not out:
            raise ValueError("at least one format is required, e.g. [JPEG, PNG]")
        return out


class HashConfig(_Section):
    phash_radius: int = Field(8, ge=0, le=32, description="pHash pairs within this many bits are duplicates")
    dhash_radius: int = Field(6, ge=0, le=32, description="dHash pairs within this many bits are duplicates")
    cross_check: bool = Field(
        True,
        description="when both hashes are computed, a pair found by one counts only if the other is within twice its own radius "
        "(unrelated images that collide on one hash rarely collide on both; docs/hashing.md)",
    )
    # Flat images and text scans give hashes like all ones, which match unrelated images.
    min_informative_bits: int = Field(
        4, ge=0, le=32,
        description="hashes with fewer 1 bits (or 0 bits) than this are left out of hash matching (exact and embedding still apply)",
    )


class EmbeddingConfig(_Section):
    spec: str = Field("sscd-distilled", description="embedder spec (docs/embedders.md); same as --embedder")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")
    batch_size: int = Field(32, gt=0, description="images per model batch")
    threshold: float | Literal["auto"] | None = Field(
        "auto",
        description="cosine at or above which a pair is a duplicate. auto (default): the embedder family's value (sscd/onnx "
        "0.60, open_clip 0.95) or higher, as this corpus needs to keep the expected unrelated pairs under false_pair_rate "
        "x n (docs/quality.md); a number: that value; null: the family's value",
    )
    false_pair_rate: float = Field(
        FALSE_PAIR_RATE, gt=0.0,
        description="threshold auto: expected unrelated pairs allowed above the threshold, per sample (1e-4 = 1 per 10,000; at least 1 in all)",
    )
    nlist: int | None = Field(None, gt=0, description="IVF lists for the candidate search; null = automatic from n")
    nprobe: int | None = Field(None, gt=0, description="IVF lists each vector is assigned/compared in; null = automatic")

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, (int, float)) and not -1.0 <= v <= 1.0:
            raise ValueError("a cosine threshold lies in [-1, 1] (or use auto)")
        return v

    @property
    def auto(self) -> bool:
        return self.threshold == "auto"

    def resolved_threshold(self) -> float:
        """The fixed threshold, or with ``auto`` the family's value (the floor auto starts
        from; the value a run used is in its stats.json, ``thresholds.embedding_cosine``)."""
        if isinstance(self.threshold, (int, float)):
            return float(self.threshold)
        family = self.spec.split(":", 1)[0]
        return DEFAULT_THRESHOLDS.get(family, 0.9)


class ClusterConfig(_Section):
    grouping: Literal["components", "keeper"] = Field(
        "components",
        description="components: a group of linked samples stays one cluster around its most central member, and a member "
        "joins it if linked to that keeper or close to it (join_margin); others are clustered apart (no chaining). "
        "keeper: every member must be linked directly to its keeper (the first release's rule; groups can split)",
    )
    keeper_policy: tuple[str, ...] = Field(
        ("-unpadded", "-pixels", "-copies", "-file_size", "sample_id"),
        description="rank columns, best first, deciding between a cluster's most linked, most central members; '-' = larger "
        "is better. Columns: unpadded (0 when uniform borders - padding, bars, a canvas - cover 20 %+ of the image), pixels, "
        "content_pixels (pixels inside such borders), copies (byte-identical ok samples), file_size, caption_len, sample_id",
    )
    central_tolerance: float | None = Field(
        0.02, ge=0.0,
        description="members whose centrality (cosine to the cluster's mean embedding, or pHash agreement with its majority "
        "hash) is within this of the best are tied, and keeper_policy decides; null = keeper_policy alone",
    )
    join_margin: float = Field(
        0.15, ge=0.0, le=1.0,
        description="grouping components: a member not linked to the keeper still joins it at cosine >= threshold - join_margin "
        "(or both hashes within twice their radius, or identical bytes)",
    )
    keep_per_cluster: int = Field(1, ge=1, description="samples kept per cluster (the best-ranked k)")
    verify_min_size: int = Field(
        0, ge=0,
        description="clusters of at least this size keep only members linked to their keeper by two signals or identical bytes (0 = off)",
    )
    outlier_k: int = Field(5, ge=0, description="outlier_score = 1 - cosine to the k-th nearest other sample (needs embeddings); 0 = skip it (null column: large runs save its own search)")

    @field_validator("keeper_policy")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        known = {"unpadded", "pixels", "content_pixels", "copies", "file_size", "caption_len", "sample_id"}
        for col in v:
            if col.lstrip("-+") not in known:
                raise ValueError(f"unknown keeper column {col!r}; choose from {sorted(known)}")
        return v


class RunConfig(_Section):
    workers: int = Field(0, ge=0, description="feature worker processes; 0 = one per CPU core")
    max_error_fraction: float = Field(0.05, ge=0.0, le=1.0, description="above this share of non-ok samples the run exits 3 (partial)")
    executor: Literal["local", "ray"] = Field("local", description="local (process pool) or ray; same as --executor")
    retries: int = Field(2, ge=0, description="extra attempts for a shard whose worker failed")


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; None = 'auto' if RAY_ADDRESS is set, else a local Ray")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs per decode/hash task")
    embed_actors: int = Field(0, ge=0, description="embedding actors; 0 = one per GPU, or 1 on a CPU-only cluster")
    gpus_per_actor: float = Field(
        1.0, ge=0,
        description="GPUs per embedding actor; used when the cluster has GPUs at start (device auto) or always with embedding.device cuda (an autoscaler then adds GPU nodes)",
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per embedding actor")
    max_in_flight: int = Field(0, ge=0, description="shards in flight at once; 0 = 2 x cluster CPUs (bounds memory)")


class Config(_Section):
    methods: tuple[str, ...] = Field(METHODS, description=f"signals used: {', '.join(METHODS)}; same as --methods")
    input: InputConfig = InputConfig()
    decode: DecodeConfig = DecodeConfig()
    hashes: HashConfig = HashConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    clusters: ClusterConfig = ClusterConfig()
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in v if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
        if not v:
            raise ValueError("at least one method is required")
        return tuple(m for m in METHODS if m in v)  # canonical order

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def config_hash(self) -> str:
        """Hash of the settings that can change results. Where and how the work runs
        (executor, workers, retries, Ray resources) is left out, so a run can be resumed with
        another executor or cluster size and gives byte-identical output."""
        d = self.to_dict()
        d.pop("ray", None)
        for k in ("executor", "workers", "retries"):
            d["run"].pop(k, None)
        return _hash(d)

    def features_hash(self, model_tag: str | None) -> str:
        """Hash of what determines per-sample features; stored in features files and markers."""
        wants_embedding = "embedding" in self.methods
        part = {
            "input": self.input.model_dump(mode="json"),
            "decode": self.decode.model_dump(mode="json"),
            "embedding": model_tag if wants_embedding else None,
            "features_schema": 1,
            # 2: hash-only runs draft-decode JPEG luma only (decode_plan); features computed
            # before that are not mixed with newer ones.
            "decode_version": 2,
            # 3: hashes of the content box (uniform borders trimmed), content_fraction column
            "hash_version": 3,
        }
        if wants_embedding:
            # 2: images enlarged ≥ 3× to the model's input are low-passed first (embedders.DEBLOCK_*)
            part["embed_prep_version"] = 2
        return _hash(part)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(raw: str) -> Any:
    """``--set`` values are YAML scalars/lists: 8, 0.9, true, [a, b], "text"."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _apply_override(data: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is not a section")
    node[parts[-1]] = _parse_value(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **direct: Any) -> Config:
    """Config from an optional YAML/JSON file, then ``section.key=value`` overrides, then ``direct``
    (dotted keys → values, used for CLI options such as --methods)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        if p.is_dir():
            raise ConfigError(f"--config {p}: is a directory; give a YAML/JSON file (see `dedup config`)")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text ({e.reason} at byte {e.start}): is it a YAML/JSON file?") from None
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML/JSON: {' '.join(str(e).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _apply_override(data, key.strip(), raw.strip())
    for key, value in direct.items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msgs.append(f"  {loc}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(msgs)) from None
