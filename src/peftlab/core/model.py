"""PeftModel: the container users hold — adapters by name, the active set, mixed batches, merge/unmerge, save/load.

Layout mirrors HF PEFT so scripts and saved keys carry over: `peft_model.base_model.model` is the Transformers
model, adapted in place, and saved keys are `base_model.model.<module>.<tensor>` with the adapter name removed.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

from . import adapter_files as files, heads
from .adapter_files import check_adapter_name
from .config import PeftConfig
from .layer import ModulesToSave
from .merging import MergeMethods
from .mixed import row_groups
from .quantized import keep_canonical_layout, parameter_count
from .registry import get_tuner
from .siblings import SiblingFusion
from .signature import with_base_signature
from ..hf.defaults import TASK_HEAD_NAMES


class AdaptedModel(nn.Module):
    """Holds the Transformers model at `.model`, so parameter names match HF PEFT's (`base_model.model.*`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)


class PeftModel(MergeMethods, nn.Module):
    _signature_of: Optional[type] = None  # the base model class whose forward signature this class presents

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default"):
        super().__init__()
        # forward presents the base model's signature, so HF Trainer keeps input_ids/labels (core/signature.py)
        self.__class__ = with_base_signature(type(self), type(model))
        self._hold(model, {})
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    def _hold(self, model: nn.Module, peft_config: dict[str, PeftConfig]) -> None:
        self.base_model = AdaptedModel(model)
        self.siblings = SiblingFusion()  # layers reading one input train as one node (core/siblings.py)
        self.peft_config: dict[str, PeftConfig] = peft_config
        self._active: list[str] = list(peft_config)
        self.last_aux_losses: dict[str, torch.Tensor] = {}  # the last training forward's auxiliary losses

    @classmethod
    def over_injected(cls, model: nn.Module, peft_config: dict[str, PeftConfig]) -> "PeftModel":
        """A PeftModel over a model whose adapters are in place already (helpers.inject_adapter_in_model): nothing
        is injected, frozen or activated; the helpers use it to read and load such a model's adapter tensors."""
        pm = cls.__new__(cls)
        nn.Module.__init__(pm)
        pm._hold(model, peft_config)
        return pm

    # -- attribute forwarding so the model drops into HF Trainer / generate code --------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self._modules["base_model"].model, name)

    @property
    def model(self) -> nn.Module:
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def active_adapter(self) -> str:
        return self._active[0] if self._active else None

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    # -- adapters --------------------------------------------------------------------------------------
    def _tuner(self, name: str):
        return get_tuner(self.peft_config[name].peft_type)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; delete_adapter() it first "
                             f"or pick another name")
        model = self.model
        cfg = peft_config.replace()  # our own copy: injection may resolve defaults into it
        if cfg.base_model_name_or_path is None:
            cfg.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        task_heads = TASK_HEAD_NAMES.get(cfg.task_type, [])
        if task_heads:
            # The task's head names, present or not, exactly as HF PEFT records them (both "classifier" and "score").
            cfg.modules_to_save = list(dict.fromkeys(list(cfg.modules_to_save or []) + task_heads))
        if cfg.task_type is None and cfg.auto_mapping is None:
            # HF PEFT records the model class when there is no task type, to rebuild it from the adapter alone.
            cfg.auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
        tuner = get_tuner(cfg.peft_type)
        keep_canonical_layout(model)
        tuner.inject(model, cfg, adapter_name)
        heads.wrap_modules_to_save(model, cfg.modules_to_save or [], adapter_name)
        self.peft_config[adapter_name] = cfg
        self._refresh()

    def _modules_to_save(self) -> Iterator[tuple[str, ModulesToSave]]:
        return heads.head_copies(self.model)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"no adapter named {n!r}; this model has: {', '.join(self.peft_config)}")
        self._active = names
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has: {', '.join(self.peft_config)}")
        self._tuner(adapter_name).remove(self.model, adapter_name)
        for name, wrapper in list(self._modules_to_save()):
            if adapter_name in wrapper.copies:
                del wrapper.copies[adapter_name]
        del self.peft_config[adapter_name]
        self._active = [a for a in self._active if a != adapter_name]
        if not self._active and self.peft_config:
            self._active = [next(iter(self.peft_config))]
        self._refresh()

    def _refresh(self) -> None:
        """Apply the active set to every layer and set requires_grad: only the active adapters train."""
        model = self.model
        self.siblings.reset()
        for tuner in {id(get_tuner(c.peft_type)): get_tuner(c.peft_type) for c in self.peft_config.values()}.values():
            tuner.set_active(model, self._active)
        for _, wrapper in self._modules_to_save():
            wrapper.active = next((a for a in self._active if a in wrapper.copies), None)
        for p in model.parameters():
            p.requires_grad_(False)
        for name in self._active:
            cfg = self.peft_config[name]
            if cfg.inference_mode:
                continue
            for p in self._tuner(name).adapter_parameters(model, name):
                p.requires_grad_(True)
            for _, wrapper in self._modules_to_save():
                if name in wrapper.copies:
                    for p in wrapper.copies[name].parameters():
                        p.requires_grad_(True)
            for p in self._bias_parameters(cfg, name).values():
                p.requires_grad_(True)

    def _bias_parameters(self, cfg: PeftConfig, adapter_name: str) -> dict[str, nn.Parameter]:
        return heads.trained_biases(self.model, getattr(cfg, "bias", "none"), adapter_name)  # LoRA-style configs

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: inside it the model computes the base model's output."""
        tuners = {id(get_tuner(c.peft_type)): get_tuner(c.peft_type) for c in self.peft_config.values()}.values()
        wrappers = [w for _, w in self._modules_to_save()]
        try:
            for t in tuners:
                t.set_disabled(self.model, True)
            for w in wrappers:
                w.disabled = True
            yield
        finally:
            for t in tuners:
                t.set_disabled(self.model, False)
            for w in wrappers:
                w.disabled = False

    # -- forward ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: Optional[list[str]]):
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n != "__base__" and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; known: {list(self.peft_config)} "
                             f"(use '__base__' for rows that should use the base model)")
        rewriting = sorted(n for n in set(adapter_names) | set(self._active)
                           if n in self.peft_config and self._tuner(n).rewrites_inputs)
        if rewriting:
            raise ValueError(f"mixed-adapter batches (adapter_names=...) are not supported with {rewriting}: prompt "
                             f"and prefix methods change the inputs of the whole batch; run one adapter per batch")
        with row_groups(self.model, adapter_names, self._device()):
            yield

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _active_tuners(self):
        for name in self._active:
            yield name, self.peft_config[name], self._tuner(name)

    @property
    def rewrites_inputs(self) -> bool:
        """Whether an active adapter rewrites the inputs of every forward (prompt and prefix methods)."""
        return any(t.rewrites_inputs for _, _, t in self._active_tuners())

    def _inputs_as_keywords(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Tuners that rewrite the inputs (prompt methods) read input_ids from the keywords: move it there."""
        if not self.rewrites_inputs:
            return args, kwargs
        if "inputs" in kwargs and "input_ids" not in kwargs:  # generate(inputs=...)
            kwargs = {"input_ids": kwargs.pop("inputs"), **kwargs}
        if args and "input_ids" not in kwargs:
            kwargs, args = {"input_ids": args[0], **kwargs}, args[1:]
        return args, kwargs

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        args, kwargs = self._inputs_as_keywords(args, kwargs)
        if not any(t.takes_task_ids for _, _, t in self._active_tuners()):
            kwargs.pop("task_ids", None)  # task labels of the data: only a router that learns them reads them
        for name, cfg, tuner in self._active_tuners():
            kwargs = tuner.prepare_inputs(self.model, name, cfg, kwargs, generate=False)
        with self.siblings.forward_pass(self.model), self._mixed_batch(adapter_names):
            out = self.model(*args, **kwargs)
        self.last_aux_losses = {}
        if self.training and getattr(out, "loss", None) is not None:
            for name, cfg, tuner in self._active_tuners():
                extra = tuner.aux_loss(self.model, name, cfg)
                if extra is not None:
                    out.loss = out.loss + extra
                    self.last_aux_losses[name] = extra.detach()  # the training loop logs them
        return out

    def generate(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        args, kwargs = self._inputs_as_keywords(args, kwargs)
        for name, cfg, tuner in self._active_tuners():
            kwargs = tuner.prepare_inputs(self.model, name, cfg, kwargs, generate=True)
        with self._mixed_batch(adapter_names):
            return self.model.generate(*args, **kwargs)

    def end_task(self, batches) -> None:
        """Continual learning, after training on a task: the active adapters whose method consolidates tasks
        (Tuner.consolidates_tasks, e.g. EWC-LoRA) record what they must keep, from `batches` of that task (dicts
        with labels); a no-op for the others (sequential fine-tuning)."""
        for name, cfg, tuner in self._active_tuners():
            if tuner.consolidates_tasks:
                tuner.end_task(self.model, name, cfg, batches)

    def before_optimizer_step(self, step: int) -> None:
        """Gradient hooks (call after backward and clipping, before optimizer.step()): the active adapters whose
        method rewrites its gradients (Tuner.adjusts_gradients, e.g. LoRA-Pro); a no-op for the others."""
        for name, cfg, tuner in self._active_tuners():
            if tuner.adjusts_gradients and not cfg.inference_mode:
                tuner.before_optimizer_step(self.model, name, cfg, step)

    def on_step_end(self, step: int) -> None:
        """Per-step method hooks (call after backward, before zero_grad); a no-op for most methods."""
        for name, cfg, tuner in self._active_tuners():
            if not cfg.inference_mode:
                tuner.on_step_end(self.model, name, cfg, step)

    # -- routing (mixtures of experts: Tuner.routes_tokens) -------------------------------------------------
    def _routed(self):
        for name, cfg in self.peft_config.items():
            tuner = get_tuner(cfg.peft_type)
            if tuner.routes_tokens:
                yield name, tuner

    def get_routing_stats(self) -> dict:
        """{adapter: {group: {"mean_entropy", "mean_load", "layers": {router: {"tokens", "load", "entropy",
        "max_entropy"}}}}} since the last reset; group "all" holds every token, others come from routing_group()."""
        return {name: tuner.routing_stats(self.model, name) for name, tuner in self._routed()}

    def reset_routing_stats(self) -> None:
        for name, tuner in self._routed():
            for ctx in tuner.routing_contexts(self.model, name):
                ctx.reset_stats()

    @contextlib.contextmanager
    def routing_group(self, group: Optional[str]):
        """Inside: routing statistics are also recorded under `group` (a task or label name)."""
        from .routing import group_contexts
        contexts = [c for name, tuner in self._routed() for c in tuner.routing_contexts(self.model, name)]
        with group_contexts(contexts, group):
            yield

    # -- parameters -------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(parameter_count(p) for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, n = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / n:.4f}")

    def get_layer_status(self) -> list:
        """HF PEFT's TunerLayerStatus of every adapted layer and head copy (core/status.py)."""
        from .status import layer_status
        return layer_status(self)

    def get_model_status(self):
        """HF PEFT's TunerModelStatus: the layer statuses summarised, "irregular" where layers disagree."""
        from .status import model_status
        return model_status(self)

    # -- saving and loading: HF PEFT's files (core/adapter_files.py) -------------------------------------------
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The tensors of one adapter under HF PEFT's saved key names."""
        return files.adapter_state_dict(self, adapter_name)

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Optional[list[str]] = None,
                        save_embedding_layers: Union[bool, str] = "auto", safe_serialization: bool = True,
                        is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: Optional[str] = None, **_ignored) -> None:
        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False): peftlab writes safetensors only, because a "
                             "pickled adapter_model.bin can run arbitrary code when it is loaded; drop the argument "
                             "(HF PEFT and Transformers read adapter_model.safetensors)")
        if is_main_process:
            files.save_adapters(self, Path(save_directory), selected_adapters or list(self.peft_config),
                                path_initial_model_for_weight_conversion, save_embedding_layers)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        subfolder: Optional[str] = None, **_ignored) -> "PeftModel":
        directory = files.adapter_dir(model_id, subfolder)
        cfg = config if config is not None else PeftConfig.from_pretrained(directory)
        cfg = cfg.replace(inference_mode=not is_trainable)
        peft_model = cls(model, cfg, adapter_name)
        files.load_adapter_state(peft_model, adapter_name, files.read_weights(directory))
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: Optional[str] = None, **_ignored) -> None:
        directory = files.adapter_dir(model_id, subfolder)
        cfg = PeftConfig.from_pretrained(directory).replace(inference_mode=not is_trainable)
        if adapter_name in self.peft_config:
            self._reload_adapter(adapter_name, cfg, directory, is_trainable)
            return
        self.add_adapter(adapter_name, cfg)
        try:
            files.load_adapter_state(self, adapter_name, files.read_weights(directory))
        except Exception:
            self.delete_adapter(adapter_name)  # never leave a half-loaded adapter behind
            raise
        self._refresh()

    def _reload_adapter(self, adapter_name: str, cfg: PeftConfig, directory: Path, is_trainable: bool) -> None:
        """HF PEFT's load_adapter onto an existing name: the file's tensors replace that adapter's (its config and
        trainability stay). HF Trainer resumes a checkpoint this way. A failed load puts the old tensors back."""
        own = self.peft_config[adapter_name].peft_type
        if cfg.peft_type != own:
            raise ValueError(f"{directory} holds a {cfg.peft_type} adapter, but adapter {adapter_name!r} is {own}; "
                             f"load it under a new adapter_name")
        before = files.adapter_state_dict(self, adapter_name)
        try:
            files.load_adapter_state(self, adapter_name, files.read_weights(directory))
        except Exception:
            files.load_adapter_state(self, adapter_name, before)
            raise
        if not is_trainable:
            self.eval()


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **_ignored) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (HF PEFT's entry point)."""
    return PeftModel(model, peft_config, adapter_name)
