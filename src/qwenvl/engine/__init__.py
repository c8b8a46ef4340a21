"""Serving engine internals: KV cache block management and scheduling."""
