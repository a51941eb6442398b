"""The two ways a run stops on purpose: bad input (exit 2) and a diverged stage (exit 1)."""


class ConfigError(ValueError):
    """A config value or input file the run cannot use; the message names the key, the value and
    what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key = key
        super().__init__(f"{key}={value!r}: {allowed}")


class NonFiniteLossError(RuntimeError):
    """A stage's loss became NaN or infinite; the run stops, keeping the stages already written."""
