"""A console that crashes prints no local variables: Textual's default crash report
shows them, and a console's locals may hold revealed patient fields."""

from __future__ import annotations

import asyncio

import pytest

from fake import FakeClient
from harness import CANARY_NAME

from mfconsole.console.app import ConsoleApp


def test_a_crash_reports_the_class_and_site_only(capfd, caplog):
    asyncio.run(_crash())
    printed = " ".join(capfd.readouterr())
    assert "stopped on an internal error: ValueError at" in printed
    assert "ValueError at test_crash_report.explode line" in caplog.text
    assert CANARY_NAME not in printed + caplog.text and "patient_name" not in printed


async def _crash() -> None:
    app = ConsoleApp(FakeClient())

    def explode() -> None:
        patient_name = CANARY_NAME   # a local the default report would print
        raise ValueError(f"bad value {patient_name}")

    with pytest.raises(ValueError):
        async with app.run_test() as pilot:
            await pilot.pause()
            app.call_later(explode)
            await pilot.pause(0.2)
