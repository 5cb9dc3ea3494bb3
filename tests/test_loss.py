import math

import torch
import torch.nn.functional as F

import train


def test_one_hot_target_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    ids, probs = torch.tensor([[0], [2]]), torch.ones(2, 1)
    assert torch.allclose(train.kl_to_targets(logits, ids, probs), F.cross_entropy(logits, torch.tensor([0, 2])))


def test_soft_targets_by_hand():
    uniform = torch.zeros(1, 2)  # the model says 0.5 / 0.5
    # p = (0.5, 0.5): the same distribution, KL 0
    assert torch.allclose(train.kl_to_targets(uniform, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]])),
                          torch.tensor(0.0), atol=1e-6)
    # p = (1, 0), the zero written out as a padded entry: KL = log(1 / 0.5) = log 2
    assert math.isclose(train.kl_to_targets(uniform, torch.tensor([[0, 0]]), torch.tensor([[1.0, 0.0]])).item(),
                        math.log(2), rel_tol=1e-6)
