"""The hot reads' statements use their indexes on both engines."""

import pytest
from django.db import connection, transaction

from recordings import selectors

pytestmark = pytest.mark.django_db(transaction=True)
FILTERS = [[], ["status"], ["patient_ref"]]


def _plan(statement: str, params: list) -> str:
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # An empty table is read whole at any cost; the question is whether an index gives the order.
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(f"EXPLAIN {statement}", params)
        else:
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", params)
        return "\n".join(str(row[-1]) for row in cursor.fetchall())


@pytest.mark.parametrize("filters", FILTERS, ids=["all", "status", "patient_ref"])
def test_a_list_page_walks_an_index_in_its_order_without_sorting(filters):
    where = " AND ".join([selectors.LIVE_OF_OWNER, *(selectors.FILTERS[name] for name in filters)])

    plan = _plan(selectors.list_sql(where), [1, *["x"] * len(filters), 50, 0])

    assert "rec_owner_" in plan
    assert "Sort" not in plan
    assert "TEMP B-TREE" not in plan
