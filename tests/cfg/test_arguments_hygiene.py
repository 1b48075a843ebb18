"""Every argument of default.yaml is read by the package and documented with its type and a description."""

import re
from pathlib import Path

import pytest
import yaml

import yolotrain
from yolotrain.cfg import DEFAULT_CFG_PATH

PACKAGE = Path(yolotrain.__file__).parent
TYPE_NAMES = {"int", "float", "bool", "str", "list"}
# `key: value  # (type | type) description`, read here on its own rather than through yolotrain.cfg's parser.
KEY_LINE = re.compile(r"^(?P<key>\w+):[^#]*#\s*\((?P<types>[^)]+)\)\s*(?P<description>.*)$")
KEYS = list(yaml.safe_load(DEFAULT_CFG_PATH.read_text(encoding="utf-8")))


def documented_keys():
    """{key: (type names, description)} of the key lines of default.yaml."""
    documented = {}
    for line in DEFAULT_CFG_PATH.read_text(encoding="utf-8").splitlines():
        match = KEY_LINE.match(line)
        if match:
            types = tuple(name.strip() for name in match["types"].split("|"))
            documented[match["key"]] = (types, match["description"].strip())
    return documented


def package_sources():
    # cfg/ declares and checks the keys (bounds, examples): a mention there is not a use.
    cfg_dir = PACKAGE / "cfg"
    return [p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py")) if cfg_dir not in p.parents]


@pytest.fixture(scope="module")
def sources():
    return package_sources()


@pytest.mark.parametrize("key", KEYS)
def test_every_argument_is_read_outside_the_cfg_package(key, sources):
    reads = re.compile(rf"args\.{key}\b|\"{key}\"|'{key}'")
    assert any(reads.search(text) for text in sources), f"{key} is never read (args.{key} or '{key}')"


@pytest.mark.parametrize("key", KEYS)
def test_every_argument_comment_starts_with_its_types_then_a_description(key):
    documented = documented_keys()
    assert key in documented, f"{key}: its comment does not start with '(type)'"
    types, description = documented[key]
    assert set(types) <= TYPE_NAMES, f"{key}: unknown type in {types}"
    assert len(description.split()) >= 2, f"{key}: the type is not followed by a description"


def test_the_changed_arguments_declare_their_new_types():
    documented = documented_keys()
    assert documented["fraction"][0] == ("float", "int")
    assert documented["multi_scale"][0] == ("bool", "float")
    assert "training" in documented["classes"][1]
