"""The shortcuts (frozen-prefix cache, top-layer MLP and LM head only at answer positions) must
train exactly like a plain transformers forward with a loss on the answer tokens."""
import torch
import torch.nn.functional as F

import chat_model
import train
from conftest import tiny_model
from inject import inject_lora, lora_modules, set_lora_training


def examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n_prompt, n_answer in [(5, 3), (7, 2), (4, 6), (9, 4), (6, 5), (3, 3)]:
        ids = torch.randint(0, 96, (n_prompt + n_answer,), generator=g).tolist()
        out.append(chat_model.make_example(ids[:n_prompt], ids[n_prompt:]))
    return out


def plain_loss(model, batch):
    """What a plain training loop computes: full logits, cross-entropy on the answer tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=chat_model.IGNORE)


def run_steps(use_shortcuts, steps=4, first_layer=2):
    model = tiny_model("qwen2", layers=4)
    torch.manual_seed(0)
    inject_lora(model, ["q_proj", "v_proj"], [first_layer, 3], r=4, alpha=8, dropout=0.1)
    data = examples()
    lm = chat_model.LM(model, tokenizer=None, eot_id=1, pad_id=0, first_lora_layer=first_layer)
    if use_shortcuts:
        train.cache_prefix(lm, data)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    torch.manual_seed(1)  # same dropout masks on both sides
    for step in range(steps):
        set_lora_training(model, True)
        chunk = data[(2 * step) % 6:(2 * step) % 6 + 2]
        loss = train.batch_loss(lm, chunk)[0] if use_shortcuts else plain_loss(model, train.collate(chunk, 0, "cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    weights = {n: torch.cat([m.lora_A.flatten(), m.lora_B.flatten()]) for n, m in lora_modules(model).items()}
    return losses, weights, data


def test_shortcut_training_matches_a_plain_forward(monkeypatch):
    monkeypatch.setattr(chat_model, "CPU_BF16", False)  # exactness in fp32; tests/test_bf16.py covers bf16
    full_losses, full_weights, _ = run_steps(use_shortcuts=False)
    cached_losses, cached_weights, data = run_steps(use_shortcuts=True)
    assert "prefix" in data[0] and data[0]["prefix"].shape == (8, 32)
    for a, b in zip(full_losses, cached_losses):
        assert abs(a - b) / abs(a) < 1e-4
    assert len(set(full_losses)) == len(full_losses)  # the steps really train
    for name in full_weights:
        assert torch.allclose(full_weights[name], cached_weights[name], atol=1e-5)


def test_exactness_check_accepts_the_cache():
    model = tiny_model("qwen2", layers=4)
    inject_lora(model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)
    data = examples()
    lm = chat_model.LM(model, tokenizer=None, eot_id=1, pad_id=0, first_lora_layer=2)
    train.cache_prefix(lm, data)
    assert train.check_prefix_exact(lm, data[:3]) is None
    data[0]["prefix"] = data[0]["prefix"] + 1.0  # a wrong cache is caught
    assert "differs" in train.check_prefix_exact(lm, data[:3])
