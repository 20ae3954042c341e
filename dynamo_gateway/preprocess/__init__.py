"""Preprocessing: tokenizer, chat template and incremental detokenizer."""

from __future__ import annotations

from dynamo_gateway.preprocess.chat_template import ChatTemplate, normalize_messages
from dynamo_gateway.preprocess.detokenizer import IncrementalDetokenizer
from dynamo_gateway.preprocess.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "IncrementalDetokenizer", "Tokenizer", "normalize_messages"]
