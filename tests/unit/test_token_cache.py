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


def test_a_full_cache_drops_its_oldest_entry() -> None:
    cache = TokenCache(ttl=10, max_entries=3)
    keys = [cache.key(f"chpc_{i}") for i in range(4)]
    for key in keys:
        cache.put(key, ALICE)
    assert [cache.get(k)[0] for k in keys] == [False, True, True, True]


def test_bad_tokens_never_push_out_good_ones() -> None:
    """10,000 bad tokens cleared the whole cache (issue 12): every good token then cost a lookup."""
    cache = TokenCache(ttl=60, max_entries=100, max_unknown=50)
    good = [cache.key(f"chpc_good_{i}") for i in range(100)]
    for key in good:
        cache.put(key, ALICE)
    bad = [cache.key(f"chpc_bad_{i}") for i in range(10_000)]
    for key in bad:
        cache.put(key, None)
    assert all(cache.get(key) == (True, ALICE) for key in good)
    # the bad ones are remembered too, within their own bound: the latest are, the first are not
    assert all(cache.get(key) == (True, None) for key in bad[-50:])
    assert not any(cache.get(key)[0] for key in bad[:-50])


def test_expired_entries_make_room_before_live_ones() -> None:
    cache = TokenCache(ttl=0.1, max_entries=2)
    stale = cache.key("chpc_stale")
    cache.put(stale, ALICE)
    time.sleep(0.15)
    cache.ttl = 10
    live = [cache.key("chpc_a"), cache.key("chpc_b")]
    for key in live:
        cache.put(key, ALICE)
    assert [cache.get(k)[0] for k in live] == [True, True]


def test_a_token_verified_after_being_unknown_is_known() -> None:
    """A token created after a failed attempt with the same text (`tokens create` with a chosen
    value) is found at once, never shadowed by its old negative entry."""
    cache = TokenCache(ttl=10)
    key = cache.key("chpc_later")
    cache.put(key, None)
    cache.put(key, ALICE)
    assert cache.get(key) == (True, ALICE)
