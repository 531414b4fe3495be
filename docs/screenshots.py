"""Screenshots of the search page (with results) and of a run's dashboard, for the README.

Serves an ingested db on 127.0.0.1 with Ray Serve, opens the pages in the system's headless Chromium
(apt-get install chromium chromium-driver) and saves docs/search-page.png and docs/run-page.png:

    HF_HUB_OFFLINE=1 .venv/bin/python docs/screenshots.py --db data/pydoc-db --query "re-raise an exception"
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        raise SystemExit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def _shoot(driver, path: Path, width: int) -> None:
    # The whole page: a window cannot grow past the (virtual) screen, an emulated viewport can.
    metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": min(height, 4000)})
    time.sleep(0.3)  # let the page lay out at the new size
    driver.save_screenshot(str(path))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", required=True, help="An ingested db (with at least one run report).")
    parser.add_argument("--query", default="statins and cardiovascular disease", help="What to search for.")
    parser.add_argument("-k", type=int, default=5, help="Results on the search page.")
    parser.add_argument("--out", type=Path, default=DOCS, help="Folder for the two images.")
    args = parser.parse_args()

    import ray
    from ray import serve
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from pipelines.config import ServeSettings
    from pipelines.reporting import pages
    from serve.app import ServeConfig, build_app

    runs = pages.list_runs(db=args.db)
    if not runs:
        raise SystemExit(f"no run reports under {args.db}/_runs: ingest something first")
    os.environ.pop("EMBEDPIPE_API_KEY", None)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(shard_cpus=0, router_cpus=0)
    serve.run(build_app(ServeConfig(db=args.db, settings=settings)), name="embedpipe", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    driver = _browser()
    try:
        driver.get(f"{url}/")
        k = driver.find_element(By.ID, "k")
        k.clear()
        k.send_keys(str(args.k))
        driver.find_element(By.ID, "q").send_keys(args.query + Keys.ENTER)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "li.hit"))
        args.out.mkdir(parents=True, exist_ok=True)
        _shoot(driver, args.out / "search-page.png", 1100)
        driver.get(f"{url}/runs/{runs[0]['run_id']}")
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "figure.chart svg"))
        _shoot(driver, args.out / "run-page.png", 1280)
    finally:
        driver.quit()
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
