"""The ``"tencache"`` block of a DeepSpeed JSON config: typed, validated, with defaults.

DeepSpeed keeps unknown *top-level* keys in ``engine.config`` (inside ``zero_optimization`` they are
rejected), so the block sits beside ``zero_optimization``::

    {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
     "tencache": {"device_budget": "64MiB", "warmup_steps": 2}}

Every mistake gets one :class:`TencacheConfigError` that names the key, the value and what would be
valid, before any engine is built. This module imports no DeepSpeed: it reads the DeepSpeed config
as the plain dict the user wrote.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, ValidationError,
                      field_validator)

BLOCK = "tencache"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class TencacheConfigError(ValueError):
    """A bad ``tencache`` block (or a DeepSpeed config it cannot work with)."""


def parse_bytes(value: Any) -> int | Literal["auto"]:
    """``"auto"``, ``1048576``, ``1e6``, ``"512MiB"`` or ``"1.5GB"`` -> "auto" or a byte count."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        match = _SIZE.match(value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{value!r} is not a size; use \"auto\", a byte count, or a string like "
                             f"'512MiB' or '2GB' (units: {', '.join(u for u in _UNITS if u)})")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be \"auto\", a whole number of bytes, or a size like '512MiB'")
    if value < 0:
        raise ValueError("must be at least 0 bytes")
    return value


# "auto" or bytes, validated by parse_bytes alone so an error reads as one sentence.
BytesOrAuto = Annotated[int | Literal["auto"], PlainValidator(parse_bytes)]


def _parse_bytes_only(value: Any) -> int:
    parsed = parse_bytes(value)
    if parsed == "auto":
        raise ValueError("must be a whole number of bytes or a size like '512MiB' (no \"auto\" here)")
    return parsed


Bytes = Annotated[int, PlainValidator(_parse_bytes_only)]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class MetricsConfig(_Block):
    path: str | None = None
    """JSON-lines file that receives one record per reported step; None logs the summary only."""

    every_n_steps: int = Field(1, ge=1)
    """Report every N steps (the log line and the JSON record)."""


class PoolConfig(_Block):
    alignment_bytes: int = Field(4096, ge=1)
    """Alignment of every pinned buffer. 4096 is the block size O_DIRECT NVMe I/O requires."""

    max_size_classes: int = Field(16, ge=1)
    """Most distinct buffer sizes; the rarest measured sizes round up into a larger class."""

    @field_validator("alignment_bytes")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two, got {value}")
        return value


class TencacheConfig(_Block):
    enabled: bool = True
    """Set false to keep the block in the file but run stock DeepSpeed."""

    warmup_steps: int = Field(2, ge=1)
    """Steps profiled (stock behaviour) before the plan takes over. With more than one, the first
    step's timings are dropped: it carries one-off costs."""

    device_budget: BytesOrAuto = "auto"
    """Bytes of gathered parameters the accelerator may hold at once. "auto": what stock ZeRO-3
    would keep live at most (``stage3_max_live_parameters`` elements)."""

    nvme_tier: bool = True
    """With ``offload_param.device: "nvme"``, replace ZeRO-Infinity's parameter swapper by the
    tiered store (pinned pool, CPU tier, checksummed swap files); with ``offload_optimizer.device:
    "nvme"``, replace its optimizer-state swapper likewise (CPU tier, prefetch, checksums). False
    keeps the upstream swappers and caches on the device only (useful for A/B measurements)."""

    cpu_budget: BytesOrAuto = "auto"
    """Bytes of pinned host memory of the NVMe tier: the CPU-tier residents plus the staging
    buffers of NVMe reads, in one allocation. "auto": what ZeRO-Infinity pins for its parameter
    swap slots (``offload_param.buffer_count`` x ``buffer_size`` elements)."""

    optimizer_cpu_budget: Bytes = 0
    """Host-memory bytes for optimizer sub-groups that never go to NVMe (``offload_optimizer.device:
    "nvme"`` only). Each kept sub-group costs 16 bytes per element (fp32 master weight, Adam's two
    moments, fp32 gradient) and saves reading and writing as much every step. 0, the default,
    streams every sub-group, as ZeRO-Infinity does."""

    nvme_path: str | None = None
    """Folder of the NVMe tier; defaults to the ``nvme_path`` of ``offload_param`` (parameters) or
    ``offload_optimizer`` (optimizer states)."""

    prefetch_lookahead: BytesOrAuto = "auto"
    """How far ahead fetches may run. "auto": as late as still hides each transfer behind the
    measured compute; a byte count additionally caps the bytes outstanding ahead of use."""

    verify_checksums: bool = True
    """Check a checksum of every tensor read back from NVMe (a corrupt or truncated swap file
    stops training instead of silently training on wrong weights)."""

    profile_path: str | None = None
    """Write the warm-up profile here as JSON (``.gz`` compresses), for inspection or simulation."""

    metrics: MetricsConfig = MetricsConfig()
    pool: PoolConfig = PoolConfig()

    def tier_settings_ignored(self, param_tier: bool, optimizer_tier: bool) -> list[str]:
        """Keys the user set for a tier that is not active: the adapter says plainly that they
        have no effect, rather than accepting them silently."""
        applies = {key: param_tier or optimizer_tier for key in SHARED_TIER_KEYS}
        applies.update({key: param_tier for key in PARAM_TIER_KEYS})
        applies["optimizer_cpu_budget"] = optimizer_tier
        return [key for key in applies if key in self.model_fields_set and not applies[key]]


