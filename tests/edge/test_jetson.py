"""Jetson profiles, roofline estimator arithmetic, calibration, tegrastats parsing and detection."""

import sys

import pytest
from clbench.edge import devices
from clbench.edge import jetson as J
from clbench.edge.devices import DeviceProfile
from clbench.edge.flops import StepProfile

from clbench.errors import UsageError

TOY = DeviceProfile(
    name="toy", description="", family="orin", arch="ampere", memory_gb=8, bandwidth_gbs=100.0, gpu_clock_mhz=1000,
    peak_tflops={"fp32": 2.0, "tf32": 8.0, "fp16": 16.0},
    power_modes={"MAXN": {"gpu_clock_mhz": 1000}, "HALF": {"gpu_clock_mhz": 500}, "15W": {}},
)


def _profile():
    p = StepProfile()
    p.ops[("convolution", "conv", "float32", 4_000_000_000, 1_000_000)] += 2  # compute-bound
    p.ops[("addmm", "matmul", "float32", 1_000_000_000, 0)] += 1
    p.ops[("relu", "other", "float32", 0, 200_000_000)] += 3  # memory-bound
    p.ops[("empty", "other", "none", 0, 0)] += 5  # no kernel, no launch
    return p


def test_step_time_arithmetic_on_a_hand_built_profile():
    theta = J.Theta(eta_c=0.5, eta_m=0.25, tau_launch=1e-4, tau_step=0.01)
    conv = 4e9 / (0.5 * 8e12)  # TF32 for convs (PyTorch default): 1 ms
    mm = 1e9 / (0.5 * 2e12)  # FP32 for matmuls: 1 ms
    relu = 2e8 / (0.25 * 100e9)  # bandwidth-bound: 8 ms
    expected = 2 * conv + mm + 3 * relu + 6 * 1e-4 + 0.01
    assert J.step_time(_profile(), TOY, theta) == pytest.approx(expected, rel=1e-12)
    # half the GPU clock halves compute peaks, not bandwidth
    half = 2 * 2 * conv + 2 * mm + 3 * relu + 6 * 1e-4 + 0.01
    assert J.step_time(_profile(), TOY, theta, power_mode="HALF") == pytest.approx(half, rel=1e-12)
    fp16 = 2 * 4e9 / (0.5 * 16e12) + 1e9 / (0.5 * 16e12) + 3 * relu + 6 * 1e-4 + 0.01
    assert J.step_time(_profile(), TOY, theta, J.Precision("fp16")) == pytest.approx(fp16, rel=1e-12)


def test_estimate_band_and_labels():
    cal = J.Calibration("toy-cal", "toy", "orin", J.Theta(0.5, 0.25, 1e-4, 0.01), 0.2, 0.1, 5, "hand-made")
    est = J.estimate_train_time([(_profile(), 100), (_profile(), 50)], TOY, calibration=cal)
    t = J.step_time(_profile(), TOY, cal.theta)
    assert est.time_s == pytest.approx(150 * t)
    assert est.low_s == pytest.approx(150 * t / 1.2) and est.high_s == pytest.approx(150 * t * 1.2)
    assert est.source == "estimated:toy:MAXN:toy-cal"
    assert "estimated ± 20%" in est.label()
    volta = DeviceProfile(**{**TOY.__dict__, "name": "v", "family": "volta"})
    assert J.estimate_train_time([(_profile(), 1)], volta, calibration=cal).band == 1.0  # factor 2 outside the family
    with pytest.raises(UsageError, match="15W"):
        J.estimate_train_time([(_profile(), 1)], TOY, power_mode="15W", calibration=cal)


def test_fit_recovers_theta_from_synthetic_points():
    truth = J.Theta(0.4, 0.3, 5e-5, 0.02)
    profiles = []
    for k in range(1, 7):
        p = StepProfile()
        p.ops[("convolution", "conv", "float32", k * 3_000_000_000, 10_000_000)] += k
        p.ops[("relu", "other", "float32", 0, (7 - k) * 50_000_000)] += 2 * k + 1
        p.ops[("add_", "other", "float32", 0, 1000)] += 40 * (k % 3 + 1)
        profiles.append(p)
    steps = [1000 * k for k in range(1, 7)]
    seconds = [n * J.step_time(p, TOY, truth) for p, n in zip(profiles, steps)]
    got = J.fit_theta(profiles, steps, seconds, TOY)
    for a, b in zip((got.eta_c, got.eta_m, got.tau_launch, got.tau_step), (truth.eta_c, truth.eta_m, truth.tau_launch, truth.tau_step)):
        assert a == pytest.approx(b, rel=1e-3)


def test_shipped_calibration_reproduces_its_points_within_its_band():
    cal = J.shipped_calibration()
    device = devices.load(cal.device)
    assert cal.n_points == len(J.CLFD_ORIN_NX) == 8
    assert 0 < cal.loo_median_error <= cal.loo_max_error < 0.5
    for point in J.CLFD_ORIN_NX:
        pred = point.steps * J.step_time(J.trace_point(point), device, cal.theta)
        measured = point.hours * 3600
        assert measured / (1 + cal.loo_max_error) <= pred <= measured * (1 + cal.loo_max_error), point.name


