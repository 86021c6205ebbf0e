"""The staff admin: recordings edited through the services, a read-only audit trail, tokens to revoke."""

import json
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from io import StringIO

import pytest
from django import forms
from django.contrib.admin.models import LogEntry
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from clinical.chain import head, seal
from clinical.models import AuditCheck, AuditEvent, Token
from clinical.tokens import token_issue
from recordings.models import TOMBSTONE_CLEARED, Recording
from recordings.selectors import recording_get
from recordings.services import (
    STALE_VERSION,
    recording_create,
    recording_delete,
    recording_update,
    transition_refused,
)

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct-horse-battery"
RECORDINGS = reverse("admin:recordings_recording_changelist")
TOKENS = reverse("admin:clinical_token_changelist")
EVENTS = reverse("admin:clinical_auditevent_changelist")


@pytest.fixture
def staffer(make_user):
    return make_user("staffer", is_staff=True, is_superuser=True)


@pytest.fixture
def staff(staffer):
    client = Client()
    client.force_login(staffer)
    return client


def create(owner, **fields) -> Recording:
    recording, _ = recording_create(owner=owner, **{"patient_ref": "PAT-1", **fields})
    return recording


def walk(recording: Recording, *statuses: str) -> Recording:
    for status in statuses:
        recording = recording_update(
            owner=recording.owner, recording_id=recording.pk, version=recording.version, status=status
        )
    return recording


def stored(recording) -> dict:
    return Recording.objects.filter(pk=recording.pk).values().get()


def change_url(recording) -> str:
    return reverse("admin:recordings_recording_change", args=[recording.pk])


def shown(response) -> list:
    return [row.pk for row in response.context["cl"].result_list]


def form_data(response, **changes) -> dict:
    """What the browser would post back from the change form, with `changes` typed in."""
    form = response.context["adminform"].form
    data = {}
    for name in form.fields:
        value, widget = form[name].value(), form.fields[name].widget
        if isinstance(widget, forms.MultiWidget):
            for index, part in enumerate(widget.decompress(value)):
                data[f"{name}_{index}"] = "" if part is None else part
        else:
            data[name] = "" if value is None else value
    return {**data, "_save": "Save", **changes}


class FormFields(HTMLParser):
    """The fields a browser would submit from the form with this id, as the page renders them."""

    def __init__(self, form_id: str):
        super().__init__()
        self.form_id, self.inside, self.data = form_id, False, {}
        self.textarea = self.select = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.inside = attrs.get("id") == self.form_id
        elif not self.inside:
            return
        elif tag == "input" and attrs.get("name") and attrs.get("type") not in ("submit", "checkbox", "radio"):
            self.data[attrs["name"]] = attrs.get("value") or ""
        elif tag == "textarea":
            self.textarea = attrs["name"]
            self.data[self.textarea] = ""
        elif tag == "select":
            self.select = attrs["name"]
        elif tag == "option" and self.select and ("selected" in attrs or self.select not in self.data):
            self.data[self.select] = attrs.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "textarea":
            self.textarea = None
        elif tag == "select":
            self.select = None

    def handle_data(self, data):
        if self.textarea:
            self.data[self.textarea] += data.removeprefix("\n") if not self.data[self.textarea] else data


def browser_form(response, **changes) -> dict:
    parser = FormFields("recording_form")
    parser.feed(response.text)
    return {**parser.data, "_save": "Save", **changes}


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]] if response.context else []


# Recordings: the list


def test_the_list_shows_owner_patient_status_version_and_dates(staff, alice):
    recording = create(alice, patient_ref="PAT-00042", title="Knee")

    response = staff.get(RECORDINGS)

    columns = response.context["cl"].list_display
    assert response.status_code == 200
    assert {"owner", "patient_ref", "status", "version", "created_at", "updated_at"} <= set(columns)
    assert shown(response) == [recording.pk]
    assert all(text in response.text for text in ("PAT-00042", "alice", "Pending", "column-version"))


def test_the_list_filters_by_status(staff, alice):
    verified = walk(create(alice, patient_ref="PAT-V"), "uploaded", "transcribing", "transcribed", "verified")
    create(alice, patient_ref="PAT-P")

    response = staff.get(RECORDINGS, {"status__exact": "verified"})

    assert response.status_code == 200
    assert shown(response) == [verified.pk]


def test_the_list_filters_by_owner(staff, alice, bob):
    create(alice, patient_ref="PAT-A")
    bobs = create(bob, patient_ref="PAT-B")

    response = staff.get(RECORDINGS, {"owner__id__exact": bob.pk})

    assert shown(response) == [bobs.pk]


