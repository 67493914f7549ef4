"""Keeps `import modeling_unimedvl` silent: drops known, irrelevant notices that dependencies log while importing.

diffusers imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16, bitsandbytes then asks the `kernels`
package (a dependency of transformers ≥ 5.25) for an optional accelerated CPU kernel from the Hub repository
`kernels-community/quantization-bitsandbytes`. Offline, or without `kernels`, that logs "Failed to load CPU
gemm_4bit_forward from kernels-community …" (bitsandbytes) and "Skipping publisher trust check for
'kernels-community/quantization-bitsandbytes' …" (kernels) on every command, although nothing is quantized. The
filters drop exactly those messages from exactly those loggers; every other message passes unchanged.
"""

import logging


OPTIONAL_KERNEL_NOTICES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
)
"""`(logger name, message prefix)` of the notices dropped."""


class DropMessagesStartingWith(logging.Filter):
    """A logging filter that drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_optional_kernel_notice() -> None:
    """Installs the filters on their loggers (idempotent; works before the libraries are imported)."""
    for logger_name, prefix in OPTIONAL_KERNEL_NOTICES:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(item, DropMessagesStartingWith) and item.prefix == prefix for item in logger.filters):
            logger.addFilter(DropMessagesStartingWith(prefix))


__all__ = ["DropMessagesStartingWith", "OPTIONAL_KERNEL_NOTICES", "silence_optional_kernel_notice"]
