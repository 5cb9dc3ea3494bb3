"""Interruptions: Ctrl-C keeps the best adapter and --resume finishes the run as if nothing happened;
SIGKILL during a save never leaves a broken adapter; a diverging loss stops with a clear message."""
import json
import os
import signal
import time

import pytest
from safetensors.torch import load_file

from conftest import project, run, start

RUN = dict(target_layers=[2, 3], epoch=150, early_stop=False, lr=1e-3)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.005)


def adapter_is_whole(directory):
    config = json.loads((directory / "adapter_config.json").read_text())
    return config["peft_type"] == "LORA" and len(load_file(directory / "adapter_model.safetensors")) > 0


def test_ctrl_c_keeps_the_best_adapter_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    whole = project(tmp_path / "whole", tiny_model_dir, earlier_adapter=False, **RUN)
    assert run(whole).returncode == 0
    expected = json.loads((whole / "output" / "metrics.json").read_text())

    cut = project(tmp_path / "cut", tiny_model_dir, earlier_adapter=False, **RUN)
    process = start(cut)
    wait_for(cut / "output" / "best_adapter" / "adapter_model.safetensors", process)
    sent = time.time()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert time.time() - sent < 30 and process.returncode == 2
    assert "training stopped: interrupted (Ctrl-C)" in stderr and "--resume" in stderr and "Traceback" not in stderr
    stopped = json.loads((cut / "output" / "metrics.json").read_text())
    assert 1 <= len(stopped["train_loss"]) < RUN["epoch"] and (cut / "output" / "loss_curve.png").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(cut / "output" / "best_adapter"))

    resumed = run(cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[resume] continuing after epoch" in resumed.stdout
    finished = json.loads((cut / "output" / "metrics.json").read_text())
    for key in ("train_loss", "val_loss"):
        assert len(finished[key]) == len(expected[key]) == RUN["epoch"]
        assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(finished[key], expected[key])), key
    assert finished["best_epoch"] == expected["best_epoch"]
    assert run(cut, "--resume").stderr.startswith("error: nothing to resume")


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05])
def test_sigkill_during_saves_leaves_a_whole_adapter(tmp_path, tiny_model_dir, delay):
    directory = project(tmp_path, tiny_model_dir, earlier_adapter=False, **RUN)
    process = start(directory)
    wait_for(directory / "output" / "best_adapter" / "adapter_model.safetensors", process)
    wait_for(directory / "output" / "best_adapter.tmp", process)  # the next save has begun
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    # what a user (or the next run) finds is a complete adapter, the old one or the new one
    adapter = directory / "output" / "best_adapter"
    if not adapter.exists():  # killed between the two renames of the swap: the next run puts it back
        import train
        train.restore_interrupted_swap(str(adapter))
    assert adapter_is_whole(adapter)


def test_diverging_loss_stops_clearly_and_keeps_the_last_good_adapter(tmp_path, tiny_model_dir):
    directory = project(tmp_path, tiny_model_dir, **dict(RUN, lr=1e30, epoch=20))
    result = run(directory)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the loss became" in result.stderr and "lower lr" in result.stderr
    adapter = directory / "output" / "best_adapter"
    assert adapter_is_whole(adapter) or (adapter / "adapter_model.safetensors").read_bytes() == b"earlier weights"
