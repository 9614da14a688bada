"""Jetson training time: a calibrated per-op roofline estimate, or a measurement on a real Jetson.

Estimate (spec section 3.4), for every traced aten op i of a training step:

    t_i    = max(F_i / (eta_c * P(kind_i)), B_i / (eta_m * W)) + tau_launch
    T_step = sum_i t_i + tau_step
    T      = sum over step shapes of n_steps * T_step

P is the device's peak for the op's precision (FP32 CUDA cores, TF32 or FP16 tensor
cores) scaled by the power mode's GPU clock; W its memory bandwidth. theta =
(eta_c, eta_m, tau_launch, tau_step) is fitted to published measurements (the
calibration set) by least squares on log time; the leave-one-out maximum error e is
the band that travels with every estimate: [T/(1+e), T*(1+e)]. Outside the
calibrated family the band is widened to a factor of 2.

Every time this module reports is labelled `measured:<device>:<mode>` or
`estimated:<device>:<mode>:<calibration-id>`.
"""

from __future__ import annotations

import functools
import math
import re
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Sequence

import numpy as np
from clbench.edge.devices import DeviceProfile, load
from clbench.edge.flops import StepProfile

ESTIMATE_NOTE = "estimated with a calibrated roofline model; not measured on the device"
OUT_OF_FAMILY_BAND = 1.0  # factor 2 either way when no calibration point exists for the architecture


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Theta:
    eta_c: float  # fraction of peak FLOP/s reached by compute-bound ops
    eta_m: float  # fraction of peak bandwidth reached by memory-bound ops
    tau_launch: float  # seconds per kernel (Python + launch on the ARM cores)
    tau_step: float  # seconds per step outside the ops (optimizer bookkeeping, data loading, Python)


@dataclass(frozen=True)
class Precision:
    """Which peak an op runs at. Defaults are PyTorch's: cuDNN convs use TF32, matmuls do not."""

    dtype: str = "fp32"  # fp32 | fp16 (autocast / half models)
    tf32_conv: bool = True
    tf32_matmul: bool = False

    @classmethod
    def current(cls, precision: str = "32-true") -> "Precision":
        import torch

        dtype = "fp16" if ("16" in str(precision)) else "fp32"
        return cls(dtype, bool(torch.backends.cudnn.allow_tf32), bool(torch.backends.cuda.matmul.allow_tf32))


def _op_arrays(profile: StepProfile, device: DeviceProfile, precision: Precision, power_mode: str | None):
    """(FLOPs, bytes, peak FLOP/s, calls) per distinct op record, and the number of kernel launches."""
    fp32 = device.peak_flops("fp32", power_mode)
    tf32 = device.peak_flops("tf32", power_mode)
    fp16 = device.peak_flops("fp16", power_mode)
    F, B, P, N = [], [], [], []
    for (name, kind, dtype, flops, nbytes), calls in profile.ops.items():
        half = dtype in ("float16", "bfloat16") or precision.dtype == "fp16"
        if kind == "other":
            peak = fp32
        elif half:
            peak = fp16
        elif (kind == "conv" and precision.tf32_conv) or (kind == "matmul" and precision.tf32_matmul):
            peak = tf32
        else:
            peak = fp32
        F.append(flops)
        B.append(nbytes)
        P.append(peak)
        N.append(calls if (flops or nbytes) else 0)
    return np.array(F, float), np.array(B, float), np.array(P, float), np.array(N, float)


def step_time(profile: StepProfile, device: DeviceProfile, theta: Theta, precision: Precision = Precision(),
              power_mode: str | None = None) -> float:
    """Seconds for one training step with the op mix of `profile` on `device`."""
    F, B, P, N = _op_arrays(profile, device, precision, power_mode)
    return _step_time(F, B, P, N, device.bandwidth(power_mode), theta)


def _step_time(F, B, P, N, W, theta: Theta) -> float:
    per_op = np.maximum(F / (theta.eta_c * P), B / (theta.eta_m * W)) + theta.tau_launch
    return float((per_op * N).sum() + theta.tau_step)


