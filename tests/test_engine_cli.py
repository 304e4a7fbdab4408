"""``tipstorch curate`` / ``tipstorch caption``: argument errors name the flag before any model loads."""

from __future__ import annotations

import pytest

from tipstorch.cli import main
from tipstorch.cli.engine import parse_field


def test_field_with_a_prompt_and_without():
    assert (parse_field("detailed=describe en").field, parse_field("detailed=describe en").prompt) == (
        "detailed",
        "describe en",
    )
    assert parse_field("spatial").prompt == "caption en"


def test_a_field_the_trainer_cannot_read_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(SystemExit, match="--field 'synthetic': caption field must be one .*'spatial'"):
        main(["caption", "--shards", str(tmp_path), "--field", "synthetic"])


def test_per_target_values_must_match_the_targets(tmp_path):
    with pytest.raises(SystemExit, match=r"--clusters takes one value or one per --target \(1\), got 2"):
        main(
            [
                "curate",
                "--pool",
                str(tmp_path),
                "--target",
                str(tmp_path),
                "--clusters",
                "2",
                "3",
                "--out",
                str(tmp_path),
            ]
        )


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--shards .*nothing"):
        main(["caption", "--shards", str(tmp_path / "nothing")])
