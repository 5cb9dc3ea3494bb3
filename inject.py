"""Put LoRALinear into the chosen layers of a model, freeze the rest, save/load the adapter.

The adapter is saved in PEFT's format (adapter_config.json + adapter_model.safetensors,
keys like base_model.model.model.layers.20.self_attn.q_proj.lora_A.weight), so it also
loads with peft.PeftModel.from_pretrained and in vLLM.
"""
import json
import os
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from LoRALinear import LoRALinear

PEFT_PREFIX = "base_model.model."


def decoder_layers(model: nn.Module):
    """Return (name, ModuleList) of the model's stack of decoder layers, e.g. ('model.layers', ...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"cannot find the {n} decoder layers of this {type(model).__name__}")


def resolve_layers(target_layers, depth: int):
    """Turn indices like [20, 21] or [-4, -1] into sorted positive indices, checking the depth."""
    bad = [i for i in target_layers if not -depth <= i < depth]
    if bad:
        raise ValueError(f"target_layers {bad} outside the model's {depth} layers "
                         f"(use 0..{depth - 1}, or -1..-{depth} to count from the top)")
    return sorted({i % depth for i in target_layers})


def inject_lora(model, target_modules, target_layers, r, alpha, dropout):
    """Freeze every parameter, then wrap each named nn.Linear of each chosen layer in LoRALinear.

    Returns (trainable, total) parameter counts.
    """
    model.requires_grad_(False)
    _, layers = decoder_layers(model)
    for i in resolve_layers(target_layers, len(layers)):
        found = set()
        for parent in list(layers[i].modules()):
            for child_name, child in parent.named_children():
                if child_name in target_modules and isinstance(child, nn.Linear):
                    setattr(parent, child_name, LoRALinear(child, r, alpha, dropout))
                    found.add(child_name)
        missing = [m for m in target_modules if m not in found]
        if missing:
            names = sorted({n.split(".")[-1] for n, m in layers[i].named_modules()
                            if isinstance(m, nn.Linear)})
            raise ValueError(f"target_modules {missing} not found in layer {i}; "
                             f"its Linear layers are {names}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def lora_modules(model):
    """All LoRALinear layers of the model, by their module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model):
    """The LoRA tensors under PEFT's key names (fp32, on the CPU)."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    return state


def save_adapter(model, out_dir, base_model_name):
    """Write adapter_config.json and adapter_model.safetensors as PEFT does."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRALinear layers to save")
    layers_name, _ = decoder_layers(model)
    first = next(iter(modules.values()))
    layer_ids = sorted({int(n[len(layers_name) + 1:].split(".")[0]) for n in modules})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": first.r,
        "lora_alpha": first.scaling * first.r,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": sorted({n.split(".")[-1] for n in modules}),
        "layers_to_transform": layer_ids,
        "layers_pattern": layers_name.split(".")[-1],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(lora_state_dict(model), os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})


def load_adapter(model, adapter_dir):
    """Copy a saved adapter into a model that already has the same LoRALinear layers."""
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    expected = {f"{PEFT_PREFIX}{name}.{part}.weight" for name in lora_modules(model)
                for part in ("lora_A", "lora_B")}
    if set(state) != expected:
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise ValueError(f"adapter in {adapter_dir} does not match the model's LoRA layers "
                         f"(unexpected: {extra[:2]}, missing: {missing[:2]})")
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                tensor = state[f"{PEFT_PREFIX}{name}.{part}.weight"]
                param = getattr(m, part)
                if tensor.shape != param.shape:
                    raise ValueError(f"adapter in {adapter_dir}: {name}.{part} has shape "
                                     f"{tuple(tensor.shape)}, the model expects {tuple(param.shape)} "
                                     f"(other rank or model?)")
                param.copy_(tensor)


def set_lora_training(model, on=True):
    """Switch LoRA dropout on or off. The frozen model itself always stays in eval mode, so its
    outputs are deterministic (which the frozen-prefix cache in train.py relies on)."""
    for m in lora_modules(model).values():
        m.train(on)


def inject_saved_adapter(model, adapter_dir):
    """Inject LoRA layers shaped as adapter_config.json says, then load the saved tensors."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        saved = json.load(f)
    inject_lora(model, saved["target_modules"], saved["layers_to_transform"], saved["r"], saved["lora_alpha"],
                dropout=0.0)
    load_adapter(model, adapter_dir)


@contextmanager
def merged(model):
    """Run inference on merged weights (no LoRA overhead per token), unmerging afterwards."""
    layers = list(lora_modules(model).values())
    for m in layers:
        m.merge()
    try:
        yield model
    finally:
        for m in layers:
            m.unmerge()


def merge_and_unwrap(model):
    """Fold every LoRALinear into its base nn.Linear and put that Linear back in its place,
    leaving a plain transformers model (for saving a merged copy)."""
    for name, m in lora_modules(model).items():
        m.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, m.base)
    return model


# ------------------------------------------------------------------------- module swaps for train.py's speed
# Both context managers swap modules of the frozen model for the duration of one forward and put them back.

@contextmanager
def only_layers(decoder, start, stop):
    """Let decoder.forward run layers[start:stop] alone, on hidden states passed as inputs_embeds.
    The model's own forward still builds the attention mask and rotary embeddings; the final
    norm runs only when the stack reaches the top layer."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = layers[start:stop]
    if stop < len(layers):
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


class AtPositions(nn.Module):
    """Runs a module that works position by position only at `keep` (bool, batch x length);
    zeros elsewhere."""

    def __init__(self, inner, keep):
        super().__init__()
        self.inner, self.keep = inner, keep

    def forward(self, x):
        out = torch.zeros_like(x)
        out[self.keep] = self.inner(x[self.keep]).to(x.dtype)
        return out


@contextmanager
def top_mlp_only_at(top_layer, keep):
    """The top layer's MLP is most of its cost and acts on each position alone, and above the top
    layer only the final norm and the LM head follow, which run only at the supervised positions:
    so the MLP is needed only there (about a quarter of the tokens are answers)."""
    mlp = getattr(top_layer, "mlp", None)
    if keep is None or mlp is None:
        yield
        return
    top_layer.mlp = AtPositions(mlp, keep)
    try:
        yield
    finally:
        top_layer.mlp = mlp
