"""Benchmark walking the whole sync feed of one clinician through the ASGI app.

Run from anywhere with the project's virtual environment:

    .venv/bin/python bench/feed_walk.py [--count 100000] [--limit 500] [--keep]

On a fresh SQLite file in a temporary folder: ``migrate``, one user, ``--count``
recordings inserted with ``bulk_create`` in batches of 2,000 inside one write
transaction that also takes their change numbers (and leaves the change
sequence at the last of them), a bearer token from ``token_issue``. Then a
device's first sync: ``GET /api/sync/changes`` from cursor 0 with ``--limit``,
each time from the cursor the previous page answered, until ``has_more`` is
false, through ``httpx.ASGITransport`` over ``clinical.asgi.application`` (the
whole middleware stack, bearer authentication included, no network).

Prints the walk's time, pages, changes per second and bytes; checks that it saw
exactly ``--count`` distinct ids, in increasing change order, and exits 1 if not.
A figure, never an assertion on time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCH = 2_000
TRANSCRIPT = (
    "Patient seen for follow-up. Reports less pain since the last visit, sleeping better. "
    "No fever, no new medication. Wound healing well, no signs of infection. "
    "Plan: continue physiotherapy twice a week, review in four weeks."
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def set_up_django(db_path: Path) -> None:
    # Before django.setup(): settings read the database path once, at import.
    os.environ["CLINICAL_DB_PATH"] = str(db_path)
    os.environ.setdefault("DJANGO_SECRET_KEY", "feed-walk-benchmark-only-" + "k" * 40)
    os.environ["DJANGO_SETTINGS_MODULE"] = "clinical.settings"
    os.environ.pop("DJANGO_DEBUG", None)
    sys.path.insert(0, str(REPO))
    import django

    django.setup()


def seed(count: int):
    """One user with `count` recordings, their change numbers taken in one write transaction."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import transaction

    from clinical.models import ChangeSequence
    from recordings.models import Recording

    started = time.perf_counter()
    call_command("migrate", verbosity=0)
    log(f"migrated in {time.perf_counter() - started:.1f} s")
    user = get_user_model().objects.create_user("bench")  # no password: nothing here logs in
    now = datetime.now(UTC)
    with transaction.atomic():
        sequence, _ = ChangeSequence.objects.get_or_create(pk=1)
        base = sequence.value
        for start in range(0, count, BATCH):
            Recording.objects.bulk_create(
                Recording(
                    id=uuid.uuid4(),
                    owner=user,
                    patient_ref=f"PAT-{index:06}",
                    title=f"Follow-up {index}",
                    note_type="consult",
                    status="transcribed",
                    audio_path=f"audio/{index:06}.webm",
                    duration_seconds=60.0 + index % 600,
                    transcript=TRANSCRIPT,
                    verification_results={"checks": [{"name": "dose", "ok": True}], "score": 0.9},
                    recorded_at=now,
                    created_at=now,
                    updated_at=now,
                    change_seq=base + index + 1,
                )
                for index in range(start, min(start + BATCH, count))
            )
        ChangeSequence.objects.filter(pk=1).update(value=base + count)
    return user


async def walk(token: str, limit: int) -> dict:
    import httpx

    from clinical.asgi import application

    headers = {"Authorization": f"Bearer {token}"}
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=headers) as client:
        warm_up = await client.get("/api/sync/changes", params={"since": 0, "limit": 1})
        warm_up.raise_for_status()
        ids, numbers, pages, size, cursor, more = set(), [], 0, 0, 0, True
        started = time.perf_counter()
        while more:
            response = await client.get("/api/sync/changes", params={"since": cursor, "limit": limit})
            response.raise_for_status()
            page = response.json()
            pages += 1
            size += len(response.content)
            ids.update(change["id"] for change in page["changes"])
            numbers += [change["change_seq"] for change in page["changes"]]
            cursor, more = page["cursor"], page["has_more"]
        elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "pages": pages, "bytes": size, "ids": ids, "numbers": numbers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="recordings to insert (default 100,000)")
    parser.add_argument("--limit", type=int, default=500, help="page size of the walk (default 500)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary database folder")
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="feed-walk-"))
    try:
        set_up_django(folder / "clinical.db")
        from django.db import connections

        from clinical.tokens import token_issue

        started = time.perf_counter()
        user = seed(options.count)
        token, _ = token_issue(user=user)
        connections.close_all()  # the walk reads on the ASGI app's own database thread
        log(f"seeded {options.count:,} recordings in {time.perf_counter() - started:.1f} s into {folder}")
        log(f"walking the feed with limit={options.limit}")

        result = asyncio.run(walk(token, options.limit))

        changes = len(result["numbers"])
        print(f"feed walk: {changes:,} changes in {result['pages']} pages of up to {options.limit}")
        print(
            f"feed walk: {result['elapsed']:.2f} s, {changes / result['elapsed']:,.0f} changes/s, "
            f"{result['elapsed'] / result['pages'] * 1000:.1f} ms a page, {result['bytes'] / 1e6:.1f} MB"
        )
        in_order = result["numbers"] == sorted(set(result["numbers"]))
        if len(result["ids"]) != options.count or changes != options.count or not in_order:
            print(
                f"feed walk: WRONG: {len(result['ids']):,} distinct ids and {changes:,} changes "
                f"for {options.count:,} recordings (in change order: {in_order})",
                file=sys.stderr,
            )
            return 1
        print(f"feed walk: saw exactly {options.count:,} distinct ids, in change order")
        return 0
    finally:
        if options.keep:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
