"""One self-describing JSON per run: the source of truth for leaderboards and plots."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clbench.errors import UsageError

SCHEMA_VERSION = 1


@dataclass
class RunResult:
    strategy: str
    scenario: str
    backbone: str
    seed: int
    status: str = "running"  # running | completed | failed | interrupted
    strategy_config: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    # where each value of run_config and strategy_config came from: "default", "strategy defaults (<pattern>)",
    # "paper settings", "config", "set", "flag", "run spec" or "scenario default (<backbone>)"
    settings_source: dict[str, dict[str, str]] = field(default_factory=dict)
    aux: list[dict[str, Any]] = field(default_factory=list)
    pretrained: bool = False
    paper_settings: bool = False
    # a --paper-settings run: the number its method's paper reports for the scenario (the strategy's
    # `PUBLISHED`: metric, value as a fraction, source in the paper), for the leaderboard to set beside it
    published: dict[str, Any] | None = None
    scenario_info: dict[str, Any] = field(default_factory=dict)
    accuracy_matrix: list[list[float]] = field(default_factory=list)
    initial_accuracy: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    edge: dict[str, Any] = field(default_factory=lambda: {"per_experience": [], "totals": {}})
    strategy_report: dict[str, Any] = field(default_factory=dict)
    # detection scenarios: the AP convention, per-class AP and old/new/all after every task
    # (`accuracy_matrix` then holds per-task mean AP)
    detection: dict[str, Any] = field(default_factory=dict)
    # forecasting scenarios: MSE and MAE matrices (scaled and original units), error metrics (lower is
    # better) and the scaler policy (`accuracy_matrix` then stays empty; see `clbench.tasks.forecasting`)
    forecasting: dict[str, Any] = field(default_factory=dict)
    # per add-on, per experience: what its `after_evaluation` recorded (e.g. a quantized snapshot's accuracy)
    aux_results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # per experience: what the strategy's `diagnose` measured (e.g. PrePrompt's task-prediction accuracy)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    device: str = "cpu"
    environment: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    clbench_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def result_path(output_dir: str | os.PathLike, r: RunResult) -> Path:
    """`<out>/<scenario>/<strategy>[+aux]/<backbone>-seed<k>-<device>.json`; hardware is part of the name.
    Each add-on is named with the settings given to it (`er+quantize-preset-w4a4`), so runs of one
    add-on with other settings, separate rows of a leaderboard, never overwrite each other."""
    strategy = r.strategy + "".join(f"+{add_on_slug(a)}" for a in r.aux)
    return Path(output_dir) / r.scenario / strategy / f"{_slug(r.backbone)}-seed{r.seed}-{_slug(r.device)}.json"


MAX_SETTINGS_SLUG = 60  # longer settings are named by a hash (file names stay well under 255 bytes)


def add_on_slug(add_on: dict[str, Any]) -> str:
    """An add-on with its settings, as result paths and sweep logs name it (`quantize-preset-w4a4`)."""
    settings = ",".join(f"{k}={v}" for k, v in add_on.items() if k != "name")
    if not settings:
        return add_on["name"]
    slug = _slug(settings)
    if len(slug) > MAX_SETTINGS_SLUG:
        slug = hashlib.sha1(settings.encode()).hexdigest()[:12]
    return f"{add_on['name']}-{slug}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", s).strip("-").lower() or "unknown"


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write to a temp file in the same folder and rename it over the target (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save(result: RunResult, output_dir: str | os.PathLike) -> Path:
    return write_json_atomic(result_path(output_dir, result), result.to_dict())


def load(path: str | os.PathLike) -> RunResult:
    """Read one result; a file that is not a clbench result, or from a newer schema, is a UsageError."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"result file {str(p)!r} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or "accuracy_matrix" not in data or "schema_version" not in data:
        raise UsageError(f"result file {str(p)!r} is not a clbench result (no schema_version/accuracy_matrix)")
    version = data["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UsageError(
            f"result file {str(p)!r} has schema_version {version!r}; this clbench reads up to {SCHEMA_VERSION} "
            f"(upgrade clbench)"
        )
    problem = _not_numbers(data)
    if problem is not None:
        raise UsageError(f"result file {str(p)!r} is malformed: {problem}")
    try:
        return RunResult.from_dict(data)
    except TypeError as e:
        raise UsageError(f"result file {str(p)!r} is malformed: {e}") from None


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _not_numbers(data: dict[str, Any]) -> str | None:
    """What in a result's summary metrics or accuracy matrix is not a number (None: nothing)."""
    metrics = data.get("metrics") or {}
    if not isinstance(metrics, dict):
        return f"metrics is {type(metrics).__name__}; expected a mapping of numbers"
    for key, value in metrics.items():
        if not _is_number(value):
            return f"metric {key!r} is {value!r}; expected a number"
    matrix = data["accuracy_matrix"]
    if not isinstance(matrix, list) or not all(isinstance(row, list) and all(map(_is_number, row)) for row in matrix):
        return "accuracy_matrix is not a list of rows of numbers"
    return None


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "torchvision", "pytorch-lightning", "timm", "avalanche-lib", "torchmetrics", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
    }


# --------------------------------------------------------------------------- settings of a run
# Run settings that do not change what a run computes (paths, progress bars, data loading workers).
IGNORED_RUN_KEYS = frozenset({"output_dir", "progress", "data_root", "num_workers", "download"})


def json_normal(value: Any) -> Any:
    """`value` as it reads back from a result JSON: tuples become lists, unknown types strings."""
    return json.loads(json.dumps(value, default=str, allow_nan=True))


def settings_of(strategy_config: dict[str, Any], run_config: dict[str, Any], aux: Any = None) -> dict[str, Any]:
    """One flat mapping of the settings that make a run (run keys, then the strategy's; a strategy key that a
    run key already names is `strategy.KEY`), JSON-normalised so a stored result and a fresh request compare."""
    out = {k: v for k, v in run_config.items() if k not in IGNORED_RUN_KEYS}
    for k, v in strategy_config.items():
        out[f"strategy.{k}" if k in out else k] = v
    if aux is not None:
        out["aux"] = aux
    return json_normal(out)


def result_settings(r: RunResult, with_aux: bool = True) -> dict[str, Any]:
    return settings_of(r.strategy_config, r.run_config, list(r.aux) if with_aux else None)


def _same(a: Any, b: Any) -> bool:
    # compared as JSON text: NaN equals NaN, and [] equals () once both are normalised
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def setting_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def differing_settings(stored: dict[str, Any], wanted: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, wanted value) for every key of `wanted` whose value differs (absent: None)."""
    stored, wanted = json_normal(stored), json_normal(wanted)
    return [(k, stored.get(k), v) for k, v in wanted.items() if not _same(stored.get(k), v)]


def describe_differences(differences: list[tuple[str, Any, Any]]) -> str:
    """`epochs: 5 vs 20, lr: 0.1 vs 0.05` (stored value first)."""
    return ", ".join(f"{k}: {setting_text(a)} vs {setting_text(b)}" for k, a, b in differences)


def to_json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2)


# what `peak_memory_bytes` means for each `peak_memory_kind` (report lines, JSON, leaderboard legend)
KIND_DESCRIPTIONS = {
    "cpu_rss": "cpu_rss = rise of the process RSS above its value at the start of each experience "
               "(largest over experiences; the process peak RSS is process_peak_rss_bytes)",
    "cuda_allocator": "cuda_allocator = torch.cuda.max_memory_allocated(), reset at the start of each experience",
}


def describe_kind(kind: str | None) -> str:
    return KIND_DESCRIPTIONS.get(kind or "", str(kind))
