"""The embedding cache's parts on their own: keys, the byte-bounded tier, the circuit breaker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from cliplens.experiment.inprocess import free_port
from cliplens.pipeline.cache import (
    BREAKER_FAILURES,
    CircuitBreaker,
    EmbeddingCache,
    MemoryTier,
    content_key,
    model_fingerprint,
)
from cliplens.pipeline.model import load_model
from cliplens.settings import Settings, SettingsError, load_settings
from cliplens.telemetry.metrics import Metrics
from tests.conftest import write_tiny_model


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


def test_content_keys_separate_their_parts_and_their_kinds() -> None:
    assert content_key("gcs", "photos", "a.jpg", 1) == content_key("gcs", "photos", "a.jpg", 1)
    assert content_key("gcs", "photos", "a.jpg", 1) != content_key("gcs", "photos", "a.jpg", 2)
    assert content_key("gcs", "photo", "sa.jpg", 1) != content_key("gcs", "photos", "a.jpg", 1)
    assert content_key("bytes", b"abc") != content_key("text", b"abc")
    assert len(content_key("bytes", b"")) == 32


def test_keys_change_with_the_model_its_weights_and_its_dtype(tmp_path: Path) -> None:
    first = write_tiny_model(tmp_path / "seed-0", with_weights=True, seed=0)
    other = write_tiny_model(tmp_path / "seed-1", with_weights=True, seed=1)

    def fingerprint(folder: Path, dtype: str = "float32", **overrides: object) -> str:
        settings = Settings(model=f"local-dir:{folder}", dtype=dtype, **overrides)  # type: ignore[arg-type]
        return model_fingerprint(load_model(settings), settings)

    base = fingerprint(first)
    assert fingerprint(first) == base, "the same model loaded again (another replica, a restart)"
    assert fingerprint(other) != base, "other weights"
    assert fingerprint(first, dtype="bfloat16") != base, "another dtype"
    vit_b_16 = tmp_path / "patch-16"
    write_tiny_model(vit_b_16, with_weights=False)
    config = (vit_b_16 / "open_clip_config.json").read_text().replace('"patch_size": 32', '"patch_size": 16')
    (vit_b_16 / "open_clip_config.json").write_text(config)
    assert fingerprint(vit_b_16, pretrained="none") != fingerprint(vit_b_16, pretrained="none"), (
        "random weights are a new model at every start"
    )

    metrics = Metrics()
    keys = {
        EmbeddingCache(Settings(), model, metrics).key(content_key("bytes", b"photo"))
        for model in (base, fingerprint(other))
    }
    assert len(keys) == 2


def test_the_memory_tier_stays_under_its_byte_bound_and_evicts_the_least_recently_used() -> None:
    metrics = Metrics()
    vector = np.ones(512, dtype="<f4").tobytes()
    tier = MemoryTier(64 * 1024, metrics)
    tier.put("key-0", vector)
    for number in range(1, 2000):
        tier.get("key-0")  # kept fresh: never the one evicted
        tier.put(f"key-{number}", vector)
        assert tier.size <= tier.capacity
    assert tier.get("key-0") == vector
    assert tier.get("key-1") is None, "the oldest untouched entry went first"
    assert tier.get("key-1999") == vector
    assert 20 <= len(tier) < 32, "2 KiB vectors in 64 KiB, with their keys and bookkeeping"
    assert sample(metrics, "cliplens_cache_bytes") == tier.size
    assert sample(metrics, "cliplens_cache_entries") == len(tier)

    tier.put("huge", b"x" * 100_000)
    assert tier.get("huge") is None, "an entry larger than the bound is not kept (and evicts nothing)"
    assert tier.get("key-1999") == vector


def test_the_circuit_opens_after_failures_in_a_row_and_a_trial_closes_it() -> None:
    now = [0.0]
    changes: list[bool] = []
    breaker = CircuitBreaker(3, 5.0, changes.append, clock=lambda: now[0])
    breaker.failed()
    breaker.failed()
    breaker.succeeded()  # not in a row
    breaker.failed()
    breaker.failed()
    assert breaker.allow() and not breaker.is_open
    breaker.failed()
    assert breaker.is_open and changes == [True]
    assert not breaker.allow()
    now[0] = 5.1
    assert breaker.allow(), "one trial after the cooldown"
    assert not breaker.allow(), "only one"
    breaker.failed()
    assert breaker.is_open and changes == [True], "a failed trial opens it again, without a new change"
    assert not breaker.allow()
    now[0] = 10.3
    assert breaker.allow()
    breaker.succeeded()
    assert not breaker.is_open and changes == [True, False]
    assert breaker.allow() and breaker.allow()


def test_a_dead_shared_tier_is_counted_then_bypassed_and_vectors_survive_in_memory() -> None:
    metrics = Metrics(CollectorRegistry())
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(cache_bytes=1 << 20, cache_url=dead, cache_timeout_ms=200)
    vector = np.arange(8, dtype=np.float32) / 10

    keys: list[str] = []

    async def scenario() -> None:
        cache = EmbeddingCache(settings, "f" * 64, metrics)
        try:
            assert cache.tiers == ("memory", "redis")
            assert cache.shared_url == settings.cache_url
            keys.extend(cache.key(content_key("text", str(n))) for n in range(BREAKER_FAILURES + 3))
            cache.put_many([(keys[0], vector)])
            for key in keys:
                [(found, tier)] = await cache.get_many([key])
                if key == keys[0]:
                    assert tier == "memory" and found is not None and np.array_equal(found, vector)
                else:
                    assert found is None and tier is None
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert sample(metrics, "cliplens_cache_requests_total", tier="memory", result="hit") == 1
    # the background write fails too: it is one of the failures in a row, before or after the lookups'
    assert sample(metrics, "cliplens_cache_writes_total", tier="redis", result="error") == 1
    errors = sample(metrics, "cliplens_cache_requests_total", tier="redis", result="error")
    bypassed = sample(metrics, "cliplens_cache_requests_total", tier="redis", result="bypass")
    assert errors in (BREAKER_FAILURES - 1, BREAKER_FAILURES)
    assert errors + bypassed == len(keys) - 1, "every shared lookup is counted once"
    assert sample(metrics, "cliplens_cache_circuit_open", tier="redis") == 1


def test_the_shared_url_is_shown_without_its_password() -> None:
    settings = Settings(cache_url="redis://user:secret@[::1]:6380/2", cache_bytes=0)
    cache = EmbeddingCache(settings, "0" * 64, Metrics())
    assert cache.shared_url == "redis://[::1]:6380/2"
    assert cache.memory is None and cache.tiers == ("redis",)
    assert "secret" not in repr(settings)


@pytest.mark.parametrize("url", ["http://cache:6379", "cache:6379", "valkey.internal"])
def test_a_cache_url_that_is_not_redis_is_refused(url: str) -> None:
    with pytest.raises(SettingsError, match="CLIPLENS_CACHE_URL"):
        load_settings({"CLIPLENS_CACHE_URL": url})
    assert load_settings({"CLIPLENS_CACHE_URL": "rediss://cache:6380/1"}).cache_url == "rediss://cache:6380/1"
