"""What a method is: hooks into the block runner, plus any parameters it adds to the ViT."""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from ..runtime.runner import Hooks, RunOutput, run


class Method(nn.Module, Hooks):
    """A way of running a ViT. By default: the block runner with this object as its hooks.

    Subclasses override hook steps (`before_block`, `after_attention`, `after_block`,
    `finish`...) and, when they need several passes (multi-crop), `forward` itself.
    The wrapped model is a submodule, so fine-tuning a method trains what it should.
    """

    name = "baseline"

    def __init__(self, model: nn.Module, options: Any = None):
        super().__init__()
        self.model = model
        self.options = options

    def forward(self, images: Tensor) -> RunOutput:
        return run(self.model, images, self)

    @property
    def data_dependent_shapes(self) -> str | None:
        """Why this method's inference shapes depend on the pixels, or None when the input's shape fixes
        every token count. Export refuses such a method and compile lets its graph break; a stack
        answers for itself and its reducer (methods.compose)."""
        return None

    @property
    def base_cfg(self):
        """The config rel. FLOPs are measured against: the model as given (resolution scaling runs a resized copy)."""
        return self.model.cfg

    def extra_losses(self, out: RunOutput, targets: Tensor, teacher: RunOutput | None) -> dict[str, Tensor]:
        """Weighted loss terms the method adds in training (ponder cost, keep rate, token distillation).

        `teacher` is the frozen teacher's run when the recipe has one: its logits, and its final
        tokens after the final norm in `teacher.record.aux["final_tokens"]` (`run_teacher`).
        """
        return {}

    def token_map(self, out: RunOutput):
        """Per-patch picture of what the method chose (a `runtime.token_map.TokenMap`), or None."""
        return None

    def describe(self) -> dict[str, Any]:
        """The settings that identify this run in reports."""
        opts = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}
        return {"method": self.name, **opts}


class _KeepFinalTokens(Hooks):
    def finish(self, model: nn.Module, state, record) -> Tensor:
        tokens = model.norm(state.x)
        record.aux["final_tokens"] = tokens
        return model.forward_head(tokens, state.key_mask)


def run_teacher(teacher: nn.Module, images: Tensor) -> RunOutput:
    """The teacher's plain forward, keeping its final-normed tokens for token distillation."""
    return run(teacher, images, _KeepFinalTokens())


class Baseline(Method):
    """The unmodified ViT, executed through the runner (bit-identical to `model(images)`)."""
