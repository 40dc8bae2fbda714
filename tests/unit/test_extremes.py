import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cliplens.telemetry.extremes import WindowedExtremes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(window_s: float = 10) -> tuple[WindowedExtremes, FakeClock, CollectorRegistry]:
    clock = FakeClock()
    extremes = WindowedExtremes(window_s, clock=clock)
    extremes.family("cliplens_image_stage", "per-image stage work", ["stage"])
    registry = CollectorRegistry()
    registry.register(extremes)
    return extremes, clock, registry


def test_exact_min_and_max_of_the_window_per_series() -> None:
    extremes, _, registry = make()
    for value in (0.120, 0.003, 0.071):
        extremes.observe("cliplens_image_stage", value, "load")
    extremes.observe("cliplens_image_stage", 0.5, "decode")
    assert registry.get_sample_value("cliplens_image_stage_min_seconds", {"stage": "load"}) == 0.003
    assert registry.get_sample_value("cliplens_image_stage_max_seconds", {"stage": "load"}) == 0.120
    assert registry.get_sample_value("cliplens_image_stage_max_seconds", {"stage": "decode"}) == 0.5


def test_observations_leave_the_window_after_window_seconds() -> None:
    extremes, clock, registry = make(window_s=10)
    extremes.observe("cliplens_image_stage", 9.0, "load")
    clock.now += 5
    extremes.observe("cliplens_image_stage", 1.0, "load")
    clock.now += 4.5
    assert extremes.current("cliplens_image_stage", "load") == (1.0, 9.0)
    clock.now += 1
    assert extremes.current("cliplens_image_stage", "load") == (1.0, 1.0)
    clock.now += 10
    assert extremes.current("cliplens_image_stage", "load") is None
    assert registry.get_sample_value("cliplens_image_stage_max_seconds", {"stage": "load"}) is None
    assert b"cliplens_image_stage_max_seconds{" not in generate_latest(registry)


def test_a_scrape_does_not_reset_the_values() -> None:
    extremes, _, registry = make()
    extremes.observe("cliplens_image_stage", 0.25, "load")
    first = generate_latest(registry)
    assert generate_latest(registry) == first
    assert b'cliplens_image_stage_max_seconds{stage="load"} 0.25' in first


@pytest.mark.parametrize("window_s", [0.5, 0, -1, float("nan")])
def test_a_window_under_a_second_is_refused_not_rounded(window_s: float) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        WindowedExtremes(window_s)
