"""The torch reference engine: paged KV cache, continuous batching, prefix caching."""
