"""The ways a run stops on purpose: bad input (exit 2), a diverged stage (exit 1) and a signal
(exit 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM)."""


class ConfigError(ValueError):
    """A config value or input file the run cannot use; the message names the key, the value and
    what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key = key
        super().__init__(f"{key}={value!r}: {allowed}")


class NonFiniteLossError(RuntimeError):
    """A stage's loss became NaN or infinite; the run stops, keeping the stages already written."""


class Interrupted(BaseException):  # noqa: N818 - a stop request, like KeyboardInterrupt
    """SIGTERM or SIGINT arrived: the current stage is dropped, the finished ones are kept.
    A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
