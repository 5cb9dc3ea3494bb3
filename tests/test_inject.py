import pytest
import torch

from conftest import tiny_model
from inject import inject_lora, lora_modules, resolve_layers
from LoRALinear import LoRALinear


def lora_parameter_names(model):
    return {f"{name}.{part}" for name in lora_modules(model) for part in ("lora_A", "lora_B")}


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_injects_exactly_the_named_modules_of_the_chosen_layers(kind):
    model = tiny_model(kind)
    trainable, total = inject_lora(model, ["q_proj", "v_proj"], [-2, -1], r=2, alpha=4, dropout=0.0)
    assert sorted(lora_modules(model)) == [f"model.layers.{i}.self_attn.{m}" for i in (2, 3) for m in ("q_proj", "v_proj")]
    # the trainable parameters are exactly the LoRA tensors: r * (in + out) per wrapped layer
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_parameter_names(model)
    assert trainable == sum(m.r * (m.base.in_features + m.base.out_features) for m in lora_modules(model).values())
    assert total == sum(p.numel() for p in model.parameters())
    assert not isinstance(model.model.layers[1].self_attn.q_proj, LoRALinear)
    assert not isinstance(model.model.layers[3].self_attn.k_proj, LoRALinear)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_zero_B_leaves_logits_unchanged(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 96, (2, 7))
    before = model(ids).logits
    inject_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                [0, 1, 2, 3], r=4, alpha=8, dropout=0.0)
    assert torch.equal(model(ids).logits, before)


def test_one_step_moves_only_lora_tensors(qwen2):
    inject_lora(qwen2, ["q_proj", "v_proj"], [1, 3], r=2, alpha=4, dropout=0.0)
    before = {n: p.detach().clone() for n, p in qwen2.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in qwen2.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (2, 6))
    loss = qwen2(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in qwen2.named_parameters() if not torch.equal(p, before[n])}
    assert changed == lora_parameter_names(qwen2)


def test_merged_equals_unmerged_model_output(qwen2):
    inject_lora(qwen2, ["q_proj", "v_proj"], [0, 2], r=2, alpha=4, dropout=0.0)
    for m in lora_modules(qwen2).values():
        torch.nn.init.normal_(m.lora_B, std=0.5)
    ids = torch.randint(0, 96, (1, 9))
    unmerged = qwen2(ids).logits
    for m in lora_modules(qwen2).values():
        m.merge()
    assert torch.allclose(qwen2(ids).logits, unmerged, atol=1e-5)


def test_negative_layers_and_bad_inputs(qwen2):
    assert resolve_layers([-1, -4, 1], 4) == [0, 1, 3]
    with pytest.raises(ValueError, match="outside the model's 4 layers"):
        resolve_layers([4], 4)
    with pytest.raises(ValueError, match=r"not found in layer 0; its Linear layers are \[.*'q_proj'"):
        inject_lora(qwen2, ["query"], [0], r=2, alpha=4, dropout=0.0)
