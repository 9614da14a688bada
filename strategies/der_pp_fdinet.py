"""FDINet over DER++ (reconstructed; see `fdinet.py`): same two-branch network and image buffer, DER++'s losses."""

from __future__ import annotations

from dataclasses import dataclass

from clbench.strategies import der_pp
from clbench.strategies.er import MAMMOTH_PROTOCOL
from clbench.strategies.fdinet import FDINetMixin, FDINetOptions

from clbench.registry import register_strategy


@dataclass(frozen=True)
class Config(der_pp.Config, FDINetOptions):
    pass


@register_strategy("der_pp_fdinet")
class DERPPFDINet(FDINetMixin, der_pp.DERPP):
    """FDINet (reconstructed) trained with DER++ instead of ER."""

    Config = Config
    PAPER_SETTINGS = {  # reconstruction: CLFD-DER++'s Mammoth settings (buffer 125)
        "cifar10-5": {**MAMMOTH_PROTOCOL, "lr": 0.03, "epochs": 50, "replay_batch_size": 32,
                      "buffer_size": 125, "alpha": 0.2, "beta": 0.5},
        "tinyimagenet-10": {**MAMMOTH_PROTOCOL, "lr": 0.03, "epochs": 100, "replay_batch_size": 32,
                            "buffer_size": 125, "alpha": 0.1, "beta": 0.5},
    }
    PUBLISHED: dict = {}  # no accuracy table of the FDINet paper could be read
