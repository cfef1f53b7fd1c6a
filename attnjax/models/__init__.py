"""Backbones that take any registered mixer."""

from attnjax.models.bam import BAMLM, ParallelDecoderLM
from attnjax.models.decoder import DecoderLM
from attnjax.models.graph_transformer import GraphTransformer
from attnjax.models.hf_import import load_pretrained
from attnjax.models.mosaic_bert import MosaicBERT
from attnjax.models.mot import MixtureOfTransformers
from attnjax.models.vit import ViT

__all__ = ["BAMLM", "DecoderLM", "GraphTransformer", "MixtureOfTransformers", "MosaicBERT", "ParallelDecoderLM", "ViT",
           "load_pretrained"]
