"""FLOP counts against the analytic formulas and the spec's checked reference values."""

import functools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from clbench.edge import flops as fl
from clbench.edge.flops import Counter, measure_flops
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def test_conv2d_forward_matches_reference_value():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    x = torch.randn(1, 3, 32, 32)
    assert measure_flops(lambda: conv(x)) == 884_736 == fl.conv2d_flops(1, 3, 16, 32, 32, 3, 3)


def test_depthwise_conv_forward_and_training_step_are_group_correct():
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    x = torch.randn(1, 16, 32, 32, requires_grad=True)
    assert measure_flops(lambda: conv(x)) == 294_912
    # torch alone reports 5,013,504 for this step (grad-weight over-counted x16)
    assert measure_flops(lambda: conv(x).sum().backward()) == 884_736


@pytest.mark.parametrize(
    "c_in,c_out,k,stride,dilation,groups,size",
    [(8, 16, 3, 2, 1, 1, 17), (8, 8, 3, 1, 2, 8, 16), (12, 24, 5, 2, 2, 4, 21), (6, 4, 1, 1, 1, 2, 9)],
)
def test_strided_dilated_grouped_conv_training_step(c_in, c_out, k, stride, dilation, groups, size):
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, dilation=dilation, groups=groups, padding=dilation)
    x = torch.randn(3, c_in, size, size, requires_grad=True)
    h_out = (size + 2 * dilation - dilation * (k - 1) - 1) // stride + 1
    f = fl.conv2d_flops(3, c_in, c_out, h_out, h_out, k, k, groups)
    assert measure_flops(lambda: conv(x)) == f
    assert measure_flops(lambda: conv(x).sum().backward()) == 3 * f
    # first layer: no input gradient, so forward + grad-weight only
    x0 = x.detach()
    assert measure_flops(lambda: conv(x0).sum().backward()) == 2 * f


def test_linear_with_batch_and_backward():
    lin = nn.Linear(512, 10)
    x = torch.randn(8, 512)
    assert measure_flops(lambda: lin(x)) == 81_920 == fl.linear_flops(8, 512, 10)
    xg = x.clone().requires_grad_(True)
    assert measure_flops(lambda: lin(xg).sum().backward()) == 3 * 81_920


def test_multihead_attention_on_cpu_counts_the_attention_products():
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(1, 16, 64)
    assert fl.mha_flops(1, 16, 64) == 589_824
    assert measure_flops(lambda: mha(x, x, x, need_weights=False)) == 589_824
    # backward: projections 2x (input needs no grad: in_proj weight grad only) and fused SDPA 2.5x
    attention = fl.sdpa_flops(1, 4, 16, 16, 16, 16)
    step = 589_824 + fl.linear_flops(16, 64, 192) + 2 * fl.linear_flops(16, 64, 64) + 5 * attention // 2
    assert measure_flops(lambda: mha(x, x, x, need_weights=False)[0].sum().backward()) == step == 1_409_024


def test_sdpa_functional_on_cpu():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    assert measure_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == fl.sdpa_flops(2, 3, 5, 7, 8, 4) == 2 * 2 * 3 * 5 * 7 * (8 + 4)


def test_haar_dwt_as_grouped_conv_and_rfft():
    x = torch.randn(1, 3, 32, 32)
    haar = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [-1.0, -1.0]], [[1.0, -1.0], [1.0, -1.0]], [[1.0, -1.0], [-1.0, 1.0]]]) / 2
    w = haar.unsqueeze(1).repeat(3, 1, 1, 1)  # 4 sub-bands per channel
    assert measure_flops(lambda: F.conv2d(x, w, stride=2, groups=3)) == 24_576 == fl.haar_dwt2_flops(3, 32, 32)
    s = torch.randn(4, 64)
    assert measure_flops(lambda: torch.fft.rfft(s)) == 4 * 960 == fl.fft_flops(64, 4, real=True)
    assert measure_flops(lambda: torch.fft.fft(s.to(torch.complex64))) == 4 * 5 * 64 * 6


