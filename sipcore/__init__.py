"""sipcore: SIP wire format, transports, BEKey and ring shared by proxy and nodes.

Imports only the standard library (see DESIGN.md, "Rooms").
"""
from . import compiled as _compiled

_compiled.install()     # before the modules it may load compiled are imported

from .errors import SipParseError  # noqa: E402
from .message import SipMessage, SipRequest, SipResponse, parse_message, Limits  # noqa: E402

__all__ = ["SipParseError", "SipMessage", "SipRequest", "SipResponse", "parse_message", "Limits"]
