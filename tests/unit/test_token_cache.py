"""porter's cache of verified tokens: hits within the TTL, misses after it, no plaintext kept."""

from __future__ import annotations

import time

from cloudhpc.porter.state import TokenCache
from cloudhpc.store import Principal

ALICE = Principal(user="alice", role="user", clusters=(), token_id=1)


def test_hit_within_ttl_and_miss_after() -> None:
    cache = TokenCache(ttl=0.2)
    key = cache.key("chpc_secret")
    assert cache.get(key) == (False, None)
    cache.put(key, ALICE)
    assert cache.get(key) == (True, ALICE)
    time.sleep(0.25)
    assert cache.get(key) == (False, None)


def test_unknown_tokens_are_remembered_too() -> None:
    cache = TokenCache(ttl=10)
    key = cache.key("chpc_wrong")
    cache.put(key, None)
    assert cache.get(key) == (True, None)


def test_keys_are_hashes_never_the_token() -> None:
    cache = TokenCache()
    token = "chpc_do-not-keep-me"
    cache.put(cache.key(token), ALICE)
    assert token not in repr(cache.__dict__)
    assert cache.key(token) != token
    assert len(cache.key(token)) == 64


def test_a_full_cache_starts_over() -> None:
    cache = TokenCache(ttl=10, max_entries=3)
    keys = [cache.key(f"chpc_{i}") for i in range(4)]
    for key in keys:
        cache.put(key, ALICE)
    assert [cache.get(k)[0] for k in keys] == [False, False, False, True]
