"""Logical targets: how a Host or URI authority is read as a mesh name or an egress host."""

from __future__ import annotations

import pytest

from proxy.errors import BadMessageError
from proxy.target import Authority, parse_authority, split_absolute_form


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"orders", Authority("orders", 80, "orders", None)),
        (b"Orders:8080", Authority("orders", 8080, "orders", None)),
        (b"orders.", Authority("orders", 80, "orders", None)),
        (b"orders.payments", Authority("orders.payments", 80, "orders", "payments")),
        (b"example.com", Authority("example.com", 80, "example", "com")),
        (b"api.example.com:8443", Authority("api.example.com", 8443, None, None)),
        (b"10.0.0.1:9000", Authority("10.0.0.1", 9000, None, None)),
        (b"[::1]:8080", Authority("::1", 8080, None, None)),
    ],
)
def test_parse_authority(raw: bytes, expected: Authority) -> None:
    assert parse_authority(raw) == expected


def test_connect_default_port_and_shapes() -> None:
    assert parse_authority(b"example.com", 443).port == 443
    assert parse_authority(b"orders").single_label
    assert not parse_authority(b"orders.payments").single_label


@pytest.mark.parametrize(
    "raw", [b"", b"a:0", b"a:99999", b"a:x", b"user@host", b"[::1", b"h\xc3\xa9"]
)
def test_bad_authorities(raw: bytes) -> None:
    with pytest.raises(BadMessageError):
        parse_authority(raw)


def test_split_absolute_form() -> None:
    assert split_absolute_form(b"/p?q") is None
    assert split_absolute_form(b"*") is None
    assert split_absolute_form(b"http://orders/p?q=1") == (b"orders", b"/p?q=1")
    assert split_absolute_form(b"HTTP://orders:81") == (b"orders:81", b"/")
    assert split_absolute_form(b"http://orders?x") == (b"orders", b"/?x")
    assert split_absolute_form(b"http://u:p@orders/a#frag") == (b"orders", b"/a")
    with pytest.raises(BadMessageError):
        split_absolute_form(b"https://orders/")
    with pytest.raises(BadMessageError):
        split_absolute_form(b"orders/p")
