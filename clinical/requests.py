"""What the platform reads off an HTTP request."""

import ipaddress


def client_ip(request) -> str | None:
    """The client's address as a valid IP address, or None.

    It is the peer's, or, when the peer is one of CLINICAL_TRUSTED_PROXIES,
    the one that proxy put in X-Forwarded-For (uvicorn applies it:
    clinical/serve.py). Whatever else arrives there (a name, a forged value
    with markup) is never stored in the audit trail or counted by the throttle.
    """
    value = request.META.get("REMOTE_ADDR")
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None
