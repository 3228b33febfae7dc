"""The label-smoothed token cross-entropy equals F.cross_entropy, value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from sora.models.losses import token_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_token_cross_entropy_equals_torchs(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 211, generator=g, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, 211, (37,), generator=g)
    target[:5] = 7  # repeated targets: the gradient's one-hot part adds up per row, not across rows
    theirs = F.cross_entropy(logits, target, label_smoothing=smoothing)
    (their_grad,) = torch.autograd.grad(theirs * 2.5, logits)
    mine = token_cross_entropy(logits, target, smoothing)
    (my_grad,) = torch.autograd.grad(mine * 2.5, logits)
    torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(my_grad, their_grad)


def test_token_cross_entropy_float32_and_bad_input():
    logits = torch.randn(8, 50) * 10
    target = torch.arange(8)
    torch.testing.assert_close(token_cross_entropy(logits, target, 0.1),
                               F.cross_entropy(logits, target, label_smoothing=0.1), rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, 50, requires_grad=True)
    loss = token_cross_entropy(empty, torch.zeros(0, dtype=torch.long), 0.1)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        token_cross_entropy(logits[None], target, 0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        token_cross_entropy(logits, target, 1.0)
