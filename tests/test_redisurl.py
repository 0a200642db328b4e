"""Redis URLs: passwords out of text, and the URLs a node refuses before redis-py reads
them (its errors quote pieces of the URL, a password's among them)."""

from __future__ import annotations

import pytest

from coordinator.config import ManagerConfig
from coordinator.errors import ConfigError
from coordinator.redact import redact, redact_url
from coordinator.redisurl import address_of, check_redis_url, database_of, seed_urls


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://u:hunter2@redis:6379/0", "redis://u:***@redis:6379/0"),
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        # What a URL parser takes for the path, the query, the fragment or the host.
        ("redis://u:S3CRET/PW@127.0.0.1:6399/0", "redis://u:***@127.0.0.1:6399/0"),
        ("redis://u:S3CRET?PW@h/0", "redis://u:***@h/0"),
        ("redis://u:S3CRET#PW@h/0", "redis://u:***@h/0"),
        ("redis://u:p@ss@host/0", "redis://u:***@host/0"),
        ("redis://u:S3CRET PW@127.0.0.1:6399/0", "redis://u:***@127.0.0.1:6399/0"),
        # In a message: each URL on its own, the rest of the text kept.
        (
            "Redis at redis://u:S3CRET PW@h:1/0 is unreachable: Error 111",
            "Redis at redis://u:***@h:1/0 is unreachable: Error 111",
        ),
        (
            "from redis://u:a@b@h1/0 to rediss://:c/d@h2/0?password=e\nnext redis://h3/0",
            "from redis://u:***@h1/0 to rediss://:***@h2/0?password=***\nnext redis://h3/0",
        ),
        # No password: nothing hidden.
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("http://host/path x: alice@example.com", "http://host/path x: alice@example.com"),
        ("redis://user@host/0", "redis://user@host/0"),
    ],
)
def test_redact_url_hides_everything_up_to_the_last_at(text: str, shown: str) -> None:
    assert redact_url(text) == shown
    assert redact(text) == shown  # what logs and the CLI's messages go through


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis://u:S3CRET/PW@127.0.0.1:6399/0", "must be percent-encoded"),
        ("redis://127.0.0.1:notaport/0", "the port is not a number 0-65535"),
        ("redis://127.0.0.1:6379999/0", "the port is not a number 0-65535"),
        ("redis://[::1", "its host cannot be read"),
        ("redis://127.0.0.1:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        ("redis://127.0.0.1:6379/0?socket_timeout=inf", "socket_timeout must be a finite"),
        ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=bogus", "Certificate Requirements Flag"),
        ("redis://", "no host"),
        ("redis://:S3CRET@/0", "no host"),
        ("unix://", "no socket path"),
        ("redis+sentinel://[::1:26379/mymaster", "its host cannot be read"),
        ("redis+sentinel://u:S3CRET/PW@h:26379/mymaster", "must be percent-encoded"),
        ("redis+sentinel://h:99999/mymaster", "is not HOST:PORT"),
        ("redis+sentinel:///mymaster", "at least one HOST:PORT"),
        # Several nodes (a cluster's seeds): each HOST:PORT, each a usable node URL.
        ("redis://:S3CRET@h1:7000,h2/0", "cluster node address 'h2' is not HOST:PORT"),
        ("redis://:S3CRET@h1:7000,,h2:7001/0", "cluster node address '' is not HOST:PORT"),
        ("redis://:S3CRET@h1:7000,h2:70000/0", "'h2:70000' is not HOST:PORT"),
        ("redis://:S3CRET@h1:7000,h2:\u00b2/0", "'h2:\u00b2' is not HOST:PORT"),  # isdigit()
        ("redis://:S3CRET@h1:7000,h2:0/0", "'h2:0' is not HOST:PORT"),
        ("redis://:S3CRET@h1:7000,h 2:7001/0", "'h 2:7001' is not HOST:PORT"),
        ("redis://:S3CRET@h1:7000,h2:7001/abc", "after the host comes /DB"),
        ("rediss://:S3CRET@h1:7000,h2:7001/0?socket_timeout=0", "socket_timeout must be more"),
        # A path redis-py would read as no database, so DB 0.
        ("redis://:S3CRET@127.0.0.1:6379/abc", "after the host comes /DB"),
        ("redis://:S3CRET@127.0.0.1:6379/0/1", "after the host comes /DB"),
        ("rediss://:S3CRET@127.0.0.1:6379/db0", "after the host comes /DB"),
        # Timeouts no call could meet.
        ("redis://:S3CRET@127.0.0.1:6379/0?socket_timeout=0", "socket_timeout must be more"),
        ("redis://127.0.0.1:6379/0?socket_timeout=-1", "socket_timeout must be more than 0"),
        ("redis://h/0?socket_connect_timeout=0", "socket_connect_timeout must be more than 0"),
        # A Sentinel URL's parameters are read as a redis:// URL's.
        ("redis+sentinel://:S3CRET@h:26379/m?socket_timeout=0", "socket_timeout must be more"),
        ("redis+sentinel://h:26379/m?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        (
            "rediss+sentinel://h:26379/m?sentinel_password=S3CRET&ssl_cert_reqs=bogus",
            "Certificate Requirements Flag",
        ),
    ],
)
def test_check_redis_url_refuses_what_redis_py_would_misread(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_redis_url(url)
    message = str(info.value)
    assert why in message
    assert "S3CRET" not in message and "PW" not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://u:p@ss@127.0.0.1:6379/0",  # an @ in the password: redis-py reads it right
        "redis://:S3CRET%2FPW@127.0.0.1/0",
        "redis://[::1]:6379/0",
        "rediss://h:6380/0?ssl_cert_reqs=none&socket_timeout=2.5",
        "unix:///tmp/redis.sock",
        "unix://:pw@/tmp/redis.sock?db=1",
        "redis+sentinel://h1:26379,h2:26379/mymaster",
        "rediss+sentinel://u:pw@[::1]:26379,[::2]:26379/mymaster/1",
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1:6379/",
        "redis://127.0.0.1:6379/15?socket_timeout=0.5",
        "redis+sentinel://h1:26379/mymaster?socket_timeout=1&sentinel_password=pw",
        "redis://u:pw@h1:7000,h2:7001,[::1]:7002/0?socket_timeout=2",
        "rediss://h1:7000,h2:7001",
        "redis+sentinel://h1:26379,h2:26379,/mymaster",  # a blank item, as accepted before
    ],
)
def test_check_redis_url_accepts_every_supported_form(url: str) -> None:
    check_redis_url(url)


