"""Analysis probes over attention weights and activations.

Pure functions on arrays (`sinks`, `heads`, `saliency`, `multimodal`, `quantization`) and the
capture helpers that get those arrays out of a model (`capture`).
"""

from attnjax.analysis import capture, heads, multimodal, quantization, saliency, sinks

__all__ = ["capture", "heads", "multimodal", "quantization", "saliency", "sinks"]
