"""Methods as text, the one grammar the command line, evaluations and benchmarks share.

- a budget: `512` is a token count, `0.25` / `25%` / `1.0` a fraction of the context (in (0, 1]);
- a parameter list: `key=value` pairs (ints, floats, true/false, none, strings), each key once;
- a method spec: `name` or `name:key=value,key=value`, swept over budgets it does not fix itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from squeezegen.errors import SqueezegenError
from squeezegen.methods.full import Full
from squeezegen.methods.registry import method, methods
from squeezegen.methods.rpc import RPC
from squeezegen.runtime.hooks import Method

BUDGET_GRAMMAR = "a token count (512) or a fraction of the context (0.25, 25%, 1.0)"


def parse_budget(text: str | int | float) -> int | float:
    """`"512"` -> 512 tokens; `"0.25"`, `"25%"`, `"1.0"` -> fractions. Anything else is an error."""
    if isinstance(text, bool):
        raise SqueezegenError(f"budget must be {BUDGET_GRAMMAR}, got {text!r}")
    if isinstance(text, (int, float)):
        value: int | float = text
    else:
        raw = str(text).strip()
        try:
            if raw.endswith("%"):
                value = float(raw[:-1]) / 100
            elif raw.lstrip("+-").isdigit():
                value = int(raw)
            else:
                value = float(raw)
        except ValueError:
            raise SqueezegenError(f"budget must be {BUDGET_GRAMMAR}, got {text!r}") from None
    if isinstance(value, float) and not (math.isfinite(value) and 0 < value <= 1):
        raise SqueezegenError(f"a fractional budget must be in (0, 1], got {text!r}; a token count is an integer")
    if isinstance(value, int) and value < 1:
        raise SqueezegenError(f"a token budget must be at least 1, got {text!r}")
    return value


def parse_value(text: str) -> object:
    """Command-line text to a Python value: int, float, bool, None or the string itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_params(pairs: list[str]) -> dict[str, object]:
    """`["budget=512", "window=32"]` -> `{"budget": 512, "window": 32}`; a key given twice is an error."""
    params: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SqueezegenError(f"method parameters are key=value pairs, got {pair!r}")
        if key in params:
            raise SqueezegenError(f"method parameter {key!r} is given twice: keep one {key}=...")
        params[key] = parse_budget(value) if key == "budget" else parse_value(value)
    return params


@dataclass(frozen=True)
class MethodSpec:
    """`name` or `name:key=value,key=value` from the command line; `label` names it in tables."""

    label: str
    name: str
    params: dict = field(hash=False)

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        name, _, rest = text.partition(":")
        params = parse_params([p for p in rest.split(",") if p]) if rest else {}
        method(name, **params)  # fail early on an unknown name or parameter
        return cls(text, name, params)

    def budgets(self, sweep: list[float | int]) -> list[float | int | None]:
        """The budgets this spec runs at: its own if it names one, else the sweep's; [None] for a
        method that sizes its cache itself (RPC)."""
        if "budget" not in methods()[self.name]:
            return [None]
        return [self.params["budget"]] if "budget" in self.params else list(sweep)

    def build(self, budget: float | int | None = None) -> Method:
        """The configured method; `budget` applies if the method takes one and the spec set none."""
        params = dict(self.params)
        if budget is not None and "budget" in methods()[self.name] and "budget" not in params:
            params["budget"] = budget
        return method(self.name, **params)


def expand(specs: list[MethodSpec], budgets: list[float | int]) -> dict[tuple[str, float | int | None], Method]:
    """Every (label, budget) to run, with its configured method; the full cache first."""
    configured: dict[tuple[str, float | int | None], Method] = {("full", None): Full()}
    for spec in specs:
        for budget in spec.budgets(budgets):
            configured[(spec.label, budget)] = spec.build(budget)
    return configured


def matched_budget(specs: list[MethodSpec], prompt_tokens: int, generated: int) -> int:
    """A token budget equal to the peak cache of the first RPC among `specs` over `generated`
    decode steps (prompt included): baselines then hold as much as RPC ever does."""
    rpc = next((s.build() for s in specs if s.name == "rpc"), RPC())
    return prompt_tokens + rpc.peak_generated(generated)
