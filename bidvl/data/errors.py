"""The data package's error (a leaf module: meta, remote and tarstream all raise it)."""

from ..errors import BidvlError


class ShardError(BidvlError, ValueError):
    """A shards folder, shard or member is not what the reader or writer expected."""
