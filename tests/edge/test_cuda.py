"""The profiler's CUDA paths: FLOPs as on the CPU, allocator peaks reset per experience, CUDA-event
step times, and the 'measured' Jetson branch (a Jetson is a CUDA device; here one is faked).

Skipped without a CUDA GPU (CI has none); run on a GPU machine with
`pytest tests/edge/test_cuda.py`.
"""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from clbench.edge import flops as fl
from clbench.edge.flops import measure_flops
from clbench.edge.profiler import WARMUP_STEPS, EdgeProfiler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clbench import config as C
from clbench.engine.runner import RunSpec, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _conv_stack_step(device):
    """Plain, depthwise and strided convolutions and a linear head: torch over-counts the depthwise
    weight gradient on every device."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).to(device)
    x, y = torch.randn(4, 3, 16, 16, device=device), torch.randint(0, 10, (4,), device=device)
    analytic = (2 * fl.conv2d_flops(4, 3, 8, 16, 16, 3, 3) + 3 * fl.conv2d_flops(4, 8, 8, 16, 16, 3, 3, groups=8)
                + 3 * fl.conv2d_flops(4, 8, 16, 8, 8, 3, 3) + 3 * fl.linear_flops(4, 16, 10))
    return (lambda: F.cross_entropy(model(x), y).backward()), analytic


def _attention_step(device):
    """Multi-head attention: CUDA runs a fused SDPA kernel that torch counts; the CPU kernel is
    the one clbench corrects, so both must give the same figure."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).to(device)
    x = torch.randn(1, 16, 64, device=device)
    attention = fl.sdpa_flops(1, 4, 16, 16, 16, 16)
    analytic = fl.mha_flops(1, 16, 64) + fl.linear_flops(16, 64, 192) + 2 * fl.linear_flops(16, 64, 64) + 5 * attention // 2
    return (lambda: mha(x, x, x, need_weights=False)[0].sum().backward()), analytic


@pytest.mark.parametrize("make_step", [_conv_stack_step, _attention_step])
def test_a_training_step_counts_the_same_flops_on_cuda_as_on_cpu(make_step):
    counts = {}
    for device in ("cpu", "cuda"):
        step, analytic = make_step(device)
        counts[device] = measure_flops(step)
        assert counts[device] == analytic, device
    assert counts["cuda"] == counts["cpu"]


class _Blob(pl.LightningModule):
    """A two-layer MLP whose steps can hold a large temporary tensor on the GPU."""

    def __init__(self, blob_mib: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        self.blob_mib = blob_mib

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        blob = torch.ones(self.blob_mib * 2**20 // 4, device=self.device) if self.blob_mib else None
        loss = F.cross_entropy(self.net(x), y)
        del blob
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_on_cuda(module, profiler, n=8, batch=4):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    trainer = pl.Trainer(max_epochs=1, accelerator="gpu", devices=1, logger=False, callbacks=[profiler],
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, DataLoader(data, batch_size=batch))


def test_cuda_peak_is_the_allocators_and_resets_per_experience():
    prof = EdgeProfiler(flops="off")
    prof.start_experience(0)
    _fit_on_cuda(_Blob(blob_mib=64), prof)
    first = prof.end_experience(_Blob())
    prof.start_experience(1)
    _fit_on_cuda(_Blob(), prof)
    second = prof.end_experience(_Blob())
    assert first["peak_memory_kind"] == second["peak_memory_kind"] == "cuda_allocator"
    assert first["peak_memory_bytes"] == first["peak_alloc_bytes"] >= 64 * 2**20
    assert first["peak_reserved_bytes"] >= first["peak_alloc_bytes"]
    # the fit's own allocations (the cuBLAS workspaces among them: about 64 MiB on an H100) are in both
    # peaks, the blob only in the first (give or take a few small tensors): the reset forgot it
    assert 0 < second["peak_alloc_bytes"] <= first["peak_alloc_bytes"] - 63 * 2**20


def test_on_a_jetson_the_time_is_measured_not_estimated(monkeypatch):
    from clbench.edge import devices, jetson

    orin = devices.JetsonInfo(model="NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
                              l4t="# R36 (release), REVISION: 4.0", memory_gb=16.0, profile="jetson-orin-nx-16gb")
    monkeypatch.setattr(devices, "detect", lambda root="/": orin)
    monkeypatch.setattr(jetson, "power_mode_name", lambda: "MAXN")
    prof = EdgeProfiler(flops="sample")
    prof.start_experience(0)
    _fit_on_cuda(_Blob(), prof, n=4 * (WARMUP_STEPS + 10))
    rec = prof.end_experience(_Blob())
    assert rec["jetson"]["source"] == "measured:jetson-orin-nx-16gb:MAXN"
    assert rec["jetson"]["time_s"] == rec["train_time_s"]
    assert rec["jetson"]["label"] == f"{rec['train_time_s']:.2f} s measured"
    # CUDA-event times (in seconds) of the ten steps after the warm-up: a median under a tenth of the fit
    assert 0 < rec["step_time_median_s"] < rec["train_time_raw_s"] / 10
    assert prof.totals()["jetson"]["source"] == "measured:jetson-orin-nx-16gb:MAXN"


def _er_run(tmp_path, accelerator: str, profile: bool = True):
    cfg = C.RunConfig(epochs=4, progress=False, output_dir=str(tmp_path / f"{accelerator}-{int(profile)}"),
                      profile=profile, accelerator=accelerator, checkpoint=False)
    result = run(RunSpec("er", "digits-5", run=cfg, seed=3))
    assert result.status == "completed"
    return result


def test_a_profiled_cuda_run_counts_what_the_cpu_run_counts_and_times_steps_with_events(tmp_path):
    gpu, cpu = _er_run(tmp_path, "gpu"), _er_run(tmp_path, "cpu")
    for g, c in zip(gpu.edge["per_experience"], cpu.edge["per_experience"], strict=True):
        assert g["peak_memory_kind"] == "cuda_allocator" and c["peak_memory_kind"] == "cpu_rss"
        # parameters and their gradients are live together at the optimiser step
        assert g["peak_alloc_bytes"] >= 2 * 4 * g["trainable_params"]
        assert (g["train_flops_exp"], g["fwd_flops_per_sample"], g["steps"]) == (
            c["train_flops_exp"], c["fwd_flops_per_sample"], c["steps"])
        assert g["steps"] > WARMUP_STEPS + 5  # so that some steps are timed by CUDA events
        assert 0 < g["step_time_median_s"] < g["train_time_s"] / 5
    assert gpu.edge["totals"]["peak_memory_kind"] == "cuda_allocator"


def test_the_profiler_leaves_a_cuda_run_unchanged(tmp_path):
    with_p, without = _er_run(tmp_path, "gpu"), _er_run(tmp_path, "gpu", profile=False)
    assert with_p.accuracy_matrix == without.accuracy_matrix
