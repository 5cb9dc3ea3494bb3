"""Bad config.json, data.py and model input: one line naming the problem, exit code 2, no traceback,
and an existing output/best_adapter left byte for byte as it was."""
import json
import shutil

import pytest

import model_files
import train
from conftest import project, run_here, tiny_model



def expect_failure(capsys, call, *phrases):
    """The call stops with a UserError: one line, which main() prints as `error: ...` with exit code 2."""
    with pytest.raises(train.UserError) as stop:
        call()
    message = str(stop.value)
    assert message and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message


@pytest.mark.parametrize("text, phrases", [
    ('{"lr": 0.01,}', ["config.json: invalid JSON at line 1, column 13"]),
    ('{"learning_rate": 0.01}', ["unknown key 'learning_rate'"]),
    ('{"epochs": 3}', ["unknown key 'epochs'; did you mean 'epoch'?"]),
    ('{"lora_rank": "8"}', ['lora_rank = "8" must be a whole number > 0']),
    ('{"lora_rank": 0}', ["lora_rank = 0 must be a whole number > 0"]),
    ('{"lora_alpha": -1}', ["lora_alpha = -1 must be a number > 0"]),
    ('{"lr": 0}', ["lr = 0 must be a number > 0"]),
    ('{"epoch": 0}', ["epoch = 0 must be a whole number > 0"]),
    ('{"epoch": 2.5}', ["epoch = 2.5 must be a whole number > 0"]),
    ('{"batch_size": -4}', ["batch_size = -4 must be a whole number > 0"]),
    ('{"val_ratio": 1.0}', ["val_ratio = 1.0 must be a number in [0, 1)"]),
    ('{"lora_dropout": 1}', ["lora_dropout = 1 must be a number in [0, 1)"]),
    ('{"target_layers": [20, "21"]}', ["target_layers", "must be a list of layer numbers"]),
    ('{"target_modules": "q_proj"}', ['target_modules = "q_proj" must be a list of names']),
    ('{"replay": "yes"}', ['replay = "yes" must be true or false']),
    ('{"teacher_questions": 2.5}', ["teacher_questions = 2.5 must be a whole number >= 0 (0 turns distillation off)"]),
    ('{"conversations": -1}', ["conversations = -1 must be a whole number >= 0 (0: none)"]),
    ('[1, 2]', ["must be a JSON object"]),
])
def test_bad_config(tmp_path, capsys, text, phrases):
    path = tmp_path / "config.json"
    path.write_text(text)
    expect_failure(capsys, lambda: train.load_config(str(path)), *phrases)


@pytest.mark.parametrize("text, phrases", [
    ("qa_data = [\n  {'instruction': 'Q?',, 'output': 'A'}]\n", ["data.py, line 2: syntax error"]),
    ("facts = []", ["defines no qa_data"]),
    ("qa_data = {'instruction': 'Q?', 'output': 'A'}", ["qa_data must be a list of dicts, not a dict"]),
    ("qa_data = []", ["qa_data is empty"]),
    ("qa_data = ['Q? A']", ["qa_data[0] must be a dict", "not a str"]),
    ("qa_data = [{'instruction': 'Q?', 'input': ''}]", ["qa_data[0] has no 'output'"]),
    ("qa_data = [{'output': 'A'}]", ["qa_data[0] has no 'instruction'"]),
    ("qa_data = [{'instruction': 'Q?', 'input': '', 'output': 2006}]", ["qa_data[0]['output'] must be a string, not a int"]),
    ("qa_data = [{'instruction': 'Q?', 'input': None, 'output': 'A'}]", ["qa_data[0]['input'] must be a string"]),
    ("qa_data = [{'instruction': 'Q?', 'input': '', 'output': '  '}]", ["qa_data[0]['output'] is empty"]),
    ("raise RuntimeError('oops')", ["running it failed: RuntimeError: oops"]),
])
def test_bad_data(tmp_path, capsys, text, phrases):
    path = tmp_path / "data.py"
    path.write_text(text)
    expect_failure(capsys, lambda: train.load_data(dict(train.DEFAULTS), str(path)), str(path), *phrases)


def test_duplicate_questions_warn_with_count(tmp_path, capsys):
    path = tmp_path / "data.py"
    path.write_text("qa_data = [{'instruction': 'Q?', 'input': '', 'output': 'A'}] * 3 + "
                    "[{'instruction': f'Q{i}', 'input': '', 'output': 'A'} for i in range(5)]")
    assert len(train.load_data(dict(train.DEFAULTS), str(path))) == 8
    assert "2 questions appear more than once" in capsys.readouterr().out


def test_bad_model_names(tmp_path, capsys):
    expect_failure(capsys, lambda: model_files.resolve_model(str(tmp_path / "missing")), "no such file or directory")
    expect_failure(capsys, lambda: model_files.resolve_model("./model/nothing.gguf"), "no such file or directory")
    expect_failure(capsys, lambda: model_files.resolve_model("not a model"), "neither an existing path nor a hub id")
    (tmp_path / "empty").mkdir()
    expect_failure(capsys, lambda: model_files.resolve_model(str(tmp_path / "empty")), "directory without model weights")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps(tiny_model().config.to_dict()))
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    expect_failure(capsys, lambda: model_files.load_model(str(corrupt), "cpu", None), "cannot load it", "download them again")


@pytest.mark.parametrize("config, phrase", [
    ({"target_layers": [4]}, "config.json: target_layers [4] outside the model's 4 layers (use 0..3"),
    ({"target_modules": ["query"]}, "config.json: target_modules ['query'] not found in layer 0; its Linear layers "
                                    "are ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
    ({"lr": -1}, "config.json: lr = -1 must be a number > 0"),
    ({"max_length": 8}, "data.py: every pair is longer than max_length=8 tokens (the longest has "),
])
def test_failed_runs_keep_the_existing_adapter(tmp_path, capfd, tiny_model_dir, config, phrase):
    directory = project(tmp_path, tiny_model_dir, **{"target_layers": [0, 1], **config})
    before = {p.name: p.read_bytes() for p in (directory / "output" / "best_adapter").iterdir()}
    result = run_here(capfd, directory)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and phrase in result.stderr
    assert {p.name: p.read_bytes() for p in (directory / "output" / "best_adapter").iterdir()} == before


@pytest.mark.parametrize("change, phrase", [
    ({"layers_to_transform": [6, 7]}, "target_layers [6, 7] outside the model's 4 layers"),
    ({"r": 8}, "has shape (4, 32), the model expects (8, 32)"),
])
def test_adapter_that_does_not_fit_the_model_fails_clearly(tmp_path, capfd, tiny_model_dir, change, phrase):
    from inject import inject_lora, save_adapter
    directory = project(tmp_path, tiny_model_dir)
    model = tiny_model()
    inject_lora(model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)
    adapter = directory / "output" / "best_adapter"
    shutil.rmtree(adapter)
    save_adapter(model, adapter, "tiny")
    saved = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**saved, **change}))
    result = run_here(capfd, directory, "--ask", "Q1?")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "does not fit model" in result.stderr and phrase in result.stderr and "train again" in result.stderr
