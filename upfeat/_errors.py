"""upfeat's own exception classes, without importing torch (the CLI's error boundary and
``import upfeat`` need them before any command decides whether torch is needed)."""


class UpfeatError(Exception):
    """Base of upfeat's own errors (:class:`ShapeError`, ``OfflineError``, ``CheckpointError``,
    ``ImageReadError``, ...): a user-facing problem with a one-line message, which the CLI prints
    as ``error: ...`` with exit code 2."""


class ShapeError(UpfeatError, ValueError):
    """A tensor has the wrong number of dimensions or the wrong size."""
