"""The staff admin for recordings: edits and deletes go through the same services as the API."""

import json

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.utils.html import format_html

from clinical.audit import audit_reads
from clinical.requests import client_ip
from recordings.models import TRANSITIONS, Recording
from recordings.services import (
    STALE_VERSION,
    RecordingConflict,
    recording_delete,
    recording_update,
    transition_refused,
)

EDITABLE = (
    "patient_ref",
    "title",
    "note_type",
    "status",
    "audio_path",
    "duration_seconds",
    "recorded_at",
    "transcript",
    "error",
)


DELETED = "This recording was deleted: it can no longer be changed."


class RecordingForm(forms.ModelForm):
    # The version this form was loaded at: an edit made meanwhile elsewhere is a conflict.
    seen_version = forms.IntegerField(widget=forms.HiddenInput)

    class Meta:
        model = Recording
        fields = EDITABLE

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["seen_version"].initial = self.instance.version

    def clean(self):
        cleaned = super().clean()
        if self.instance.deleted_at is not None:
            raise forms.ValidationError(DELETED)
        if cleaned.get("seen_version") not in (None, self.instance.version):
            raise forms.ValidationError(f"{STALE_VERSION} Reload the page to see the current version.")
        old, new = self.instance.status, cleaned.get("status")
        if new and new != old and new not in TRANSITIONS[old]:
            self.add_error("status", transition_refused(old, new))
        return cleaned


class DeletedFilter(admin.SimpleListFilter):
    title = "deleted"
    parameter_name = "deleted"

    def lookups(self, request, model_admin):
        return (("no", "Live"), ("yes", "Deleted"))

    def queryset(self, request, queryset):
        if self.value() in ("no", "yes"):
            return queryset.filter(deleted_at__isnull=self.value() == "no")
        return queryset


@admin.register(Recording)
class RecordingAdmin(admin.ModelAdmin):
    form = RecordingForm
    list_display = ("patient_ref", "title", "owner", "status", "version", "recorded_at", "created_at", "updated_at")
    list_filter = ("status", "owner", ("created_at", admin.DateFieldListFilter), DeletedFilter)
    search_fields = ("patient_ref", "title")
    date_hierarchy = "created_at"
    list_select_related = ("owner",)
    readonly_fields = ("id", "owner", "version", "digest", "created_at", "updated_at", "deleted_at", "results_json")
    fields = (
        "id",
        "owner",
        *EDITABLE,
        "results_json",
        "version",
        "seen_version",
        "digest",
        "created_at",
        "updated_at",
    )
    ordering = ("-created_at",)

    def has_add_permission(self, request):
        return False  # recordings come from clinicians' devices

    # Every display of a recording's content is a read of patient data: audited
    # as the API's reads are, one event per recording shown, before the page goes.

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        listed = getattr(response, "context_data", None) or {}
        if "cl" in listed:
            self._audit_shown(request, [recording.pk for recording in listed["cl"].result_list])
        return response

    def change_view(self, request, object_id, form_url="", extra_context=None):
        response = super().change_view(request, object_id, form_url, extra_context)
        shown = (getattr(response, "context_data", None) or {}).get("original")
        if response.status_code == 200 and shown is not None:
            self._audit_shown(request, [shown.pk])
        return response

    def _audit_shown(self, request, recording_ids: list) -> None:
        with transaction.atomic():
            audit_reads(actor=request.user, recording_ids=recording_ids, ip=client_ip(request))

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and obj.deleted_at is not None:
            return (*self.readonly_fields, *EDITABLE)  # a tombstone is shown, not edited
        return self.readonly_fields

    @admin.display(description="verification results")
    def results_json(self, recording):
        text = json.dumps(recording.verification_results, indent=2, ensure_ascii=False, sort_keys=True)
        return format_html('<pre class="verification-results">{}</pre>', text)

    def save_model(self, request, obj, form, change):
        changes = {field: form.cleaned_data[field] for field in form.changed_data if field in EDITABLE}
        try:
            saved = recording_update(
                owner=obj.owner,
                recording_id=obj.pk,
                version=form.cleaned_data["seen_version"],
                actor=request.user,
                ip=client_ip(request),
                **changes,
            )
        except RecordingConflict as conflict:
            messages.error(request, f"Not saved: {conflict.detail} Reload the page to see the current version.")
            return
        except Recording.DoesNotExist:
            messages.error(request, f"Not saved: {DELETED}")
            return
        obj.version = saved.version

    def delete_model(self, request, obj):
        recording_delete(owner=obj.owner, recording_id=obj.pk, actor=request.user, ip=client_ip(request))

    def delete_queryset(self, request, queryset):
        for recording in queryset.select_related("owner"):
            self.delete_model(request, recording)
