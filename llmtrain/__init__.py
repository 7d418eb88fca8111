"""llmtrain: a PyTorch mini-pretraining framework for encoder, decoder and encoder-decoder language models."""

__version__ = "0.1.0"
