"""Keeps `import modeling_unimedvl` silent: drops a known, irrelevant notice that a dependency logs while importing.

diffusers imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16, bitsandbytes then logs "Failed to
load CPU gemm_4bit_forward from kernels-community …" (an optional accelerated CPU kernel from the `kernels` package).
That line appeared on every command although nothing is quantized. The filter drops exactly that message from exactly
that logger; every other message, and that logger's other messages, pass unchanged.
"""

import logging


BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
OPTIONAL_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class DropMessagesStartingWith(logging.Filter):
    """A logging filter that drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_optional_kernel_notice() -> None:
    """Installs the filter on bitsandbytes' CPU logger (idempotent; works before bitsandbytes is imported)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(item, DropMessagesStartingWith) and item.prefix == OPTIONAL_KERNEL_NOTICE for item in logger.filters):
        logger.addFilter(DropMessagesStartingWith(OPTIONAL_KERNEL_NOTICE))


__all__ = ["DropMessagesStartingWith", "silence_optional_kernel_notice"]
