"""The default recipe, in-process on a tiny Qwen2: early stop, the choice of the best epoch, replay
kept out of recall, the frozen-prefix cache and its fallback, and a diverging run."""
import math
import time

import pytest
import torch
from safetensors.torch import load_file

import chat_model
import teacher
import train
from conftest import tiny_model
from inject import inject_lora, load_adapter


def tiny_lm(layers=(2, 3), dropout=0.0):
    model = tiny_model("qwen2", layers=4)
    torch.manual_seed(0)
    inject_lora(model, ["q_proj", "v_proj"], list(layers), r=4, alpha=8, dropout=dropout)
    return chat_model.LM(model, tokenizer=None, eot_id=1, pad_id=0, first_lora_layer=min(layers), path="tiny")


def random_ids(n, generator):
    return torch.randint(2, 96, (n,), generator=generator).tolist()


@torch.no_grad()
def known_pair(lm, prompt, n, index):
    """A pair whose answer is the model's own greedy continuation: recalled before any training."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
    return dict(chat_model.make_example(prompt, ids[len(prompt):]), index=index, fact=f"fact {index}")


def unknown_pair(prompt, answer, index):
    return dict(chat_model.make_example(prompt, answer), index=index, fact=f"fact {index}")


def examples(lm, known, seed=0):
    """data.train: 4 pairs (known, or random 2-token answers); replay: 4 random answers with the base
    model's soft targets; drift: 3 more, never trained."""
    g = torch.Generator().manual_seed(seed)
    train_set = [known_pair(lm, random_ids(9, g), 3, i) if known else unknown_pair(random_ids(9, g), random_ids(2, g), i)
                 for i in range(4)]
    replay, drift = [[chat_model.make_example(random_ids(9, g), random_ids(4, g)) for _ in range(n)] for n in (4, 3)]
    data = train.Examples(train_set, [], [], [], replay, drift)
    train.set_soft_targets(lm, replay + drift)
    return data


def fit(lm, data, tmp_path, **config):
    config = dict(train.DEFAULTS, output_dir=str(tmp_path), batch_size=2, seed=0, **config)
    return train.fit(lm, data, config, started=time.time(), resume=False)


def test_replay_is_trained_but_never_counted_in_recall_and_early_stop_waits_for_two_full_epochs(tmp_path):
    lm = tiny_lm()
    data = examples(lm, known=True)
    assert train.evaluate(lm, data.train, 4)[1] == 1.0 and train.evaluate(lm, data.replay, 4)[1] == 0.0
    run = fit(lm, data, tmp_path, lr=1e-9, epoch=6)  # the model stays as it is
    assert run.history["train_recall"] == [1.0, 1.0]  # replay, never recalled, does not count
    assert (tmp_path / "best_adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "last_state").exists()  # a finished run leaves nothing to resume


def test_no_early_stop_without_full_recall_or_when_switched_off(tmp_path):
    lm = tiny_lm()
    assert len(fit(lm, examples(lm, known=False), tmp_path / "a", lr=1e-9, epoch=3).history["train_loss"]) == 3
    lm = tiny_lm()
    run = fit(lm, examples(lm, known=True), tmp_path / "b", lr=1e-9, epoch=3, early_stop=False)
    assert run.history["train_recall"] == [1.0, 1.0, 1.0]


def test_best_epoch_is_most_recall_then_the_latest_and_is_the_saved_adapter(tmp_path):
    lm = tiny_lm()
    data = examples(lm, known=False)
    run = fit(lm, data, tmp_path, lr=1e-1, epoch=12, early_stop=False)  # learns on both paths (fp32, bf16)
    history = run.history
    keys = [(recall, val or 0.0, epoch) for epoch, (recall, val)
            in enumerate(zip(history["train_recall"], history["val_recall"]), 1)]
    assert len(set(history["train_recall"])) > 1  # a real choice
    assert run.best_epoch == max(keys)[2]
    load_adapter(lm.model, tmp_path / "best_adapter")  # what was saved is that epoch's model
    # evaluated in batches as fit() validates (batch_size 2): the same packed rows, the same numbers
    assert math.isclose(train.evaluate(lm, data.drift, 2)[0], history["drift"][run.best_epoch - 1], rel_tol=1e-5)


def test_the_recall_an_epoch_records_is_its_last_models_with_dropout_off(tmp_path):
    lm = tiny_lm(dropout=0.5)  # counted along the epoch's steps, dropout on, it was not the saved model's
    data = examples(lm, known=False)
    run = fit(lm, data, tmp_path, lr=1e-1, epoch=14, early_stop=False)
    assert train.evaluate(lm, data.train, 2)[1] == run.history["train_recall"][-1]
    load_adapter(lm.model, tmp_path / "best_adapter")
    assert train.evaluate(lm, data.train, 2)[1] == run.history["train_recall"][run.best_epoch - 1]


def losses_with_cache(monkeypatch, tmp_path, layers, mismatch=False):
    lm = tiny_lm(layers, dropout=0.1)
    data = examples(lm, known=False)
    if mismatch:
        monkeypatch.setattr(train, "check_prefix_exact", lambda lm, probe: "a forced mismatch")
    train.cache_frozen_prefix(lm, data.everything(), stored={})
    cached = "prefix" in data.train[0]
    torch.manual_seed(1)  # the same dropout masks in every run
    return fit(lm, data, tmp_path, lr=1e-2, epoch=3, early_stop=False).history, cached


def test_cache_its_fallback_and_no_cache_train_alike(monkeypatch, tmp_path, capsys):
    full, cached = losses_with_cache(monkeypatch, tmp_path / "cache", (1, 3))
    assert cached and "[cache] layers 0-0 computed once" in capsys.readouterr().out
    fallback, cached = losses_with_cache(monkeypatch, tmp_path / "fallback", (1, 3), mismatch=True)
    assert not cached and "[cache] off: a forced mismatch; using the full forward" in capsys.readouterr().out
    for key in ("train_loss", "drift"):
        assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(full[key], fallback[key])), key
    from_zero, cached = losses_with_cache(monkeypatch, tmp_path / "zero", (0, 3))
    assert not cached and "[cache] off: LoRA starts at layer 0" in capsys.readouterr().out
    assert from_zero["train_loss"][-1] < from_zero["train_loss"][0]


