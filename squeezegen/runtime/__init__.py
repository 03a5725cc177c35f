"""The inference engine: decoder loop, KV cache, attention, sampling and `generate`."""
