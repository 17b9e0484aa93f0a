"""The one exception type a stage turns into a one-line message."""


class ShearError(Exception):
    """A user-facing error: bad params, a missing or corrupt file, an unsupported model.

    The message is one line that names the parameter or path and what would be valid.
    """


class ConfigError(ShearError):
    """params.yaml holds an unknown key, a wrong type or an out-of-range value."""