def test_the_list_filters_by_date(staff, alice):
    recent = create(alice, patient_ref="PAT-NEW")
    old = create(alice, patient_ref="PAT-OLD")
    long_ago = timezone.now() - timedelta(days=400)
    Recording.objects.filter(pk=old.pk).update(created_at=long_ago)
    listing = staff.get(RECORDINGS)
    [date_filter] = [spec for spec in listing.context["cl"].filter_specs if spec.title == "created at"]
    links = {choice["display"]: choice["query_string"] for choice in date_filter.choices(listing.context["cl"])}

    past_week = staff.get(RECORDINGS + links["Past 7 days"])
    by_year = staff.get(RECORDINGS, {"created_at__year": long_ago.year})

    assert shown(past_week) == [recent.pk]
    assert shown(by_year) == [old.pk]


@pytest.mark.parametrize(("term", "expected"), [("PAT-77", ["knee"]), ("shoulder", ["shoulder"]), ("zzz", [])])
def test_the_list_searches_patient_ref_and_title(staff, alice, term, expected):
    recordings = {
        "knee": create(alice, patient_ref="PAT-77", title="Knee review"),
        "shoulder": create(alice, patient_ref="PAT-88", title="Shoulder pain"),
    }

    response = staff.get(RECORDINGS, {"q": term})

    assert shown(response) == [recordings[name].pk for name in expected]


# Recordings: the change page


def test_the_change_page_shows_verification_results_as_indented_json(staff, alice):
    results = {"checks": [{"name": "dose", "ok": True}], "score": 0.9}
    recording = create(alice, verification_results=results)

    response = staff.get(change_url(recording))

    expected = escape(json.dumps(results, indent=2, sort_keys=True))
    assert response.status_code == 200
    assert f'<pre class="verification-results">{expected}</pre>' in response.text
    assert "\n  &quot;checks&quot;: [\n    {\n      &quot;name&quot;: &quot;dose&quot;," in response.text


def test_the_change_page_shows_the_digest(staff, alice):
    recording = create(alice)

    response = staff.get(change_url(recording))

    assert len(recording.digest) == 64
    assert recording.digest in response.text


def test_the_change_page_escapes_html_in_verification_results(staff, alice):
    recording = create(alice, verification_results={"note": "<script>alert(1)</script>"})

    response = staff.get(change_url(recording))

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "<script>alert(1)</script>" not in response.text


def test_an_edit_goes_through_the_service_versioned_and_audited(staff, staffer, alice):
    recording = create(alice, title="Knee")
    page = staff.get(change_url(recording))

    response = staff.post(change_url(recording), form_data(page, title="Knee, left"))

    after = stored(recording)
    [update] = AuditEvent.objects.filter(action="update")
    assert response.status_code == 302
    assert (after["title"], after["version"]) == ("Knee, left", 2)
    assert after["change_seq"] > recording.change_seq
    assert (update.user_id, update.username, update.recording_id) == (staffer.pk, "staffer", recording.pk)
    assert (update.fields, update.client_ip) == (["title"], "127.0.0.1")


def test_a_status_edit_is_audited_with_old_and_new(staff, alice):
    recording = create(alice)
    page = staff.get(change_url(recording))

    staff.post(change_url(recording), form_data(page, status="uploaded"))

    [update] = AuditEvent.objects.filter(action="update")
    assert stored(recording)["status"] == "uploaded"
    assert (update.fields, update.status_from, update.status_to) == (["status"], "pending", "uploaded")


def test_the_page_carries_the_version_the_form_was_loaded_at(staff, alice):
    recording = walk(create(alice), "uploaded")

    page = staff.get(change_url(recording))

    assert form_data(page)["seen_version"] == 2
    assert browser_form(page).get("seen_version") == "2"


def test_an_edit_posted_as_a_browser_posts_it_is_saved(staff, alice):
    recording = create(alice, title="Knee")
    page = staff.get(change_url(recording))

    response = staff.post(change_url(recording), browser_form(page, title="Knee, left"))

    assert response.status_code == 302
    assert (stored(recording)["title"], stored(recording)["version"]) == ("Knee, left", 2)


def test_every_field_the_form_offers_is_saved(staff, alice):
    recording = create(alice)
    page = staff.get(change_url(recording))
    offered = set(page.context["adminform"].form.fields)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    staff.post(change_url(recording), form_data(page, recorded_at_0="2026-01-02", recorded_at_1="03:04:05"))

    assert "recorded_at" not in offered or stored(recording)["recorded_at"] == when


