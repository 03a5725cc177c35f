"""PyramidKV: SnapKV scores with budgets that shrink with depth (same total as a flat budget)."""

from dataclasses import dataclass

from squeezegen.methods.snapkv import SnapKV
from squeezegen.runtime.scoring import resolve_budget


@dataclass
class PyramidKV(SnapKV):
    """Layer 0 keeps the most, the last layer the least, budget/beta of the non-window part;
    the budgets fall linearly and average to the flat budget."""

    beta: int = 20

    def layer_budget(self, engine, layer, context):
        flat = resolve_budget(self.budget, context)
        window = min(self.window, flat)
        layers = len(engine.parts.layers)
        low = (flat - window) / self.beta
        high = 2 * (flat - window) - low
        step = (high - low) / max(layers - 1, 1)
        return min(context, window + round(high - layer * step))
