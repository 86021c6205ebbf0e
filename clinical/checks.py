"""Django's deploy checks, run as if our middleware subclasses were Django's own.

Django's security checks look for its middleware by import path and skip
themselves when it is absent; ours are subclasses (hooks run inline), so
without this, `check --deploy` would no longer check HSTS, the SSL redirect,
nosniff, the referrer policy and secure CSRF cookies.
"""

from django.conf import settings
from django.core.checks import Tags, register
from django.core.checks.security import base, csrf
from django.test.utils import override_settings

STOCK = {
    "clinical.middleware.SecurityMiddleware": "django.middleware.security.SecurityMiddleware",
    "clinical.middleware.CsrfViewMiddleware": "django.middleware.csrf.CsrfViewMiddleware",
    "clinical.middleware.XFrameOptionsMiddleware": "django.middleware.clickjacking.XFrameOptionsMiddleware",
}
CHECKS = (
    base.check_security_middleware,
    base.check_xframe_options_middleware,
    csrf.check_csrf_middleware,
    base.check_sts,
    base.check_sts_include_subdomains,
    base.check_sts_preload,
    base.check_content_type_nosniff,
    base.check_ssl_redirect,
    base.check_xframe_deny,
    base.check_referrer_policy,
    base.check_cross_origin_opener_policy,
    csrf.check_csrf_cookie_secure,
)


@register(Tags.security, deploy=True)
def check_security_through_subclasses(app_configs, **kwargs):
    with override_settings(MIDDLEWARE=[STOCK.get(path, path) for path in settings.MIDDLEWARE]):
        return [message for check in CHECKS for message in check(app_configs)]
