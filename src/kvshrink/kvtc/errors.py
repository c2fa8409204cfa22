"""The one error KVTC adds: stored bytes (a blob or a calibration file) that cannot be used."""

from ..errors import KVShrinkError


class KVTCFormatError(KVShrinkError):
    """A truncated, corrupted or foreign blob, or a calibration that does not match the model or blob."""