def test_clbench_haar_ops_count_the_haar_formula_both_ways():
    from clbench.models.wavelets import haar_dwt, haar_idwt

    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert measure_flops(lambda: haar_dwt(x)) == 24_576 == fl.haar_dwt2_flops(3, 32, 32)
    # the backward is the inverse transform of the two output gradients: the same 8 H W per channel
    assert measure_flops(lambda: sum(t.sum() for t in haar_dwt(x)).backward()) == 2 * 24_576
    ll, details = haar_dwt(x.detach())
    assert measure_flops(lambda: haar_idwt(ll, details)) == 24_576
    assert measure_flops(lambda: haar_dwt(torch.empty(2, 4, 16, 8, device="meta"))) == 8 * 16 * 8 * 8


def test_clfd_encoder_counts_its_dwt_and_three_1x1_convs():
    from clbench.strategies.clfd import FrequencyEncoder

    enc = FrequencyEncoder(3)
    x = torch.randn(2, 3, 32, 32)
    # per image: DWT 8*32*32*3; then on 16x16: low 3->1, all bands 12->1, high 9->1 (2 FLOPs per MAC)
    per_image = 24_576 + 2 * 16 * 16 * (3 + 12 + 9)
    assert measure_flops(lambda: enc(x)) == 2 * per_image == 2 * 36_864


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def _cnn_step_analytic(n: int) -> int:
    c1 = fl.conv2d_flops(n, 3, 8, 16, 16, 3, 3)
    dw = fl.conv2d_flops(n, 8, 8, 16, 16, 3, 3, groups=8)
    c3 = fl.conv2d_flops(n, 8, 16, 8, 8, 3, 3)
    fc = fl.linear_flops(n, 16, 10)
    return 2 * c1 + 3 * dw + 3 * c3 + 3 * fc  # the first conv needs no input gradient


def test_small_cnn_training_step_and_meta_device_agree():
    model = _small_cnn()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    real = measure_flops(lambda: F.cross_entropy(model(x), y).backward())
    assert real == _cnn_step_analytic(4)
    meta_model = _small_cnn().to("meta")
    xm, ym = torch.empty(4, 3, 16, 16, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    assert measure_flops(lambda: F.cross_entropy(meta_model(xm), ym).backward()) == real


def test_trace_sees_the_same_flops_and_moves_bytes():
    model = _small_cnn()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with Counter(trace=True) as c:
        F.cross_entropy(model(x), y).backward()
    assert c.profile.flops == c.total == _cnn_step_analytic(4)
    kinds = {k[1] for k in c.profile.ops}
    assert {"conv", "matmul", "other"} <= kinds
    assert c.profile.bytes >= 4 * 3 * 16 * 16 * 4  # at least the input was read


def test_torch_behaviour_reports_what_was_corrected():
    b = fl.torch_behaviour()
    # the labels say what this torch's own FlopCounterMode does on the two known cases
    with FlopCounterMode(display=False) as raw:
        fl._depthwise_step()
    raw_exact = raw.get_total_flops() == 3 * fl.conv2d_flops(1, 16, 16, 32, 32, 3, 3, groups=16)
    assert b["grouped_conv_weight_grad"].startswith("torch already exact" if raw_exact else "corrected")
    with FlopCounterMode(display=False) as raw:
        fl._cpu_sdpa()
    assert b["cpu_sdpa"].startswith("corrected" if raw.get_total_flops() == 0 else "torch already exact")


def test_torch_behaviour_raises_when_a_correction_disagrees_with_the_analytic_count(monkeypatch):
    # a torch upgrade that changed a formula under a correction must stop runs, not mis-count them
    monkeypatch.setitem(fl._CORRECTIONS, torch.ops.aten.convolution_backward, lambda *a, **k: 0)
    fl.torch_behaviour.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="depthwise conv step 294912 \\(expected 884736\\)"):
            fl.torch_behaviour()
    finally:
        fl.torch_behaviour.cache_clear()


