"""--max-memory strings: the forms people write are read as the bytes they mean; anything else is refused."""

import pytest

from slimtune.errors import ConfigError
from slimtune.memory.sizes import parse_memory_size


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * 2**30), ("8GB", 8 * 10**9), ("7.5GiB", int(7.5 * 2**30)), ("8000MiB", 8000 * 2**20),
    ("8 gib", 8 * 2**30), ("512M", 512 * 2**20), ("0.5TB", 5 * 10**11), (".5GiB", 2**29),
])
def test_sizes_people_write(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["8", "8 G B", "eight GiB", "8XB", "-1GiB", "0GiB", "", "GiB", None, 8, True])
def test_bad_sizes_are_refused_with_the_accepted_forms(text):
    with pytest.raises(ConfigError) as info:
        parse_memory_size(text)
    assert "GiB" in str(info.value)


def test_a_bare_number_asks_for_a_unit():
    with pytest.raises(ConfigError, match="add a unit"):
        parse_memory_size("8")
