"""The staff admin for the platform: a read-only audit trail, tokens to revoke, users to sign out."""

import uuid

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.utils import timezone

from clinical.chain import recording_events
from clinical.models import AuditCheck, AuditEvent, Token
from clinical.requests import client_ip
from clinical.tokens import password_stamp, token_revoke, tokens_revoke_all

User = get_user_model()


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only for everyone, superusers included: the trail is append-only."""

    list_display = (
        "at",
        "username",
        "action",
        "recording_id",
        "changed_fields",
        "status_change",
        "client_ip",
        "outcome",
    )
    list_filter = ("action", "outcome", ("at", admin.DateFieldListFilter), "username")
    search_fields = ("recording_id",)
    search_help_text = "A recording's id."
    date_hierarchy = "at"
    actions = None
    list_per_page = 100

    def changelist_view(self, request, extra_context=None):
        messages.add_message(request, *_chain_status())
        return super().changelist_view(request, extra_context)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="fields")
    def changed_fields(self, event):
        return ", ".join(event.fields)

    @admin.display(description="status")
    def status_change(self, event):
        return f"{event.status_from or '∅'} → {event.status_to}" if event.status_to else ""

    def get_search_results(self, request, queryset, search_term):
        # Ids are stored without dashes on SQLite: match the parsed id, not the text.
        try:
            return queryset.filter(id__in=recording_events(uuid.UUID(search_term.strip()))), False
        except ValueError:
            return queryset.none() if search_term.strip() else queryset, False


@admin.register(Token)
class TokenAdmin(admin.ModelAdmin):
    """Tokens are listed (never their secret) and revoked; nothing else."""

    list_display = ("user", "created_at", "expires_at", "last_used_at", "revoked_at", "is_active")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "expires_at")
    search_fields = ("user__username",)
    fields = ("user", "created_at", "expires_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    list_select_related = ("user",)

    @admin.display(boolean=True, description="active")
    def is_active(self, token):
        # Refused once revoked, expired, or issued under a password since changed.
        return (
            token.revoked_at is None
            and token.expires_at > timezone.now()
            and token.password_stamp == password_stamp(token.user.password)
        )

    @admin.action(description="Revoke the selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        for token in queryset.filter(revoked_at__isnull=True):
            token_revoke(token_id=token.pk, actor=request.user, ip=client_ip(request))
        self.message_user(request, "The selected tokens are revoked.", messages.SUCCESS)


admin.site.unregister(User)


@admin.register(User)
class ClinicalUserAdmin(UserAdmin):
    """Django's user admin, with a way to sign someone out of every device at once."""

    actions = ["sign_out_everywhere"]

    @admin.action(
        description="Sign out everywhere (revoke every token, end every admin session)", permissions=["change"]
    )
    def sign_out_everywhere(self, request, queryset):
        revoked = sum(tokens_revoke_all(user=user, actor=request.user, ip=client_ip(request)) for user in queryset)
        self.message_user(request, f"Signed out everywhere: {revoked} tokens revoked.", messages.SUCCESS)


def _chain_status() -> tuple[int, str]:
    """How far the audit chain was last verified (manage.py verifyaudit), as a message level and text."""
    check = AuditCheck.objects.first()
    if check is None:
        return messages.WARNING, "The audit chain has not been verified yet: run manage.py verifyaudit."
    when = timezone.localtime(check.at).strftime("%Y-%m-%d %H:%M:%S %Z")
    if not check.ok:
        return messages.ERROR, f"The audit chain was found broken at {when}: {check.detail}"
    return (
        messages.INFO,
        f"The audit chain was last verified at {when}: whole through event {check.last_event_id or 0} "
        f"({check.events:,} events), head {check.head}.",
    )
