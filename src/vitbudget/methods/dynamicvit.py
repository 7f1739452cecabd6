"""DynamicViT (Rao et al., NeurIPS 2021): a learned predictor on token embeddings drops tokens.

Predictors before 0-based blocks `stages` (3, 6, 9) keep rho, rho^2, rho^3 of the patch tokens.
Training: hard Gumbel-softmax masks (tau 1), monotone, applied as an attention policy; loss adds
rate_weight * sum_k (kept fraction - rho^k)^2 / K and token_distill * MSE(final kept tokens,
teacher tokens, both after the final norm); the KL to the teacher is the Trainer's distill_weight. Inference: top
int(N * rho^k) tokens by keep score as its reference computes them (N = 196, rho 0.7: 137, 96, 67),
the rest really removed (same count per image: batched). The reference orders the kept tokens by
score; we keep their original order, which changes no logit (attention and the predictor's
global mean are permutation-invariant). Fine-tuning recipe: `dynamicvit_cifar10`, predictors at
100x the backbone's learning rate (the reference's backbone `lr_scale` 0.01).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from .predictor import PredictorMethod, StagedOptions
from .registry import register


@dataclass(frozen=True)
class DynamicViTOptions(StagedOptions):
    rate_weight: float = field(default=2.0, metadata={"help": "dynamicvit/spot: weight of the keep-rate loss sum_k (kept fraction - rho^k)^2 / K"})
    token_distill: float = field(default=0.5, metadata={"help": "dynamicvit/spot: weight of the MSE between final kept tokens and the teacher's (dynamicvit 0.5, spot 0)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rate_weight < 0 or self.token_distill < 0:
            raise ConfigError(f"--rate-weight and --token-distill must be >= 0, got {self.rate_weight}, {self.token_distill}")


class DynamicViT(PredictorMethod):
    name = "dynamicvit"
    sources = ()

    def __init__(self, model: nn.Module, options: DynamicViTOptions):
        super().__init__(model, options)
        self.setup(d_remap=model.cfg.embed_dim, head_average=False, shared=False)


register("dynamicvit", lambda model, opts: DynamicViT(model, opts), DynamicViTOptions,
         "DynamicViT: learned embedding-only predictors prune to rho^k of the tokens at each stage (needs training)",
         label="DynamicViT", kind="reducer", trains=True, recipe="dynamicvit_cifar10")