def test_fft_flops_formula():
    assert fl.fft_flops(8) == 5 * 8 * 3
    assert fl.fft_flops(8, vectors=2, real=True) == 2 * 60
    assert fl.fft_flops(1) == 0
    assert fl.fft_flops(10) == round(5 * 10 * math.log2(10))


def test_cifar_resnet18_forward_and_training_step_reference_values():
    import timm

    import clbench.models.backbones  # noqa: F401  (registers resnet18_cifar with timm)

    with torch.device("meta"):
        model = timm.create_model("resnet18_cifar", num_classes=10)
    model.eval()
    fwd = measure_flops(lambda: model(torch.empty(1, 3, 32, 32, device="meta")))
    assert fwd == pytest.approx(1.111e9, rel=0.005)
    model.train()
    x, y = torch.empty(64, 3, 32, 32, device="meta"), torch.zeros(64, dtype=torch.long, device="meta")
    step = measure_flops(lambda: F.cross_entropy(model(x), y).backward())
    assert step == pytest.approx(213.06e9, rel=1e-4)
    assert 2.99 < step / (64 * fwd) < 3.0  # the first conv needs no input gradient


def _mlp_sgd_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # foreach ops on tensor lists
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    step()  # momentum buffers exist from here on, as in every later step
    return step


def _cnn_step():
    model = _small_cnn()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    return lambda: F.cross_entropy(model(x), y).backward()


def _attention_and_fft_step():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    return lambda: (mha(x, x, x, need_weights=False)[0].sum() + torch.fft.rfft(x).abs().sum()).backward()


@pytest.mark.parametrize("make_step", [_mlp_sgd_step, _cnn_step, _attention_and_fft_step])
def test_lean_dispatch_counts_and_traces_exactly_what_torchs_own_path_does(make_step):
    runs = {}
    for lean in (True, False):
        torch.manual_seed(0)
        step = make_step()  # fresh state: a second backward would add gradient-accumulation ops
        counter = fl._TracingFlopCounter(dict(fl._CORRECTIONS), lean=lean)
        with counter:
            step()
        runs[lean] = (counter.get_total_flops(), counter.get_flop_counts()["Global"], counter.profile.ops)
    assert runs[True][0] > 0
    assert runs[True] == runs[False]


def test_a_reused_counter_starts_every_count_afresh():
    lin, x = nn.Linear(512, 10), torch.randn(8, 512)
    counter = Counter(trace=True)
    for _ in range(2):
        counter.start()
        lin(x)
        counter.stop()
        assert counter.total == counter.profile.flops == fl.linear_flops(8, 512, 10)


def test_shape_mapper_maps_like_torchs_pytree_map():
    from collections import namedtuple

    from torch.utils._pytree import tree_map

    pair = namedtuple("pair", "a b")
    t = torch.zeros(2, 3)
    value = (t, [t, 4, (t,)], {"k": t}, pair(t, 1.5), torch.Size([5, 6]), None, "s")
    expected = tree_map(lambda v: v.shape if isinstance(v, torch.Tensor) else v, value)
    assert fl._shapes(value) == expected
    assert type(fl._shapes(value)[3]) is pair


