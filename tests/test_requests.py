"""What the platform reads off a request: the client's address, only ever a valid IP address."""

import pytest
from django.test import RequestFactory

from clinical.requests import client_ip


@pytest.mark.parametrize(
    ("remote_addr", "expected"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:DB8::1", "2001:db8::1"),
        ("not-an-ip<script>", None),
        ("203.0.113.9, 10.0.0.1", None),
        ("localhost", None),
        ("", None),
        (None, None),
    ],
)
def test_only_a_valid_ip_address_is_the_clients(remote_addr, expected):
    request = RequestFactory().get("/api/health", REMOTE_ADDR=remote_addr)

    assert client_ip(request) == expected
