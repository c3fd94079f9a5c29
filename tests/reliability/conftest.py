import pytest

from tests.reliability.helpers import chat_jsonl, tiny_llama_dir


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("rel-llama"))


@pytest.fixture(scope="session")
def chat(tmp_path_factory):
    return chat_jsonl(tmp_path_factory.mktemp("rel-data") / "chat.jsonl", n=24)
