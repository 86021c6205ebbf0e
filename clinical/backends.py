"""The admin's login, throttled and audited like the API's, under the same rule."""

from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied
from django.db import transaction

from clinical.audit import Action, audit_record
from clinical.passwords import in_turn
from clinical.requests import client_ip
from clinical.throttle import login_attempt_end, login_attempt_start, login_failure_record

NOT_STAFF = "not_staff"


class ThrottledModelBackend(ModelBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None or password is None:
            return None  # not a login with a password: nothing to throttle
        ip = client_ip(request) if request is not None else None
        attempt_id, _ = login_attempt_start(username=username, ip=ip)
        if attempt_id is None:
            raise PermissionDenied  # authenticate() stops here: not even the right password gets in
        # The hash is checked in the passwords' pool, one of a few at once (clinical/passwords.py).
        user = in_turn(super().authenticate, request, username=username, password=password, **kwargs)
        if user is None:
            login_failure_record(attempt_id=attempt_id, username=username, ip=ip)
            return None
        # This backend serves the admin, which turns away all but staff.
        with transaction.atomic():
            login_attempt_end(attempt_id, succeeded=True)
            audit_record(actor=user, action=Action.LOGIN, ip=ip, outcome="success" if user.is_staff else NOT_STAFF)
        return user