def test_a_stale_edit_is_refused_with_a_message_and_changes_nothing(staff, alice):
    recording = create(alice, title="Knee")
    page = staff.get(change_url(recording))
    recording_update(owner=alice, recording_id=recording.pk, version=1, title="changed on the phone")
    before = stored(recording)

    response = staff.post(change_url(recording), form_data(page, title="changed by staff"), follow=True)

    assert stored(recording) == before
    assert STALE_VERSION in response.text  # a form error or a message: what the staff member reads
    assert AuditEvent.objects.filter(action="update", username="staffer").count() == 0


def test_a_stale_edit_does_not_also_claim_success(staff, alice):
    recording = create(alice, title="Knee")
    page = staff.get(change_url(recording))
    recording_update(owner=alice, recording_id=recording.pk, version=1, title="changed on the phone")

    response = staff.post(change_url(recording), form_data(page, title="changed by staff"), follow=True)

    assert [message for message in messages_of(response) if "successfully" in message] == []


def test_a_refused_status_transition_is_a_form_error(staff, alice):
    recording = create(alice)
    page = staff.get(change_url(recording))
    before = stored(recording)

    response = staff.post(change_url(recording), form_data(page, status="verified"))

    assert response.status_code == 200
    assert response.context["adminform"].form.errors["status"] == [transition_refused("pending", "verified")]
    assert stored(recording) == before
    assert not AuditEvent.objects.filter(action="update").exists()


def test_an_edit_of_a_deleted_recording_is_refused_without_a_server_error(staffer, alice):
    client = Client(raise_request_exception=False)
    client.force_login(staffer)
    recording = create(alice, title="Knee")
    recording_delete(owner=alice, recording_id=recording.pk)  # the tombstone the "Deleted" filter lists
    page = client.get(change_url(recording))
    before = stored(recording)

    response = client.post(change_url(recording), form_data(page, title="changed"), follow=True)

    assert response.status_code < 500
    assert stored(recording) == before


def test_recordings_cannot_be_added_in_the_admin(staff):
    response = staff.get(reverse("admin:recordings_recording_add"))

    assert response.status_code == 403


# Recordings: deleting


def test_deleting_leaves_a_tombstone_and_a_delete_event(staff, staffer, alice):
    recording = create(alice)

    response = staff.post(reverse("admin:recordings_recording_delete", args=[recording.pk]), {"post": "yes"})

    after = stored(recording)
    [delete] = AuditEvent.objects.filter(action="delete")
    assert response.status_code == 302
    assert after["deleted_at"] is not None
    assert after["version"] == 2
    assert after["change_seq"] > recording.change_seq
    assert (delete.user_id, delete.username, delete.recording_id) == (staffer.pk, "staffer", recording.pk)


def test_deleting_several_leaves_a_tombstone_and_an_event_each(staff, alice):
    recordings = [create(alice, patient_ref=f"PAT-{number}") for number in range(2)]
    kept = create(alice, patient_ref="PAT-KEPT")

    response = staff.post(
        RECORDINGS,
        {"action": "delete_selected", "_selected_action": [str(r.pk) for r in recordings], "post": "yes"},
    )

    assert response.status_code == 302
    assert [stored(r)["deleted_at"] is not None for r in [*recordings, kept]] == [True, True, False]
    assert sorted(e.recording_id for e in AuditEvent.objects.filter(action="delete")) == sorted(
        r.pk for r in recordings
    )


def test_a_tombstone_keeps_no_clinical_content(staff, alice):
    recording = create(alice, patient_ref="PAT-SECRET", title="Biopsy", transcript="words", error="why")
    recording = walk(recording, "failed")

    staff.post(reverse("admin:recordings_recording_delete", args=[recording.pk]), {"post": "yes"})

    after = stored(recording)
    assert {field: after[field] for field in TOMBSTONE_CLEARED} == TOMBSTONE_CLEARED
    assert after["status"] == "failed"


def test_the_admins_own_log_carries_no_patient_text(staff, alice):
    recording = create(alice, patient_ref="PAT-SECRET", title="Biopsy of the left knee")
    page = staff.get(change_url(recording))
    staff.post(change_url(recording), form_data(page, title="Biopsy of the right knee"))

    staff.post(reverse("admin:recordings_recording_delete", args=[recording.pk]), {"post": "yes"})

    entries = list(LogEntry.objects.values_list("object_repr", "change_message"))
    assert len(entries) == 2
    assert not [entry for entry in entries if "PAT-SECRET" in str(entry) or "knee" in str(entry)]


