"""The default log level of elastic_impl loggers."""


def get_log_level() -> str:
    """The level used when env ``LOGLEVEL`` is not set."""
    return "WARNING"
