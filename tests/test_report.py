"""The HTML report in a real browser: headless Chromium (Debian's chromium and chromium-driver)
loads it without network and without console errors, shows its pictures, plots and table, sorts
the table and downloads the CSV."""

import csv
import shutil
import time

import numpy as np
import pytest

from curvkern.data import Data
from curvkern.report import TABLE_ROWS, ReportScores, build_report

webdriver = pytest.importorskip("selenium.webdriver")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None, reason="needs chromium and chromedriver (apt-get install chromium-driver)"
)

K = 5


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _scores(n, classes, seed=0):
    rng = np.random.default_rng(seed)
    curvature = rng.lognormal(1.0, 1.0, n)
    curvature[3] = np.nan  # one sample never scored
    baselines = {
        "loss_mean": curvature * rng.lognormal(-2, 0.5, n),
        "grad_norm_mean": rng.lognormal(0, 1, n),
        "forgetting": np.where(rng.random(n) < 0.1, np.inf, rng.integers(0, 4, n)),
    }
    settings = {"method": "fd", "h": 0.001, "n_probes": 10, "seed": 0}
    return ReportScores(
        "run/scores.npz", n, [0, 1, 2, 5], curvature, curvature / 10, baselines, settings
    )


def _digits_like(tmp_path, n=600):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, n)
    images = rng.random((n, 64), dtype=np.float32) * 16
    return Data(None, labels, [str(c) for c in range(10)], "digits.npz", images=images), n


def _folder(tmp_path, n=40):
    from PIL import Image

    rng = np.random.default_rng(2)
    classes = ["cat", "dog", "bird"]
    labels = np.arange(n) % 3
    files = []
    for i in range(n):
        folder = tmp_path / "images" / classes[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(file)
        files.append(str(file))
    return Data(None, labels, classes, str(tmp_path / "images"), files=files), n


@pytest.fixture(params=["digits", "folder"])
def page(request, tmp_path):
    data, n = (_digits_like if request.param == "digits" else _folder)(tmp_path)
    scores = _scores(n, len(data.classes))
    out = tmp_path / "report.html"
    build_report(scores, data, out, top=K)
    return out, scores, data


def _open(browser, path):
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(path.as_uri())
    for _ in range(100):
        if browser.execute_script("return document.readyState") == "complete":
            break
        time.sleep(0.05)


def test_page_loads_without_errors_or_network(browser, page):
    path, scores, data = page
    _open(browser, path)
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    # Every resource is inline: the browser fetched nothing but the page itself.
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(n => !n.startsWith('data:'))"
    )
    assert fetched == []
    # K pictures per class, all decoded.
    classes = len(data.classes)
    per_class = [
        min(K, int(((data.labels == c) & np.isfinite(scores.curvature)).sum()))
        for c in range(classes)
    ]
    figures = browser.find_elements("css selector", ".grid figure")
    assert len(figures) == sum(per_class)
    broken = browser.execute_script(
        "return Array.from(document.querySelectorAll('.grid img'))"
        ".filter(i => !(i.complete && i.naturalWidth > 0)).length"
    )
    assert broken == 0
    # Two histograms, one scatter plot per baseline, each an SVG with content.
    assert len(browser.find_elements("css selector", "#distribution svg path.bar")) == 2
    assert len(browser.find_elements("css selector", "#baselines svg")) == len(scores.baselines)
    # The table shows the first TABLE_ROWS rows, the rest behind a button.
    rows = browser.find_elements("css selector", "#scores tbody tr")
    assert len(rows) == min(TABLE_ROWS, scores.num_samples)
    more = browser.find_element("id", "more")
    assert more.is_displayed() == (scores.num_samples > TABLE_ROWS)
    # Nothing wider than a laptop screen.
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth"
    )
    size = browser.find_element("css selector", "nav .size").text
    assert size.startswith("this page: ") and ("kB" in size or "MB" in size)


def _column(browser, name):
    heads = [h.text for h in browser.find_elements("css selector", "#scores th")]
    j = heads.index(name)
    cells = browser.find_elements("css selector", f"#scores tbody tr td:nth-child({j + 1})")
    return [c.text for c in cells], browser.find_elements("css selector", "#scores th")[j]


def test_table_sorts_and_csv_downloads(browser, page, tmp_path):
    path, scores, data = page
    _open(browser, path)
    finite = np.sort(scores.curvature[np.isfinite(scores.curvature)])
    values, head = _column(browser, "curvature")
    assert float(values[0]) == pytest.approx(finite[-1], rel=1e-3)  # rank order at first
    head.click()
    assert head.get_attribute("aria-sort") == "descending"
    head.click()
    assert head.get_attribute("aria-sort") == "ascending"
    values, _ = _column(browser, "curvature")
    assert float(values[0]) == pytest.approx(finite[0], rel=1e-3)
    assert values[-1] != "" or len(values) == scores.num_samples  # the NaN row sorts last

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    browser.find_element("id", "csv").click()
    target = downloads / "scores.csv"
    for _ in range(200):
        if target.exists() and target.stat().st_size > 0:
            break
        time.sleep(0.05)
    with open(target, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == scores.num_samples
    assert table[0]["rank"] == "1"
    best = int(np.nanargmax(scores.curvature))
    assert int(table[0]["id"]) == best
    assert float(table[0]["curvature"]) == pytest.approx(scores.curvature[best], rel=1e-4)
    assert int(table[0]["label"]) == data.labels[best]
    unscored = [r for r in table if r["rank"] == ""]
    assert [int(r["id"]) for r in unscored] == [3] and unscored[0]["curvature"] == ""
    assert {r["forgetting"] for r in table} >= {"inf"}
