"""Backbones that take any registered mixer."""

from attnjax.models.decoder import DecoderLM
from attnjax.models.graph_transformer import GraphTransformer
from attnjax.models.mosaic_bert import MosaicBERT
from attnjax.models.vit import ViT

__all__ = ["DecoderLM", "GraphTransformer", "MosaicBERT", "ViT"]
