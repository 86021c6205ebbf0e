"""Middleware that serves the API without thread hops and answers it in JSON.

Django's stock middleware runs each hook through sync_to_async: two thread hops
per middleware per request. Hooks that do no I/O run inline here; the ones
that touch the session (and so the database) run for the admin only, since
the API authenticates with bearer tokens.
"""

from http import HTTPStatus

from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.http import JsonResponse
from django.middleware import clickjacking, common, csrf, security
from django.utils.decorators import async_only_middleware

from clinical.tokens import answer_unchecked

API_PREFIX = "/api/"


def is_api(request) -> bool:
    return request.path_info.startswith(API_PREFIX)


class Inline:
    """Runs a middleware's request and response hooks on the event loop: they do no I/O."""

    async def __acall__(self, request):
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class SiteOnly:
    """Lets API requests pass this middleware by; the admin gets it as Django ships it."""

    async def __acall__(self, request):
        if is_api(request):
            return await self.get_response(request)
        return await super().__acall__(request)


class SecurityMiddleware(Inline, security.SecurityMiddleware):
    pass


class CommonMiddleware(Inline, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(Inline, csrf.CsrfViewMiddleware):
    async def process_view(self, request, callback, callback_args, callback_kwargs):
        return super().process_view(request, callback, callback_args, callback_kwargs)


class XFrameOptionsMiddleware(Inline, clickjacking.XFrameOptionsMiddleware):
    pass


class SessionMiddleware(SiteOnly, sessions.SessionMiddleware):
    pass


class AuthenticationMiddleware(SiteOnly, auth.AuthenticationMiddleware):
    pass


class MessageMiddleware(SiteOnly, messages.MessageMiddleware):
    pass


@async_only_middleware
def api_responses(get_response):
    """Every API answer is JSON and never cached: it may carry patient data."""

    async def middleware(request):
        response = await get_response(request)
        if not is_api(request):
            return response
        response["Cache-Control"] = "no-store"
        if response.status_code >= 400 and not response.get("Content-Type", "").startswith("application/json"):
            response = _as_json(response)
        return response

    return middleware


@async_only_middleware
def api_tokens_checked(get_response):
    """A bad token answers 401 even where the input was refused before its check (clinical.tokens).

    The innermost middleware, so that the 401 it may put in place passes out
    through the others and gets their security headers.
    """

    async def middleware(request):
        return await answer_unchecked(request, await get_response(request))

    return middleware


def _as_json(response):
    status = response.status_code
    detail = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    replacement = JsonResponse({"detail": f"{detail}."}, status=status)
    for header, value in response.items():
        if header.lower() not in ("content-type", "content-length"):
            replacement[header] = value  # Allow, Retry-After, the security headers...
    replacement["Cache-Control"] = "no-store"
    return replacement
