import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from inject import inject_lora, load_adapter, lora_modules, save_adapter


def trained_tiny(kind="qwen2", layers=(-2, -1), r=2):
    """A tiny model with LoRA on q/v whose B is random, as if it had been trained."""
    model = tiny_model(kind)
    inject_lora(model, ["q_proj", "v_proj"], list(layers), r=r, alpha=2 * r, dropout=0.0)
    torch.manual_seed(1)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.3)
    return model


def test_saved_keys_are_exactly_the_lora_set_in_peft_names(tmp_path):
    model = trained_tiny()
    save_adapter(model, tmp_path, "tiny")
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{p}.weight"
                    for i in (2, 3) for m in ("q_proj", "v_proj") for p in "AB"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    assert config["layers_to_transform"] == [2, 3] and config["target_modules"] == ["q_proj", "v_proj"]
    # only the small LoRA tensors are written, never the base weights
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") < 10_000


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_peft_loads_the_adapter_and_gives_the_same_logits(tmp_path, kind):
    from peft import PeftModel
    model = trained_tiny(kind)
    save_adapter(model, tmp_path, "tiny")
    ids = torch.randint(0, 96, (2, 8))
    ours = model(ids).logits
    peft_model = PeftModel.from_pretrained(tiny_model(kind), str(tmp_path)).eval()
    theirs = peft_model(ids).logits
    assert not torch.allclose(ours, tiny_model(kind)(ids).logits, atol=1e-3)  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_load_adapter_round_trip_and_mismatch(tmp_path):
    model = trained_tiny()
    save_adapter(model, tmp_path, "tiny")
    ids = torch.randint(0, 96, (1, 5))
    fresh = tiny_model()
    inject_lora(fresh, ["q_proj", "v_proj"], [2, 3], r=2, alpha=4, dropout=0.0)
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(ids).logits, model(ids).logits)

    other_layers = tiny_model()
    inject_lora(other_layers, ["q_proj", "v_proj"], [0, 1], r=2, alpha=4, dropout=0.0)
    with pytest.raises(ValueError, match="does not match the model's LoRA layers"):
        load_adapter(other_layers, tmp_path)
    other_rank = tiny_model()
    inject_lora(other_rank, ["q_proj", "v_proj"], [2, 3], r=4, alpha=4, dropout=0.0)
    with pytest.raises(ValueError, match="other rank or model"):
        load_adapter(other_rank, tmp_path)
