"""Reference implementations a plug-in's bench entry may time itself against
(`BenchVariant.reference`: "module:function"). Each takes the freshly built model and the
entry's own recipe, changes the model in place and returns the tensors it adds, by name (the
bench trains them with the session's own)."""
from __future__ import annotations


def peft_lora(model, recipe) -> dict:
    """peft's LoRA (`inject_adapter_in_model`) on the frozen backbone of a model without
    adapters, at the entry's rank and scale (lora_alpha = alpha * r: peft scales by
    lora_alpha / r, ours by alpha) on the linears the entry's method adapts."""
    from peft import LoraConfig, inject_adapter_in_model

    from delo_dist.config import plugin_class
    cfg = recipe.method.settings
    method = plugin_class(recipe.method)(cfg)
    names = list(method.select_linears(model.backbone, recipe.backbone.targets))
    inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha * cfg.rank,
                                       target_modules=names, lora_dropout=0.0), model.backbone)
    return {n: p for n, p in model.named_parameters() if "lora_" in n}
