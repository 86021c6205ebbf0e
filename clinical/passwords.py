"""Password checks: deliberately slow, so never more at once than leave a core to the API.

A PBKDF2 check takes about half a second of CPU, and OpenSSL runs it without
the GIL: 24 logins at once would take every core from the event loop and the
database thread (measured: the API's worst answer 1.6 s). The API's and the
admin's logins both check through this one small pool, and wait their turn.
"""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.contrib.auth.hashers import check_password, make_password

CHECKERS = ThreadPoolExecutor(
    max_workers=settings.CLINICAL_PASSWORD_CHECKS or max(1, (os.cpu_count() or 2) - 1),
    thread_name_prefix="password",
)


async def ain_turn(function, /, *args, **kwargs):
    """function(*args, **kwargs) in the pool, from async code."""
    return await asyncio.get_running_loop().run_in_executor(CHECKERS, lambda: function(*args, **kwargs))


def in_turn(function, /, *args, **kwargs):
    """function(*args, **kwargs) in the pool, from a thread of its own (the admin's), waiting for it."""
    return CHECKERS.submit(function, *args, **kwargs).result()


def password_matches(password: str, encoded: str | None, rehashed: list | None = None) -> bool:
    """Whether `password` matches the hash `encoded` (None: no such user); CPU only, for the pool.

    With `rehashed`, a new hash is put there when Django wants the stored one upgraded.
    """
    if encoded is None:
        make_password(password)  # as long as a real check: no timing hint that the user does not exist
        return False
    setter = None if rehashed is None else lambda raw: rehashed.append(make_password(raw))
    return check_password(password, encoded, setter=setter)
