import torch
from torch import nn

from LoRALinear import LoRALinear


def hand_set_layer():
    """base W = identity (2x2), A = [[1, 2]], B = [[1], [0]], alpha = 2, r = 1 -> scaling 2."""
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    layer = LoRALinear(base, r=1, alpha=2.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0], [0.0]]))
    return layer


def test_forward_matches_hand_computation():
    # x = [1, 1]: base gives [1, 1]; A x = 1 + 2 = 3; B (A x) = [3, 0]; times scaling 2 = [6, 0]
    layer = hand_set_layer()
    out = layer(torch.tensor([[1.0, 1.0]]))
    assert torch.equal(out, torch.tensor([[7.0, 1.0]]))


def test_delta_weight_is_scaled_B_times_A():
    assert torch.equal(hand_set_layer().delta_weight(), torch.tensor([[2.0, 4.0], [0.0, 0.0]]))


def test_merge_and_unmerge():
    layer = hand_set_layer()
    x = torch.tensor([[1.0, 1.0], [0.5, -1.0]])
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and torch.equal(layer.base.weight, torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    assert torch.allclose(layer(x), unmerged)
    layer.merge()  # a second merge must not add the update twice
    assert torch.allclose(layer(x), unmerged)
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.base.weight, torch.eye(2))
    assert torch.allclose(layer(x), unmerged)


def test_init_B_zero_A_nonzero_and_only_lora_trainable():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.1)
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.scaling == 2.0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    x = torch.randn(3, 16)
    layer.eval()
    assert torch.equal(layer(x), base(x))
