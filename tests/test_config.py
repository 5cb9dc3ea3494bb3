import json
import os

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_json_holds_every_default():
    with open(os.path.join(ROOT, "config.json")) as f:
        assert json.load(f) == train.DEFAULTS


def test_config_file_overrides_defaults(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"lr": 0.01, "target_layers": [-1]}')
    config = train.load_config(str(path))
    assert config["lr"] == 0.01 and config["target_layers"] == [-1] and config["epoch"] == train.DEFAULTS["epoch"]
