"""The search page in headless Chromium: type a query, see the top-k grid, toggle rerank, drop an image.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (and the ``selenium`` Python
package); skipped, with the reason, when they are absent.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image
from tests.support.serving import API_KEY, build_index, client, running_server, shape_image, tiny_serving_model

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="the selenium package is not installed")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="needs the Debian packages chromium and chromium-driver")]

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1100,900")


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    model = tiny_serving_model()
    index = build_index(model, tmp_path_factory.mktemp("corpus"))
    with running_server(model, index, api_key=API_KEY, max_wait_ms=2) as server:
        yield server, index


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _open_page(driver, server, key: str = API_KEY) -> None:
    """Load the page and enter ``key`` (replacing one a previous test left in the session)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element("id", "key-row").is_displayed())
    driver.execute_script("sessionStorage.clear();")
    field = driver.find_element("id", "api-key")
    field.clear()
    field.send_keys(key)


def _wait_for_results(driver, timeout: float = 60.0) -> list:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element("id", "results").get_attribute("data-state") in ("done", "error"))
    assert driver.find_element("id", "results").get_attribute("data-state") == "done", \
        driver.find_element("id", "error").text
    return driver.find_elements("css selector", "#results .result")


def test_search_page_shows_the_top_k_grid_and_a_nonblank_screenshot(page_server, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server, index = page_server
    _open_page(browser, server)
    assert "7 indexed items" in browser.find_element("id", "server-info").text
    Select(browser.find_element("id", "k")).select_by_visible_text("5")
    browser.find_element("id", "query").send_keys("a large red circle", Keys.ENTER)
    cards = _wait_for_results(browser)
    expected = [hit.id for hit in index.search("a large red circle", k=5)[0]]
    assert [card.get_attribute("data-id") for card in cards] == expected
    scores = [card.find_element("css selector", ".score").text for card in cards]
    assert all(score.replace(".", "", 1).lstrip("-").isdigit() for score in scores)
    WebDriverWait(browser, 30).until(lambda d: all(  # thumbnails fetched with the key and drawn
        img.get_property("naturalWidth") > 0 for img in d.find_elements("css selector", "#results img")))

    browser.find_element("id", "rerank").click()  # toggling rerank searches again
    WebDriverWait(browser, 60).until(lambda d: "reranked" in d.find_element("id", "summary").text)
    cards = _wait_for_results(browser)
    reranked = [hit.id for hit in index.search("a large red circle", k=5, rerank=5)[0]]
    assert [card.get_attribute("data-id") for card in cards] == reranked
    assert "p=" in cards[0].find_element("css selector", ".score").text

    screenshot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    screenshot.save(tmp_path / "search-page.png")
    pixels = np.asarray(screenshot)
    assert screenshot.size[0] >= 800 and pixels.std() > 10  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50  # text, cards and thumbnails drawn


def test_search_page_takes_a_chosen_image_as_the_query(page_server, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    server, index = page_server
    picture = tmp_path / "query.png"
    shape_image("blue", "star").save(picture)
    _open_page(browser, server)
    browser.find_element("id", "image-file").send_keys(str(picture))  # what dropping or choosing a file does
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "preview").is_displayed())
    browser.find_element("id", "search").click()
    cards = _wait_for_results(browser)
    expected = [hit.id for hit in index.search([{"image": shape_image("blue", "star")}], k=10)[0]]
    assert [card.get_attribute("data-id") for card in cards] == expected


def test_search_page_shows_the_servers_error(page_server, browser):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server, _ = page_server
    _open_page(browser, server, key="wrong")
    browser.find_element("id", "query").send_keys("anything", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "results").get_attribute("data-state") == "error")
    assert "invalid API key" in browser.find_element("id", "error").text
    with client(server) as http:
        assert http.post("/v1/search", json={"query": "still serving"}).status_code == 200
