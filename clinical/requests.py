"""What the platform reads off an HTTP request."""


def client_ip(request) -> str | None:
    # Behind a proxy, uvicorn's --proxy-headers (with --forwarded-allow-ips)
    # puts the client's address here from X-Forwarded-For.
    return request.META.get("REMOTE_ADDR") or None