def test_a_url_of_several_nodes_is_one_url_per_node_with_everything_else_kept() -> None:
    """A Redis Cluster's seeds: each node's URL keeps the credentials (a password holding
    ',' and '@' too), the database and the parameters; a URL of one node is itself."""
    url = "rediss://u:p%2Cw@d@h1:7000,[::1]:7001/0?socket_timeout=2"
    assert seed_urls(url) == [
        "rediss://u:p%2Cw@d@h1:7000/0?socket_timeout=2",
        "rediss://u:p%2Cw@d@[::1]:7001/0?socket_timeout=2",
    ]
    assert [address_of(u) for u in seed_urls(url)] == [("h1", 7000), ("::1", 7001)]
    assert seed_urls("redis://h1:7000/0") == ["redis://h1:7000/0"]
    assert seed_urls("redis://h1:7000, h2:7001/0") == ["redis://h1:7000/0", "redis://h2:7001/0"]
    assert seed_urls("redis+sentinel://h1:26379,h2:26379/m") == [
        "redis+sentinel://h1:26379,h2:26379/m"
    ]
    assert database_of("redis://h1:7000,h2:7001/3") == 3


def test_several_nodes_are_refused_where_one_server_is_meant() -> None:
    with pytest.raises(ConfigError, match="several nodes, the seeds of a Redis Cluster"):
        ManagerConfig(redis_url="redis://:S3CRET@h1:7000,h2:7001/0", redis_mode="standalone")
    ManagerConfig(redis_url="redis://h1:7000,h2:7001/0", redis_mode="cluster")
    ManagerConfig(redis_url="redis://h1:7000,h2:7001/0")  # auto: the first node answering says
