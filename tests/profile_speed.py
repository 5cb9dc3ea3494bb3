"""Where train.py's time goes (run by hand): one epoch of its training steps and validation on the
random Qwen2.5-0.5B-shaped model of bench_speed.py, under torch.profiler, next to a FLOP count.

    python tests/profile_speed.py                    # the bf16 path where the CPU has it, else fp32
    QWEN_LORA_FP32=1 python tests/profile_speed.py   # the fp32 path (a CPU without bf16) on any CPU
    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 QWEN_LORA_FP32=1 \
        python tests/profile_speed.py                # as on an AVX2-only CPU (MKL, torch's and oneDNN's kernels)
"""
import os
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chat_model  # noqa: E402
import train  # noqa: E402
from bench_speed import QA, QWEN_05B_SHAPES, offline_qwen  # noqa: E402
from inject import inject_lora, set_lora_training  # noqa: E402


def main():
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(offline_qwen())
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B_SHAPES)).eval()
    inject_lora(model, ["q_proj", "v_proj"], [20, 21, 22, 23], r=8, alpha=16, dropout=0.0)
    lm = chat_model.LM.of(model, tokenizer, first_lora_layer=20)
    examples = [chat_model.encode(lm, q, a) for q, a in QA]
    train_set, val_set = examples[:11], examples[11:]
    t0 = time.time()
    train.cache_prefix(lm, examples)
    cache_s = time.time() - t0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    head = None  # the answer head where fit() trains with it, its vocabulary as frozen_outputs() makes it
    if train.answer_head_pays(lm):
        train.set_guesses(lm, train_set, stored={})
        head = train.AnswerHead.of(lm, train.Examples(train_set, val_set, [], [], [], []).vocabulary())
    trained_rows = len(head.ids) if head else 151936

    def epoch():
        set_lora_training(model, True)
        for batch in train.shuffled_batches(train_set, 4, random.Random(0)):
            loss = train.batch_loss(lm, batch, head)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train.evaluate(lm, val_set, 4)

    with chat_model.frozen_weights_in_bf16(lm, [*model.model.layers[20:], model.lm_head]):  # as fit() trains
        epoch()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.time()
            epoch()
            epoch_s = time.time() - t0
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    # FLOPs of one epoch: 4 target layers forward + backward (input grads; LoRA grads are tiny),
    # the LM head (the answer head's rows where fit() uses it) at answer positions forward + backward,
    # validation forward (the full head).
    per_layer = 896 * 896 * 2 + 896 * 128 * 2 + 3 * 896 * 4864
    tokens = sum(len(e["input_ids"]) for e in train_set)
    answers = sum(len(e["target_ids"]) for e in train_set)
    val_tokens = sum(len(e["input_ids"]) for e in val_set)
    val_answers = sum(len(e["target_ids"]) for e in val_set)
    flops = (2 * (2 * 4 * per_layer * tokens + 2 * trained_rows * 896 * answers)
             + 2 * (4 * per_layer * val_tokens + 151936 * 896 * val_answers))
    print(f"{'bf16' if chat_model.CPU_BF16 else 'fp32'} path: cache {cache_s:.2f}s, one epoch {epoch_s:.2f}s "
          f"(LM head in training: {trained_rows} rows); the epoch's matmuls need {flops / 1e9:.0f} GFLOP "
          f"-> {flops / 1e9 / epoch_s:.0f} GFLOP/s achieved")


if __name__ == "__main__":
    main()