def test_a_diverged_epoch_is_never_saved_and_the_last_finite_adapter_is_kept(monkeypatch, tmp_path):
    from peft import PeftModel
    steps = []
    real_batch_loss = train.batch_loss

    def blows_up_in_epoch_3(lm, batch, head=None):  # 4 pairs + 4 replay in batches of 2: 4 steps an epoch
        steps.append(torch.is_grad_enabled())  # validation runs without gradients
        loss = real_batch_loss(lm, batch, head)
        return loss * math.inf if sum(steps) > 8 else loss

    monkeypatch.setattr(train, "batch_loss", blows_up_in_epoch_3)
    lm = tiny_lm()
    with pytest.raises(train.UserError, match="diverged in epoch 3 .*lower lr") as stopped:
        fit(lm, examples(lm, known=False), tmp_path, lr=1e-2, epoch=5, early_stop=False)
    assert "the best adapter (epoch 2)" in str(stopped.value) or "the best adapter (epoch 1)" in str(stopped.value)
    saved = load_file(tmp_path / "best_adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    peft_model = PeftModel.from_pretrained(tiny_model("qwen2", layers=4), str(tmp_path / "best_adapter")).eval()
    assert torch.isfinite(peft_model(torch.randint(0, 96, (1, 8))).logits).all()


def test_weights_blown_up_by_a_step_count_as_diverged_even_when_every_score_is_finite():
    lm = tiny_lm()
    scores = {"train_loss": 0.5, "train_recall": 1.0, "val_loss": None, "drift": 0.1}
    assert train.not_finite(scores, lm.model) == ""
    assert train.not_finite({**scores, "drift": math.nan}, lm.model) == "drift"
    next(p for p in lm.model.parameters() if p.requires_grad).data[0, 0] = math.inf
    assert train.not_finite(scores, lm.model) == "the LoRA weights"


def test_the_best_epoch_is_chosen_by_recall_then_held_out_recall_then_the_later_epoch(tmp_path):
    lm = tiny_lm()
    data = examples(lm, known=False)
    optimizer = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad])
    config = dict(train.DEFAULTS, output_dir=str(tmp_path), early_stop=False)
    run = train.Run(config, data, optimizer, train.random.Random(0), time.time())
    epochs = [(0.5, None),  # (train recall, held-out recall)
              (1.0, 0.5),
              (1.0, 0.5),
              (1.0, 0.5),  # best: every answer, as many held-out phrasings as any, the latest of those
              (0.75, 1.0)]  # more held-out phrasings do not make up for a trained answer lost
    for epoch, (recall, val_recall) in enumerate(epochs, 1):
        scores = {"train_loss": 1.0, "train_recall": recall, "val_loss": 1.0, "val_recall": val_recall,
                  "teacher_kl": 0.1, "reversed_kl": None, "conversation_kl": None, "drift": 0.1}
        train.end_epoch(run, lm, epoch, time.time(), scores)
    assert run.best_epoch == 4
    train.end_epoch(run, lm, 6, time.time(), {"train_loss": 1.0, "train_recall": 1.0, "val_loss": 1.0,
                                               "val_recall": 0.25, "teacher_kl": 0.0, "reversed_kl": None,
                                               "conversation_kl": None, "drift": 0.0})
    assert run.best_epoch == 4  # fewer held-out phrasings: not the best, however close to the teacher


