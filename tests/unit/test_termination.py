"""Termination states: the two letters an operator reads in every log line."""

import pytest

from proxy.io.relay import Ending
from proxy.frontends.session import _ENDINGS
from proxy.runtime import KillReason


@pytest.mark.parametrize(
    ("ending", "code"),
    [
        (Ending.NORMAL, "--"),
        (Ending.CLIENT_ABORT, "CD"),
        (Ending.SERVER_ABORT, "SD"),
        (Ending.CLIENT_TIMEOUT, "cD"),
        (Ending.SERVER_TIMEOUT, "sD"),
    ],
)
def test_relay_endings_map_to_haproxy_codes(ending, code):
    assert _ENDINGS[ending] == code


def test_every_relay_ending_has_a_code():
    assert set(_ENDINGS) == set(Ending)


def test_kill_reasons_are_haproxy_first_letters():
    assert KillReason.KILLED.value + "D" == "KD"  # operator kill / end of stop grace
    assert KillReason.SERVER_DOWN.value + "D" == "DD"  # shutdown-sessions
