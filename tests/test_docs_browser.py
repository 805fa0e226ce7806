"""The interactive docs in a real headless browser, offline: Swagger UI renders the predict
operation from files this service serves, and "Try it out" classifies an upload with a token.

Debian's chromium driven by Playwright's Python package (`executable_path`, no browser
download). Every request the page makes to anywhere but the service is refused and recorded:
the page must not need one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import TEST_SECRET, running_server, token

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PREDICT_OPERATION = "#operations-inference-predict_api_v1_inference_predict_post"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bundled demo model on embedded defaults, with the tests' JWT secret."""
    folder = tmp_path_factory.mktemp("docs-browser")
    env = {"DATA_DIR": str(folder / "data"), "JWT_SECRET": TEST_SECRET}
    with running_server(env, folder / "server.log") as base_url:
        yield base_url


@pytest.fixture
def page(service: str) -> Iterator[tuple[object, list[str]]]:
    """A fresh page whose requests off the service's origin are aborted and listed."""
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "chromium is missing: apt-get install chromium"
    origin = urlsplit(service).netloc
    elsewhere: list[str] = []

    def only_the_service(route) -> None:  # type: ignore[no-untyped-def]
        url = route.request.url
        if urlsplit(url).netloc == origin or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.route("**/*", only_the_service)
            tab = context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            tab.on("pageerror", lambda error: errors.append(str(error)))
            yield tab, elsewhere
            assert not errors, f"script errors on the page: {errors}"
        finally:
            browser.close()


def test_docs_render_the_predict_operation_offline(service: str, page) -> None:
    tab, elsewhere = page
    response = tab.goto(f"{service}/api/v1/docs")
    assert response is not None and response.status == 200
    operation = tab.locator(PREDICT_OPERATION)
    operation.wait_for()
    assert "/api/v1/inference/predict" in operation.locator(".opblock-summary-path").inner_text()
    assert "healthy or rotten" in operation.inner_text()
    assert tab.locator("button.authorize").is_visible()
    assert not elsewhere, f"the docs page reached out: {elsewhere}"


def test_try_it_out_classifies_an_upload_with_a_token(service: str, page) -> None:
    tab, elsewhere = page
    tab.goto(f"{service}/api/v1/docs")
    # Authorize: the bearer token goes into the HTTPBearer scheme's value field.
    tab.locator("button.authorize").first.click()
    dialog = tab.locator(".dialog-ux")
    dialog.locator("input").first.fill(token())
    dialog.locator("button.authorize").click()
    dialog.locator("button.btn-done").click()
    # Open the operation, "Try it out", attach an example photo, ask for the top 3.
    operation = tab.locator(PREDICT_OPERATION)
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    operation.locator("tr[data-param-name='top_k'] input").fill("3")
    operation.locator("input[type=file]").set_input_files(ROOT / "examples" / "apple__rotten.jpg")
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for()
    body = operation.locator(".live-responses-table tbody .response-col_description pre").first
    assert status.inner_text().strip() == "200", body.inner_text()
    answer = json.loads(body.inner_text())
    assert answer["predicted_class_name"] == "Apple__Rotten"
    assert len(answer["top_k"]) == 3
    assert not elsewhere, f"the docs page reached out: {elsewhere}"


def test_try_it_out_without_a_token_gets_the_401(service: str, page) -> None:
    tab, _ = page
    tab.goto(f"{service}/api/v1/docs")
    operation = tab.locator(PREDICT_OPERATION)
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    operation.locator("input[type=file]").set_input_files(ROOT / "examples" / "apple__rotten.jpg")
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip() == "401"
