"""HTTP conditional requests (RFC 9110, section 13): entity tags, If-Match and If-None-Match.

An answer that carries one recording has a strong ETag: its digest in quotes.
If-None-Match compares weakly (W/"x" matches "x"), If-Match strongly (a weak
tag never matches); "*" matches any current recording. A header that does not
parse as a list of entity tags matches nothing: a malformed If-Match fails
(412), a malformed If-None-Match is as if the client held no copy.
"""

import re
from typing import Annotated

from django.http import HttpResponse
from ninja import Header

ETAG = "ETag"
IF_MATCH = "If-Match"
IF_NONE_MATCH = "If-None-Match"
ANY = "*"
# One element of a list: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, between optional
# white space, then a comma or the end. Empty elements are allowed (RFC 9110, 5.6.1);
# an opaque tag may hold commas, so the list is read tag by tag, not split.
_ELEMENT = re.compile(r'[ \t]*(?:(?P<weak>W/)?"(?P<opaque>[\x21\x23-\x7e\x80-\xff]*)")?[ \t]*(?:,|\Z)')

IfMatch = Annotated[
    str | None,
    Header(alias=IF_MATCH, description='The ETag you last saw: the change is made only while it is current ("*": any)'),
]
IfNoneMatch = Annotated[
    str | None,
    Header(alias=IF_NONE_MATCH, description="ETags of copies you hold: 304 and no body when one is current"),
]


def etag(digest: str) -> str:
    """A recording's entity tag: its digest, quoted (strong)."""
    return f'"{digest}"'


def tagged(response: HttpResponse, digest: str) -> HttpResponse:
    response[ETAG] = etag(digest)
    return response


def entity_tags(value: str) -> list[tuple[bool, str]] | None:
    """The (weak, opaque tag) pairs of a list of entity tags, in order; None when the value is not one."""
    tags, position = [], 0
    while position < len(value):
        element = _ELEMENT.match(value, position)
        if element is None:
            return None
        if element["opaque"] is not None:
            tags.append((element["weak"] is not None, element["opaque"]))
        position = element.end()
    return tags


def if_match_passes(value: str | None, digest: str) -> bool:
    """If-Match against the current recording's digest: strong comparison; no header passes."""
    if value is None or value.strip(" \t") == ANY:
        return True
    return (False, digest) in (entity_tags(value) or [])


def if_none_match_passes(value: str | None, digest: str) -> bool:
    """If-None-Match against the current recording's digest: weak comparison; False means 304."""
    if value is None:
        return True
    if value.strip(" \t") == ANY:
        return False
    return digest not in {opaque for _, opaque in entity_tags(value) or []}


def etag_documented(*statuses: int) -> dict:
    """openapi_extra saying that these answers of an operation carry an ETag header."""
    header = {"description": "The recording's entity tag: its digest, quoted", "schema": {"type": "string"}}
    return {"responses": {status: {"headers": {ETAG: header}} for status in statuses}}
