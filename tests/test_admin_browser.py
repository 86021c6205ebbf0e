"""The Django admin in a real headless Chromium, against a real uvicorn process on its own database.

A staff member logs in, filters recordings by status, reads a recording's
verification results, edits its title (the version goes up through the same
service as the API) and finds that edit in the audit list; a clinician who is
not staff stays on the login page. Screenshots of every step are kept in
pytest's temporary directory (the path is printed; see it with `-rA` or `-s`).

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver);
scripts/test installs them when run as root. Without them these tests fail, unless
CLINICAL_BROWSER_TESTS=0, which skips them.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server import PASSWORD, REPO_ROOT, Server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = (
    "The admin's browser tests need Chromium and chromedriver at {chromium} and {chromedriver}, "
    "and {missing} is missing. Install them (as root) with "
    "`apt-get update && apt-get install -y chromium chromium-driver` (scripts/test does this itself "
    "when run as root), or set CLINICAL_BROWSER_TESTS=0 to skip these tests."
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",  # wide enough for the changelist's filter sidebar
)
WAIT = 15  # seconds for a page or an element

STAFF = "ward-admin"
CLINICIAN = "dr-clinician"
RESULTS = {
    "checks": [
        {"name": "dose", "ok": True},
        {"name": "allergies", "ok": False, "note": "penicillin <b>not bold</b> — confirm"},
    ],
    "reviewer": None,
    "score": 0.93,
}
NEW_TITLE = "Follow-up after surgery (checked by ward admin)"
HEADER_BLUE = "rgb(65, 118, 144)"  # #417690, the admin's header colour from base.css


def browser_problem() -> str | None:
    """Why the browser cannot be driven here; None when it can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            return INSTALL_HINT.format(chromium=CHROMIUM, chromedriver=CHROMEDRIVER, missing=path)
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "The admin's browser tests need selenium: .venv/bin/pip install -r requirements.txt"
    return None


def require_browser() -> None:
    """Each test's first step: a missing browser fails the test (CI installs it), it does not skip it."""
    problem = browser_problem()
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="module")
def browser_ready() -> bool:
    """False when the browser is missing: the fixtures then start nothing and require_browser() fails the test."""
    if os.environ.get("CLINICAL_BROWSER_TESTS") == "0":
        pytest.skip("CLINICAL_BROWSER_TESTS=0: the admin's browser tests are turned off.")
    return browser_problem() is None


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    directory = tmp_path_factory.mktemp("admin-browser-screenshots", numbered=True)
    print(f"\nadmin browser screenshots: {directory}")
    return directory


@pytest.fixture(scope="module")
def site(browser_ready, tmp_path_factory):
    """A started server with a staff superuser, a clinician and four of the clinician's recordings."""
    if not browser_ready:
        yield None
        return
    server = Server(tmp_path_factory.mktemp("admin-browser-server"))
    collectstatic(server)
    server.prepare(STAFF, CLINICIAN)
    make_staff_superuser(server, STAFF)
    server.start()
    try:
        token = server.login(CLINICIAN)
        with server.client(token) as client:
            recordings = seed_recordings(client)
        yield server, token, recordings
    finally:
        server.stop()


def collectstatic(server: Server) -> None:
    """The admin's CSS and JS into STATIC_ROOT, which the app serves itself (ServeStatic)."""
    done = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput"],
        cwd=REPO_ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"collectstatic failed:\n{done.stdout}\n{done.stderr}"


def make_staff_superuser(server: Server, username: str) -> None:
    updated = server.query(
        "UPDATE auth_user SET is_staff = TRUE, is_superuser = TRUE WHERE username = %s RETURNING id", (username,)
    )
    assert len(updated) == 1


def seed_recordings(client: httpx.Client) -> dict[str, dict]:
    """Two pending recordings and two transcribed ones (through PATCHes), one with verification results."""

    def create(**fields) -> dict:
        response = client.post("/recordings", json=fields)
        assert response.status_code == 201, response.text
        return response.json()

    def advance_to_transcribed(recording: dict, **extra) -> dict:
        for status in ("uploaded", "transcribing", "transcribed"):
            changes = {"version": recording["version"], "status": status}
            if status == "transcribed":
                changes.update(extra)
            response = client.patch(f"/recordings/{recording['id']}", json=changes)
            assert response.status_code == 200, response.text
            recording = response.json()
        return recording

    recordings = {
        "pending-1": create(patient_ref="PAT-BRW-001", title="Intake call"),
        "pending-2": create(patient_ref="PAT-BRW-002", title="Medication review"),
        "checked": advance_to_transcribed(
            create(patient_ref="PAT-BRW-003", title="Follow-up after surgery", verification_results=RESULTS),
            transcript="Patient reports less pain. No fever.",
        ),
        "plain": advance_to_transcribed(create(patient_ref="PAT-BRW-004", title="Night shift handover")),
    }
    assert recordings["checked"]["status"] == "transcribed"
    assert recordings["checked"]["version"] == 4
    assert recordings["pending-1"]["status"] == "pending"
    return recordings


