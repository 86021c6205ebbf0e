"""The admin's login, throttled and audited like the API's."""

from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied
from django.db import transaction

from clinical.audit import Action, audit_record
from clinical.requests import client_ip
from clinical.throttle import FAILED, THROTTLED, login_retry_after
from clinical.tokens import login_failure_record

NOT_STAFF = "not_staff"


class ThrottledModelBackend(ModelBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        ip = client_ip(request) if request is not None else None
        if username and login_retry_after(username=username, ip=ip):
            login_failure_record(username=username, ip=ip, outcome=THROTTLED)
            raise PermissionDenied  # authenticate() stops here: not even the right password gets in
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            login_failure_record(username=username or "", ip=ip, outcome=FAILED)
        else:
            # This backend serves the admin, which turns away all but staff.
            with transaction.atomic():
                audit_record(actor=user, action=Action.LOGIN, ip=ip, outcome="success" if user.is_staff else NOT_STAFF)
        return user