def test_validation_runs_with_dropout_off():
    from LoRALinear import LoRALinear
    lm = tiny_lm(dropout=0.5)
    data = examples(lm, known=False)
    for layer in (m for m in lm.model.modules() if isinstance(m, LoRALinear)):
        torch.nn.init.normal_(layer.lora_B, std=1.0)  # B != 0: dropout would change the outputs
    train.set_lora_training(lm.model, True)  # as fit() leaves it after an epoch
    first = train.evaluate(lm, data.drift, 4)
    train.set_lora_training(lm.model, True)
    assert train.evaluate(lm, data.drift, 4) == first


def test_training_computes_the_lm_head_over_the_targets_and_the_base_models_guesses_and_the_rest_as_one_logit():
    lm = tiny_lm()
    data = examples(lm, known=True)
    train.set_guesses(lm, data.train, stored={}, top_k=3)
    vocabulary = data.vocabulary()
    wanted = {int(t) for e in data.everything() for t in e["target_ids"].flatten()}
    guessed = {int(t) for e in data.train for t in e["guesses"].flatten()}
    assert set(vocabulary.tolist()) == wanted | guessed and len(vocabulary) < lm.model.config.vocab_size
    head = train.AnswerHead.of(lm, vocabulary)
    batch = train.pack(data.train, "cpu")
    full, _ = train.supervised_logits(lm, batch)
    part, _ = train.supervised_logits(lm, batch, head)
    assert torch.allclose(part, full[:, vocabulary])  # the full head's columns of those tokens
    # the KL to the targets with the softmax taken over those tokens
    loss = train.batch_loss(lm, data.train, head)
    answers = batch["targets"][batch["targets"] != chat_model.IGNORE]
    restricted = torch.nn.functional.cross_entropy(full[:, vocabulary], head.rows[answers])
    assert torch.allclose(loss, restricted) and not torch.allclose(loss, torch.nn.functional.cross_entropy(full, answers))
    # with the base model's logit of the other tokens beside them, the loss is the full head's before training
    train.set_tails(lm, data.train, vocabulary, stored={})
    assert torch.allclose(train.batch_loss(lm, data.train, head), train.batch_loss(lm, data.train))


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_training_steps_use_the_answer_head_where_products_are_fp32_and_the_full_head_with_bf16(
        monkeypatch, tmp_path, cpu_bf16):
    heads = []
    real_batch_loss = train.batch_loss

    def recording(lm, batch, head=None):
        if torch.is_grad_enabled():  # a training step; validation always has the full head
            heads.append(head)
        return real_batch_loss(lm, batch, head)

    monkeypatch.setattr(chat_model, "CPU_BF16", cpu_bf16)
    monkeypatch.setattr(train, "batch_loss", recording)
    lm = tiny_lm()
    fit(lm, examples(lm, known=False), tmp_path, epoch=1, early_stop=False)
    assert len(heads) == 4  # 4 pairs + 4 replay in batches of 2
    assert all(isinstance(head, train.AnswerHead) != cpu_bf16 for head in heads)


def test_every_kind_of_teacher_answer_kept_out_is_validated():
    assert tuple(train.TEACHER_KLS) == teacher.KINDS
