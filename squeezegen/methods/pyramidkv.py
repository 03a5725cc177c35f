"""PyramidKV: SnapKV scores with budgets that shrink with depth (same total as a flat budget)."""

from dataclasses import dataclass

from squeezegen.methods.scoring import resolve_budget
from squeezegen.methods.snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """Layer 0 keeps the most, the last layer the least, budget/beta of the non-window part;
    the budgets fall linearly and average to the flat budget."""

    beta: int = 20

    CHOICE_FIELDS = SnapKV.CHOICE_FIELDS | {"beta"}

    def layer_budget(self, view, context, prompt):
        flat = resolve_budget(self.budget, context)
        window = min(self.window, flat)
        layers = view.num_layers
        low = (flat - window) / self.beta
        high = 2 * (flat - window) - low
        step = (high - low) / max(layers - 1, 1)
        return min(context, window + round(high - view.index * step))