# --------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class CalibrationPoint:
    """A published measurement with enough setup to rebuild its training step."""

    name: str
    grad_forwards: tuple[int, ...]  # images per forward that is back-propagated (one backward over their sum)
    teacher_forwards: tuple[int, ...] = ()  # images per no-grad forward (teachers, EMA models)
    ema_models: int = 0  # parameter-averaged copies updated every step
    in_chans: int = 3
    size: int = 32
    steps: int = 78_250
    hours: float = 0.0
    model: str = "resnet18_cifar"
    num_classes: int = 10


@dataclass(frozen=True)
class Calibration:
    id: str
    device: str
    family: str
    theta: Theta
    loo_max_error: float
    loo_median_error: float
    n_points: int
    source: str
    precision: Precision = Precision()
    points: tuple[dict, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = list(d["points"])
        return d


# CLFD (Liu et al., NeurIPS 2024), Fig. 1 right: split CIFAR-10 on a Jetson Orin NX, Mammoth
# defaults (ResNet-18, batch 32, replay minibatch 32, 50 epochs x 5 tasks x 313 steps, FP32).
# Hours are read off the chart (+-0.3 h) and include per-task evaluation and checkpoints.
# The CLFD variants are modelled as the same method on the 12-channel 16x16 Haar sub-bands
# (an assumption: the paper's exact frequency-feature selection is not rebuilt).
CLFD_ORIN_NX = (
    CalibrationPoint("er", (64,), hours=6.5),
    CalibrationPoint("er_ace", (32, 32), hours=6.2),
    CalibrationPoint("derpp", (32, 32, 32), hours=10.4),
    CalibrationPoint("cls_er", (64,), (32, 32), ema_models=2, hours=11.7),
    CalibrationPoint("clfd-er", (64,), in_chans=12, size=16, hours=2.8),
    CalibrationPoint("clfd-er_ace", (32, 32), in_chans=12, size=16, hours=2.6),
    CalibrationPoint("clfd-derpp", (32, 32, 32), in_chans=12, size=16, hours=4.1),
    CalibrationPoint("clfd-cls_er", (64,), (32, 32), ema_models=2, in_chans=12, size=16, hours=5.0),
)
CLFD_CALIBRATION_ID = "clfd-orinnx-v1"
CLFD_DEVICE = "jetson-orin-nx-16gb"  # the paper does not say 8 or 16 GB; 16 GB is assumed


@functools.lru_cache(maxsize=None)
def trace_point(point: CalibrationPoint) -> StepProfile:
    """One training step of the point's workload, traced on the meta device (nothing is computed)."""
    import timm
    import torch
    import torch.nn.functional as F_
    from clbench.edge.flops import Counter

    import clbench.models.backbones  # noqa: F401  (registers the CIFAR ResNets with timm)

    def make():
        with torch.device("meta"):  # no weights are initialised or stored
            return timm.create_model(point.model, num_classes=point.num_classes, in_chans=point.in_chans)

    net = make()
    others = [make().eval() for _ in range(max(point.ema_models, len(point.teacher_forwards) and 1))]
    for m in others:
        m.requires_grad_(False)

    def batch(n):
        return (torch.empty(n, point.in_chans, point.size, point.size, device="meta"),
                torch.zeros(n, dtype=torch.long, device="meta"))

    with Counter(trace=True) as c:
        loss = 0
        for n in point.grad_forwards:
            x, y = batch(n)
            loss = loss + F_.cross_entropy(net(x), y)
        with torch.no_grad():
            for i, n in enumerate(point.teacher_forwards):
                others[i % len(others)](batch(n)[0])
        loss.backward()
        with torch.no_grad():
            params = [p for p in net.parameters()]
            for p in params:  # plain SGD update (Mammoth's default, no momentum)
                p.add_(p.grad, alpha=-0.1)
            for m in others[: point.ema_models]:
                for q, p in zip(m.parameters(), params):
                    q.mul_(0.999).add_(p, alpha=0.001)
    return c.profile


def fit_theta(profiles: Sequence[StepProfile], steps: Sequence[int], seconds: Sequence[float],
              device: DeviceProfile, precision: Precision = Precision()) -> Theta:
    """Least squares on log time with bounded parameters (deterministic start)."""
    from scipy.optimize import least_squares

    arrays = [_op_arrays(p, device, precision, None) for p in profiles]
    W = device.bandwidth()
    scale = np.array([1.0, 1.0, 1e-5, 1e-2])  # optimise O(1) numbers

    def theta_of(x):
        v = x * scale
        return Theta(float(v[0]), float(v[1]), float(v[2]), float(v[3]))

    def residuals(x):
        th = theta_of(x)
        return [math.log(n * _step_time(*a, W, th)) - math.log(t) for a, n, t in zip(arrays, steps, seconds)]

    x0 = np.array([0.3, 0.5, 1.0, 1.0])
    lo, hi = np.array([0.005, 0.005, 0.0, 0.0]), np.array([1.0, 1.0, 100.0, 100.0])  # tau_launch <= 1 ms, tau_step <= 1 s
    fit = least_squares(residuals, x0, bounds=(lo, hi), method="trf", xtol=1e-9, ftol=1e-9, gtol=1e-9, max_nfev=400)
    return theta_of(fit.x)


def calibrate(points: Sequence[CalibrationPoint] = CLFD_ORIN_NX, device_name: str = CLFD_DEVICE,
              calibration_id: str = CLFD_CALIBRATION_ID) -> Calibration:
    """Fit theta on all points; leave-one-out refits give the error band."""
    device = load(device_name)
    profiles = [trace_point(p) for p in points]
    steps = [p.steps for p in points]
    seconds = [p.hours * 3600 for p in points]
    theta = fit_theta(profiles, steps, seconds, device)
    errors = []
    for i in range(len(points)):
        keep = [j for j in range(len(points)) if j != i]
        th = fit_theta([profiles[j] for j in keep], [steps[j] for j in keep], [seconds[j] for j in keep], device)
        pred = steps[i] * step_time(profiles[i], device, th)
        errors.append(abs(pred - seconds[i]) / seconds[i])
    return Calibration(
        id=calibration_id,
        device=device_name,
        family=device.family,
        theta=theta,
        loo_max_error=float(max(errors)),
        loo_median_error=float(np.median(errors)),
        n_points=len(points),
        source="CLFD (Liu et al., NeurIPS 2024) Fig. 1, split CIFAR-10 on Jetson Orin NX, read off the chart",
        points=tuple({**asdict(p), "grad_forwards": list(p.grad_forwards), "teacher_forwards": list(p.teacher_forwards)}
                     for p in points),
    )


@functools.lru_cache(maxsize=None)
def shipped_calibration(calibration_id: str = CLFD_CALIBRATION_ID) -> Calibration:
    """The fitted calibration stored with the package (regenerate: python -m clbench.edge.jetson)."""
    from clbench.edge.devices import read_yaml

    path = resources.files("clbench.edge").joinpath("devices").joinpath(f"calibration-{calibration_id}.yaml")
    d = read_yaml(path.read_text(encoding="utf-8"))
    d["theta"] = Theta(**d["theta"])
    d["precision"] = Precision(**d["precision"])
    d["points"] = tuple(d.get("points", ()))
    return Calibration(**d)


# --------------------------------------------------------------------------- estimates
@dataclass
class Estimate:
    device: str
    power_mode: str
    time_s: float
    low_s: float
    high_s: float
    band: float  # relative error e: the interval is [T/(1+e), T(1+e)]
    source: str
    calibration: str
    n_calibration_points: int
    note: str = ESTIMATE_NOTE
    per_step_s: dict[str, float] = field(default_factory=dict)

    def label(self) -> str:
        return estimate_label(self.time_s, self.band, self.low_s, self.high_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label()
        return d


def estimate_train_time(steps: Sequence[tuple[StepProfile, int]], device: DeviceProfile | str,
                        power_mode: str | None = None, precision: Precision | None = None,
                        calibration: Calibration | None = None) -> Estimate:
    """Jetson training time of `n` steps of each traced step shape, with its uncertainty band."""
    device = load(device) if isinstance(device, str) else device
    calibration = calibration or shipped_calibration()
    precision = precision or Precision()
    mode = power_mode or device.default_power_mode
    band = calibration.loo_max_error if device.family == calibration.family else max(OUT_OF_FAMILY_BAND, calibration.loo_max_error)
    total = 0.0
    per_step = {}
    for i, (profile, n) in enumerate(steps):
        t = step_time(profile, device, calibration.theta, precision, mode)
        per_step[str(i)] = t
        total += n * t
    return Estimate(
        device=device.name,
        power_mode=mode,
        time_s=total,
        low_s=total / (1 + band),
        high_s=total * (1 + band),
        band=band,
        source=f"estimated:{device.name}:{mode}:{calibration.id}",
        calibration=calibration.id,
        n_calibration_points=calibration.n_points,
        per_step_s=per_step,
    )


def estimate_label(time_s: float, band: float, low_s: float, high_s: float) -> str:
    """e.g. `2.1 h estimated ± 33% [1.6 h, 2.8 h]`."""
    return f"{_hms(time_s)} estimated ± {100 * band:.0f}% [{_hms(low_s)}, {_hms(high_s)}]"


def measured_label(time_s: float) -> str:
    return f"{time_s:.2f} s measured"


def _hms(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


# --------------------------------------------------------------------------- measuring on a Jetson
_TEGRA = {
    "ram": re.compile(r"RAM (\d+)/(\d+)MB"),
    "swap": re.compile(r"SWAP (\d+)/(\d+)MB"),
    "emc": re.compile(r"EMC_FREQ (\d+)%"),
    "gr3d": re.compile(r"GR3D_FREQ (\d+)%"),
    "power": re.compile(r"(?:VDD_IN|POM_5V_IN) (\d+)(?:mW)?/(\d+)"),
}


def parse_tegrastats(line: str) -> dict[str, float]:
    """The fields clbench uses from one tegrastats line (absent fields are left out)."""
    out: dict[str, float] = {}
    if m := _TEGRA["ram"].search(line):
        out["ram_used_mb"], out["ram_total_mb"] = float(m.group(1)), float(m.group(2))
    if m := _TEGRA["swap"].search(line):
        out["swap_used_mb"], out["swap_total_mb"] = float(m.group(1)), float(m.group(2))
    if m := _TEGRA["emc"].search(line):
        out["emc_load_pct"] = float(m.group(1))
    if m := _TEGRA["gr3d"].search(line):
        out["gpu_load_pct"] = float(m.group(1))
    if m := _TEGRA["power"].search(line):
        out["power_in_mw"] = float(m.group(1))
    return out


class Tegrastats:
    """Runs `tegrastats --interval 100` in the background and keeps peak RAM, swap and power."""

    def __init__(self, command: Sequence[str] = ("tegrastats", "--interval", "100")):
        self.command = list(command)
        self.samples: list[dict[str, float]] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return True

    def _read(self) -> None:
        for line in self._proc.stdout:
            s = parse_tegrastats(line)
            if s:
                self.samples.append(s)

    def stop(self) -> dict[str, Any]:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            if self._thread is not None:
                self._thread.join(timeout=2)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        ram = [s["ram_used_mb"] for s in self.samples if "ram_used_mb" in s]
        swap = [s["swap_used_mb"] for s in self.samples if "swap_used_mb" in s]
        power = [s["power_in_mw"] for s in self.samples if "power_in_mw" in s]
        out: dict[str, Any] = {"samples": len(self.samples)}
        if ram:
            out["ram_baseline_mb"], out["ram_peak_mb"] = ram[0], max(ram)
            out["peak_system_ram_bytes"] = int((max(ram) - ram[0]) * 2**20)
        if swap:
            out["swap_grew_mb"] = max(swap) - swap[0]
        if power:
            out["mean_power_in_mw"] = float(np.mean(power))
        return out


def power_mode_name() -> str:
    """Active nvpmodel mode ('MAXN', '15W', ...), or 'unknown'."""
    try:
        text = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    return m.group(1) if m else "unknown"


def _write_shipped() -> None:  # python -m clbench.edge.jetson
    import os

    import yaml

    cal = calibrate()
    path = os.path.join(os.path.dirname(__file__), "devices", f"calibration-{cal.id}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Generated by `python -m clbench.edge.jetson`; tests check it is reproducible.\n")
        yaml.safe_dump(cal.to_dict(), f, sort_keys=False)
    print(f"wrote {path}: theta={cal.theta}, LOO max {100 * cal.loo_max_error:.1f}%, median {100 * cal.loo_median_error:.1f}%")


if __name__ == "__main__":
    _write_shipped()
