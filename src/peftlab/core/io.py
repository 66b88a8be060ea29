"""Safe file I/O: atomic writes (temp file + fsync + rename) and safetensors-only adapter weights."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def as_os_error(error: BaseException, path: str | os.PathLike) -> OSError:
    """A failed write as an OSError naming the file: safetensors reports I/O failures (a full disk) as
    SafetensorError("... I/O error: No space left on device (os error 28)"); its errno is kept."""
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror or str(error), str(path))
    code = re.search(r"os error (\d+)", str(error))
    return OSError(int(code.group(1)) if code else errno.EIO, str(error), str(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_replace(Path(path), lambda f: f.write(text.encode("utf-8")))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_replace(Path(path), lambda f: f.write(data))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write a safetensors file atomically; tensors are made contiguous and detached (safetensors requires it)."""
    path = Path(path)
    clean = {k: v.detach().contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors sharing memory; clone any that alias another.
    seen: dict[int, str] = {}
    for k, v in clean.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            clean[k] = v.clone()
        seen[ptr] = k
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=metadata or {"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        os.path.exists(tmp) and os.unlink(tmp)
        raise as_os_error(e, path) from e
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors content under another name (e.g. a CorDA cache_file path the user chose): an 8-byte
    little-endian header length, then the JSON header itself. torch.save files start with a zip or pickle
    magic instead, so the two are never confused."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read adapter weights. safetensors is preferred (recognised by suffix or content); a legacy .bin or other
    torch.save file is read with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights {path} do not exist")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); the adapter file is corrupted or "
                             f"truncated — re-save or re-download it") from None
    try:
        # weights_only=True refuses pickled code objects: a .bin from an untrusted source cannot execute anything.
        data = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ValueError(f"{path} could not be read as a plain tensor dict with weights_only=True ({e}); "
                         f"peftlab refuses pickles that need code execution — convert it to safetensors") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return data
