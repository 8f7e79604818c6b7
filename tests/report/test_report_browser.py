"""report.html in a real browser: Debian's headless Chromium driven by selenium through chromedriver.

The page must render the verdict and the tensor table, load every image, filter and sort the table, reveal a row
from the coverage grid, stay complete without JavaScript, and make no network request at all (Chrome's
performance log records every request the page makes; a control page proves the log would see one). Screenshots
go to $LORATV_TEST_ARTIFACTS (default: test-artifacts/). Without chromium the tests skip, unless $CI is set.
"""

import json
import time

import pytest
from helpers_report import (artifacts_dir, example_validation, full_page_screenshot, layered_validation,
                            require_chromium, requested_urls, start_chromium)


@pytest.fixture(scope="module")
def chromium_paths():
    return require_chromium()


@pytest.fixture(scope="module")
def browser(chromium_paths):
    driver = start_chromium(chromium_paths)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    return example_validation(tmp_path_factory)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return layered_validation(tmp_path_factory)


def load(driver, path):
    """Open the page and return (seconds to load, the URLs it requested)."""
    requested_urls(driver)  # drop what came before
    start = time.perf_counter()
    driver.get(path.resolve().as_uri())
    driver.execute_script("return document.readyState")
    return time.perf_counter() - start, requested_urls(driver)


