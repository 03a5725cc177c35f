"""The OpenAI-compatible server: protocol, scheduler (continuous batching), document cache, app."""