def test_trace_bytes_are_tensors_read_plus_written_and_views_move_nothing():
    a, b = torch.randn(4, 6), torch.randn(2, 6)
    with Counter(trace=True) as c:
        torch.cat([a, b])  # a list of tensors in: 24 + 12 floats read, 36 written
        a.sum(dim=[0])  # the dim list holds no tensor: 24 read, 6 written
        a.t()  # a view: no entry
    bytes_and_calls = {k[0]: (k[4], n) for k, n in c.profile.ops.items()}
    assert bytes_and_calls == {"cat": ((24 + 12 + 36) * 4, 1), "sum": ((24 + 6) * 4, 1)}


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_first_count_inside_no_grad_works(context):
    """The self-test behind the first Counter() runs a backward; it must not inherit the caller's
    no_grad. A fresh interpreter, so that the cached self-test of earlier tests cannot hide a failure."""
    script = textwrap.dedent(f"""
        import torch
        from clbench.edge import flops
        assert flops.torch_behaviour.cache_info().currsize == 0  # nothing ran the self-test yet
        conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        with torch.{context}():
            print(flops.measure_flops(lambda: conv(torch.randn(1, 3, 32, 32))))
        assert torch.is_grad_enabled()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "884736"


def test_an_inverse_real_fft_counts_half_the_complex_formula_over_its_output_length():
    """irfft is counted on its real output: 2.5 n log2 n per transformed vector, n the product of the
    output's transformed sizes (not of the half-spectrum input's)."""
    spectrum = torch.randn(4, 33, dtype=torch.complex64)  # 4 vectors -> 64 real samples each
    assert measure_flops(lambda: torch.fft.irfft(spectrum)) == 4 * 2.5 * 64 * 6 == 3840
    # a length that is not a power of two: 4 * 2.5 * 10 * log2(10) = 332.19...
    assert measure_flops(lambda: torch.fft.irfft(spectrum, n=10)) == 332
    # two transformed dims: one 8 x 16 = 128-point transform per batch element
    assert measure_flops(lambda: torch.fft.irfft2(torch.randn(2, 8, 9, dtype=torch.complex64))) == 2 * 2.5 * 128 * 7
    # non-adjacent dims of a (3, 4, 6, 8) output: n = 4 * 8 = 32, over 3 * 6 = 18 vectors
    spectra = torch.randn(3, 4, 6, 5, dtype=torch.complex64)
    assert measure_flops(lambda: torch.fft.irfftn(spectra, dim=(1, 3))) == 18 * 2.5 * 32 * 5 == 7200


def test_step_profile_scales_adds_and_summarises_its_op_tally():
    """A profile of k steps is the one-step tally times k; two profiles add call counts op by op."""
    from collections import Counter as Tally

    mm = ("mm", "matmul", "float32", 100, 40)
    relu = ("relu", "other", "float32", 0, 8)
    conv = ("convolution", "conv", "float32", 50, 30)
    one = fl.StepProfile(Tally({mm: 2, relu: 3}))
    three = one.scaled(3)
    assert three.ops == Tally({mm: 6, relu: 9})
    assert all(type(n) is int for n in three.ops.values())
    assert (three.flops, three.bytes, three.n_ops) == (600, 6 * 40 + 9 * 8, 15)
    both = one + fl.StepProfile(Tally({mm: 1, conv: 1}))
    assert both.ops == Tally({mm: 3, relu: 3, conv: 1})
    assert both.summary() == {"flops": 3 * 100 + 50, "bytes": 3 * 40 + 3 * 8 + 30, "ops": 7}
    assert one.ops == Tally({mm: 2, relu: 3})  # the operands are left as they were


def test_by_op_names_each_counted_op_with_its_flops():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    lin = nn.Linear(512, 10)
    x, z = torch.randn(1, 3, 32, 32), torch.randn(8, 512)
    with Counter() as c:
        conv(x)
        lin(z)
        lin(z)
    assert c.by_op() == {"convolution": 884_736, "addmm": 2 * 81_920}


def test_by_op_is_empty_when_nothing_with_flops_ran():
    x = torch.randn(4, 4)
    with Counter() as c:
        (x + 1).relu()
    assert c.by_op() == {} and c.total == 0


def test_by_op_names_an_entry_without_a_name_by_its_string():
    """The counts are keyed by op packets; any other key (one without a __name__) is shown by its str."""

    class Kernel:
        def __str__(self):
            return "some_kernel"

    lin, z = nn.Linear(512, 10, bias=False), torch.randn(8, 512)
    with Counter() as c:
        lin(z)
    c._fcm.flop_counts["Global"][Kernel()] += 7
    assert c.by_op() == {"mm": 81_920, "some_kernel": 7}


@functools.lru_cache(maxsize=None)
def _test_ops():
    """Two custom ops (defined once per process): each returns 2 * x."""
    ops = []
    for name in ("twice_a", "twice_b"):
        @torch.library.custom_op(f"clbench_flops_test::{name}", mutates_args=())
        def twice(x: torch.Tensor) -> torch.Tensor:
            return 2 * x

        @twice.register_fake
        def _(x):
            return torch.empty_like(x)

        ops.append(getattr(torch.ops.clbench_flops_test, name))
    return ops


@functools.lru_cache(maxsize=None)
def _test_op_with_a_keyword_tensor():
    """An op (defined once per process) with a keyword-only tensor: x * scale."""
    lib = torch.library.Library("clbench_flops_test", "FRAGMENT")
    lib.define("scale_by(Tensor x, *, Tensor scale) -> Tensor")
    lib.impl("scale_by", lambda x, *, scale: x * scale, "CompositeExplicitAutograd")
    _test_op_with_a_keyword_tensor.library = lib  # the registration lives as long as the library object
    return torch.ops.clbench_flops_test.scale_by


@functools.lru_cache(maxsize=None)
def _test_ops_with_a_keyword():
    """Two custom ops (defined once per process) with a keyword-only factor: each returns k * x."""
    ops = []
    for name in ("times_k", "times_k_raw"):
        @torch.library.custom_op(f"clbench_flops_test::{name}", mutates_args=())
        def times(x: torch.Tensor, *, k: int) -> torch.Tensor:
            return k * x

        @times.register_fake
        def _(x, *, k):
            return torch.empty_like(x)

        ops.append(getattr(torch.ops.clbench_flops_test, name))
    return ops


def test_a_registered_formula_counts_a_custom_op_given_as_packet_or_overload(monkeypatch):
    monkeypatch.setattr(fl, "_CORRECTIONS", dict(fl._CORRECTIONS))  # registrations stay in this test
    by_packet, by_overload = _test_ops()

    def per_element(k):
        return lambda x_shape, out_shape=None, **_: k * math.prod(out_shape)

    f_a, f_b = per_element(3), per_element(5)
    assert fl.register_flop_formula(by_packet)(f_a) is f_a
    assert fl.register_flop_formula(by_overload.default)(f_b) is f_b
    x = torch.randn(2, 6)
    with Counter() as c:
        by_packet(x)
        by_overload(x)
    assert c.by_op() == {"twice_a": 3 * 12, "twice_b": 5 * 12}
    assert c.total == 8 * 12


def test_a_two_point_fft_costs_ten_flops_per_vector():
    """The smallest transform that counts: 5 * 2 * log2(2) = 10 per complex vector (a 1-point one is free)."""
    assert fl.fft_flops(2) == 10
    assert measure_flops(lambda: torch.fft.fft(torch.randn(3, 2, dtype=torch.complex64))) == 3 * 10
    assert measure_flops(lambda: torch.fft.fft(torch.randn(3, 1, dtype=torch.complex64))) == 0


def test_multihead_attention_formula_scales_with_the_batch():
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 16, 64)
    # 32 rows through Q/K/V (64 -> 192) and out (64 -> 64), then QK^T and AV: 2 * (2 * 16 * 16 * 64) each
    expected = 2 * 32 * 64 * 192 + 2 * 32 * 64 * 64 + 4 * 2 * 16 * 16 * 64
    assert fl.mha_flops(2, 16, 64) == expected == 2 * 589_824
    assert measure_flops(lambda: mha(x, x, x, need_weights=False)) == expected


def test_transposed_conv_training_step_counts_its_input_side_three_times():
    """A transposed conv scatters each input pixel over the kernel: 2 N H_in W_in C_in (C_out/g) K_h K_w
    forward, and its grad-input and grad-weight convolutions cost the same again each."""
    deconv = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    f = 2 * 2 * 5 * 5 * 8 * (4 // 2) * 3 * 3
    assert deconv(x).shape == (2, 4, 10, 10)
    assert measure_flops(lambda: deconv(x)) == f == 14_400
    assert measure_flops(lambda: deconv(x).sum().backward()) == 3 * f
    x0 = x.detach()  # no input gradient: forward + grad-weight only
    assert measure_flops(lambda: deconv(x0).sum().backward()) == 2 * f


def test_registered_formulas_get_keyword_only_arguments_on_the_lean_and_torchs_path(monkeypatch):
    """A formula on shapes and a raw one (`_get_raw`: it takes the tensors, as torch's are marked) both
    see an op's keyword-only arguments and its output, whichever dispatch path counts the op."""
    monkeypatch.setattr(fl, "_CORRECTIONS", dict(fl._CORRECTIONS))
    on_shapes_op, raw_op = _test_ops_with_a_keyword()

    @fl.register_flop_formula(on_shapes_op)
    def per_element(x_shape, *, k, out_shape=None, **_):
        return k * math.prod(out_shape)

    def raw(x, *, k, out_val=None, **_):
        assert isinstance(x, torch.Tensor) and isinstance(out_val, torch.Tensor)
        return 100 * k + out_val.numel()

    raw._get_raw = True
    fl.register_flop_formula(raw_op)(raw)
    x = torch.randn(3, 4)
    for lean in (True, False):
        counter = fl._TracingFlopCounter(dict(fl._CORRECTIONS), lean=lean)
        with counter:
            on_shapes_op(x, k=5)
            raw_op(x, k=7)
        assert counter.get_flop_counts()["Global"] == {on_shapes_op: 5 * 12, raw_op: 700 + 12}, lean
        assert counter.profile.flops == 5 * 12 + 712


def test_trace_records_each_ops_kind_precision_flops_bytes_and_calls():
    """Every traced op: (name, kind, precision = first floating input, else output, else "none", FLOPs,
    bytes read + written) -> calls; GEMMs and attention are 'matmul', convolutions 'conv'."""
    a, b = torch.randn(4, 6), torch.randn(6, 5)
    q = torch.zeros(1, 1, 4, 8)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with Counter(trace=True) as c:
        a @ b
        F.scaled_dot_product_attention(q, q, q)
        F.conv2d(x, w)
        a.to(torch.float16)  # the dtype is a keyword argument; the precision is the input's
        torch.arange(6)  # no tensor in, integers out
        torch.zeros(3, 4)  # no tensor in, floats out
        for _ in range(2):
            torch.max(a, dim=1)  # two outputs: values and indices
        a.view(24)
    assert dict(c.profile.ops) == {
        ("mm", "matmul", "float32", 2 * 4 * 6 * 5, (24 + 30 + 20) * 4): 1,
        # out (1, 1, 4, 8) and its logsumexp (1, 1, 4) written
        ("_scaled_dot_product_flash_attention_for_cpu", "matmul", "float32", 2 * 2 * 4 * 4 * 8, (3 * 32 + 32 + 4) * 4): 1,
        ("convolution", "conv", "float32", 2 * 27 * 2 * 9, (50 + 54 + 27) * 4): 1,
        ("_to_copy", "other", "float32", 0, 24 * 4 + 24 * 2): 1,
        ("arange", "other", "none", 0, 6 * 8): 1,
        ("zeros", "other", "float32", 0, 12 * 4): 1,
        ("max", "other", "float32", 0, 24 * 4 + 4 * 4 + 4 * 8): 2,
    }
    assert c.profile.summary() == {"flops": 240 + 512 + 972, "bytes": 296 + 528 + 524 + 144 + 48 + 48 + 2 * 144, "ops": 8}


def test_trace_bytes_include_keyword_tensors_on_the_lean_and_torchs_path():
    op = _test_op_with_a_keyword_tensor()
    x, scale = torch.randn(3, 4), torch.randn(4, dtype=torch.float64)
    for lean in (True, False):
        counter = fl._TracingFlopCounter(dict(fl._CORRECTIONS), lean=lean)
        with counter:
            op(x, scale=scale)
        # x (12 float32) and scale (4 float64) read, 12 float64 (the promoted type) written
        assert dict(counter.profile.ops) == {("scale_by", "other", "float32", 0, 12 * 4 + 4 * 8 + 12 * 8): 1}, lean


def test_a_counter_counts_only_between_start_and_stop_and_stopping_twice_is_harmless():
    lin, x = nn.Linear(512, 10), torch.randn(8, 512)
    c = Counter()
    assert c.active is False
    c.stop()  # never started: nothing to stop
    assert c.start() is c and c.active is True
    lin(x)
    c.stop()
    assert c.active is False
    lin(x)  # after the stop: not counted
    c.stop()
    assert c.active is False and c.total == fl.linear_flops(8, 512, 10)
    assert c.profile is None  # no trace unless asked for


def test_only_torchs_own_path_attributes_counts_to_modules():
    """The lean counter files every count under "Global" only; lean=False is torch's own path, with its
    per-module attribution."""
    model = nn.Sequential(nn.Linear(16, 4, bias=False))
    x = torch.randn(2, 16)
    counts = {}
    for lean in (True, False):
        counter = fl._TracingFlopCounter(dict(fl._CORRECTIONS), lean=lean)
        with counter:
            model(x)
        counts[lean] = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    assert counts[True] == {"Global": 2 * 2 * 16 * 4}
    assert counts[False]["Global"] == 2 * 2 * 16 * 4 and len(counts[False]) > 1


@functools.lru_cache(maxsize=None)
def _test_op_with_two_half_outputs():
    """An op (defined once per process) returning two float16 copies of its input."""
    lib = torch.library.Library("clbench_flops_test", "FRAGMENT")
    lib.define("two_halves(Tensor x) -> (Tensor, Tensor)")
    lib.impl("two_halves", lambda x: (x.half(), x.half()), "CompositeExplicitAutograd")
    _test_op_with_two_half_outputs.library = lib
    return torch.ops.clbench_flops_test.two_halves


def test_an_op_with_several_outputs_is_traced_at_its_inputs_precision():
    op = _test_op_with_two_half_outputs()
    x = torch.randn(3, 4)
    with Counter(trace=True) as c:
        op(x)
    assert dict(c.profile.ops) == {("two_halves", "other", "float32", 0, 12 * 4 + 2 * 12 * 2): 1}


def test_a_raw_formula_gets_tensors_when_it_wraps_another_function_or_is_a_callable_object(monkeypatch):
    monkeypatch.setattr(fl, "_CORRECTIONS", dict(fl._CORRECTIONS))
    wrapping_op, object_op = _test_ops()

    def on_shapes(*_, **__):
        raise AssertionError("a raw formula must not be unwrapped")

    @functools.wraps(on_shapes)
    def wrapping(x, out_val=None, **_):
        assert isinstance(x, torch.Tensor)
        return x.numel()

    class Formula:
        _get_raw = True

        def __call__(self, x, out_val=None, **_):
            assert isinstance(x, torch.Tensor)
            return 3 * out_val.numel()

    wrapping._get_raw = True
    fl.register_flop_formula(wrapping_op)(wrapping)
    fl.register_flop_formula(object_op)(Formula())
    x = torch.randn(3, 4)
    with Counter() as c:
        wrapping_op(x)
        object_op(x)
    assert c.by_op() == {"twice_a": 12, "twice_b": 36}


def test_a_new_counter_is_lean_and_its_trace_starts_empty():
    counter = fl._TracingFlopCounter(dict(fl._CORRECTIONS))
    assert isinstance(counter.profile, fl.StepProfile) and counter.profile.n_ops == 0
    assert Counter(trace=True).profile.ops == {}
    with counter:
        nn.Sequential(nn.Linear(16, 4, bias=False))(torch.randn(2, 16))
    assert {k: sum(v.values()) for k, v in counter.get_flop_counts().items()} == {"Global": 2 * 2 * 16 * 4}


@functools.lru_cache(maxsize=None)
def _test_op_with_a_dict_of_tensors():
    """An op (defined once per process) taking a tensor and a dict of tensors: their sum."""
    lib = torch.library.Library("clbench_flops_test", "FRAGMENT")
    lib.define("sum_with_parts(Tensor first, Dict(str, Tensor) parts) -> Tensor")
    lib.impl("sum_with_parts", lambda first, parts: first + sum(parts.values()), "CompositeExplicitAutograd")
    _test_op_with_a_dict_of_tensors.library = lib
    return torch.ops.clbench_flops_test.sum_with_parts


def test_trace_bytes_include_the_tensors_of_a_dict_argument_and_an_empty_list_is_read_as_nothing():
    op = _test_op_with_a_dict_of_tensors()
    first, a, b = torch.randn(3, dtype=torch.float64), torch.randn(3), torch.randn(3, dtype=torch.float64)
    for lean in (True, False):
        counter = fl._TracingFlopCounter(dict(fl._CORRECTIONS), lean=lean)
        with counter:
            op(first, {"a": a, "b": b})
            torch.zeros([])  # its size argument is an empty list
        # first (3 float64: the first floating tensor names the precision, the dict's float32 does not
        # replace it), a (3 float32) and b (3 float64) read, 3 float64 written
        assert dict(counter.profile.ops) == {("sum_with_parts", "other", "float64", 0, 3 * 8 + 3 * 4 + 3 * 8 + 3 * 8): 1,
                                             ("zeros", "other", "float32", 0, 4): 1}, lean


def test_the_lean_path_runs_compute_and_view_ops_itself_and_counts_only_what_has_flops_or_bytes(monkeypatch):
    # the lean path is a speed feature: its counts equal torch's path (tested above) whichever
    # way an op is routed, so only the routing itself can show that it is taken
    via_torch, counted = [], []
    torch_path = torch.utils.flop_counter._FlopCounterMode.__torch_dispatch__
    count_direct = fl._TracingFlopCounter._count_direct

    def spy_torch_path(self, func, types, args=(), kwargs=None):
        via_torch.append(func)
        return torch_path(self, func, types, args, kwargs)

    def spy_count_direct(self, entry, out, args, kwargs):
        counted.append(entry[5])
        return count_direct(self, entry, out, args, kwargs)

    monkeypatch.setattr(torch.utils.flop_counter._FlopCounterMode, "__torch_dispatch__", spy_torch_path)
    monkeypatch.setattr(fl._TracingFlopCounter, "_count_direct", spy_count_direct)
    aten = torch.ops.aten
    lin, x = nn.Linear(16, 4), torch.randn(2, 16)
    counter = fl._TracingFlopCounter(dict(fl._CORRECTIONS))
    with counter:
        lin(x).view(8).sum()
    assert counter.get_total_flops() == 2 * 2 * 16 * 4
    assert via_torch == []
    assert aten.addmm.default in counted and aten.sum.default in counted
    assert aten.t.default not in counted and aten.view.default not in counted
    entry = counter._direct[id(aten.addmm.default)]
    assert entry[5] is aten.addmm.default and entry[1] is counter.flop_registry[aten.addmm]


def test_torchs_size_queries_take_torchs_path():
    # torch answers these queries with NotImplemented so that the tensor's own policy handles them
    assert not any(fl._runs_directly(op) for op in fl._TORCH_SKIPPED)
    assert fl._runs_directly(torch.ops.aten.mm.default) and fl._runs_directly(torch.ops.aten.view.default)
    assert not fl._runs_directly(torch.ops.aten.mm)  # a packet, not an overload


def test_every_op_with_a_flop_formula_moves_data():
    # why the lean path may return early on `formula is None and not moves_data` alone: an op
    # with a formula never skips the trace for moving nothing
    registry = fl._TracingFlopCounter(dict(fl._CORRECTIONS)).flop_registry
    packets = [p for p in registry if isinstance(p, torch._ops.OpOverloadPacket)]  # not higher-order ops
    assert len(packets) > 10
    assert [p for p in packets if not fl._op_facts(p)[2]] == []
