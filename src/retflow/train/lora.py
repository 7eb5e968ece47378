"""Protocol ``lora``: low-rank adapters on a frozen ViT encoder, with the ``peft`` library.

:func:`add_adapters` injects LoRA layers (``peft.inject_adapter_in_model``, the model stays the
same timm ``VisionTransformer``, modified in place) into the layers of every block that
``lora.target_modules`` names (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``: matched as
name suffixes, so ``attn.proj`` never catches ``patch_embed.proj``): ``W x + (alpha / rank) B A
dropout(x)``, ``B`` starting at zero so the adapted model starts as the pretrained one. Every
base weight is frozen; the adapters, the head and ``fc_norm`` train. :func:`merge_adapters` folds
the adapters into the base weights (peft's per-layer ``merge``) and puts the plain layers back,
so a run's ``best.pth`` is an ordinary timm state dict: every reader (predict, saliency, export)
loads it without peft.
"""

from __future__ import annotations

from torch import nn

from retflow.settings.load import ConfigError
from retflow.settings.stages import LoraSettings

#: parameters that train along with the adapters (the classifier on the pooled features)
TRAINED_WITH_ADAPTERS = ("head.", "fc_norm.")


def is_adapter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (``...qkv.lora_A.default.weight``)."""
    return ".lora_" in name


def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Every target names a linear layer of the blocks (a ViT variant may lack one the schema allows)."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")]
    missing = [t for t in targets if not any(n.endswith(f".{t}") for n in linear)]
    if missing:
        known = list(dict.fromkeys(n.split(".", 2)[2] for n in linear))
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} names no linear layer of this ViT's blocks; "
                          f"use some of {', '.join(known)}")


def add_adapters(model: nn.Module, a: LoraSettings) -> nn.Module:
    """LoRA adapters into ``model`` (in place) per ``a``; base weights frozen, adapters + head train."""
    _check_targets(model, a.target_modules)
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
                        bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter(name) or name.startswith(TRAINED_WITH_ADAPTERS)
    return model


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back (in place); returns ``model``,
    now a plain timm model whose outputs equal the adapted model's (in eval mode)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if "peft_config" in vars(model):  # the config peft leaves on an injected model
        del model.peft_config
    return model
