"""moesteer: test-time steering of Mixture-of-Experts language models through their routers."""

from moesteer import routing
from moesteer.backends.hf.steer import steer
from moesteer.lm import LM, load
from moesteer.models.adapters import SUPPORTED_FAMILIES
from moesteer.sampling import SamplingParams
from moesteer.trace import RoutingTrace

__version__ = "0.1.0"

__all__ = ["LM", "SUPPORTED_FAMILIES", "RoutingTrace", "SamplingParams", "__version__", "load", "routing", "steer"]
