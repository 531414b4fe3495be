"""The search page and the run dashboards in headless Chromium, against a real Serve app on 127.0.0.1
over real SciFact documents ingested with the real model.

Needs the system ``chromium`` and ``chromedriver`` (Debian: apt-get install chromium chromium-driver;
.ci/run installs them). Without them these tests skip, except under CI, where they fail.
"""

import json
import os
import shutil
import socket

import pytest
import requests

from pipelines import ingest
from pipelines.config import ServeSettings, load_config
from tests.conftest import scifact_docs

KEY = "ui-key-456"
XSS = "<img src=x onerror=\"document.body.dataset.pwned='1'\">"


def _browser_paths() -> tuple[str, str]:
    """The system Chromium and chromedriver, or a skip (a failure under CI) naming what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this fails instead of skipping")
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(site: dict, *, api_key: str | None) -> None:
    """Run the app with this key (None: no key), redeploying only when the key changes."""
    from ray import serve

    from serve.app import ServeConfig, build_app

    if site.get("api_key", "unset") == api_key:
        return
    site["api_key"] = api_key
    db = site["db"]
    settings = ServeSettings(shard_cpus=0, router_cpus=0, refresh_s=0)
    config = ServeConfig(db=str(db), settings=settings, api_key=api_key, device="cpu", dtype="fp32")
    serve.run(build_app(config), name="embedpipe", route_prefix="/")


@pytest.fixture(scope="module")
def ui_app(ray_local, tmp_path_factory, scifact, monkeypatch_module):
    """30 SciFact docs, one doc with HTML in its title and a doc_id (holding HTML) given twice, so that
    the run has failures to show; ingested with the real model. The site and keyed fixtures run the app."""
    from ray import serve

    monkeypatch_module.delenv("EMBEDPIPE_API_KEY", raising=False)
    root = tmp_path_factory.mktemp("ui")
    docs = scifact_docs(30)
    docs.append({"_id": "xss-doc", "title": f"Statins {XSS} <b>bold</b>", "text": "Statins lower LDL."})
    docs += [{"_id": XSS, "title": "twice", "text": f"copy {i}"} for i in range(2)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    db = root / "db"
    run = ingest.build(source=corpus, db=db, cfg=load_config(None, shards=2, **{"ray.progress_bars": False}))
    assert run["docs"]["failed"] == 2
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    state = {"url": f"http://127.0.0.1:{port}", "db": db, "docs": docs, "run": run}
    yield state
    serve.shutdown()


@pytest.fixture
def site(ui_app):
    _deploy(ui_app, api_key=None)
    return ui_app


@pytest.fixture
def keyed(ui_app):
    _deploy(ui_app, api_key=KEY)
    return ui_app


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _by(css: str):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, css


def _search(driver, url: str, query: str, *, filter: str = "") -> None:
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{url}/")
    if filter:
        driver.find_element(*_by("#filter")).send_keys(filter)
    box = driver.find_element(*_by("#q"))
    box.send_keys(query + Keys.ENTER)  # the keyboard submits the form


def _visible_text(driver, css: str) -> str:
    elements = [e for e in driver.find_elements(*_by(css)) if e.is_displayed()]
    return elements[0].text if elements else ""


def _script_errors(driver) -> list[str]:
    # HTTP errors the page is meant to show (400, 401) are logged too; anything else is a bug,
    # e.g. a Content-Security-Policy violation or an exception in the page's script.
    logs = driver.get_log("browser")
    return [
        e["message"] for e in logs if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]


# The page's sideways scroll, the smallest chart text's height (px), and any chart text outside its chart.
CHART_TEXT = """
const outside = [];
let smallest = Infinity;
for (const svg of document.querySelectorAll("figure.chart svg")) {
  const box = svg.getBoundingClientRect();
  for (const text of svg.querySelectorAll("text")) {
    const r = text.getBoundingClientRect();
    smallest = Math.min(smallest, r.height);
    if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
      outside.push(text.textContent);
  }
}
return [document.documentElement.scrollWidth, window.innerWidth, smallest, outside];
"""


def test_search_by_keyboard_shows_the_top_result(browser, site):
    url, doc = site["url"], site["docs"][3]
    expected = requests.post(f"{url}/search", json={"query": doc["title"], "k": 10}, timeout=60).json()
    _search(browser, url, doc["title"])
    _wait(browser, lambda d: d.find_elements(*_by("li.hit")))
    titles = [e.text for e in browser.find_elements(*_by("li.hit .hit-title"))]
    assert len(titles) == len(expected["results"]) == 10
    assert titles[0] == expected["results"][0]["title"] == doc["title"]
    first = browser.find_element(*_by("li.hit"))
    assert first.find_elements(*_by("mark")), "query terms are highlighted"
    assert expected["results"][0]["doc_id"] in first.text and "shard_00" in first.text
    assert "score" in first.text and "took_ms" in browser.find_element(*_by("#status")).text
    for field in ("q", "k", "mode", "filter"):  # every input has a label
        assert browser.find_elements(*_by(f'label[for="{field}"]'))
    assert browser.find_element(*_by("body")).get_attribute("data-auth") == "none"
    assert not browser.find_element(*_by("#key-form")).is_displayed()
    assert _script_errors(browser) == []


def test_result_text_is_escaped_and_the_page_fits_a_narrow_window(browser, site):
    browser.set_window_size(390, 900)
    try:
        _search(browser, site["url"], "Statins lower LDL bold", filter="doc_id = 'xss-doc'")
        _wait(browser, lambda d: d.find_elements(*_by("li.hit")))
        title = browser.find_element(*_by("li.hit .hit-title"))
        assert title.text == site["docs"][30]["title"]  # the markup shows as text
        assert not browser.find_elements(*_by("li.hit img, li.hit b"))
        assert browser.find_element(*_by("body")).get_attribute("data-pwned") is None
        scroll, inner = browser.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert scroll <= inner, "no sideways scrolling on a narrow window"
    finally:
        browser.set_window_size(1280, 1000)


def test_bad_filter_shows_its_error(browser, site):
    _search(browser, site["url"], "cancer", filter="nosuchcolumn = 1")
    _wait(browser, lambda d: _visible_text(d, "#error"))
    message = _visible_text(browser, "#error")
    assert message.startswith("Error 400") and "nosuchcolumn" in message
    assert not browser.find_elements(*_by("li.hit"))


def test_a_shared_link_with_a_filter_waits_for_a_click(browser, site):
    from urllib.parse import urlencode

    from selenium.webdriver.common.by import By

    url = site["url"]
    plain = urlencode({"q": "statins", "k": 3})
    browser.get(f"{url}/?{plain}")
    _wait(browser, lambda d: d.find_elements(*_by("li.hit")))  # no filter: it runs on load
    filtered = urlencode({"q": "statins", "k": 3, "filter": "doc_id = 'xss-doc'"})
    browser.get(f"{url}/?{filtered}")
    _wait(browser, lambda d: "press Search" in _visible_text(d, "#status"))
    assert browser.find_element(*_by("#filter")).get_attribute("value") == "doc_id = 'xss-doc'"
    assert not browser.find_elements(*_by("li.hit"))  # nothing was searched with the tab's key
    browser.find_element(By.CSS_SELECTOR, "#search-form button[type=submit], #search-form button").click()
    _wait(browser, lambda d: d.find_elements(*_by("li.hit")))
    assert {e.text for e in browser.find_elements(*_by("li.hit .hit-title"))} == {site["docs"][30]["title"]}


def test_runs_page_lists_the_run_and_its_charts_render(browser, site):
    run_id = site["run"]["run_id"]
    browser.get(f"{site['url']}/runs")
    link = _wait(browser, lambda d: d.find_elements(*_by(f'#runs a[href="/runs/{run_id}"]')))[0]
    row = browser.find_element(*_by("#runs tr.run")).text
    assert run_id in row and " 33 " in f" {row} "  # 33 docs seen: 31 ingested, 2 failed
    link.click()
    _wait(browser, lambda d: d.find_elements(*_by("figure.chart svg")))
    assert browser.find_element(*_by("h1")).text == f"Ingest run {run_id}"
    captions = [e.text for e in browser.find_elements(*_by("figure.chart figcaption"))]
    assert captions[:4] == [
        "Throughput over time", "Time per stage", "Memory over time (RSS, MB)", "CPU use over time (%)"
    ]  # fmt: skip
    svgs = browser.find_elements(*_by("figure.chart svg"))
    for svg in svgs:
        assert svg.size["width"] > 100 and svg.size["height"] > 50
    assert [svg.accessible_name for svg in svgs[:4]] == [
        "Documents and chunks per second", "Wall time of each pipeline stage",
        "Memory in MB", "CPU use in percent",
    ]  # fmt: skip
    bars = browser.find_elements(*_by('figure.chart svg g[id^="stages-bar-"] path'))
    assert bars and all(bar.size["width"] > 0 for bar in bars)
    assert browser.find_elements(*_by('figure.chart svg g[id*="-series-"] path'))
    browser.set_window_size(390, 900)  # a phone: the charts shrink to the column, their text stays inside
    try:
        scroll, inner, smallest, outside = browser.execute_script(CHART_TEXT)
        assert scroll <= inner and smallest >= 9 and outside == []
    finally:
        browser.set_window_size(1280, 1000)
    failures = browser.find_elements(*_by("#failures tr.failure"))
    assert len(failures) == 2 and all(XSS in row.text and "duplicate doc_id" in row.text for row in failures)
    assert not browser.find_elements(*_by("#failures img"))
    assert browser.find_element(*_by("body")).get_attribute("data-pwned") is None
    assert _script_errors(browser) == []


def test_run_ids_are_checked(site):
    url = site["url"]
    for bad in (".hidden", "..%2F..%2Fetc%2Fpasswd", "%2E%2E"):
        response = requests.get(f"{url}/api/runs/{bad}", timeout=30)
        assert response.status_code == 404, (bad, response.text)
    assert "Invalid run id" in requests.get(f"{url}/api/runs/.hidden", timeout=30).json()["detail"]
    assert "No run" in requests.get(f"{url}/api/runs/20990101T000000Z-000000", timeout=30).json()["detail"]
    page = requests.get(f"{url}/runs/.hidden", timeout=30)
    assert page.status_code == 404 and "Invalid run id" in page.text
    listed = requests.get(f"{url}/api/runs", timeout=30).json()["runs"]
    assert [r["run_id"] for r in listed] == [site["run"]["run_id"]]


def test_with_an_api_key_the_page_asks_for_it(browser, keyed):
    from selenium.webdriver.common.keys import Keys

    url, run_id = keyed["url"], keyed["run"]["run_id"]
    # The HTML shells are open; the data is not.
    for path in ("/", "/runs", f"/runs/{run_id}"):
        page = requests.get(f"{url}{path}", timeout=30)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
        assert "Content-Security-Policy" in page.headers
    for path in ("/api/runs", f"/api/runs/{run_id}"):
        assert requests.get(f"{url}{path}", timeout=30).status_code == 401, path
    data = requests.get(f"{url}/api/runs/{run_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert data.json()["run"]["run_id"] == run_id

    browser.get(f"{url}/")
    browser.execute_script("sessionStorage.clear()")
    doc = keyed["docs"][7]
    _search(browser, url, doc["title"])
    assert browser.find_element(*_by("#key-form")).is_displayed(), "the page asks for the key"
    _wait(browser, lambda d: _visible_text(d, "#error"))
    assert _visible_text(browser, "#error").startswith("Error 401: missing or wrong API key")
    assert not browser.find_elements(*_by("li.hit"))
    browser.find_element(*_by("#api-key")).send_keys(KEY + Keys.ENTER)  # the search runs again
    _wait(browser, lambda d: d.find_elements(*_by("li.hit")))
    assert browser.find_element(*_by("li.hit .hit-title")).text == doc["title"]
    assert not browser.find_element(*_by("#error")).is_displayed()

    browser.get(f"{url}/runs/{run_id}")  # the key stays in this tab's sessionStorage
    _wait(browser, lambda d: d.find_elements(*_by("figure.chart svg")))
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{url}/runs")
    _wait(browser, lambda d: _visible_text(d, "#error"))
    assert "401" in _visible_text(browser, "#error") and not browser.find_elements(*_by("#runs"))


def test_the_search_page_can_search_another_generation(browser, site):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from pipelines import rebuild, store

    db, url = site["db"], site["url"]
    if (
        len(store.read_catalog(db).generations) == 1
    ):  # a generation that is not live: the others see no change
        rebuild.reshard(db=str(db), shards=3, cfg=load_config(None, **{"ray.progress_bars": False}))
    doc = site["docs"][5]
    body = {"query": doc["title"], "k": 10, "generation": 2}
    expected = requests.post(f"{url}/search", json=body, timeout=60).json()
    assert expected["generation"] == 2 and expected["results"][0]["doc_id"] == doc["_id"]
    browser.get(f"{url}/")
    _wait(browser, lambda d: len(d.find_elements(*_by("#generation option"))) == 3)  # live, 1 and 2
    assert browser.find_elements(*_by('label[for="generation"]'))
    Select(browser.find_element(*_by("#generation"))).select_by_value("2")
    browser.find_element(*_by("#q")).send_keys(doc["title"] + Keys.ENTER)
    _wait(browser, lambda d: "from generation 2" in d.find_element(*_by("#status")).text)
    titles = [e.text for e in browser.find_elements(*_by("li.hit .hit-title"))]
    assert titles == [h["title"] for h in expected["results"]]
    assert "generation=2" in browser.current_url
    assert _script_errors(browser) == []
