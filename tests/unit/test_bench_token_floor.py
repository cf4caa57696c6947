"""bench.token_floor: the flat token path it times does the token path's work."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench import token_floor


def test_a_request_leaves_the_answers_usage_charged_and_shows_what_is_left() -> None:
    buckets: dict[str, list[float]] = {}
    headers = token_floor._one_request(buckets, "k", 80)
    # Reserved 20 + 1024, then reconciled to the 9 + 12 tokens the answer used.
    assert buckets["k"][:2] == [21.0, 21.0]
    assert headers["x-oaimux-ratelimit-remaining-tokens"] == str(10**12 - 1044)


def test_it_prints_the_floor_per_request(capsys: pytest.CaptureFixture[str]) -> None:
    token_floor.main(["--requests", "200", "--repeat", "1", "--json"])
    figure = json.loads(capsys.readouterr().out)["token_floor_us_per_request"]
    assert 0 < figure < 1000


def test_the_inline_floor_patch_still_applies_to_the_tree() -> None:
    # bench/README.md, "Token budget: the floor inside the proxy": the measurement is
    # repeatable only while the patch applies to the request path as it is.
    root = Path(__file__).resolve().parents[2]
    checked = subprocess.run(
        ["git", "apply", "--check", "bench/token_floor_inline.patch"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