def fresh_load(driver, url):
    """Leave the page, load it again and wait until it has finished loading."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")


def foreign(urls, page_url):
    """Requests other than the page itself and its inline data: images."""
    return [u for u in urls if u != page_url and not u.startswith("data:")]


def visible_names(driver, table_id):
    return driver.execute_script(
        "return Array.from(document.getElementById(arguments[0]).tBodies[0].rows)"
        ".filter(r => !r.hidden).map(r => r.cells[1].textContent)", table_id)


def type_filter(driver, table_id, text):
    box = driver.find_element("css selector", f'[data-tools-for="{table_id}"] input[type=search]')
    box.clear()
    box.send_keys(text)


def choose_category(driver, table_id, category):
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("css selector", f'[data-tools-for="{table_id}"] select')).select_by_value(category)


def test_validate_report_in_chromium(browser, validated):
    record = json.loads((validated / "comparison_results.json").read_text())
    page_url = (validated / "report.html").resolve().as_uri()
    seconds, urls = load(browser, validated / "report.html")
    assert urls and urls[0] == page_url  # the log works: it saw the page itself
    assert foreign(urls, page_url) == []
    assert seconds < 10

    # the verdict and the headline, as rendered
    verdict = browser.find_element("id", "verdict-text")
    assert verdict.is_displayed() and verdict.text.endswith(record["summary"]["verdict"])
    assert browser.title == f"loratv report: {record['summary']['verdict']}"

    # every image decoded, one per PNG the command wrote
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
    assert len(images) == len(list(validated.glob("*.png"))) == 4
    assert all(complete and width > 0 and height > 0 and alt for complete, width, height, alt in images)

    # the table: all rows, in base order, then filtered by name and by category
    names = [t["name"] for t in record["tensors"]]
    assert visible_names(browser, "tensor-table") == names
    type_filter(browser, "tensor-table", "layers.7.self_attn.q_proj")
    expected = [n for n in names if "layers.7.self_attn.q_proj" in n]
    assert visible_names(browser, "tensor-table") == expected and len(expected) == 2
    status = browser.find_element("css selector", '[data-tools-for="tensor-table"] output').text
    assert status == f"Showing 2 of {len(names)} tensors"
    type_filter(browser, "tensor-table", "layers.7.")
    choose_category(browser, "tensor-table", "shared")
    assert visible_names(browser, "tensor-table") == [
        t["name"] for t in record["tensors"] if "layers.7." in t["name"] and t["category"] == "shared"]
    type_filter(browser, "tensor-table", "")
    choose_category(browser, "tensor-table", "")
    assert visible_names(browser, "tensor-table") == names

    # sort: certificate ratio, descending on the second click; tensors without one stay last
    header = browser.find_element("xpath", '//table[@id="tensor-table"]//th[normalize-space()="certificate ratio"]//button')
    header.click()
    header.click()
    ordered = visible_names(browser, "tensor-table")
    ratios = sorted(((t["certificate_ratio"], t["name"]) for t in record["tensors"] if t["certificate_ratio"] is not None),
                    reverse=True)
    assert ordered[:len(ratios)] == [n for _, n in ratios]
    assert browser.find_element("xpath", '//table[@id="tensor-table"]//th[@aria-sort]').get_attribute("aria-sort") == "descending"

    # a coverage cell leads to its row, even when a filter hid it
    type_filter(browser, "tensor-table", "embed_tokens")
    browser.find_element("css selector", '#coverage-grid a[title^="model.layers.29.self_attn.o_proj.weight:"]').click()
    target = browser.execute_script("return location.hash.slice(1)")
    row = browser.find_element("id", target)
    assert row.is_displayed() and row.find_elements("tag name", "td")[1].text == "model.layers.29.self_attn.o_proj.weight"

    assert foreign(requested_urls(browser), page_url) == []  # nothing fetched while using the page either
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []  # no script error, no CSP violation

    # the screenshot a person would see first, and the whole page: a fresh load (not a jump within the page, which
    # chromium can still be navigating when the screenshot is asked for)
    fresh_load(browser, page_url)
    out = artifacts_dir()
    browser.save_screenshot(str(out / "report-validate.png"))
    full_page_screenshot(browser, out / "report-validate-full.png")
    assert (out / "report-validate.png").stat().st_size > 10_000


def test_page_is_complete_without_javascript(chromium_paths, validated):
    record = json.loads((validated / "comparison_results.json").read_text())
    driver = start_chromium(chromium_paths, javascript=False)
    try:
        driver.get((validated / "report.html").resolve().as_uri())
        notice = driver.find_element("xpath", '//p[starts-with(normalize-space(), "Sorting and filtering need")]')
        assert notice.is_displayed()  # <noscript> shows: JavaScript really is off
        rows = driver.find_elements("css selector", "#tensor-table tbody tr")
        assert len(rows) == len(record["tensors"]) and all(r.is_displayed() for r in rows[:: len(rows) // 20])
        assert [r.find_elements("tag name", "td")[1].text for r in rows[:3]] == [t["name"] for t in record["tensors"][:3]]
        assert driver.find_element("id", "verdict-text").text.endswith(record["summary"]["verdict"])
        assert not driver.find_element("css selector", '[data-tools-for="tensor-table"]').is_displayed()
        # sort buttons are the script's: without it the headers are plain text
        assert driver.find_elements("css selector", "#tensor-table th button") == []
        widths = [img.get_property("naturalWidth") for img in driver.find_elements("tag name", "img")]
        assert len(widths) == 4 and min(widths) > 0
    finally:
        driver.quit()


def test_80_layer_report_stays_usable(browser, big):
    out = big
    record = json.loads((out / "comparison_results.json").read_text())
    page_url = (out / "report.html").resolve().as_uri()
    seconds, urls = load(browser, out / "report.html")
    assert foreign(urls, page_url) == [] and seconds < 5
    grid_rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('#coverage-grid tbody tr')).map(r => r.cells[0].textContent)")
    assert grid_rows == [str(i) for i in range(80)]
    assert len(visible_names(browser, "tensor-table")) == len(record["tensors"]) == 1283
    start = time.perf_counter()
    type_filter(browser, "tensor-table", "layers.79.")
    assert len(visible_names(browser, "tensor-table")) == 16
    assert time.perf_counter() - start < 3
    images = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert len(images) == 4 and min(images) > 0
    fresh_load(browser, page_url)
    browser.save_screenshot(str(artifacts_dir() / "report-80-layers.png"))


def test_network_log_sees_a_request_when_there_is_one(browser, tmp_path):
    """Control: a page without the CSP that loads an image over http is caught by the same check."""
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><html lang="en"><title>c</title><img alt="x" src="http://127.0.0.1:9/x.png">')
    _, urls = load(browser, page)
    assert foreign(urls, page.resolve().as_uri()) == ["http://127.0.0.1:9/x.png"]
