"""sipcore: SIP wire format, transports, BEKey and ring shared by proxy and nodes.

Imports only the standard library (see DESIGN.md, "Rooms").
"""
from .errors import SipParseError
from .message import SipMessage, SipRequest, SipResponse, parse_message, Limits

__all__ = ["SipParseError", "SipMessage", "SipRequest", "SipResponse", "parse_message", "Limits"]
