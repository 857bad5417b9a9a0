"""Estimated compute per processed position: what the bench reports and the k policy assumes
when it must not depend on timings."""
from __future__ import annotations


def flops_per_token(model) -> float:
    """~2 FLOPs per weight of every linear layer (the output head included, even when tied to
    the input embedding, which is a lookup). Attention-score FLOPs are left out: small at
    these lengths. Quantized or reduced-precision linears count by their shapes."""
    from torch import nn
    from torch.ao.nn.quantized import Linear as QuantizedLinear

    if hasattr(model, "flops_per_token"):  # models that are not a torch module tree (compact decoder)
        return float(model.flops_per_token())
    torch_model = getattr(model, "model", None)
    if torch_model is None:
        return 0.0
    weights = sum(m.in_features * m.out_features for m in torch_model.modules()
                  if isinstance(m, (nn.Linear, QuantizedLinear)))
    return 2.0 * weights
