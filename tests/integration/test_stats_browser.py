"""The stats page in a real browser (Debian's chromium driven by Playwright), JavaScript off.

The operator's scenario, over HTTPS (the docs recommend it: basic-auth
credentials never travel in clear): log in, see the brokers UP, lose one and see it DOWN
after the page refreshes itself, drain another with its form and see DRAIN,
put the unchecked backup in MAINT. The brokers are fake (tests/proxyutil.py)
and checked by Warren's TCP health check; the final page is saved as
tests/artifacts/stats_page.png.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import replace

import pytest
import trio

from proxy.app import App
from proxy.config.model import BindAddress, BindTls, CheckKind, Health, InitState, Stats
from proxy.runtime import AdminState
from proxy.stats_ui.service import StatsService
from tests.proxyutil import use_service, make_config, serve_named, server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = pathlib.Path(__file__).resolve().parent.parent / "artifacts"
BROKERS = ("rmq-a", "rmq-b", "rmq-c")

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")
HealthService = pytest.importorskip("proxy.health.checker").HealthService


async def run_broker(name: str, scopes: dict, *, task_status=trio.TASK_STATUS_IGNORED):
    """A fake broker that can be stopped alone (its listener closes: checks get refused)."""
    with trio.CancelScope() as scope:
        scopes[name] = scope
        async with trio.open_nursery() as nursery:
            task_status.started(await nursery.start(serve_named, name))


async def start_warren(nursery, scopes, pki) -> tuple[App, str]:
    ports = {name: await nursery.start(run_broker, name, scopes) for name in BROKERS}
    servers = [server(n, p) for n, p in ports.items()] + [server("rmq-spare", ports["rmq-a"], backup=True, check=False)]
    health = Health(kinds=(CheckKind.TCP,), inter=0.2, rise=1, fall=1, timeout=0.5, init_state=InitState.UP)
    config = make_config(servers, health=health)
    stats = Stats(binds=(BindAddress("127.0.0.1", 0),), users=(("admin", "s3cret"),), admin=True, refresh=1.0,
                  tls=BindTls(crt=(pki.server.pem,)))
    config = replace(config, stats=stats)
    app = App(config, handle_signals=False)
    use_service(app, HealthService(config))
    service = StatsService(config, sample_interval=0.5)
    use_service(app, service)
    await nursery.start(app.serve)
    host, port = service.addresses[0]
    return app, f"https://localhost:{port}/"


def goto_still(page, url: str, attempts: int = 3) -> None:
    """Navigates to `url`; the page's own meta refresh, firing at the same
    moment, aborts one of the two navigations (net::ERR_ABORTED): try again."""
    for attempt in range(attempts):
        try:
            page.goto(url)
            return
        except sync_api.Error as error:
            if "ERR_ABORTED" not in str(error) or attempt == attempts - 1:
                raise


def operator_scenario(url: str, stop_broker) -> list[str]:
    """Runs in a worker thread (Playwright's sync API owns its own loop); returns what it saw."""
    expect = sync_api.expect
    seen = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                http_credentials={"username": "admin", "password": "s3cret"},
                ignore_https_errors=True,  # the test CA is not in chromium's trust store
                java_script_enabled=False,  # the page must work without it
                viewport={"width": 1280, "height": 800},
            )
            context.set_default_timeout(15_000)
            page = context.new_page()
            response = page.goto(url)
            assert response.url.startswith("https://") and response.status == 200
            assert response.security_details()["protocol"] in ("TLS 1.3", "TLS 1.2")

            for name in BROKERS:
                expect(page.locator(f"#server-be-{name} .pill")).to_contain_text(" UP")
            expect(page.locator("#server-be-rmq-spare .pill")).to_contain_text("no check")
            seen.append("all up")

            stop_broker("rmq-b")
            # No reload from us: the meta refresh brings the news.
            expect(page.locator("#server-be-rmq-b .pill")).to_contain_text("DOWN")
            expect(page.locator("#server-be-rmq-b")).to_have_class("down")
            seen.append("rmq-b down")

            page.locator("#server-be-rmq-c button[value=drain]").click()
            expect(page.locator(".notice")).to_have_text("be/rmq-c: DRAIN")
            expect(page.locator("#server-be-rmq-c .pill")).to_contain_text("DRAIN")
            seen.append("rmq-c drained")

            page.locator("#server-be-rmq-spare button[value=maint]").click()
            expect(page.locator("#server-be-rmq-spare .pill")).to_contain_text("MAINT")
            seen.append("spare in maint")

            ARTIFACTS.mkdir(exist_ok=True)
            goto_still(page, url + "?norefresh")  # a still page for the picture
            page.screenshot(path=str(ARTIFACTS / "stats_page.png"), full_page=True)
        finally:
            browser.close()
    return seen


async def test_operator_sees_states_change_and_acts_from_the_page(pki):
    scopes: dict[str, trio.CancelScope] = {}
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app, url = await start_warren(nursery, scopes, pki)

            def stop_broker(name: str) -> None:
                trio.from_thread.run_sync(scopes[name].cancel)

            seen = await trio.to_thread.run_sync(operator_scenario, url, stop_broker)
            assert seen == ["all up", "rmq-b down", "rmq-c drained", "spare in maint"]
            runtime = app.runtime
            assert not runtime.server("be", "rmq-b").up
            assert runtime.server("be", "rmq-c").admin is AdminState.DRAIN
            assert runtime.server("be", "rmq-spare").admin is AdminState.MAINT
            assert (ARTIFACTS / "stats_page.png").stat().st_size > 10_000
            nursery.cancel_scope.cancel()
