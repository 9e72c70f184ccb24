"""TLS failures in operators' words: a sentence for logs and check results, a short key for counters."""

from __future__ import annotations

import ssl

TIMEOUT = "handshake_timeout"
CLOSED = "closed_during_handshake"
RESET = "reset_during_handshake"


def describe(error: ssl.SSLError) -> str:
    """ "certificate verify failed: hostname mismatch", "TLS handshake failed: wrong version number"."""
    if isinstance(error, ssl.SSLCertVerificationError):
        message = (error.verify_message or "").split(",")[0].rstrip(".").lower()
        return f"certificate verify failed: {message or 'unknown reason'}"
    reason = (error.reason or str(error)).replace("_", " ").lower()
    return f"TLS handshake failed: {reason}"


def reason_key(error: ssl.SSLError) -> str:
    """A stable label for counters: OpenSSL's reason in lower case ("wrong_version_number",
    "http_request", "certificate_verify_failed", "peer_did_not_return_a_certificate", ...)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return "certificate_verify_failed"
    reason = error.reason or type(error).__name__
    return reason.lower()
