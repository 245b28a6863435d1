"""Shared pytest configuration."""


def pytest_configure(config):
    """Register the ``slow`` marker (deselect with ``-m "not slow"``)."""
    config.addinivalue_line(
        "markers", "slow: slow test (e.g. loads the real SmolLM2-135M); deselect with -m 'not slow'"
    )
