"""bf16, the dtype train.py uses on CUDA, run on the CPU with a tiny Qwen2: the frozen-prefix cache,
a training step with fp32 LoRA tensors, merge/unmerge and export, each within a stated tolerance."""
import torch
from transformers import AutoModelForCausalLM

import chat_model
import train
from conftest import tiny_model
from inject import inject_lora, lora_modules

BF16 = 2 ** -7  # bf16 keeps 8 significant bits: one rounding moves a number by up to this, relatively


def bf16_lm():
    model = tiny_model("qwen2", layers=4).to(torch.bfloat16)
    torch.manual_seed(0)
    inject_lora(model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.5)  # as if trained, so that merging changes the weights
    return chat_model.LM(model, tokenizer=None, eot_id=1, pad_id=0, first_lora_layer=2)


def examples():
    g = torch.Generator().manual_seed(0)
    return [chat_model.make_example(torch.randint(2, 96, (n,), generator=g).tolist(), [5, 6, 1]) for n in (9, 6, 12, 7)]


def test_cached_path_and_a_training_step_in_bf16():
    lm = bf16_lm()
    data = examples()
    train.cache_prefix(lm, data)
    assert data[0]["prefix"].dtype == torch.bfloat16
    assert train.check_prefix_exact(lm, data) is None  # relative error under the bf16 tolerance, 2e-2
    cached_loss = train.batch_loss(lm, data)
    full_loss = train.batch_loss(lm, [{k: v for k, v in e.items() if k != "prefix"} for e in data])
    assert abs(cached_loss.item() - full_loss.item()) <= 2e-2 * full_loss.item()

    lora = [p for p in lm.model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # small updates are not rounded away
    before = [p.detach().clone() for p in lora]
    cached_loss.backward()
    torch.optim.AdamW(lora, lr=1e-3).step()
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in lora)
    assert all(not torch.equal(p, b) for p, b in zip(lora, before))


def test_merge_unmerge_and_export_in_bf16(tmp_path, qwen_tokenizer):
    lm = bf16_lm()
    ids = torch.randint(0, 96, (2, 10))
    weights = {n: m.base.weight.detach().clone() for n, m in lora_modules(lm.model).items()}
    with torch.no_grad():
        unmerged = lm.model(ids).logits.float()
        with train.merged(lm.model):
            merged = lm.model(ids).logits.float()
        scale = unmerged.abs().max()
        # merging rounds W + BA to bf16 once: the logits move by a few bf16 steps at most
        assert (merged - unmerged).abs().max() <= 8 * BF16 * scale
        assert not torch.equal(merged, unmerged)  # the update is really folded in
        for name, m in lora_modules(lm.model).items():  # unmerge gives W back within the roundings of W + BA
            magnitude = (weights[name].float().abs() + m.delta_weight().abs()).max()
            assert (m.base.weight.float() - weights[name].float()).abs().max() <= 2 * BF16 * magnitude

        train.export(chat_model.LM(lm.model, qwen_tokenizer, 1, 0), str(tmp_path / "merged"), "f16")
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
        assert exported.model.layers[2].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert (exported(ids).logits.float() - merged).abs().max() <= 8 * BF16 * scale


def test_frozen_weights_in_bf16_compute_what_autocast_does_and_come_back_as_they_were(monkeypatch):
    monkeypatch.setattr(chat_model, "CPU_BF16", True)  # autocast to bf16 on any CPU (slower where it has no bf16)
    model = tiny_model("qwen2", layers=4, tie=True)
    inject_lora(model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.5)
    lm = chat_model.LM(model, tokenizer=None, eot_id=1, pad_id=0, first_lora_layer=0)
    batch = train.pack(examples(), "cpu")
    top = [*model.model.layers[2:], model.lm_head]
    weights = {name: p for name, p in model.named_parameters(remove_duplicate=False)}

    def loss_and_grads():
        logits, supervised = train.supervised_logits(lm, batch)
        loss = train.kl_to_targets(logits, batch["target_ids"], batch["target_probs"])
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        return loss, grads

    autocast_loss, autocast_grads = loss_and_grads()
    with chat_model.frozen_weights_in_bf16(lm, top):
        q_proj = model.model.layers[2].self_attn.q_proj
        assert q_proj.base.weight.dtype == torch.bfloat16 and q_proj.lora_A.dtype == torch.float32
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert model.model.embed_tokens.weight.dtype == torch.float32  # the tied input embedding stays
        assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.float32  # not in `top`
        copied_loss, copied_grads = loss_and_grads()
    # autocast casts each fp32 weight to the same bf16 numbers: the same loss and gradients
    assert torch.equal(copied_loss, autocast_loss)
    assert all(torch.equal(a, b) for a, b in zip(copied_grads, autocast_grads))
    # afterwards the very same fp32 parameters are back, the head tied to the embedding again
    assert all(p is weights[name] for name, p in model.named_parameters(remove_duplicate=False))
    assert model.lm_head.weight is model.model.embed_tokens.weight
