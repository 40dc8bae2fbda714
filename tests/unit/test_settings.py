from pathlib import Path

import pytest

from cliplens.settings import Settings, SettingsError, load_settings


def test_defaults_when_the_environment_is_empty() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.model == "ViT-B-32"
    assert settings.pretrained == "laion2b_s34b_b79k"
    assert settings.max_inputs == 256
    assert settings.otlp_endpoint is None


def test_reads_every_documented_variable() -> None:
    settings = load_settings(
        {
            "CLIPLENS_MODEL": "ViT-B-16",
            "CLIPLENS_PRETRAINED": "none",
            "CLIPLENS_DEVICE": "cpu",
            "CLIPLENS_DTYPE": "bfloat16",
            "CLIPLENS_IMAGE_ROOT": "/srv/photos",
            "CLIPLENS_DEFAULT_BUCKET": "photos",
            "CLIPLENS_ALLOWED_BUCKETS": "photos, archive ,",
            "CLIPLENS_MAX_INPUTS": "64",
            "CLIPLENS_MAX_BATCH": "8",
            "CLIPLENS_BATCH_WAIT_MS": "0.5",
            "STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443",
            "CLIPLENS_ALLOW_EMULATOR": "1",
            "CLIPLENS_MAX_IMAGES_IN_FLIGHT": "500",
            "CLIPLENS_REQUEST_TIMEOUT_S": "12.5",
            "CLIPLENS_DOWNLOAD_RETRIES": "5",
            "CLIPLENS_SHUTDOWN_GRACE_S": "20",
            "CLIPLENS_API_TOKENS": "alpha, beta",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_TRACES_EXPORTER": "Console",
        }
    )
    assert settings.model == "ViT-B-16"
    assert settings.pretrained == "none"
    assert settings.device == "cpu"
    assert settings.dtype == "bfloat16"
    assert settings.image_root == Path("/srv/photos")
    assert settings.buckets == frozenset({"photos", "archive"})
    assert settings.max_inputs == 64
    assert settings.max_batch == 8
    assert settings.batch_wait_ms == 0.5
    assert settings.gcs_emulator_host == "http://127.0.0.1:4443"
    assert settings.allow_emulator is True
    assert settings.max_images_in_flight == 500
    assert settings.request_timeout_s == 12.5
    assert settings.download_retries == 5
    assert settings.shutdown_grace_s == 20
    assert settings.api_tokens == ("alpha", "beta")
    assert "alpha" not in repr(settings)
    assert settings.otlp_endpoint == "http://collector:4317"
    assert settings.otlp_protocol == "grpc"
    assert settings.traces_exporter == "console"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CLIPLENS_MAX_INPUTS", "many"),
        ("CLIPLENS_MAX_INPUTS", "0"),
        ("CLIPLENS_DEVICE", "tpu"),
        ("CLIPLENS_DTYPE", "int4"),
        ("CLIPLENS_RUNTIME", "tensorrt"),
        ("CLIPLENS_INT8_MIN_COSINE", "1.5"),
        ("CLIPLENS_BATCH_WAIT_MS", "-1"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("CLIPLENS_RANDOM_WEIGHTS_FALLBACK", "maybe"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})


@pytest.mark.parametrize("name", ["CLIPLENS_REQUEST_TIMEOUT_S", "CLIPLENS_DOWNLOAD_TIMEOUT_S"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_zero_or_negative_deadline_refuses_to_start(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({name: value})
    message = str(raised.value)
    assert message.startswith(f"{name}={value!r}: "), message
    assert "greater than 0" in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["0.5", "0", "-5"])
def test_an_extremes_window_under_a_second_refuses_to_start(value: str) -> None:
    """The window moves in one-second slots: half a second cannot be honoured, so it is not taken."""
    with pytest.raises(SettingsError) as raised:
        load_settings({"CLIPLENS_EXTREMES_WINDOW_S": value})
    message = str(raised.value)
    assert message.startswith(f"CLIPLENS_EXTREMES_WINDOW_S={value!r}: "), message
    assert "greater than or equal to 1" in message
    assert load_settings({"CLIPLENS_EXTREMES_WINDOW_S": "1"}).extremes_window_s == 1


def test_a_zero_shutdown_grace_means_no_grace() -> None:
    assert load_settings({"CLIPLENS_SHUTDOWN_GRACE_S": "0"}).shutdown_grace_s == 0


@pytest.mark.parametrize(
    ("value", "expected"), [("yes", True), (" On ", True), ("FALSE", False), ("0", False)]
)
def test_booleans_take_the_usual_words(value: str, expected: bool) -> None:
    assert load_settings({"CLIPLENS_GPU_DECODE": value}).gpu_decode is expected


def test_every_bad_value_is_named_on_one_line() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"CLIPLENS_MAX_BATCH": "0", "CLIPLENS_DEVICE": "tpu", "CLIPLENS_MODEL": "ViT-B-16"})
    message = str(raised.value)
    assert "CLIPLENS_MAX_BATCH='0'" in message
    assert "CLIPLENS_DEVICE='tpu'" in message
    assert "'auto', 'cpu' or 'cuda'" in message, "a bad choice lists the good ones"
    assert "\n" not in message
    assert "CLIPLENS_MODEL" not in message


def test_an_empty_variable_counts_as_unset() -> None:
    assert load_settings({"CLIPLENS_MAX_INPUTS": "", "CLIPLENS_IMAGE_ROOT": " "}) == Settings()


def test_model_threads_has_a_new_name_and_keeps_the_old_one() -> None:
    assert load_settings({"CLIPLENS_MODEL_THREADS": "3"}).model_threads == 3
    assert load_settings({"CLIPLENS_TORCH_THREADS": "2"}).model_threads == 2
    assert load_settings({"CLIPLENS_MODEL_THREADS": "3", "CLIPLENS_TORCH_THREADS": "2"}).model_threads == 3


def test_the_runtime_settings_are_read() -> None:
    settings = load_settings(
        {
            "CLIPLENS_RUNTIME": "ONNXRuntime",
            "CLIPLENS_DTYPE": "int8",
            "CLIPLENS_EXPORT_DIR": "/var/cache/cliplens",
            "CLIPLENS_INT8_MIN_COSINE": "0.99",
            "CLIPLENS_INT8_MEAN_COSINE": "0.995",
            "CLIPLENS_FIDELITY_DIR": "/srv/photos/held-apart",
        }
    )
    assert (settings.runtime, settings.dtype) == ("onnxruntime", "int8")
    assert settings.export_dir == Path("/var/cache/cliplens")
    assert (settings.int8_min_cosine, settings.int8_mean_cosine) == (0.99, 0.995)
    assert settings.fidelity_dir == Path("/srv/photos/held-apart")


def test_the_signal_specific_protocol_wins_over_the_general_one() -> None:
    both = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert load_settings(both).otlp_protocol == "grpc"


def test_an_emulator_host_without_the_explicit_opt_in_refuses_to_start() -> None:
    with pytest.raises(SettingsError, match="CLIPLENS_ALLOW_EMULATOR"):
        load_settings({"STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443"})
    assert load_settings(
        {"STORAGE_EMULATOR_HOST": "http://x:1", "CLIPLENS_ALLOW_EMULATOR": "1"}
    ).allow_emulator


def test_a_container_cpu_limit_caps_the_cores_used(tmp_path: Path) -> None:
    from cliplens.machine import cgroup_cpu_limit

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")
    assert cgroup_cpu_limit(cpu_max) == 3
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(cpu_max) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None
