"""structlog configuration: JSON lines in production, pretty console in a terminal, secrets masked in every
handler's output (:mod:`worker.redaction`)."""

from __future__ import annotations

import logging
import sys

import structlog

from worker.redaction import REDACTOR, redact_handlers


def configure_logging(fmt: str = "auto", level: int = logging.INFO) -> None:
    renderer: structlog.types.Processor
    pretty = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        REDACTOR.processor,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: useful when debugging a daemon, noise otherwise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The handlers other code set up (Celery's own) write secrets masked too.
    redact_handlers()
