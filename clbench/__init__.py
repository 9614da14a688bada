"""clbench: a continual-learning benchmark over Avalanche streams and Lightning strategies."""

from clbench._version import __version__
from clbench.registry import (  # cheap: no torch import
    AUXILIARY,
    SCENARIOS,
    STRATEGIES,
    register_aux,
    register_scenario,
    register_strategy,
)

__all__ = [
    "__version__",
    "STRATEGIES",
    "SCENARIOS",
    "AUXILIARY",
    "register_strategy",
    "register_scenario",
    "register_aux",
    "create_strategy",
    "create_scenario",
    "run",
]


def __getattr__(name):
    if name in ("create_strategy", "create_scenario", "create_aux", "run", "RunSpec"):
        from clbench.engine import runner

        return getattr(runner, name)
    raise AttributeError(name)
