"""Request bodies as JSON: parsed one way, with one nesting bound, wherever a body is read.

orjson reads up to 1,024 levels but writes only 254, so a deep body that
parsed could not be written back (the idempotency fingerprint answered 500).
Nothing we accept nests deeper than verification_results' 32 levels inside a
request object; 64 leaves room and stays far below both.
"""

import orjson

MAX_DEPTH = 64
MALFORMED_JSON = "The request body is not valid JSON"
TOO_DEEP = f"The request body nests deeper than {MAX_DEPTH} levels"


class BadBody(ValueError):
    """The body is not JSON we read (400); the message says why."""


def parse_json(body: bytes):
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadBody(f"{MALFORMED_JSON}: {exc}") from exc
    if nests_deeper(value, MAX_DEPTH):
        raise BadBody(TOO_DEEP)
    return value


def nests_deeper(value, limit: int) -> bool:
    """Whether arrays and objects in `value` nest more than `limit` levels (level by level: no recursion)."""
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
            if isinstance(child, (dict, list))
        ]
    return False
