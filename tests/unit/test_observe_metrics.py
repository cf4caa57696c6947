"""The Metrics object on its own: registries, label children, breaker states."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import LogSettings
from proxy.observe.metrics import Metrics
from proxy.observe.observer import Observer
from proxy.observe.usage import Usage


def single() -> Metrics:
    return Metrics(multiprocess_dir="")  # never the multiprocess mode in this process


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_two_instances_do_not_share_values() -> None:
    a, b = single(), single()
    a.request_finished("m", "u", 200, 0.1, 0.05)
    assert sample(a, "oaimux_requests_total", model="m", upstream="u", status_class="2xx") == 1
    assert sample(b, "oaimux_requests_total", model="m", upstream="u", status_class="2xx") is None


@pytest.mark.parametrize(
    ("status", "klass"), [(200, "2xx"), (304, "3xx"), (404, "4xx"), (499, "4xx"), (502, "5xx")]
)
def test_status_classes(status: int, klass: str) -> None:
    m = single()
    m.request_finished("", "", status, 0.01, None)
    m.request_finished("", "", status, 0.01, None)
    assert sample(m, "oaimux_requests_total", model="", upstream="", status_class=klass) == 2


def test_latency_buckets_reach_long_streams() -> None:
    m = single()
    m.request_finished("m", "u", 200, 450.0, 0.3)
    assert sample(m, "oaimux_request_duration_seconds_bucket", upstream="u", le="300.0") == 0
    assert sample(m, "oaimux_request_duration_seconds_bucket", upstream="u", le="600.0") == 1
    assert sample(m, "oaimux_time_to_first_byte_seconds_bucket", upstream="u", le="0.25") == 0
    assert sample(m, "oaimux_time_to_first_byte_seconds_bucket", upstream="u", le="0.5") == 1
    assert sample(m, "oaimux_request_duration_seconds_sum", upstream="u") == 450.0


def test_tokens_by_type() -> None:
    m = single()
    m.count_tokens("m", "u", "alice", Usage(10, None))
    m.count_tokens("m", "u", "bob", Usage(5, 7, cached_tokens=4))
    # Anthropic: cache reads and writes come apart from the (uncached) input.
    m.count_tokens("m", "u", "carol", Usage(3, 2, 40, 6))
    assert sample(m, "oaimux_tokens_total", model="m", upstream="u", type="prompt") == 18
    assert sample(m, "oaimux_tokens_total", model="m", upstream="u", type="completion") == 9
    # Per key name: input without the cached part, cached, output.
    assert sample(m, "oaimux_key_tokens_total", key="alice", model="m", type="input") == 10
    assert sample(m, "oaimux_key_tokens_total", key="bob", model="m", type="input") == 1
    assert sample(m, "oaimux_key_tokens_total", key="bob", model="m", type="cached") == 4
    assert sample(m, "oaimux_key_tokens_total", key="bob", model="m", type="output") == 7
    assert sample(m, "oaimux_key_tokens_total", key="alice", model="m", type="output") is None
    assert sample(m, "oaimux_tokens_total", model="m", upstream="u", type="cache_read") == 40
    assert sample(m, "oaimux_tokens_total", model="m", upstream="u", type="cache_creation") == 6
    assert sample(m, "oaimux_key_tokens_total", key="carol", model="m", type="input") == 9
    assert sample(m, "oaimux_key_tokens_total", key="carol", model="m", type="cached") == 40


def test_breaker_states_through_the_observer_hook() -> None:
    m = Metrics(["a", "b"], multiprocess_dir="")
    observer = Observer(LogSettings(), m)
    assert sample(m, "oaimux_circuit_breaker_state", upstream="a") == 0
    for state, expected in (("open", 2), ("half_open", 1), ("closed", 0)):
        observer.breaker_changed("a", state)
        assert sample(m, "oaimux_circuit_breaker_state", upstream="a") == expected
    assert sample(m, "oaimux_circuit_breaker_state", upstream="b") == 0


def test_failure_and_fallback_hooks() -> None:
    m = single()
    observer = Observer(LogSettings(), m)
    observer.upstream_failure("a", "connect")
    observer.upstream_failure("a", "connect")
    observer.upstream_failure("a", "status_503")
    observer.fallback("a", "b")
    assert sample(m, "oaimux_upstream_failures_total", upstream="a", kind="connect") == 2
    assert sample(m, "oaimux_upstream_failures_total", upstream="a", kind="status_503") == 1
    assert sample(m, "oaimux_fallbacks_total", from_upstream="a", to_upstream="b") == 1


def test_render_text_and_openmetrics() -> None:
    m = single()
    body, content_type = m.render(None)
    assert content_type.startswith("text/plain") and b"oaimux_requests_in_flight 0.0" in body
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_process_metrics_in_single_process_mode() -> None:
    body, _ = single().render(None)
    assert b"process_resident_memory_bytes" in body or b"python_info" in body


def test_counts_kept_on_the_hot_path_are_published_at_collection() -> None:
    from proxy.observe import Exchange

    m = single()
    observer = Observer(LogSettings(access=False), m)
    ex = Exchange(request_id="r", method="GET", path="/", client="c")
    observer.begin(ex)
    observer.stream_opened(ex)
    assert sample(m, "oaimux_requests_in_flight") == 1
    assert sample(m, "oaimux_open_streams") == 1
    ex.status, ex.upstream, ex.metric_model = 200, "u", "m"
    ex.usage = Usage(3, 4)  # as the usage reader leaves it
    observer.finished(ex)
    assert sample(m, "oaimux_requests_in_flight") == 0
    assert sample(m, "oaimux_open_streams") == 0
    assert sample(m, "oaimux_requests_total", model="m", upstream="u", status_class="2xx") == 1
    assert sample(m, "oaimux_tokens_total", model="m", upstream="u", type="completion") == 4
    # Published once: collecting again adds nothing.
    assert sample(m, "oaimux_requests_total", model="m", upstream="u", status_class="2xx") == 1


def test_batched_latency_equals_the_librarys_observe() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from proxy.observe.metrics import _BUCKETS

    values = [0.0, 0.004, 0.005, 0.0050001, 0.1, 0.7, 29.9, 30.0, 600.0, 600.5, 7200.0, 0.02] * 3
    m = single()
    reference = Histogram(
        "ref", "reference", ("upstream",), buckets=_BUCKETS, registry=CollectorRegistry()
    )
    for v in values:
        m.request_finished("m", "u", 200, v, v / 2)
        reference.labels("u").observe(v)
    bounds = [*(repr(float(b)) for b in _BUCKETS[:-1]), "+Inf"]
    for le in bounds:
        expected = reference.collect()[0]
        want = next(
            s.value for s in expected.samples if s.name == "ref_bucket" and s.labels["le"] == le
        )
        assert sample(m, "oaimux_request_duration_seconds_bucket", upstream="u", le=le) == want, le
    assert sample(m, "oaimux_request_duration_seconds_count", upstream="u") == len(values)
    assert sample(m, "oaimux_request_duration_seconds_sum", upstream="u") == pytest.approx(
        sum(values)
    )
    assert sample(m, "oaimux_time_to_first_byte_seconds_sum", upstream="u") == pytest.approx(
        sum(values) / 2
    )
    # A second batch adds to the first.
    m.request_finished("m", "u", 200, 0.001, None)
    assert sample(m, "oaimux_request_duration_seconds_count", upstream="u") == len(values) + 1
    assert sample(m, "oaimux_time_to_first_byte_seconds_count", upstream="u") == len(values)


def test_a_worker_starting_beside_one_that_is_still_creating_its_file(tmp_path: Path) -> None:
    """A sibling worker's metrics file exists but is still empty (created, not
    yet sized) while this worker builds its registry: that must not kill the
    worker. Registering the multiprocess collector used to read every file
    (the registry's auto-describe) and raise struct.error on the empty one.
    Run in a child: the multiprocess value class is switched for good."""
    (tmp_path / "counter_99999.db").write_bytes(b"")
    code = (
        "import sys\n"
        "from proxy.observe.metrics import Metrics\n"
        "Metrics(['a'], multiprocess_dir=sys.argv[1])\n"
        "print('built')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "built"
