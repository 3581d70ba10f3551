"""Test setup: 8 emulated CPU devices, float32, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Full-precision float32 matmuls on CPU so parity tolerances mean what they say.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _attention_override(monkeypatch):
    """`CAIG_TEST_ATTENTION=chunked pytest tests/test_llama.py` runs every attention call of the models under test
    with that implementation, so the parity tests check each implementation at their own tolerances."""
    impl = os.environ.get("CAIG_TEST_ATTENTION")
    if impl:
        from caig_jax.models import attention

        original = attention.attention
        monkeypatch.setattr(attention, "attention", lambda q, k, v, mask=None, *, impl_=None, **kw: original(
            q, k, v, mask, **{**kw, "impl": impl}))


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"tests expect 8 emulated CPU devices, got {len(devs)}"
    return devs
