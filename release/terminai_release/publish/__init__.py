"""Publishing signed releases to an artifact store (S3 or a file mirror)."""

from .publish import PublishResult, promote, publish

__all__ = ["PublishResult", "promote", "publish"]
