"""The one error sipcore raises for bad input."""
from __future__ import annotations


class SipParseError(ValueError):
    """Input that is not a valid SIP message. `reason` is short and human;
    it goes into a 400 reason phrase and into the log. `message`, when set,
    is the partly parsed message (enough to build a 400 if it is a request
    with Via, From, To, Call-ID and CSeq)."""

    def __init__(self, reason: str, message=None):
        super().__init__(reason)
        self.reason = reason
        self.message = message
