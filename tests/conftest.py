import os
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
