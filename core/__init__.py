"""The training engine: configuration, models, adapters, data, class images, trainer and session.

Nothing in this package imports gradio; the UI talks to it through `core.session` and plain functions.
"""

import logging as _logging


class _OptionalKernelFilter(_logging.Filter):
    """bitsandbytes (imported by peft when installed) warns at import, on CPUs with AVX-512 BF16, that an optional
    downloadable kernel package is missing; its own CPU code runs instead, and nothing is downloaded here."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelFilter())
