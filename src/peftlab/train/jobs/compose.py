"""run_compose: adapters (or fine-tuned models) of one base composed into one adapter without gradient training
(`peftlab compose smile|lorahub`)."""
from __future__ import annotations

import json
from pathlib import Path

from ...core.io import atomic_write_text
from .config import ComposeConfig, JobError, comma_list
from .evaluate import Say, quiet
from .inputs import adapter_directory, encode, load_base, load_data, sample

KINDS = ("smile", "lorahub")
HUB = "default"   # the composed adapter (the sources are loaded beside it as source0, source1, ...)


def run_compose(config: ComposeConfig, kind: str = "smile", say: Say = quiet) -> dict:
    """Compose config's sources (kind: smile | lorahub) and save the adapter to config.output; the summary that
    `peftlab compose KIND --json` prints."""
    if kind not in KINDS:
        raise JobError(f"compose {kind!r}: the compositions are {', '.join(KINDS)}")
    for flag, value in (("model", config.model), ("output", config.output)):
        if not value:
            raise JobError(f"compose needs --{flag}")
    adapters, models = [adapter_directory(d) for d in comma_list(config.adapters)], comma_list(config.models)
    if len(adapters) + len(models) < 2:
        raise JobError(f"compose {kind} needs at least two sources: --adapters DIR1,DIR2,... (LoRA adapters or "
                       f"train runs)" + (" and/or --models DIR1,... (fine-tuned models of the same base)"
                                         if kind == "smile" else ""))
    if kind == "lorahub" and models:
        raise JobError("compose lorahub combines LoRA adapters (--adapters); fine-tuned models are SMILE's sources")
    try:
        return (_smile if kind == "smile" else _lorahub)(config, adapters, models, say)
    except (ValueError, FileNotFoundError) as e:
        raise JobError(str(e)) from None


def _smile(config: ComposeConfig, adapters: list, models: list, say: Say) -> dict:
    from ... import get_peft_model
    from ...methods.smile import SmileConfig
    base, _ = load_base(config.model, config.device, "generation", None, config)
    model = get_peft_model(base, SmileConfig(adapter_dirs=adapters or None, model_dirs=models or None, k=config.k,
                                             gate_k=config.gate_k, top_k=config.top_k))
    dest = Path(config.output)
    model.save_pretrained(str(dest))
    cfg = model.peft_config["default"]
    extra, total = model.get_nb_trainable_parameters()
    say(f"composed {len(adapters) + len(models)} sources with SMILE (k {cfg.k}, gate_k {cfg.gate_k}, top_k "
        f"{cfg.top_k}) on {len(cfg.target_modules)} layers: {extra:,} adapter parameters "
        f"({100 * extra / (total - extra):.2f}% of the base) -> {dest}")
    return {"command": "compose", "kind": "smile", "model": config.model, "sources": adapters + models,
            "output": str(dest), "experts": cfg.expert_names, "k": cfg.k, "gate_k": cfg.gate_k, "top_k": cfg.top_k,
            "adapter_params": extra, "layers": len(cfg.target_modules)}


def _lorahub(config: ComposeConfig, adapters: list, _models: list, say: Say) -> dict:
    from ...core.model import PeftModel
    from ...methods.lora.lorahub import lorahub
    data = load_data(config, "eval")
    if data.kind != "generation":
        raise JobError(f"compose lorahub fits the weights on prompt/completion examples; {data.name} is "
                       f"{data.kind} data")
    if config.shots < 1 or config.budget < 2:
        raise JobError(f"compose lorahub needs --shots >= 1 and --budget >= 2 (got {config.shots}, {config.budget})")
    shots = sample(data.train, config.shots, config.seed)
    base, tok = load_base(config.model, config.device, "generation", None, config)
    names = [f"source{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, d in zip(names[1:], adapters[1:]):
        model.load_adapter(d, adapter_name=name)
    configs = [model.peft_config[n] for n in names]
    if any(c.peft_type != "LORA" or c.use_dora for c in configs) or len({c.r for c in configs}) != 1:
        raise JobError("compose lorahub combines LoRA adapters of one rank (A and B are summed entry by entry); got "
                       + ", ".join(f"{d}: {c.peft_type}{' (DoRA)' if getattr(c, 'use_dora', False) else ''} "
                                   f"r={getattr(c, 'r', None)}" for d, c in zip(adapters, configs)))
    targets = sorted({t for c in configs for t in ([c.target_modules] if isinstance(c.target_modules, str)
                                                   else c.target_modules)})
    spec = "|".join(f"(?:{t})" for t in targets) if any(isinstance(c.target_modules, str) for c in configs) else targets
    model.add_adapter(HUB, configs[0].replace(target_modules=spec, rank_pattern={}, alpha_pattern={},
                                              init_lora_weights=True))
    examples, collate = encode("generation", shots, tok, config)
    batches = [{k: v.to(next(model.parameters()).device) for k, v in collate(examples[i:i + 8]).items()}
               for i in range(0, len(examples), 8)]
    result = lorahub(model, names, HUB, batches, budget=config.budget, l1=config.l1, seed=config.seed)
    for name in names:
        model.delete_adapter(name)
    dest = Path(config.output)
    model.save_pretrained(str(dest))
    saved = dest
    summary = {"command": "compose", "kind": "lorahub", "model": config.model, "sources": adapters,
               "output": str(saved), "weights": result.weights, "loss": result.loss, "start_loss": result.start_loss,
               "evaluations": result.evaluations, "shots": len(shots), "data": data.name}
    atomic_write_text(saved / "lorahub.json", json.dumps({**summary, "history": result.history}, indent=1))
    say(f"LoraHub on {len(shots)} examples of {data.name}: weights "
        + ", ".join(f"{w:+.3f}" for w in result.weights)
        + f"; few-shot objective {result.start_loss:.4f} (base) -> {result.loss:.4f} after {result.evaluations} "
          f"evaluations -> {saved}")
    return summary
