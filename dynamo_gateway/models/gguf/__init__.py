"""GGUF checkpoints (llama.cpp's single-file format) read as Hugging Face models.

A ``--model`` may name a ``.gguf`` file, or a directory holding one and no
``config.json``; every component that reads a model (the card, the tokenizer,
the chat template, the reference engine's weights) asks `find_gguf` first and
reads from `GgufModel` when it answers.
"""

from dynamo_gateway.models.gguf.reader import GgufModel, find_gguf

__all__ = ["GgufModel", "find_gguf"]