@pytest.mark.slow
def test_shipped_calibration_is_reproducible():
    cal, shipped = J.calibrate(), J.shipped_calibration()
    assert cal.theta.eta_c == pytest.approx(shipped.theta.eta_c, rel=1e-3)
    assert cal.theta.tau_step == pytest.approx(shipped.theta.tau_step, rel=1e-3)
    assert cal.loo_max_error == pytest.approx(shipped.loo_max_error, rel=1e-2)


def test_device_profiles_are_consistent():
    names = devices.names()
    assert {"jetson-nano", "jetson-xavier-nx", "jetson-agx-xavier", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb",
            "jetson-agx-orin-64gb"} <= set(names)
    assert set(devices.describe()) == set(names)  # calibration files are not devices
    for name in names:
        d = devices.load(name)
        # FP32 peak = CUDA cores x 2 x max clock (datasheet-derived, rounded in the table)
        assert d.peak_tflops["fp32"] == pytest.approx(d.cuda_cores * 2 * d.gpu_clock_mhz * 1e6 / 1e12, rel=0.03), name
        assert d.peak_flops("tf32") >= d.peak_flops("fp32")
        assert d.clock_scale() == 1.0
    with pytest.raises(UsageError, match="unknown device"):
        devices.load("jetson-tx9")


def test_tegrastats_parser_orin_and_nano_lines():
    orin = ("08-09-2023 10:31:50 RAM 2475/15388MB (lfb 2834x4MB) SWAP 0/7694MB (cached 0MB) CPU [1%@729,0%@729] "
            "EMC_FREQ 3%@2133 GR3D_FREQ 47%@[305] VIC_FREQ 729 CPU@46.5C VDD_IN 4886mW/4886mW VDD_SOC 1471mW/1471mW")
    nano = ("RAM 1538/3964MB (lfb 2x2MB) SWAP 12/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) CPU [5%@102,off] "
            "EMC_FREQ 3%@1600 GR3D_FREQ 0%@76 APE 25 PLL@22C POM_5V_IN 1851/1851 POM_5V_GPU 0/0")
    assert J.parse_tegrastats(orin) == {"ram_used_mb": 2475, "ram_total_mb": 15388, "swap_used_mb": 0, "swap_total_mb": 7694,
                                        "emc_load_pct": 3, "gpu_load_pct": 47, "power_in_mw": 4886}
    n = J.parse_tegrastats(nano)
    assert (n["ram_used_mb"], n["swap_used_mb"], n["gpu_load_pct"], n["power_in_mw"]) == (1538, 12, 0, 1851)
    assert J.parse_tegrastats("garbage") == {}


def test_tegrastats_reader_keeps_peak_above_baseline():
    lines = ["RAM 1000/8000MB SWAP 0/100MB VDD_IN 5000mW/5000mW", "RAM 1600/8000MB SWAP 0/100MB VDD_IN 7000mW/6000mW",
             "RAM 1200/8000MB SWAP 5/100MB VDD_IN 6000mW/6000mW"]
    script = "import time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines)
    t = J.Tegrastats([sys.executable, "-c", script])
    assert t.start()
    t._thread.join(timeout=20)
    s = t.stop()
    assert s["samples"] == 3
    assert s["peak_system_ram_bytes"] == 600 * 2**20
    assert s["swap_grew_mb"] == 5
    assert s["mean_power_in_mw"] == pytest.approx(6000)


def _fake_jetson(tmp_path, model: str, mem_kb: int):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R35 (release), REVISION: 4.1\n")
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\x00")
    (tmp_path / "proc" / "meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree: 1 kB\n")
    return tmp_path


@pytest.mark.parametrize("model,mem_gb,expected", [
    ("NVIDIA Jetson Orin Nano Developer Kit", 7.4, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Nano Developer Kit", 3.9, "jetson-nano"),
    ("NVIDIA Orin NX Developer Kit", 15.3, "jetson-orin-nx-16gb"),
    ("NVIDIA Orin NX Developer Kit", 7.4, "jetson-orin-nx-8gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", 61.3, "jetson-agx-orin-64gb"),
    ("Jetson-AGX", 31.0, "jetson-agx-xavier"),
    ("Some Other Tegra Board", 4.0, None),
    ("NVIDIA Jetson AGX Xavier Developer Kit", 31.0, "jetson-agx-xavier"),
])
def test_detect_from_device_tree(tmp_path, model, mem_gb, expected):
    info = devices.detect(_fake_jetson(tmp_path, model, int(mem_gb * 2**20)))
    assert info.model == model and info.l4t.startswith("# R35")
    assert info.profile == expected


def test_not_a_jetson(tmp_path):
    assert devices.detect(tmp_path) is None
