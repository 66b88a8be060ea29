"""The LoRA family as one package: LoRA, rsLoRA, DoRA, PiSSA, CorDA, EVA, LoRA-FA, LoRA-dropout.

config.py   LoraConfig (HF PEFT's fields; rsLoRA, DoRA, PiSSA, CorDA and EVA are options of it)
layers.py   LoraLinear / LoraEmbedding: y = W x + s·B A x, the low-rank operand protocol (core/lowrank.py)
dora.py     DoraLinear: a learned row magnitude over the LoRA-updated direction
pissa.py    PiSSA's SVD initialisation; olora.py OLoRA's QR one; corda.py CorDA's context-oriented one (needs
            calibration data)
eva.py      EVA: A from an incremental PCA (ipca.py) of each layer's inputs, ranks redistributed by explained
            variance, after get_peft_model (initialize_lora_eva_weights); eva_load.py puts the result in the model
trainable_tokens.py  trainable_token_indices: only some embedding rows train (PEFT's TrainableTokens)
params.py   target_parameters: LoRA on nn.Parameters such as MoE expert tensors (PEFT's ParamWrapper)
replication.py  layer_replication: repeated decoder layers sharing base weights
combine.py  add_weighted_adapter's combinations
tuner.py    LoraTuner (peft_type "LORA") and the registry names lora / rslora / pissa / dora
fa.py       LoRA-FA (A frozen), dropout.py LoRA-dropout: own peft_types, LoRA's file layout
pro.py      LoRA-Pro: LoRA's gradients adjusted before each optimizer step (Tuner.adjusts_gradients)
multi.py    MultiLoRA: n parallel LoRAs with learnable scalings, computed as one LoRA of rank n·r
ewc.py      EWC-LoRA: elastic weight consolidation across a sequence of tasks (peftlab continual)
lorahub.py  LoraHub: composition weights of several LoRAs searched on a few examples (peftlab compose lorahub)
The fused kernels these layers run are in core/functional.py: sibling fusion and mixed batches (core) call them
through the low-rank operand protocol, not through this package.
"""
from .config import EvaConfig, LoftQConfig, LoraConfig
from .corda import CordaConfig, CordaLoraConfig, preprocess_corda
from .dora import DoraLinear
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .dropout import LoraDropoutConfig, LoraDropoutLinear
from .ewc import EwcLoraConfig
from .fa import LoraFaConfig, LoraFaLinear
from .layers import LoraEmbedding, LoraLinear, linear_lora_kwargs, lora_scale
from .loftq import replace_lora_weights_loftq
from .tuner import LoraTuner

__all__ = ["CordaConfig", "CordaLoraConfig", "DoraLinear", "EvaConfig", "EwcLoraConfig", "LoftQConfig", "LoraConfig", "LoraDropoutConfig",
           "LoraDropoutLinear", "LoraEmbedding", "LoraFaConfig", "LoraFaLinear", "LoraLinear", "LoraTuner",
           "get_eva_state_dict", "initialize_lora_eva_weights", "linear_lora_kwargs", "lora_scale", "preprocess_corda",
           "replace_lora_weights_loftq"]
