"""The forward signature a PeftModel presents: its base model's (plus `adapter_names`), at the class and the instance.

Code that reads a model's forward signature decides what to pass from it. HF Trainer's default
`remove_unused_columns=True` keeps only the batch keys named in the signature, and `find_labels` /
`can_return_loss` read the class's signature to find the label columns; a wrapper whose forward is
`(*args, **kwargs)` loses `input_ids` and `labels` there. HF PEFT answers with one class per task type whose forward
lists the usual arguments; here each PeftModel class is paired with its base model's class in a subclass whose
forward carries the base forward's exact signature (LLaMA's `position_ids`, BERT's `token_type_ids`, ...), so
every task type and architecture is covered. The subclass only declares a signature: it computes what its parent
computes and keeps its parent's name.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional


def with_base_signature(cls: type, base_cls: type) -> type:
    """The subclass of `cls` (a PeftModel class) whose forward presents `base_cls.forward`'s signature."""
    while cls.__dict__.get("_signature_of") is not None:  # already paired (from_pretrained on a paired class)
        cls = cls.__bases__[0]
    return _paired(cls, base_cls)


def _rebuild(cls: type, base_cls: type):
    """Unpickling: the paired class is made again (it lives in no module namespace pickle could look it up in)."""
    return object.__new__(with_base_signature(cls, base_cls))


@functools.lru_cache(maxsize=None)
def _paired(cls: type, base_cls: type) -> type:
    sig = _forward_signature(base_cls)
    if sig is None:
        return cls

    def forward(self, *args, **kwargs):
        return super(paired, self).forward(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        _, _, *rest = super(paired, self).__reduce_ex__(protocol)  # (copyreg.__newobj__, (paired,), state, ...)
        return (_rebuild, (cls, base_cls), *rest)

    functools.update_wrapper(forward, cls.forward)
    forward.__signature__ = sig
    paired = type(cls.__name__, (cls,), {"forward": forward, "__reduce_ex__": __reduce_ex__, "_signature_of": base_cls,
                                         "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                         "__doc__": cls.__doc__})
    return paired


def _forward_signature(base_cls: type) -> Optional[inspect.Signature]:
    """base_cls.forward's signature (self first) with a keyword-only `adapter_names=None` (mixed batches) added."""
    try:
        sig = inspect.signature(base_cls.forward)
    except (TypeError, ValueError):  # a forward implemented in C: keep the generic (*args, **kwargs)
        return None
    params = list(sig.parameters.values())
    if "adapter_names" not in sig.parameters:
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
    return sig.replace(parameters=params)
