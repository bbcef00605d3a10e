"""Parameter initialisation, declared per parameter in torchtitan's ``param_init`` style."""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import RMSNorm


def linear_init(in_features: int, out_features: int, std: float, bias: bool = False) -> Linear:
    if std == 0.0:
        init = {"weight": nn.init.zeros_}
    else:
        init = {"weight": partial(nn.init.trunc_normal_, mean=0.0, std=std, a=-3 * std, b=3 * std)}
    if bias:
        init["bias"] = nn.init.zeros_
    return Linear.Config(
        in_features=in_features, out_features=out_features, bias=bias, param_init=init
    ).build()


def rms_norm(dim: int, eps: float) -> RMSNorm:
    return RMSNorm.Config(normalized_shape=dim, eps=eps, param_init={"weight": nn.init.ones_}).build()


def depth_scaled_std(layer_id: int, base_std: float = 0.02) -> float:
    # Output projections of deeper layers start smaller so the residual stream's variance
    # does not grow with depth (the Llama / torchtitan convention).
    return base_std / (2 * (layer_id + 1)) ** 0.5