# Tokens


def test_the_token_list_never_shows_a_key_hash(staff, alice):
    _, token = token_issue(user=alice)

    listing = staff.get(TOKENS)
    page = staff.get(reverse("admin:clinical_token_change", args=[token.pk]))

    assert (listing.status_code, page.status_code) == (200, 200)
    assert token.key_hash not in listing.text
    assert token.key_hash not in page.text
    assert "key_hash" not in listing.text + page.text


def test_the_revoke_action_revokes_and_audits(staff, staffer, alice):
    _, token = token_issue(user=alice)
    _, other = token_issue(user=alice)

    response = staff.post(TOKENS, {"action": "revoke", "_selected_action": [str(token.pk)]})

    [revoked] = AuditEvent.objects.filter(action="token_revoked")
    assert response.status_code == 302
    assert Token.objects.get(pk=token.pk).revoked_at is not None
    assert Token.objects.get(pk=other.pk).revoked_at is None
    assert (revoked.user_id, revoked.username, revoked.client_ip) == (staffer.pk, "staffer", "127.0.0.1")


def test_tokens_cannot_be_added_or_deleted_in_the_admin(staff, alice):
    _, token = token_issue(user=alice)

    add = staff.get(reverse("admin:clinical_token_add"))
    delete = staff.post(reverse("admin:clinical_token_delete", args=[token.pk]), {"post": "yes"})

    assert (add.status_code, delete.status_code) == (403, 403)
    assert Token.objects.filter(pk=token.pk).exists()


def test_a_token_issued_before_a_password_change_shows_as_not_active(staff, alice):
    _, before = token_issue(user=alice)
    alice.set_password("a brand new passphrase")
    alice.save()
    _, after = token_issue(user=alice)

    response = staff.get(TOKENS)

    shown = {
        token.pk: response.context["cl"].model_admin.is_active(token) for token in response.context["cl"].result_list
    }
    assert shown == {before.pk: False, after.pk: True}


def test_sign_out_everywhere_revokes_every_token_and_ends_every_session(staff, staffer, alice, bob):
    tokens = [token_issue(user=alice)[1] for _ in range(2)]
    _, bobs = token_issue(user=bob)
    alice.is_staff = True
    alice.save()
    alices_admin = Client()
    alices_admin.force_login(alice)

    response = staff.post(
        reverse("admin:auth_user_changelist"), {"action": "sign_out_everywhere", "_selected_action": [alice.pk]}
    )

    assert response.status_code == 302
    assert all(Token.objects.get(pk=token.pk).revoked_at is not None for token in tokens)
    assert Token.objects.get(pk=bobs.pk).revoked_at is None
    assert alices_admin.get(RECORDINGS).status_code == 302  # to the login page
    assert staff.get(RECORDINGS).status_code == 200
    events = AuditEvent.objects.filter(action="token_revoked")
    assert [(event.user_id, event.username) for event in events] == [(staffer.pk, "staffer")] * 2


# The audit trail: read-only for everyone


@pytest.fixture
def event(alice):
    token_issue(user=alice, ip="10.0.0.1")
    return AuditEvent.objects.get()


def test_superusers_can_read_the_audit_trail(staff, event):
    response = staff.get(EVENTS)

    assert response.status_code == 200
    assert [row.pk for row in response.context["cl"].result_list] == [event.pk]


def test_the_audit_list_says_the_chain_was_never_verified(staff, event):
    response = staff.get(EVENTS)

    assert "The audit chain has not been verified yet" in response.text


def test_the_audit_list_says_how_far_the_chain_was_last_verified(staff, event):
    call_command("verifyaudit", stdout=StringIO())

    response = staff.get(EVENTS)

    assert f"whole through event {event.pk} (1 events), head {head()[1]}" in response.text


def test_the_audit_list_says_when_the_chain_was_found_broken(staff, event):
    AuditCheck.objects.create(at=timezone.now(), events=0, ok=False, detail="event 3 was removed: its seal remains")

    response = staff.get(EVENTS)

    assert "The audit chain was found broken at" in response.text
    assert "event 3 was removed" in response.text


