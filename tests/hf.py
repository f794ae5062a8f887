"""Tiny Hugging Face models for the tests: random init, no dropout, nothing downloaded (conftest
hides a torchvision that cannot load against this torch, which transformers would import)."""

from __future__ import annotations


def transformers():
    import transformers as library

    library.logging.set_verbosity_error()
    return library


def gpt2(layers: int = 2, width: int = 32, vocabulary: int = 97):
    """A tiny GPT-2 language model, random init, no dropout (steps are reproducible)."""
    transformers()  # quiet
    from opcomp.comparison.models import gpt2_lm

    return gpt2_lm(vocabulary, 64, layers=layers, width=width, heads=2)


def vit(classes: int = 5):
    """A tiny ViT classifier on 16×16 images, random init, no dropout."""
    library = transformers()
    config = library.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return library.ViTForImageClassification(config)
