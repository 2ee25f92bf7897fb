import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep few-shot caches out of the user's ~/.cache during tests."""
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path_factory.mktemp("cache")))
