"""The fused JumpReLU node against its composed definition: same values and gradients, fewer saved tensors."""

from __future__ import annotations

import pytest
import torch

from crosscoders.activations import jumprelu, jumprelu_composed


@pytest.mark.parametrize("per_source", [False, True])
@pytest.mark.parametrize("ste_to_input", [False, True])
def test_fused_jumprelu_equals_the_composed_gate(per_source, ste_to_input):
    g = torch.Generator().manual_seed(0)
    B, S, H = 64, 5, 96
    pre0 = torch.randn(B, 1, H, generator=g, dtype=torch.float64) if per_source else \
        torch.randn(B, H, generator=g, dtype=torch.float64)
    norm0 = torch.rand(S, H, generator=g, dtype=torch.float64) + 0.2 if per_source else \
        torch.rand(H, generator=g, dtype=torch.float64) + 0.2
    theta0 = torch.rand(H, generator=g, dtype=torch.float64) * 0.3
    grad = torch.randn((B, S, H) if per_source else (B, H), generator=g, dtype=torch.float64)
    out = {}
    for name, fn in (("fused", jumprelu), ("composed", jumprelu_composed)):
        pre, norm, theta = (t.clone().requires_grad_() for t in (pre0, norm0, theta0))
        f = fn(pre, norm, theta, 0.3, ste_to_input)
        (f * grad).sum().backward()
        out[name] = (f.detach(), pre.grad, norm.grad, theta.grad)
    f1, p1, n1, t1 = out["fused"]
    f2, p2, n2, t2 = out["composed"]
    assert torch.equal(f1, f2)
    assert torch.allclose(p1, p2, atol=1e-12) and torch.allclose(t1, t2, atol=1e-12)
    assert (n1 is None and n2 is None) or torch.allclose(n1, n2, atol=1e-12)
    assert bool((t1 != 0).any())  # the kernel window holds some entries: the threshold gradient is exercised


def test_fused_jumprelu_saves_no_code_sized_tensor():
    B, S, H = 32, 4, 128
    pre = torch.randn(B, 1, H, requires_grad=True)
    norm = torch.rand(S, H, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        jumprelu(pre, norm, torch.full((H,), 0.1), 0.05)
    assert max(sizes) < B * S * H
