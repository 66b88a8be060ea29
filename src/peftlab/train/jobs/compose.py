"""run_compose: adapters (or fine-tuned models) of one base composed without training into one adapter
(`peftlab compose smile`)."""
from __future__ import annotations

from pathlib import Path

from .config import ComposeConfig, JobError
from .evaluate import Say, quiet
from .inputs import adapter_directory, load_base

def _dirs(value) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def run_compose(config: ComposeConfig, say: Say = quiet) -> dict:
    """SMILE over config's sources, saved to config.output; the summary `peftlab compose smile --json` prints."""
    for flag, value in (("model", config.model), ("output", config.output)):
        if not value:
            raise JobError(f"compose needs --{flag}")
    adapters = [adapter_directory(d) for d in _dirs(config.adapters)]
    models = _dirs(config.models)
    if len(adapters) + len(models) < 2:
        raise JobError("compose smile needs at least two sources: --adapters DIR1,DIR2,... (LoRA adapters or train "
                       "runs) and/or --models DIR1,... (fine-tuned models of the same base)")
    from ... import get_peft_model
    from ...methods.smile import SmileConfig
    base, tok = load_base(config.model, config.device, "generation", None, config)
    try:
        model = get_peft_model(base, SmileConfig(adapter_dirs=adapters or None, model_dirs=models or None,
                                                 k=config.k, gate_k=config.gate_k, top_k=config.top_k))
    except (ValueError, FileNotFoundError) as e:
        raise JobError(str(e)) from None
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
