"""The gradient-scale autograd function of the CLIP core: identity forward, x k backward."""

import torch

from vlprompt.clip.model import grad_scale


def test_identity_forward_scaled_backward():
    x = torch.randn(3, 5, requires_grad=True)
    y = grad_scale(x, 7.0)
    assert torch.equal(y, x)
    w = torch.randn(3, 5)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, 7.0 * w, rtol=0, atol=0)


def test_negative_and_zero_scale():
    x = torch.randn(4, requires_grad=True)
    (grad_scale(x, -1.0) ** 2).sum().backward()  # gradient reversal
    torch.testing.assert_close(x.grad, -2 * x.detach())
    x.grad = None
    grad_scale(x, 0.0).sum().backward()
    assert torch.equal(x.grad, torch.zeros(4))


def test_scaled_branch_gives_exact_input_gradient_and_rescaled_parameter_gradient():
    """grad_scale(f(grad_scale(x, s)) * s, 1/s): x receives the exact gradient of s * f(x);
    f's parameters receive 1/s times their exact gradient."""
    torch.manual_seed(0)
    f = torch.nn.Linear(6, 6)
    s = 1e-3
    x = torch.randn(2, 6, requires_grad=True)
    (grad_scale(f(grad_scale(x, s)) * s, 1 / s)).pow(2).sum().backward()
    gx, gw = x.grad.clone(), f.weight.grad.clone()
    x.grad = None
    f.zero_grad()
    (f(x) * s).pow(2).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(gw, f.weight.grad / s, rtol=1e-5, atol=0)


def test_composes_with_autocast_dtypes():
    x = torch.randn(3, dtype=torch.bfloat16, requires_grad=True)
    y = grad_scale(x, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0, dtype=torch.bfloat16))
