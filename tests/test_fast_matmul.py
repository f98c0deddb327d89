"""oneDNN matrix products (sb3_ppo_ext.matmul) agree with the BLAS ones, values and gradients."""

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_ppo_ext import matmul
from sb3_ppo_ext.buffers import GAERolloutBuffer

needs_onednn = pytest.mark.skipif(not matmul.onednn_matmul_available(), reason="torch build without oneDNN matmul")


@pytest.fixture(autouse=True)
def _switch_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # these tests expect the switch on; monkeypatch restores whatever SB3_PPO_EXT_ONEDNN_MATMUL set
    monkeypatch.setitem(matmul._state, "enabled", True)


def _counting_kernel(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls that reach oneDNN, so a test can tell which branch ran."""
    calls: list[int] = []
    real = matmul._kernel()

    def kernel(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(matmul, "_kernel", lambda: kernel)
    return calls


@needs_onednn
def test_large_products_go_to_onednn_and_match_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_kernel(monkeypatch)
    g = th.Generator().manual_seed(0)
    x, w, b = th.randn(64, 256, generator=g), th.randn(300, 256, generator=g), th.randn(300, generator=g)
    th.testing.assert_close(matmul.addmm(b, x, w), th.addmm(b, x, w.t()), rtol=1e-5, atol=1e-4)
    grad = th.randn(64, 300, generator=g)
    # the backward pass's transposed operands
    th.testing.assert_close(matmul.mm(grad.t(), x), grad.t() @ x, rtol=1e-5, atol=1e-4)
    th.testing.assert_close(matmul.mm(grad, w), grad @ w, rtol=1e-5, atol=1e-4)
    assert len(calls) == 3


def test_small_products_and_switched_off_stay_on_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_kernel(monkeypatch)
    x, w = th.randn(8, 16), th.randn(4, 16)
    assert th.equal(matmul.addmm(None, x, w), x @ w.t())
    matmul.set_onednn_matmul(False)
    big_x, big_w = th.randn(64, 256), th.randn(256, 256)
    assert th.equal(matmul.linear(big_x, big_w), F.linear(big_x, big_w))
    assert th.equal(matmul.linear(big_x.double(), big_w.double()), F.linear(big_x.double(), big_w.double()))
    assert calls == []


@needs_onednn
def test_linear_gradients_match_autograd() -> None:
    g = th.Generator().manual_seed(1)
    x = th.randn(128, 512, generator=g, requires_grad=True)
    w = th.randn(256, 512, generator=g, requires_grad=True)
    b = th.randn(256, generator=g, requires_grad=True)
    upstream = th.randn(128, 256, generator=g)
    matmul.linear(x, w, b).backward(upstream)
    ours = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.linear(x, w, b).backward(upstream)
    for mine, ref in zip(ours, (x.grad, w.grad, b.grad), strict=True):
        th.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-3)
    # hand-derived: dL/dx = g W, dL/dW = g^T x, dL/db = sum g
    th.testing.assert_close(ours[0], upstream @ w.detach(), rtol=1e-4, atol=1e-3)
    th.testing.assert_close(ours[1], upstream.t() @ x.detach(), rtol=1e-4, atol=1e-3)
    th.testing.assert_close(ours[2], upstream.sum(0), rtol=1e-5, atol=1e-4)


def test_fast_linears_keep_parameters_and_state_dict() -> None:
    class Custom(nn.Linear):
        pass

    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), Custom(8, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weight = net[0].weight
    matmul.use_fast_linears(net)
    assert type(net[0]) is matmul.FastLinear and type(net[2]) is Custom
    assert net[0].weight is weight
    assert net.state_dict().keys() == before.keys()
    x = th.randn(3, 4)
    assert net(x).shape == (3, 2)


def test_broken_kernel_is_detected_and_avoided(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args):
        raise RuntimeError("no such op")

    monkeypatch.setattr(matmul, "_kernel", lambda: broken)
    monkeypatch.setitem(matmul._state, "available", None)
    assert not matmul.onednn_matmul_available()
    x, w = th.randn(64, 256), th.randn(256, 256)
    th.testing.assert_close(matmul.linear(x, w), F.linear(x, w))
    monkeypatch.setitem(matmul._state, "available", None)


def test_channels_last_buffer_hands_out_the_same_minibatches() -> None:
    from gymnasium import spaces

    space = spaces.Box(0, 255, (4, 12, 10), dtype="uint8")
    buffers = [
        GAERolloutBuffer(8, space, spaces.Discrete(3), device="cpu", n_envs=2, channels_last=layout)
        for layout in (False, True)
    ]
    rng = th.Generator().manual_seed(0)
    frames = th.randint(0, 256, (8, 2, 4, 12, 10), generator=rng, dtype=th.uint8).numpy()
    for buffer in buffers:
        for t in range(8):
            zeros = th.zeros(2)
            buffer.add(frames[t], th.zeros(2, 1).numpy(), th.ones(2).numpy(), zeros.numpy(), zeros, zeros)
        buffer.compute_returns_and_advantage(th.zeros(2), th.zeros(2).numpy())
    th.manual_seed(5)
    plain = [batch.observations for batch in buffers[0].get(6)]
    th.manual_seed(5)
    nhwc = [batch.observations for batch in buffers[1].get(6)]
    assert len(plain) == len(nhwc) == 3
    for a, b in zip(plain, nhwc, strict=True):
        assert th.equal(a, b)
        assert b.is_contiguous(memory_format=th.channels_last) and not b.is_contiguous()


@needs_onednn
def test_tracing_sees_the_standard_linear() -> None:
    layer = matmul.use_fast_linears(nn.Sequential(nn.Linear(512, 512)))
    traced = th.jit.trace(layer, th.randn(64, 512))
    assert "mkldnn" not in str(traced.graph)
    x = th.randn(64, 512)
    th.testing.assert_close(traced(x), layer(x), rtol=1e-5, atol=1e-4)


def test_auto_rule_uses_onednn_only_where_it_pays() -> None:
    from sb3_ppo_ext import ClippedPPO

    def fast_linears(model: ClippedPPO) -> int:
        return sum(type(m) is matmul.FastLinear for m in model.policy.modules())

    small = ClippedPPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, device="cpu")
    assert not small.policy.onednn_matmul and fast_linears(small) == 0
    big = ClippedPPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs=dict(net_arch=[1024, 1024]))
    assert big.policy.onednn_matmul and fast_linears(big) > 0
    forced = ClippedPPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs=dict(onednn_matmul=True))
    assert forced.policy.onednn_matmul and fast_linears(forced) == 6
    assert forced.policy._get_constructor_parameters()["onednn_matmul"] is True
    # any convolution turns it on (oneDNN already runs the convolutions)
    assert matmul.wants_onednn_matmul(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
