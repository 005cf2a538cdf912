"""The transformers backend: :class:`HFEngine` and its decode sessions."""

from moesteer.backends.hf.engine import HFEngine
from moesteer.backends.hf.session import DecodeSession

__all__ = ["DecodeSession", "HFEngine"]
