"""The operators' dashboard (GET /) in a real browser: Debian's Chromium, headless, driven by
Playwright, over a running daemon with operator keys and a simulated fleet (a quarter of its
chargers faulty) whose readings came in over MQTT. The numbers on the page are checked
against plain SQL over the raw readings; every request the page makes must go to the daemon;
text from devices must stay text. Screenshots are kept under var/test-artifacts/dashboard/
(or $TEST_ARTIFACTS/dashboard/)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    async_playwright,
    expect,
)

from daemon.services import EmbeddedMosquitto, EmbeddedPostgres
from simulator.fleet import Fleet, as_arrays
from tests.conftest import fresh_database
from tests.figures import independent
from tests.helpers import eventually, meter_json
from tests.services import REPO, DaemonProcess, Publisher

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "var" / "test-artifacts")) / "dashboard"
HOURS = 6
NOW = datetime.now(UTC).replace(second=0, microsecond=0)
FIRST = NOW - timedelta(hours=HOURS)
OPERATOR_KEY = f"operator-{uuid.uuid4().hex}"
XSS_PAYLOAD = '<img src=x onerror="document.body.dataset.pwned=1">'
XSS_TOPIC = "meters/<svg onload=alert(1)>/telemetry"


@dataclass
class Scene:
    daemon: DaemonProcess
    db: asyncpg.Connection
    fleet: Fleet
    mqtt_port: int
    rejected: int
    faulty_vehicles: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
async def scene(postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto) -> AsyncIterator[Scene]:
    url = await fresh_database(postgres)
    daemon = DaemonProcess(
        database_url=url,
        mqtt_url=mosquitto.url,
        operator_api_keys=OPERATOR_KEY,
        ingest_api_keys=f"ingest-{uuid.uuid4().hex}",
    ).start()
    db = await asyncpg.connect(url)
    try:
        fleet = Fleet(meters=24, vehicles=24, faulty_share=0.25, seed=11, prefix="DB-")
        # Linked since before the first reading (sessions written straight into their table,
        # to place them in the past; the link route links from now).
        await db.executemany(
            "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at) VALUES ($1, $2, $3)",
            [(v.vehicle_id, v.meter_id, FIRST - timedelta(minutes=1)) for v in fleet.vehicles],
        )
        heartbeats = [
            m for t in range(HOURS * 60) for m in fleet.minute(FIRST + timedelta(minutes=t))
        ]
        spoiled = [
            ("meters/DB-M-00000/telemetry", XSS_PAYLOAD.encode()),
            (XSS_TOPIC, meter_json("DB-M-00000", NOW)),
            ("vehicles/DB-V-00000/telemetry", b'{"vehicleId": "DB-V-00000", "soc": 140}'),
        ]
        publisher = Publisher(mosquitto.port)
        await asyncio.to_thread(publisher.publish_all, [*as_arrays(heartbeats, 60), *spoiled])
        publisher.close()

        async def all_in() -> bool:
            n = await db.fetchval(
                "SELECT (SELECT count(*) FROM meter_readings) + (SELECT count(*) "
                "FROM vehicle_readings) + (SELECT count(*) FROM rejections)"
            )
            return bool(n == len(heartbeats) + len(spoiled))

        await eventually(all_in, timeout_s=60)
        await _silent_devices(db)
        faulty = sorted(v.vehicle_id for v in fleet.vehicles if v.meter_id in fleet.faulty)
        yield Scene(daemon, db, fleet, mosquitto.port, len(spoiled), faulty)
    finally:
        await db.close()
        assert daemon.stop() == 0, daemon.log()


SILENT_METER, SILENT_CAR, QUIET_CAR = "DB-M-SILENT", "DB-V-SILENT", "DB-V-QUIET"


async def _silent_devices(db: asyncpg.Connection) -> None:
    """A meter silent for 2 h with a vehicle charging on it (linked an hour ago, after its
    meter's last reading), and a vehicle silent for 45 min. Written straight into the tables
    to place their arrival in the past too (the devices seen lately stay the fleet's 24)."""
    meter_at, car_at = NOW - timedelta(hours=2), NOW - timedelta(minutes=45)
    for table in ("meter_readings", "meter_latest"):
        await db.execute(
            f"INSERT INTO {table} (meter_id, ts, kwh_consumed_ac, voltage, received_at) "
            "VALUES ($1, $2, 0.2, 230, $2)",
            SILENT_METER,
            meter_at,
        )
    for table in ("vehicle_readings", "vehicle_latest"):
        await db.execute(
            f"INSERT INTO {table} (vehicle_id, ts, soc, kwh_delivered_dc, battery_temp, "
            "received_at) VALUES ($1, $2, 40, 0.1, 25, $2)",
            QUIET_CAR,
            car_at,
        )
    await db.execute(
        "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at) VALUES ($1, $2, $3)",
        SILENT_CAR,
        SILENT_METER,
        NOW - timedelta(hours=1),
    )


@dataclass
class Watched:
    """What a page asked for and complained about."""

    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> Page:
        page.on("request", lambda r: self.requests.append(_url(r)))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", self._console)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        # A 401 for a wrong key is logged by Chromium as a failed resource: expected here.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.problems.append(message.text)

    def foreign(self, base_url: str) -> list[str]:
        own = urlsplit(base_url).netloc
        return [u for u in self.requests if not u.startswith("data:") and urlsplit(u).netloc != own]


def _url(request: Request) -> str:
    return request.url


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.fail("no chromium here: `make test` installs it (scripts/system-deps.sh)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield chromium
        await chromium.close()


def number(text: str) -> float:
    found = re.search(r"-?\d+(\.\d+)?", text.replace(",", ""))
    assert found, text
    return float(found.group())


async def sign_in(page: Page, key: str) -> None:
    await page.wait_for_selector("#key-form:not([hidden])")
    await page.fill("#key-input", key)
    await page.click("#key-form button[type=submit]")


async def cells(page: Page, row: str) -> dict[str, str]:
    tds = page.locator(f'#alerts tr[data-vehicle="{row}"] td')
    return {
        "ratio": await tds.nth(1).inner_text(),
        "ratio_exact": await tds.nth(1).get_attribute("title") or "",
        "ac": await tds.nth(2).inner_text(),
        "dc": await tds.nth(3).inner_text(),
    }


async def test_the_dashboard_shows_the_faulty_chargers_their_charts_and_the_rejections(
    scene: Scene, browser: Browser
) -> None:
    watched = Watched()
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = watched.watch(await context.new_page())
    base = scene.daemon.base_url

    # Keys are configured: the page asks for one before it reads any data.
    await page.goto(base + "/")
    await page.wait_for_selector("#key-form:not([hidden])")
    assert not [u for u in watched.requests if "/v1/" in u]
    await sign_in(page, "not-a-key")
    await expect(page.locator("#key-error")).to_contain_text("unknown API key")
    await page.screenshot(path=ARTIFACTS / "key.png")
    await sign_in(page, OPERATOR_KEY)

    # The fleet: the alert list holds exactly the vehicles on faulty chargers, worst first,
    # each with the figures plain SQL gives over the raw readings.
    await page.wait_for_selector("#alerts tr[data-vehicle]")
    await page.wait_for_selector("#summary .card")
    listed = await page.locator("#alerts tr[data-vehicle]").evaluate_all(
        "rows => rows.map(r => r.dataset.vehicle)"
    )
    assert sorted(listed) == scene.faulty_vehicles
    ratios = []
    for vehicle in listed:
        expected = await independent(
            scene.db, vehicle, NOW - timedelta(hours=23), NOW + timedelta(hours=1)
        )
        shown = await cells(page, vehicle)
        assert float(shown["ratio_exact"]) == expected["efficiencyRatio"]
        assert abs(number(shown["ratio"]) - expected["efficiencyRatio"] * 100) <= 0.05 + 1e-9
        assert abs(number(shown["ac"]) - expected["totalAcConsumedKwh"]) <= 0.0005 + 1e-9
        assert abs(number(shown["dc"]) - expected["totalDcDeliveredKwh"]) <= 0.0005 + 1e-9
        assert expected["efficiencyRatio"] < 0.85
        ratios.append(expected["efficiencyRatio"])
    assert ratios == sorted(ratios)
    heading = await page.inner_text("#alerts h2")
    assert f"{len(scene.faulty_vehicles)} vehicles under 85.0 %" in heading

    summary = await page.inner_text("#summary")
    assert "24 · 24" in summary  # meters · vehicles seen in the last 5 minutes
    assert re.search(rf"Rejections \(last 1 h\)\s+{scene.rejected}\b", summary), summary
    await page.screenshot(path=ARTIFACTS / "fleet.png", full_page=True)

    # It refreshes itself: a new meter shows up in the summary without a reload.
    publisher = Publisher(scene.mqtt_port)
    publisher.publish_all([("meters/DB-M-new/telemetry", meter_json("DB-M-new", NOW))])
    publisher.close()
    await expect(page.locator("#summary")).to_contain_text("25 · 24", timeout=20_000)

    # A vehicle's page: charts drawn with one point per bucket that has readings.
    worst = listed[0]
    await page.click(f'#alerts tr[data-vehicle="{worst}"] a')
    await page.wait_for_selector("#efficiency-chart canvas")
    await page.wait_for_selector("#soc-chart canvas")
    meter = next(v.meter_id for v in scene.fleet.vehicles if v.vehicle_id == worst)
    buckets = await scene.db.fetchval(
        "SELECT count(DISTINCT date_bin('15 minutes', ts, timestamptz '2000-01-01Z')) "
        "FROM meter_readings WHERE meter_id = $1",
        meter,
    )
    assert buckets >= HOURS * 4
    assert await page.get_attribute("#efficiency-chart", "data-points") == str(buckets)
    vehicle_buckets = await scene.db.fetchval(
        "SELECT count(DISTINCT date_bin('15 minutes', ts, timestamptz '2000-01-01Z')) "
        "FROM vehicle_readings WHERE vehicle_id = $1",
        worst,
    )
    assert await page.get_attribute("#soc-chart", "data-points") == str(vehicle_buckets)
    for chart in ("#efficiency-chart", "#soc-chart"):
        painted = await page.eval_on_selector(
            chart + " canvas",
            """canvas => {
                const context = canvas.getContext('2d');
                const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
                let n = 0;
                for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
                return n;
            }""",
        )
        assert painted > 1000, (chart, painted)
    figures = await page.inner_text("#figures")
    expected = await independent(
        scene.db, worst, NOW - timedelta(hours=23), NOW + timedelta(hours=1)
    )
    assert f"{expected['totalAcConsumedKwh']:.3f} kWh" in figures
    assert await page.get_attribute("#figures", "data-ratio") == str(expected["efficiencyRatio"])
    assert meter in await page.inner_text("#meters")
    sessions = await page.inner_text("#sessions")
    assert meter in sessions and "open" in sessions
    await page.screenshot(path=ARTIFACTS / "vehicle.png", full_page=True)

    # Rejections, newest first; what devices sent is shown as text, never run.
    await page.click("nav a[data-view=rejections]")
    await page.wait_for_selector("#rejections tr[data-id]")
    rows = page.locator("#rejections tr[data-id]")
    assert await rows.count() == scene.rejected
    ids = await rows.evaluate_all("rows => rows.map(r => Number(r.dataset.id))")
    assert ids == sorted(ids, reverse=True)
    text = await page.inner_text("#rejections")
    assert XSS_PAYLOAD in text and XSS_TOPIC in text
    assert "soc" in text
    assert await page.locator("#rejections img, #rejections svg").count() == 0
    assert await page.evaluate("document.body.dataset.pwned") is None
    await page.screenshot(path=ARTIFACTS / "rejections.png", full_page=True)

    # A vehicle nobody knows, by a hand-typed address (with a stray %).
    await page.goto(base + "/#/vehicle/NO-SUCH-%E0%A4")
    await expect(page.locator("#figures")).to_contain_text("Unknown vehicle")

    # On a phone.
    phone = watched.watch(await context.new_page())
    await phone.set_viewport_size({"width": 390, "height": 844})
    await phone.goto(base + "/")
    await phone.wait_for_selector("#alerts tr[data-vehicle]")
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    await phone.screenshot(path=ARTIFACTS / "phone.png", full_page=True)

    assert watched.foreign(base) == []
    assert watched.problems == []
    data = [u for u in watched.requests if "/v1/" in u]
    assert data, "the page read no data"
    await context.close()


async def test_the_dashboard_names_the_silent_devices(scene: Scene, browser: Browser) -> None:
    watched = Watched()
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = watched.watch(await context.new_page())
    base = scene.daemon.base_url
    await page.goto(base + "/")
    await sign_in(page, OPERATOR_KEY)

    # Longest silent first, each with its newest reading; the meter with the vehicle on it.
    await page.wait_for_selector("#silent tr[data-device]")
    rows = page.locator("#silent tr[data-device]")
    listed = await rows.evaluate_all("rows => rows.map(r => [r.dataset.stream, r.dataset.device])")
    assert listed == [["meter", SILENT_METER], ["vehicle", QUIET_CAR]]
    meter_row = await page.inner_text(f'#silent tr[data-device="{SILENT_METER}"]')
    assert SILENT_CAR in meter_row and "2 h ago" in meter_row
    quiet_row = await page.inner_text(f'#silent tr[data-device="{QUIET_CAR}"]')
    assert re.search(r"\b4[5-9] min ago", quiet_row), quiet_row
    assert "Silent devices: 2 with no reading for over 15 min" in await page.inner_text(
        "#silent h2"
    )
    await expect(page.locator("#summary")).to_contain_text("Silent (over 15 min)")
    await page.locator("#silent").screenshot(path=ARTIFACTS / "silent.png")
    await page.screenshot(path=ARTIFACTS / "fleet-silent.png", full_page=True)

    # The vehicle on the silent meter: its page says its efficiency lacks that meter's AC.
    await page.click(f'#silent tr[data-device="{SILENT_METER}"] a')
    await expect(page.locator("#figures")).to_contain_text("Meter silent")
    await expect(page.locator("#figures")).to_contain_text(SILENT_METER)

    # It reports again (through the daemon): it leaves the listing at the next refresh.
    publisher = Publisher(scene.mqtt_port)
    publisher.publish_all([(f"meters/{SILENT_METER}/telemetry", meter_json(SILENT_METER, NOW))])
    publisher.close()
    await page.goto(base + "/")
    await expect(page.locator(f'#silent tr[data-device="{SILENT_METER}"]')).to_have_count(
        0, timeout=20_000
    )
    assert watched.foreign(base) == [] and watched.problems == []
    await context.close()


async def test_without_keys_the_dashboard_says_the_api_is_open(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto, browser: Browser
) -> None:
    daemon = DaemonProcess(database_url=await fresh_database(postgres), mqtt_url=mosquitto.url)
    daemon.start()
    try:
        watched = Watched()
        page = watched.watch(await browser.new_page())
        await page.goto(daemon.base_url + "/")
        await page.wait_for_selector("#alerts h2")
        assert "API open" in await page.inner_text("#auth")
        assert await page.is_hidden("#key-form")
        assert "No vehicle is under the threshold" in await page.inner_text("#alerts")
        assert watched.foreign(daemon.base_url) == [] and watched.problems == []
        await page.close()
    finally:
        assert daemon.stop() == 0, daemon.log()


async def test_the_page_forbids_what_it_does_not_need(scene: Scene) -> None:
    """The Content-Security-Policy stops a script from anywhere but the daemon, inline or
    injected, and any connection elsewhere; the page cannot be framed."""
    async with asyncio.timeout(10), httpx.AsyncClient() as client:
        page = await client.get(scene.daemon.base_url + "/")
        script = await client.get(scene.daemon.base_url + "/static/dashboard/dashboard.js")
    assert page.status_code == 200 and script.status_code == 200
    policy = {
        part.split()[0]: part.split()[1:]
        for part in page.headers["content-security-policy"].split(";")
    }
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"] and policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text  # no inline script
    assert b"innerHTML" not in script.content and b"insertAdjacentHTML" not in script.content
