"""moesteer: test-time steering of Mixture-of-Experts language models through their routers."""

from moesteer import routing
from moesteer.backends.hf.steer import steer
from moesteer.lm import LM, load
from moesteer.models.adapters import SUPPORTED_FAMILIES
from moesteer.sampling import SamplingParams
from moesteer.strategies import (
    C3PO,
    DES,
    BeamSearch,
    BestOfN,
    Plain,
    Rerouting,
    RoE,
    RunContext,
    SCMoE,
    SelfConsistency,
    WithK,
    WithPolicy,
    parse,
    run,
)
from moesteer.trace import RoutingTrace

__version__ = "0.1.0"

__all__ = [
    "C3PO",
    "DES",
    "LM",
    "SUPPORTED_FAMILIES",
    "BeamSearch",
    "BestOfN",
    "Plain",
    "Rerouting",
    "RoE",
    "RoutingTrace",
    "RunContext",
    "SCMoE",
    "SamplingParams",
    "SelfConsistency",
    "WithK",
    "WithPolicy",
    "__version__",
    "load",
    "parse",
    "routing",
    "run",
    "steer",
]
