"""The dashboard in a real headless browser (Debian's chromium through chromium-driver,
which `make browser` installs): with the demo mesh of `tether up` running, the graph at
`/ui/` shows the demo's services and edges, and its numbers change. A screenshot is
saved in the test's output directory (docs/dashboard.png is one such)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    MANAGEMENT_TOKEN,
    ControlPlaneProcess,
    RegistryProcess,
    free_port,
    stop_group,
)
from tests.sidecar_harness import ROOT, poll

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]

SERVICES = ("frontend.default", "orders.default", "inventory.default")
EDGES = ("frontend.default->orders.default", "orders.default->inventory.default")


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed (`make browser` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--disable-gpu"):  # fmt: skip
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    """`tether up` (registry, control plane, the demo's six instances); its dashboard URL."""
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether.cli", "up", "--registry-port", str(free_port()),
             "--controlplane-port", str(free_port()), "--no-view", "--drain-seconds", "1",
             "--rate", "10"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        poll(lambda: "tether up: ready" in log.read_text(), 90, "tether up ready", interval=0.2)
        m = re.search(r"dashboard +(http://127\.0\.0\.1:\d+/ui/)", log.read_text())
        assert m is not None, log.read_text()
        yield m.group(1)
    finally:
        stop_group(proc, grace=30)


def test_dashboard_graph_shows_the_demo_live(browser: Any, demo: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(demo)

    def labels() -> dict[str, str] | None:
        nodes = {
            n.get_attribute("data-service")
            for n in browser.find_elements(By.CSS_SELECTOR, "#graph .node")
        }
        edges = {
            e.get_attribute("data-edge"): e.find_element(By.CSS_SELECTOR, "text").text
            for e in browser.find_elements(By.CSS_SELECTOR, "#graph .edge")
        }
        if not set(SERVICES) <= nodes or not set(EDGES) <= set(edges):
            return None
        # Traffic flows: requests/s above zero, every call answered.
        if not all(re.match(r"[1-9]\d*\.\d/s · 100\.0%", edges[e]) for e in EDGES):
            return None
        return edges

    first = poll(labels, 40, "the demo's services and edges with traffic on the graph", 0.5)
    changed = poll(lambda: (now := labels()) and now != first and now, 20, "numbers change", 0.5)
    assert changed != first
    for e in EDGES:
        assert re.search(r"p99 \d+\.\d ms", changed[e]), changed
    # Healthy edges are drawn green.
    healthy = browser.find_elements(By.CSS_SELECTOR, '#graph .edge[data-health="ok"]')
    assert {h.get_attribute("data-edge") for h in healthy} >= set(EDGES)
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    # The canary page: the demo's 90/10 split of orders against what callers sent.
    browser.get(demo + "#/canary")
    poll(
        lambda: (
            "orders.default" in browser.find_element(By.ID, "page").text
            and "90%" in browser.find_element(By.ID, "page").text
        ),
        20,
        "the canary page",
        0.5,
    )
    browser.save_screenshot(str(tmp_path / "canary.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    # The sidecars page: the demo runs mTLS, so each sidecar's certificate expiry (from
    # its stats reports) is shown with the time left.
    browser.get(demo + "#/sidecars")

    def expiries() -> list[str] | None:
        text = browser.find_element(By.ID, "page").text
        found = re.findall(r"\d{4}-\d\d-\d\dT[\d:]+Z \(in [\d.]+[mhd]\)", text)
        return found if len(found) >= len(SERVICES) and "no mTLS" not in text else None

    poll(expiries, 20, "every sidecar's certificate expiry on the sidecars page", 0.5)


def test_with_acls_on_the_page_asks_for_a_token_and_sends_it(
    browser: Any, acl_processes: Callable[..., tuple[RegistryProcess, ControlPlaneProcess]]
) -> None:
    from selenium.webdriver.common.by import By

    _, cp = acl_processes()
    browser.get(f"{cp.url}/ui/")
    notice = browser.find_element(By.ID, "notice")
    poll(lambda: notice.is_displayed() and "token" in notice.text, 20, "the token notice", 0.2)
    assert "X-Tether-Token" in notice.text  # the control plane's 401 says what to send
    field = browser.find_element(By.ID, "token")
    field.send_keys(MANAGEMENT_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    heading = browser.find_element(By.CSS_SELECTOR, "#page h2")
    poll(lambda: not notice.is_displayed() and "replicas" in heading.text, 20, "the graph", 0.2)
    # Kept for this tab only (sessionStorage), and sent with every call since.
    stored = browser.execute_script("return sessionStorage.getItem('tether-token')")
    assert stored == MANAGEMENT_TOKEN
    browser.get(f"{cp.url}/ui/#/sidecars")
    poll(lambda: "config version" in browser.find_element(By.ID, "page").text, 20, "sidecars", 0.2)
    assert not browser.find_element(By.ID, "notice").is_displayed()
