"""The shortcuts (packed batches with their shared start computed once, frozen-prefix cache, top-layer MLP
and LM head only at answer positions) must train exactly like a plain transformers forward with a loss on
the answer tokens."""
import torch
import torch.nn.functional as F

import chat_model
import train
from conftest import padded_batch, tiny_model
from inject import inject_lora, lora_modules, set_lora_training


START = [7, 8, 9]  # every prompt begins with it, as every chat begins with the system prompt


def examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n_prompt, n_answer in [(5, 3), (7, 2), (4, 6), (9, 4), (6, 5), (3, 3)]:
        ids = torch.randint(0, 96, (n_prompt + n_answer,), generator=g).tolist()
        out.append(chat_model.make_example(START + ids[:n_prompt], ids[n_prompt:]))
    return out


def plain_loss(model, batch):
    """What a plain training loop computes: full logits, cross-entropy on the answer tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=chat_model.IGNORE)


def run_steps(use_shortcuts, steps=4, first_layer=2):
    model = tiny_model("qwen2", layers=4)
    torch.manual_seed(0)
    inject_lora(model, ["q_proj", "v_proj"], [first_layer, 3], r=4, alpha=8, dropout=0.0)  # packed rows draw other masks
    data = examples()
    lm = chat_model.LM(model, tokenizer=None, eot_id=1, pad_id=0, first_lora_layer=first_layer)
    if use_shortcuts:
        train.cache_prefix(lm, data)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        set_lora_training(model, True)
        chunk = data[(2 * step) % 6:(2 * step) % 6 + 2]
        loss = train.batch_loss(lm, chunk) if use_shortcuts else plain_loss(model, padded_batch(chunk, 0))
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
    assert "prefix" in data[0] and data[0]["prefix"].shape == (11, 32)
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


def test_a_packed_batch_computes_what_each_example_alone_does():
    model = tiny_model("qwen2", layers=4)
    lm = chat_model.LM(model, tokenizer=None, eot_id=1, pad_id=0)
    data = examples()[:4]
    batch = train.pack(data, "cpu")
    n = len(START)  # the shared start is held once
    assert batch["input_ids"].shape == (1, n + sum(len(e["input_ids"]) - n for e in data))
    with torch.no_grad():
        packed = train.final_hidden(lm, batch)[0]
        for e, rows in zip(data, batch["rows"]):
            alone = model.model(torch.tensor([e["input_ids"]])).last_hidden_state[0]
            assert (packed[rows] - alone).abs().max() < 1e-5
            # each position is trained to predict the next token of its own example, and only in the answer
            assert batch["targets"][0, rows].tolist() == e["labels"][1:] + [chat_model.IGNORE]


def test_what_the_frozen_model_computes_is_kept_for_the_next_run_and_made_again_for_another_model(tmp_path, capsys,
                                                                                                 monkeypatch):
    model = tiny_model("qwen2", layers=4)
    inject_lora(model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)
    config = {"output_dir": str(tmp_path)}
    monkeypatch.setattr(chat_model, "CPU_BF16", False)  # the fp32 path, whose training needs guesses and tails

    def run(first_lora_layer=2, data=None):
        lm = chat_model.LM(model, tokenizer=None, eot_id=1, pad_id=0, first_lora_layer=first_lora_layer, path="tiny")
        data = data or examples()
        replay, drift = data[:3], data[3:]
        train.frozen_outputs(lm, train.Examples(data[:1], [], [], [], replay, drift), config)
        return data, capsys.readouterr().out

    first, printed = run()
    assert "computed once for 7 examples" in printed and "answers of 6 examples, kept from the last run for 0" in printed
    assert "tokens at the answers of 1 examples, kept from the last run for 0" in printed  # data.train's guesses
    assert "training computes, at the answers of 4 examples, kept from the last run for 0" in printed  # + replay
    again, printed = run()
    assert "computed once for 0 examples, kept from the last run for 7" in printed
    assert "answers of 0 examples, kept from the last run for 6" in printed
    assert "tokens at the answers of 0 examples, kept from the last run for 1" in printed
    assert "training computes, at the answers of 0 examples, kept from the last run for 4" in printed
    for a, b in zip(first, again):  # the very numbers computed the first time
        assert all(torch.equal(a[k], b[k]) for k in ("prefix", "target_ids", "target_probs"))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first[:1], again) for k in ("guesses", "tail"))
    _, printed = run(data=examples() + examples(seed=1)[:1])  # a new example: only it is computed
    assert "computed once for 1 examples" in printed and "answers of 1 examples" in printed
    _, printed = run(first_lora_layer=3)  # other layers cached: made again
    assert "computed once for 7 examples" in printed and "answers of 6 examples" in printed
    with open(tmp_path / "frozen_cache.safetensors", "r+b") as f:
        f.write(b"broken")
    _, printed = run(first_lora_layer=3)
    assert "cannot be read" in printed and "computed once for 7 examples" in printed
    monkeypatch.setattr(chat_model, "CPU_BF16", True)  # bf16 products: training has the full head
    _, printed = run()
    assert "computed once for 7 examples" in printed and "[guesses]" not in printed and "[tails]" not in printed


def test_a_taught_pair_without_a_teacher_keeps_its_one_hot_answer_and_one_with_a_teacher_gets_the_teachers(tmp_path,
                                                                                                          monkeypatch):
    monkeypatch.setattr(chat_model, "CPU_BF16", False)  # fp32 products: the teacher's numbers to 1e-5
    model = tiny_model("qwen2", layers=4)
    inject_lora(model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)
    lm = chat_model.LM(model, tokenizer=None, eot_id=1, pad_id=0, first_lora_layer=2, path="tiny")
    built, student, reading = examples()[:3]  # a question built from a fact; a student's prompt; a teacher's
    answer = reading["input_ids"][-3:]
    taught = dict(chat_model.make_example(student["input_ids"][:-3], answer),
                  teacher=chat_model.make_example(reading["input_ids"][:-3], answer))
    config = {"output_dir": str(tmp_path)}
    train.frozen_outputs(lm, train.Examples([], [], [built, taught], [], [], []), config)
    again = examples()[0]
    train.frozen_outputs(lm, train.Examples([], [], [again], [], [], []), config)  # the next run, from the cache
    for e in (built, again):
        assert e["target_ids"].flatten().tolist() == e["labels"][-3:]
        assert torch.equal(e["target_probs"], torch.ones(3, 1))
    with torch.no_grad():  # the teacher's top-32 at its answer's three positions, renormalised
        logits = model(torch.tensor([taught["teacher"]["input_ids"]])).logits[0, -4:-1]
    top = F.softmax(logits, -1).topk(32)

    def dense(ids, probs):
        return torch.zeros(3, logits.shape[-1]).scatter_(1, ids, probs)

    assert torch.allclose(dense(taught["target_ids"], taught["target_probs"]),
                          dense(top.indices, top.values / top.values.sum(-1, keepdim=True)), atol=1e-5)
