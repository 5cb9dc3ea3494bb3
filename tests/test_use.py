"""Getting a model and using the trained one: where the weights come from, and --chat's history."""
import importlib.machinery
import sys
import types

import pytest

import chat_model
import model_files
import train


def fake_download(calls, source, writes_weights=True):
    def snapshot_download(name, local_dir):
        calls.append((source, name, local_dir))
        if not writes_weights:
            raise OSError("connection refused")
        import os
        os.makedirs(local_dir, exist_ok=True)
        open(os.path.join(local_dir, "model.safetensors"), "wb").close()
    return snapshot_download


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """No network: the Hugging Face download fails; modelscope is installed and works."""
    import huggingface_hub
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(calls, "hf", writes_weights=False))
    modelscope = types.ModuleType("modelscope")
    modelscope.__spec__ = importlib.machinery.ModuleSpec("modelscope", None)
    modelscope.snapshot_download = fake_download(calls, "modelscope")
    monkeypatch.setitem(sys.modules, "modelscope", modelscope)
    return calls


def test_modelscope_downloads_into_model_dir_when_the_hub_cannot(hub):
    assert model_files.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "model/Qwen2.5-0.5B-Instruct"
    assert hub == [("hf", "Qwen/Qwen2.5-0.5B-Instruct", "model/Qwen2.5-0.5B-Instruct"),
                   ("modelscope", "Qwen/Qwen2.5-0.5B-Instruct", "model/Qwen2.5-0.5B-Instruct")]
    hub.clear()
    assert model_files.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "model/Qwen2.5-0.5B-Instruct"
    assert hub == []  # found in model/: nothing downloaded again


def test_without_any_source_the_error_says_how_to_get_the_model(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # not installed
    monkeypatch.setattr(model_files, "offline_model", lambda: None)
    with pytest.raises(train.UserError, match="huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir "
                                              "model/Qwen2.5-0.5B-Instruct.*modelscope download"):
        model_files.resolve_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_chat_keeps_the_history_and_reset_clears_it(monkeypatch, capsys):
    conversations = []

    def answer(lm, batch, max_new_tokens, streamer=None):
        conversations.append([dict(message) for message in batch[0]])
        return [(f"answer {len(conversations)}", True)]

    lines = iter(["Who is Zorblat?", "", "And his cat?", "/reset", "And his cat?", "exit", "never read"])
    monkeypatch.setattr(train, "generate", answer)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    train.chat(chat_model.LM(None, tokenizer=None, eot_id=1, pad_id=0), max_new_tokens=8)
    user = [{"role": "user", "content": "Who is Zorblat?"}, {"role": "assistant", "content": "answer 1"},
            {"role": "user", "content": "And his cat?"}]
    assert conversations == [user[:1], user, user[2:]]  # the second turn sees the first; /reset forgets it
    assert "(history cleared)" in capsys.readouterr().out
    assert next(lines) == "never read"  # `exit` left the chat


def test_chat_ends_at_the_end_of_input(monkeypatch):
    def end_of_input(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", end_of_input)
    train.chat(chat_model.LM(None, tokenizer=None, eot_id=1, pad_id=0), max_new_tokens=8)  # returns, no traceback
