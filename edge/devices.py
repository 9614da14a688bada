"""Jetson device profiles (shipped as `edge/devices/*.yaml`) and detection of a real Jetson.

A profile holds datasheet numbers: peak throughput per precision (TFLOP/s at the
maximum GPU clock), memory bandwidth, memory size, and the power modes whose GPU
clock is known. Derived values are marked so in the files.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from clbench.errors import UsageError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    family: str
    arch: str
    memory_gb: float
    bandwidth_gbs: float
    gpu_clock_mhz: float
    peak_tflops: dict[str, float | None]
    power_modes: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_power_mode: str = "MAXN"
    model_match: tuple[str, ...] = ()
    cuda_cores: int = 0
    tensor_cores: int = 0

    def clock_scale(self, power_mode: str | None = None) -> float:
        """GPU clock of the power mode relative to the datasheet maximum (peaks scale linearly)."""
        mode = power_mode or self.default_power_mode
        if mode not in self.power_modes:
            raise UsageError(f"power mode {mode!r} is not one of {self.name}'s: {', '.join(self.power_modes)}")
        clock = self.power_modes[mode].get("gpu_clock_mhz")
        if not clock:
            known = ", ".join(m for m, v in self.power_modes.items() if v.get("gpu_clock_mhz"))
            raise UsageError(f"power mode {mode!r} of {self.name} has no GPU clock in its profile; modes with clocks: {known}")
        return float(clock) / self.gpu_clock_mhz

    def peak_flops(self, precision: str, power_mode: str | None = None) -> float:
        """FLOP/s for 'fp32', 'tf32' or 'fp16'; tf32 falls back to fp32 on GPUs without it."""
        value = self.peak_tflops.get(precision)
        if value is None:
            value = self.peak_tflops["fp32"] if precision == "tf32" else None
        if value is None:
            raise UsageError(f"device {self.name} has no {precision} peak in its profile")
        return float(value) * 1e12 * self.clock_scale(power_mode)

    def bandwidth(self, power_mode: str | None = None) -> float:
        """Bytes/s. Power modes also lower the memory clock; until the profile has EMC clocks, the peak is used."""
        return self.bandwidth_gbs * 1e9

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "peak_tflops": dict(self.peak_tflops),
            "bandwidth_gbs": self.bandwidth_gbs,
            "memory_gb": self.memory_gb,
            "gpu_clock_mhz": self.gpu_clock_mhz,
        }


def _files():
    folder = resources.files("clbench.edge").joinpath("devices")
    # calibration-*.yaml files sit beside the profiles but are not devices
    files = (f for f in folder.iterdir() if f.name.endswith(".yaml") and not f.name.startswith("calibration-"))
    return sorted(files, key=lambda f: f.name)


def read_yaml(text: str) -> Any:
    """Safe YAML load, with libyaml's C loader where PyYAML has it (the pure-Python one took
    tens of milliseconds for the shipped files: a visible share of a short profiled run)."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=None)
def _all() -> dict[str, DeviceProfile]:
    out = {}
    for f in _files():
        data = read_yaml(f.read_text(encoding="utf-8"))
        data["model_match"] = tuple(data.get("model_match", ()))
        data["power_modes"] = {str(k): dict(v or {}) for k, v in data.get("power_modes", {}).items()}
        out[data["name"]] = DeviceProfile(**data)
    return out


def names() -> list[str]:
    return list(_all())


def load(name: str) -> DeviceProfile:
    profiles = _all()
    if name not in profiles:
        raise UsageError(f"unknown device {name!r}; expected one of: {', '.join(profiles)}")
    return profiles[name]


def describe() -> dict[str, str]:
    return {name: p.description for name, p in _all().items()}


# --------------------------------------------------------------------------- real Jetson
@dataclass(frozen=True)
class JetsonInfo:
    model: str  # /proc/device-tree/model, without the trailing NUL
    l4t: str  # first line of /etc/nv_tegra_release
    memory_gb: float
    profile: str | None  # matching device profile name, if any


def detect(root: str | Path = "/") -> JetsonInfo | None:
    """The Jetson this process runs on, or None. `root` lets tests point at a fake filesystem."""
    root = Path(root)
    release = root / "etc" / "nv_tegra_release"
    model_file = root / "proc" / "device-tree" / "model"
    if not release.is_file() or not model_file.is_file():
        return None
    model = model_file.read_bytes().rstrip(b"\x00").decode("utf-8", "replace").strip()
    l4t = release.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip() if release.stat().st_size else ""
    mem_gb = _mem_total_gb(root / "proc" / "meminfo")
    return JetsonInfo(model=model, l4t=l4t, memory_gb=mem_gb, profile=match_profile(model, mem_gb))


def match_profile(model: str, memory_gb: float) -> str | None:
    """Longest matching pattern wins ('orin nano' before 'nano'); memory picks between 8 and 16 GB modules."""
    text = model.lower()
    candidates = []
    for p in _all().values():
        hits = [m for m in p.model_match if m in text]
        if hits:
            candidates.append((max(len(m) for m in hits), p))
    if not candidates:
        return None
    best = max(c[0] for c in candidates)
    same = [p for n, p in candidates if n == best]
    # MemTotal is a little below the module's nominal size
    fitting = [p for p in same if p.memory_gb >= memory_gb] or same
    return min(fitting, key=lambda p: abs(p.memory_gb - memory_gb)).name


def _mem_total_gb(meminfo: Path) -> float:
    try:
        m = re.search(r"MemTotal:\s+(\d+)\s*kB", meminfo.read_text())
    except OSError:
        return 0.0
    return int(m.group(1)) / 2**20 if m else 0.0
