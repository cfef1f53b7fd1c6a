"""Backbones that take any registered mixer."""

from attnjax.models.bam import BAMLM, ParallelDecoderLM
from attnjax.models.decoder import DecoderLM
from attnjax.models.mot import MixtureOfTransformers
from attnjax.models.hf_import import load_pretrained
from attnjax.models.vit import ViT

__all__ = ["BAMLM", "DecoderLM", "MixtureOfTransformers", "ParallelDecoderLM", "ViT", "load_pretrained"]
