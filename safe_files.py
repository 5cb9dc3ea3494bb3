"""Nothing the user already has is lost, and what they must fix is said in one line.

UserError is a problem the user can fix; only train.main() turns it into `error: ...` and exit code 2.
Directories (the best adapter, the resume state, the converted model) are replaced atomically, and the
caches (JSON, safetensors) are written through a temporary file and read back without trusting a
half-written or hand-broken one. Needs nothing from the other modules.
"""
import json
import os
import shutil
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix, said in one line; main() prints it and exits with code 2."""


@contextmanager
def replaced_atomically(path):
    """Yield a fresh directory to write into; once written in full it takes the place of `path`.
    A crash while writing leaves the previous `path` as it was (and path.old if it hit the swap)."""
    restore_interrupted_swap(path)
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    if os.path.exists(path):
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:  # the new copy could not take its place: put the previous one back
        restore_interrupted_swap(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_swap(path):
    """A crash between the two renames above leaves only path.old: put it back."""
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        os.rename(path + ".old", path)


def read_json(path):
    """A JSON object that train.py wrote (and the user may have edited), or None when there is
    none; one that is cut short or not an object is made again rather than trusted."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as e:  # a crash while an older version wrote it, an edit gone wrong
        print(f"[files] {path} cannot be read ({type(e).__name__}): making it again")
        return None
    if not isinstance(data, dict):
        print(f"[files] {path} is not a JSON object: making it again")
        return None
    return data


def read_tensors(path, made_for):
    """The tensors of a safetensors cache that train.py wrote for `made_for` (its metadata, str -> str),
    or {} when there is none, it was made for something else, or it cannot be read."""
    from safetensors import safe_open
    if not os.path.exists(path):
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            if f.metadata() != made_for:
                return {}
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # a crash while writing it, a file that is not safetensors
        print(f"[files] {path} cannot be read ({type(e).__name__}): making it again")
        return {}


def write_tensors(path, tensors, made_for):
    """Write a safetensors cache through a temporary file, so a crash never leaves half a file."""
    from safetensors.torch import save_file
    save_file({key: t.contiguous() for key, t in tensors.items()}, path + ".tmp", metadata=made_for)
    os.replace(path + ".tmp", path)


def write_json(path, data):
    """Write JSON through a temporary file, so a crash never leaves half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)
