"""containerd filter expressions as the snapshotter's List understands them."""

from __future__ import annotations

import pytest

from apull_node.snapshotter.errors import InvalidArgumentError
from apull_node.snapshotter.filters import parse_filters

OBJECT = {
    ("name",): "default/7/sha256:abc",
    ("parent",): "",
    ("kind",): "committed",
    ("labels", "containerd.io/snapshot.ref"): "sha256:abc",
    ("labels", "plain"): "x y",
}


def adaptor(fieldpath):
    # Labels are looked up by their dotted key, as the snapshot adaptor does.
    if fieldpath and fieldpath[0] == "labels":
        key = ("labels", ".".join(fieldpath[1:]))
    else:
        key = tuple(fieldpath)
    return OBJECT.get(key, ""), key in OBJECT


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], True),
        ([""], True),
        (["kind==committed"], True),
        (["kind==active"], False),
        (["kind!=view"], True),
        (["name==default/7/sha256:abc"], True),
        (['name=="default/7/sha256:abc"'], True),
        # What containerd's metadata layer sends when a target snapshot already exists.
        (['labels."containerd.io/snapshot.ref"==sha256:abc,parent==""'], True),
        (['labels."containerd.io/snapshot.ref"==sha256:abc,parent=="x"'], False),
        (["labels.plain"], True),
        (["labels.missing"], False),
        (["labels.missing!=1"], True),
        (['labels.plain=="x y"'], True),
        (["name~=^default/"], True),
        (["name~=/sha256:[a-f]+$/"], True),
        (["name~=|^nope|"], False),
        (["kind==view", "kind==committed"], True),  # OR between filters
        (["kind==committed,name==other"], False),  # AND within one
        ([' kind == committed , parent == "" '], True),
        (['labels."containerd.io/snapshot.ref"==\x22sha256:\\x61bc\x22'], True),
    ],
)
def test_matching(filters, expected):
    assert parse_filters(filters).matches(adaptor) is expected


@pytest.mark.parametrize(
    "text",
    [
        "kind=committed",
        "kind==",
        "==x",
        "kind==a b",
        'labels."unterminated==x',
        "name==/regex-quotes-need-~=/",
        "name~=(",
        "kind==a,",
    ],
)
def test_syntax_errors_are_invalid_arguments(text):
    with pytest.raises(InvalidArgumentError, match="filter"):
        parse_filters([text])
