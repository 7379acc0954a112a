"""The producer and reader side of jetledger: `LedgerClient` and the wire contract it speaks."""

from jetledger.schemas import *  # noqa: F403 - one import gives a producer everything
from jetledger.schemas import __all__ as _schemas_all

from .client import AppendResult, LedgerClient

__all__ = ["AppendResult", "LedgerClient", *_schemas_all]