@pytest.fixture(scope="module")
def browser(browser_ready, site, screenshots, tmp_path_factory):
    if not browser_ready:
        yield None
        return
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(screenshots / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT * 2)
    try:
        yield driver
    finally:
        try:
            driver.save_screenshot(str(screenshots / "99-last-page.png"))
        finally:
            driver.quit()


class Admin:
    """The steps a person takes in the admin, each followed by a screenshot."""

    def __init__(self, driver, base_url: str, screenshots: Path):
        self.driver = driver
        self.base_url = base_url
        self.screenshots = screenshots

    def shot(self, name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def wait_for(self, css: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, WAIT).until(
            EC.visibility_of_element_located((By.CSS_SELECTOR, css)), f"no visible {css!r} on {self.driver.current_url}"
        )

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def go(self, path: str) -> None:
        self.driver.get(f"{self.base_url}{path}")

    def click_and_wait(self, element, css: str):
        """Click something that loads a new page, and wait for `css` on that new page."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def left_behind(_driver) -> bool:
            # Stale, or (Chromium, mid-navigation) "Node … does not belong to the document": the page was replaced.
            try:
                element.is_enabled()
            except WebDriverException:
                return True
            return False

        element.click()
        WebDriverWait(self.driver, WAIT).until(left_behind, "the click did not load a new page")
        return self.wait_for(css)

    def log_in(self, username: str, password: str = PASSWORD) -> None:
        self.go("/admin/login/?next=/admin/")
        self.wait_for("#id_username").send_keys(username)
        self.find("#id_password").send_keys(password)
        self.click_and_wait(self.find("#login-form [type=submit]"), "#container")

    def header_colour(self) -> str:
        return self.driver.execute_script("return getComputedStyle(document.getElementById('header')).backgroundColor")

    def console_errors(self) -> list[str]:
        """The browser console's errors (a failed script or style sheet, say); the app has no favicon."""
        return [
            entry["message"]
            for entry in self.driver.get_log("browser")
            if entry["level"] == "SEVERE" and "/favicon.ico" not in entry["message"]
        ]


@pytest.fixture(scope="module")
def admin(browser, site, screenshots):
    if browser is None:
        return None
    server, _, _ = site
    return Admin(browser, server.url, screenshots)


def row_for(admin: Admin, recording_id: str):
    """The changelist row whose link opens this recording."""
    rows = [row for row in admin.find_all("#result_list tbody tr") if recording_id in row_link(row)]
    assert len(rows) == 1, f"{len(rows)} rows for {recording_id} on {admin.driver.current_url}"
    return rows[0]


def row_link(row) -> str:
    from selenium.webdriver.common.by import By

    links = row.find_elements(By.CSS_SELECTOR, "th a, td a")
    return links[0].get_attribute("href") if links else ""


def cell(row, field: str) -> str:
    from selenium.webdriver.common.by import By

    return row.find_element(By.CSS_SELECTOR, f".field-{field}").text.strip()


def test_the_app_serves_the_admins_static_files(site):
    require_browser()
    server, _, _ = site

    response = httpx.get(f"{server.url}/static/admin/css/base.css", timeout=10)
    script = httpx.get(f"{server.url}/static/admin/js/core.js", timeout=10)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")
    assert "--header-bg" in response.text
    assert script.status_code == 200


def test_staff_filters_reads_and_edits_a_recording_and_the_audit_list_shows_it(site, admin):
    require_browser()
    from selenium.webdriver.common.by import By

    server, token, recordings = site
    checked = recordings["checked"]
    started = time.monotonic()

    # Log in.
    admin.log_in(STAFF)
    assert admin.driver.current_url == f"{server.url}/admin/"
    admin.wait_for("#user-tools")
    assert STAFF.upper() in admin.find("#user-tools").text.upper()
    assert admin.header_colour() == HEADER_BLUE, "base.css did not apply: the static files are not served"
    admin.shot("01-admin-index")

    # The recordings list, then its status filter.
    admin.go("/admin/recordings/recording/")
    admin.wait_for("#result_list")
    assert len(admin.find_all("#result_list tbody tr")) == 4
    admin.shot("02-recordings-list")
    status_filter = admin.find('#changelist-filter details[data-filter-title="status"]')
    link = status_filter.find_element(By.LINK_TEXT, "Transcribed")
    admin.click_and_wait(link, "#result_list")
    assert "status__exact=transcribed" in admin.driver.current_url
    rows = admin.find_all("#result_list tbody tr")
    assert sorted(cell(row, "patient_ref") for row in rows) == ["PAT-BRW-003", "PAT-BRW-004"]
    assert {cell(row, "status") for row in rows} == {"Transcribed"}
    assert cell(row_for(admin, checked["id"]), "version") == "4"
    admin.shot("03-filtered-by-status-transcribed")

    # Open the recording: its verification results are indented JSON in a <pre>.
    row = row_for(admin, checked["id"])
    admin.click_and_wait(row.find_element(By.CSS_SELECTOR, "th a"), "#recording_form")
    assert f"/admin/recordings/recording/{checked['id']}/change/" in admin.driver.current_url
    pre = admin.wait_for("pre.verification-results")
    assert pre.get_attribute("textContent") == json.dumps(RESULTS, indent=2, sort_keys=True, ensure_ascii=False)
    assert '\n  "checks": [' in pre.get_attribute("textContent")
    assert pre.find_elements(By.TAG_NAME, "b") == [], "the JSON's text was rendered as HTML"
    assert admin.find(".field-version .readonly").text == "4"
    assert admin.find("#id_title").get_attribute("value") == "Follow-up after surgery"
    admin.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", pre)
    admin.shot("04-recording-change-page-results-json")

    # Edit its title and save.
    title = admin.find("#id_title")
    title.clear()
    title.send_keys(NEW_TITLE)
    admin.shot("05-title-edited")
    admin.click_and_wait(admin.find('input[name="_save"]'), "#content")
    refused = [item.text for item in admin.find_all(".errornote, .messagelist .error")]
    if refused:
        admin.shot("06-edit-refused")
        shown = [item.text for item in admin.find_all(".errorlist")]
        pytest.fail(f"The admin refused the edit: {refused}; errors shown on fields: {shown}", pytrace=False)
    success = admin.wait_for(".messagelist .success")
    assert "was changed successfully" in success.text
    assert admin.driver.current_url.startswith(f"{server.url}/admin/recordings/recording/")
    saved = row_for(admin, checked["id"])
    assert cell(saved, "title") == NEW_TITLE
    assert cell(saved, "version") == "5"
    admin.shot("06-saved-version-5-in-list")

    admin.go(f"/admin/recordings/recording/{checked['id']}/change/")
    assert admin.wait_for(".field-version .readonly").text == "5"
    assert admin.find("#id_title").get_attribute("value") == NEW_TITLE
    admin.shot("07-change-page-version-5")

    # The API (the clinician's own view) sees the same edit.
    with server.client(token) as client:
        fetched = client.get(f"/recordings/{checked['id']}").json()
    assert (fetched["title"], fetched["version"], fetched["status"]) == (NEW_TITLE, 5, "transcribed")

    # The audit list shows the edit: an update by the staff member, of this recording, changing the title.
    admin.go("/admin/clinical/auditevent/")
    admin.wait_for("#result_list")
    updates = [
        (cell(row, "username"), cell(row, "recording_id"), cell(row, "changed_fields"))
        for row in admin.find_all("#result_list tbody tr")
        if cell(row, "action") == "Update"
    ]
    assert (STAFF, checked["id"], "title") in updates, updates
    admin.shot("08-audit-list-shows-update")
    # Its search finds the recording's events by id.
    search = admin.find("#searchbar")
    search.send_keys(checked["id"])
    admin.click_and_wait(admin.find('#changelist-search [type="submit"]'), "#result_list")
    found = admin.find_all("#result_list tbody tr")
    assert found, "searching the audit list by recording id found nothing"
    assert {cell(row, "recording_id") for row in found} == {checked["id"]}
    assert {(cell(row, "username"), cell(row, "action")) for row in found} >= {(STAFF, "Update"), (CLINICIAN, "Create")}
    admin.shot("09-audit-search-by-recording-id")

    assert admin.console_errors() == []
    assert time.monotonic() - started < 45


def test_a_clinician_who_is_not_staff_cannot_get_into_the_admin(site, admin):
    require_browser()
    server, _, _ = site
    admin.driver.delete_all_cookies()

    admin.go("/admin/login/?next=/admin/")
    admin.wait_for("#id_username").send_keys(CLINICIAN)
    admin.find("#id_password").send_keys(PASSWORD)
    admin.shot("10-clinician-login-form")
    admin.click_and_wait(admin.find("#login-form [type=submit]"), ".errornote")

    assert admin.driver.current_url.startswith(f"{server.url}/admin/login/")
    assert "staff account" in admin.find(".errornote").text
    assert admin.find_all("#user-tools") == []
    assert admin.header_colour() == HEADER_BLUE
    admin.shot("11-clinician-refused")

    admin.go("/admin/recordings/recording/")
    admin.wait_for("#login-form")
    assert admin.driver.current_url.startswith(f"{server.url}/admin/login/")
    admin.shot("12-clinician-sent-back-to-login")
