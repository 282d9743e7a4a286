"""One exception family whose messages are single lines a user can act on.

The CLI prints ``str(err)`` and exits 2, so every message names the field, file or value at
fault and what was expected.
"""


class KdnasError(Exception):
    """Base class for user-facing errors (bad config, missing corpus, unknown teacher...)."""


class ConfigError(KdnasError):
    pass


class DataError(KdnasError):
    pass


class TeacherError(KdnasError):
    pass


class ArchError(KdnasError):
    pass


class EvalError(KdnasError):
    pass
