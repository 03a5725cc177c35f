"""Imported first by the package: drops log noise that optional dependencies emit on import."""

import logging


class _DropImportNoise(logging.Filter):
    """torchao (pulled in by litert-torch, imported by transformers) logs its missing CUDA kernels
    and torch's pytree a deprecation on every import; neither concerns a user of this package."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load") or "register_constant()" in message)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_DropImportNoise())
