"""run_compose: adapters (or fine-tuned models) of one base composed into one adapter without gradient training
(`peftlab compose smile|lorahub|ttmm`). ttmm with --clusters K first trains its experts: one LoRA per cluster of
the task's training prompts (run_job each), then composes them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...core.io import atomic_write_text
from .config import ComposeConfig, JobError, comma_list
from .evaluate import Say, quiet
from .inputs import adapter_directory, encode, load_base, load_data, sample

KINDS = ("smile", "lorahub", "ttmm")
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
    if kind == "ttmm":
        try:
            return _ttmm(config, adapters, say)
        except (ValueError, FileNotFoundError) as e:
            raise JobError(str(e)) from None
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


def _prompt_text(record: dict) -> str:
    return record.get("prompt", record.get("text", ""))


def _ttmm(config: ComposeConfig, adapters: list, say: Say) -> dict:
    """TTMM's recipe: the training prompts embedded and clustered (bisecting k-means), one LoRA trained per
    cluster, the centroids; or (no --clusters) the given LoRAs as experts, each with the centroid of the training
    prompts its train run read (its run.json's task or data)."""
    from ... import get_peft_model
    from ...methods.ttmm import SentenceEncoder, TTMMConfig, centroids, cluster_texts
    from ...models import model_path
    from .config import JobConfig
    from .run import run_job
    dest = Path(config.output)
    encoder = SentenceEncoder(config.encoder)
    if config.clusters:
        if adapters:
            raise JobError("compose ttmm: give --clusters K (train one LoRA per cluster of --task/--data) or "
                           "--adapters (finished LoRAs of train runs), not both")
        data = load_data(config)
        if data.kind != "generation":
            raise JobError(f"compose ttmm clusters prompt/completion records; {data.name} is {data.kind} data")
        emb = encoder([_prompt_text(r) for r in data.train])
        assignment = cluster_texts(emb, config.clusters, config.seed)
        cents = centroids(emb, assignment, config.clusters)
        experts, sizes = [], []
        for k in range(config.clusters):
            members = [r for r, a in zip(data.train, assignment) if a == k]
            run_dir = dest / "experts" / f"cluster{k}"
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "train.jsonl", "".join(json.dumps(r) + "\n" for r in members))
            say(f"cluster {k}: {len(members)} examples -> training its LoRA")
            run_job(JobConfig(model=config.model, device=config.device, seed=config.seed, quantize=config.quantize,
                              data=str(run_dir / "train.jsonl"), output=str(run_dir / "run"), method="lora",
                              steps=config.steps, epochs=None if config.steps else 1.0, batch_size=config.batch_size,
                              lr=config.lr, r=config.r, target_modules="all-linear", eval_before=False,
                              forgetting=False, progress=False, save_every=None))
            experts.append(str(run_dir / "run" / "adapter"))
            sizes.append(len(members))
    else:
        if len(adapters) < 2:
            raise JobError("compose ttmm needs --clusters K (with --task or --data) or at least two --adapters "
                           "(train runs' outputs, whose training prompts give each expert's centroid)")
        cents = torch.stack([_run_centroid(d, encoder) for d in adapters])
        experts, sizes = adapters, None
    base, _ = load_base(config.model, config.device, "generation", None, config)
    model = get_peft_model(base, TTMMConfig(expert_dirs=experts, centroids=cents.tolist(), beta=config.beta,
                                            tau=config.tau, encoder=config.encoder,
                                            tokenizer=str(model_path(config.model, fetch=False))))
    model.save_pretrained(str(dest))
    cfg = model.peft_config["default"]
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"composed {len(experts)} LoRA experts with TTMM (beta {cfg.beta}, tau {cfg.tau}) on "
        f"{len(cfg.target_modules)} layers -> {dest}")
    return {"command": "compose", "kind": "ttmm", "model": config.model, "experts": experts, "cluster_sizes": sizes,
            "output": str(dest), "beta": cfg.beta, "tau": cfg.tau, "adapter_params": params,
            "layers": len(cfg.target_modules)}


def _run_centroid(adapter: str, encoder) -> "torch.Tensor":
    """The normalised mean embedding of the training prompts of the train run that saved `adapter`."""
    import torch.nn.functional as F

    from .config import JobConfig
    run = Path(adapter).parent / "run.json"
    if not run.is_file():
        raise JobError(f"compose ttmm --adapters: {adapter} is not the adapter of a train run (no {run}); TTMM "
                       f"takes each expert's centroid from the prompts it was trained on")
    summary = json.loads(run.read_text())
    source = summary.get("task")
    options = {"data": source} if source and Path(source).is_file() else {"task": source}
    data = load_data(JobConfig(**options))
    return F.normalize(encoder([_prompt_text(r) for r in data.train]).mean(0), dim=0)
