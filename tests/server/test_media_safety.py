"""URL safety of ``fetch_url`` under ``MediaPolicy.safe()``: every hop and every resolved
address is checked, and the socket connects to the address that was checked."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from qwenvl.errors import MediaError
from qwenvl.processing.fetch import address_is_public, fetch_url
from qwenvl.processing.media import load_image
from qwenvl.processing.policy import MediaPolicy

REAL_GETADDRINFO = socket.getaddrinfo


def _fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> list[str]:
    """Resolve the names in ``table`` to its addresses; record every lookup."""
    lookups: list[str] = []

    def getaddrinfo(host: str, port: Any, *args: Any, **kw: Any) -> Any:
        lookups.append(host)
        if host in table:
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port))) for ip in table[host]
            ]
        return REAL_GETADDRINFO(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


@pytest.mark.parametrize(
    ("ip", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # CGNAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
    ],
)
def test_address_classes(ip: str, public: bool) -> None:
    assert address_is_public(ip) is public


def test_the_library_default_stays_permissive(media_server: Any) -> None:
    assert fetch_url(media_server.url("red.png"), MediaPolicy()).startswith(b"\x89PNG")


def test_names_resolving_to_private_addresses_are_refused(
    media_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_dns(monkeypatch, {"innocent.test": ["93.184.216.34", "127.0.0.1"]})
    with pytest.raises(MediaError, match="resolves to 127.0.0.1"):
        fetch_url(f"http://innocent.test:{media_server.port}/red.png", MediaPolicy.safe())
    with pytest.raises(MediaError, match="refusing"):
        fetch_url(media_server.url("red.png"), MediaPolicy.safe())


def test_connects_to_the_checked_address(
    media_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "media.test" exists only in our table: the download works only if the socket connects to
    # the address our check resolved, with no second lookup by http.client (DNS rebinding).
    lookups = _fake_dns(monkeypatch, {"media.test": ["127.0.0.1"]})
    policy = MediaPolicy.safe(allowed_domains=("media.test",))
    data = fetch_url(f"http://media.test:{media_server.port}/red.png", policy)
    assert data.startswith(b"\x89PNG")
    assert lookups == ["media.test"]
    # a redirect hop is resolved and checked again (to-localhost -> localhost: not trusted)
    lookups.clear()
    with pytest.raises(MediaError, match="'localhost'"):
        fetch_url(f"http://media.test:{media_server.port}/to-localhost", policy)
    assert lookups == ["media.test", "localhost"]


def test_allow_private_networks(media_server: Any) -> None:
    policy = MediaPolicy.safe(allow_private_networks=True)
    assert fetch_url(media_server.url("to-red"), policy).startswith(b"\x89PNG")


def test_redirect_limit(media_server: Any) -> None:
    policy = MediaPolicy.safe(allowed_domains=("127.0.0.1",), max_redirects=0)
    with pytest.raises(MediaError, match="too many redirects"):
        fetch_url(media_server.url("to-red"), policy)


def test_local_media_root(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "allowed"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    policy = MediaPolicy.safe(local_media_root=root)
    assert load_image((root / "a.png").as_uri(), policy).size == (8, 8)
    for path in (tmp_path / "secret.png", root / "link.png", root / ".." / "secret.png"):
        with pytest.raises(MediaError, match="outside the allowed local media path"):
            load_image(str(path), policy)
    with pytest.raises(MediaError, match="disabled by the media policy"):
        load_image(str(root / "a.png"), MediaPolicy.safe())


def test_userinfo_is_refused_before_any_lookup_or_connection(
    media_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "http://evil.com@127.0.0.1/" names 127.0.0.1 (evil.com is a user name): whatever the policy
    # trusts, it must be refused before a name is resolved or a socket connects.
    lookups = _fake_dns(monkeypatch, {})
    connects: list[Any] = []

    class RecordingSocket(socket.socket):
        def connect(self, address: Any) -> None:
            connects.append(address)
            super().connect(address)

    monkeypatch.setattr(socket, "socket", RecordingSocket)
    port = media_server.port
    urls = (
        "http://evil.com@127.0.0.1/",
        f"http://evil.com@127.0.0.1:{port}/red.png",
        f"http://evil.com:{port}@127.0.0.1:{port}/red.png",
        "http://user:pass@169.254.169.254/latest/meta-data/",
    )
    for policy in (MediaPolicy.safe(), MediaPolicy.safe(allowed_domains=("evil.com",))):
        for url in urls:
            with pytest.raises(MediaError, match=r"user name or password \(user@host\)") as info:
                fetch_url(url, policy)
            assert "pass@" not in str(info.value)
    assert lookups == [] and connects == []