# Settings of the NVMe tiers (see tier_settings_ignored): both tiers', the parameter tier's.
SHARED_TIER_KEYS = ("nvme_tier", "nvme_path", "verify_checksums")
PARAM_TIER_KEYS = ("cpu_budget", "pool")


def _dotted(location: tuple[Any, ...]) -> str:
    path = BLOCK
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _model_at(location: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = TencacheConfig
    for part in location:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return model


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = item["loc"]
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_model_at(location[:-1]).model_fields)
            lines.append(f"{_dotted(location)}: unknown key; allowed keys here: {allowed}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{_dotted(location)} = {item['input']!r}: {message}")
    return "invalid tencache config:\n  " + "\n  ".join(lines)


def load_ds_config(ds_config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A DeepSpeed config as the dict DeepSpeed reads (a path to JSON, or a dict)."""
    if isinstance(ds_config, Mapping):
        return dict(ds_config)
    path = Path(ds_config)
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise TencacheConfigError(f"cannot read DeepSpeed config {path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise TencacheConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err


def parse_block(block: Any) -> TencacheConfig:
    """Validate the value of the ``"tencache"`` key."""
    if block is None or block is True:
        block = {}
    elif block is False:
        block = {"enabled": False}
    if not isinstance(block, Mapping):
        raise TencacheConfigError(
            f"tencache = {block!r}: must be an object like {{\"device_budget\": \"64MiB\"}}, "
            "true or false")
    try:
        return TencacheConfig.model_validate(dict(block))
    except ValidationError as err:
        raise TencacheConfigError(_explain(err)) from None


def from_ds_config(ds_config: Mapping[str, Any] | str | Path) -> TencacheConfig | None:
    """The validated block of a DeepSpeed config, or None when it has none or disables it.

    Also checks what the block needs from the rest of the config: ZeRO stage 3, and a folder
    for an NVMe tier.
    """
    config = load_ds_config(ds_config)
    if BLOCK not in config:
        _reject_misplaced_block(config)
        return None
    tencache = parse_block(config[BLOCK])
    if not tencache.enabled:
        return None
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    if stage != 3:
        raise TencacheConfigError(
            f"tencache caches ZeRO-3 parameters, but zero_optimization.stage is {stage!r}; "
            "set \"zero_optimization\": {\"stage\": 3, ...} or remove the tencache block")
    offload = zero.get("offload_param") or {}
    nvme = offload.get("device") == "nvme"
    if nvme and not (tencache.nvme_path or offload.get("nvme_path")):
        raise TencacheConfigError(
            "offload_param.device is \"nvme\" but no folder is given for the NVMe tier; set "
            "zero_optimization.offload_param.nvme_path or tencache.nvme_path")
    optimizer = zero.get("offload_optimizer") or {}
    if nvme and tencache.nvme_tier and optimizer.get("device") == "nvme" and optimizer.get("fast_init"):
        raise TencacheConfigError(
            "offload_optimizer.fast_init borrows ZeRO-Infinity's parameter swap slots, which "
            "tencache's NVMe tier replaces; remove fast_init, or set tencache.nvme_tier to false")
    return tencache


def nvme_tier_active(ds_config: Mapping[str, Any]) -> bool:
    """Whether tencache's NVMe tier replaces ZeRO-Infinity's parameter swapper for this config."""
    return _tier_active(ds_config, "offload_param")


def optimizer_tier_active(ds_config: Mapping[str, Any]) -> bool:
    """Whether tencache's NVMe tier replaces ZeRO-Infinity's optimizer-state swapper."""
    return _tier_active(ds_config, "offload_optimizer")


def _tier_active(ds_config: Mapping[str, Any], offload_key: str) -> bool:
    block = ds_config.get(BLOCK)
    if block is None or block is False:
        return False
    tencache = parse_block(block)
    zero = ds_config.get("zero_optimization") or {}
    offload = (zero.get(offload_key) or {}) if isinstance(zero, Mapping) else {}
    return tencache.enabled and tencache.nvme_tier and offload.get("device") == "nvme"


def _reject_misplaced_block(config: Mapping[str, Any]) -> None:
    """DeepSpeed would reject these with an unrelated pydantic error; say where the block goes."""
    zero = config.get("zero_optimization")
    if isinstance(zero, Mapping):
        for where in ("zero_optimization", "zero_optimization.offload_param"):
            holder = zero if where == "zero_optimization" else zero.get("offload_param") or {}
            if BLOCK in holder:
                raise TencacheConfigError(
                    f"the tencache block is inside {where}; move it to the top level of the "
                    "DeepSpeed config, beside zero_optimization")
