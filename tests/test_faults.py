"""Interruptions: Ctrl-C keeps the best adapter and --resume finishes the run as if nothing happened;
a save that fails half way never leaves a broken adapter; a diverging loss stops with a clear message."""
import json
import os
import signal
import time

import pytest

import safe_files
from conftest import project, run_here, start

# 5 pairs in batches of 2: three batches an epoch, so resuming must restore their order too. No teacher
# questions: the random model's answers never carry a fact, so none would be trained, only generated;
# and short answers: it never ends one, so every report would run to max_new_tokens
RUN = dict(target_layers=[2, 3], epoch=8, early_stop=False, lr=1e-3, batch_size=2, teacher_questions=0,
           max_new_tokens=8)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.005)


def test_ctrl_c_keeps_the_best_adapter_and_resume_matches_an_uninterrupted_run(tmp_path, capfd, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    whole = project(tmp_path / "whole", tiny_model_dir, earlier_adapter=False, **RUN)
    assert run_here(capfd, whole).returncode == 0
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

    resumed = run_here(capfd, cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[resume] continuing after epoch" in resumed.stdout
    finished = json.loads((cut / "output" / "metrics.json").read_text())
    assert len(finished["train_loss"]) == len(expected["train_loss"]) == RUN["epoch"]
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(finished["train_loss"], expected["train_loss"]))
    assert finished["train_recall"] == expected["train_recall"]
    assert finished["best_epoch"] == expected["best_epoch"]
    again = run_here(capfd, cut, "--resume")
    assert again.stderr.startswith("error: nothing to resume") and "[model]" not in again.stdout  # before loading


def write_files(directory, content):
    (directory / "adapter_model.safetensors").write_bytes(content)


@pytest.mark.parametrize("failing_call", [1, 2])  # moving the old copy aside, or the new one in
def test_a_save_that_fails_half_way_leaves_the_previous_adapter(tmp_path, monkeypatch, failing_call):
    adapter = tmp_path / "best_adapter"
    with safe_files.replaced_atomically(str(adapter)) as tmp:
        write_files(adapter.parent / os.path.basename(tmp), b"old")
    renames, real_rename = [], os.rename

    def rename(source, target):
        renames.append((source, target))
        if len(renames) == failing_call:
            raise OSError("disk full")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        with safe_files.replaced_atomically(str(adapter)) as tmp:
            write_files(adapter.parent / os.path.basename(tmp), b"new")
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"old"
    assert not (tmp_path / "best_adapter.old").exists()


def test_a_kill_between_the_two_renames_is_repaired_by_the_next_use(tmp_path):
    adapter = tmp_path / "best_adapter"
    (tmp_path / "best_adapter.old").mkdir()  # what a kill after the first rename leaves
    write_files(tmp_path / "best_adapter.old", b"old")
    with safe_files.replaced_atomically(str(adapter)) as tmp:
        assert (adapter / "adapter_model.safetensors").read_bytes() == b"old"  # put back before writing
        write_files(adapter.parent / os.path.basename(tmp), b"new")
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["best_adapter"]


def test_a_first_epoch_that_diverges_saves_nothing(tmp_path, capfd, tiny_model_dir):
    # one batch an epoch: its single step with lr 1e30 leaves weights that give nan on the next forward
    directory = project(tmp_path, tiny_model_dir, **dict(RUN, lr=1e30, epoch=3, batch_size=8))
    result = run_here(capfd, directory)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: training stopped: training diverged in epoch 1 (")
    assert "lower lr" in result.stderr and "no epoch finished" in result.stderr
    assert (directory / "output" / "best_adapter" / "adapter_model.safetensors").read_bytes() == b"earlier weights"