def test_the_audit_list_finds_a_recordings_events_by_its_id_sealed_or_not(staff, alice):
    # Found through the seals' index, and the events written since the last seal by id.
    one, other = create(alice), create(alice, patient_ref="PAT-2")
    recording_get(alice, recording_id=one.pk)
    recording_get(alice, recording_id=other.pk)
    seal()
    walk(one, "uploaded")
    mine = set(AuditEvent.objects.filter(recording_id=one.pk).values_list("pk", flat=True))

    found = staff.get(EVENTS, {"q": f" {one.pk} "}).context["cl"].result_list

    assert {row.pk for row in found} == mine
    assert len(mine) == 3  # created and read (sealed), changed (not yet)
    assert AuditEvent.objects.filter(pk__in=mine, pk__lte=head()[0]).count() == 2


def test_superusers_cannot_add_an_event(staff, event):
    page = staff.get(reverse("admin:clinical_auditevent_add"))
    post = staff.post(reverse("admin:clinical_auditevent_add"), {"username": "mallory", "action": "login"})

    assert (page.status_code, post.status_code) == (403, 403)
    assert AuditEvent.objects.count() == 1


def test_the_change_page_of_an_event_is_read_only(staff, event):
    url = reverse("admin:clinical_auditevent_change", args=[event.pk])
    before = AuditEvent.objects.filter(pk=event.pk).values().get()

    page = staff.get(url)
    post = staff.post(url, {"username": "mallory", "action": "read", "outcome": "success", "_save": "Save"})

    assert page.status_code == 200
    assert 'name="_save"' not in page.text
    assert 'name="username"' not in page.text
    assert post.status_code == 403
    assert AuditEvent.objects.filter(pk=event.pk).values().get() == before


def test_superusers_cannot_delete_an_event(staff, event):
    url = reverse("admin:clinical_auditevent_delete", args=[event.pk])

    page = staff.get(url)
    post = staff.post(url, {"post": "yes"})
    bulk = staff.post(EVENTS, {"action": "delete_selected", "_selected_action": [str(event.pk)], "post": "yes"})

    assert (page.status_code, post.status_code) == (403, 403)
    assert bulk.status_code in (200, 302, 403)
    assert AuditEvent.objects.filter(pk=event.pk).exists()


def test_the_audit_list_offers_no_actions(staff, event):
    response = staff.get(EVENTS)

    assert response.context.get("action_form") is None
    assert "delete_selected" not in response.text


# Who gets in


def test_a_clinician_who_is_not_staff_cannot_get_into_the_admin(alice):
    client = Client()

    login = client.post("/admin/login/", {"username": "alice", "password": PASSWORD, "next": "/admin/"})
    forced = Client()
    forced.force_login(alice)

    assert login.status_code == 200
    assert "_auth_user_id" not in client.session
    for url in ("/admin/", RECORDINGS, EVENTS, TOKENS):
        assert forced.get(url).status_code == 302, url
        assert forced.get(url)["Location"].startswith("/admin/login/"), url


def test_nobody_gets_in_without_logging_in(alice):
    response = Client().get(RECORDINGS)

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


# Staff reads are audited like the API's


def test_the_list_audits_a_read_of_each_recording_shown(staff, staffer, alice):
    recordings = [create(alice, patient_ref=f"PAT-{number}") for number in range(3)]

    response = staff.get(RECORDINGS)

    reads = AuditEvent.objects.filter(action="read")
    assert sorted(shown(response)) == sorted(r.pk for r in recordings)
    assert sorted(event.recording_id for event in reads) == sorted(r.pk for r in recordings)
    assert {(event.user_id, event.client_ip) for event in reads} == {(staffer.pk, "127.0.0.1")}


def test_a_search_audits_only_what_it_shows(staff, alice):
    found = create(alice, patient_ref="PAT-FOUND")
    create(alice, patient_ref="PAT-OTHER")

    staff.get(RECORDINGS, {"q": "PAT-FOUND"})

    assert list(AuditEvent.objects.filter(action="read").values_list("recording_id", flat=True)) == [found.pk]


def test_the_change_page_audits_a_read(staff, staffer, alice):
    recording = create(alice)

    response = staff.get(change_url(recording))

    [read] = AuditEvent.objects.filter(action="read")
    assert response.status_code == 200
    assert (read.recording_id, read.user_id, read.username) == (recording.pk, staffer.pk, "staffer")


def test_a_page_that_shows_no_recording_audits_no_read(staff, alice):
    recording = create(alice)

    staff.get(reverse("admin:recordings_recording_history", args=[recording.pk]))
    staff.get(reverse("admin:recordings_recording_delete", args=[recording.pk]))
    staff.get(change_url(Recording(pk="00000000-0000-0000-0000-000000000000")))

    assert not AuditEvent.objects.filter(action="read").exists()
