"""Which worker environment variables a tenant may name as an api_key_env, and where their
values may be sent (`service.secrets.KeyEnvPolicy`)."""

from __future__ import annotations

import pytest

from service.errors import ValidationFailed
from service.secrets import KeyEnvPolicy, key_env_policy
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings


def _refused(policy: KeyEnvPolicy, name: str, urls: list[str]) -> str:
    with pytest.raises(ValidationFailed) as caught:
        policy.check(name, urls, field="teacher.api_key_env")
    assert caught.value.code == "key_env_not_allowed"
    assert caught.value.details == [
        {"field": "teacher.api_key_env", "message": caught.value.details[0]["message"]}
    ]
    return str(caught.value)


def test_a_listed_name_goes_only_to_its_hosts_and_a_bare_one_anywhere() -> None:
    policy = KeyEnvPolicy.from_entries(
        ["OPENAI_API_KEY=API.openai.com.", " VLLM_API_KEY = vllm ", "VLLM_API_KEY=vllm-2", "PUBLIC"]
    )
    policy.check("OPENAI_API_KEY", ["https://api.openai.com/v1"], field="api_key_env")
    policy.check("VLLM_API_KEY", ["http://vllm:8000/v1", "http://VLLM-2:8000/v1"], field="x")
    policy.check("PUBLIC", ["https://anywhere.example/v1"], field="x")
    policy.check(None, ["https://anywhere.example/v1"], field="x")  # no variable named
    # The operator's OpenAI key next to a tenant's own server: refused, and so is one replica
    # elsewhere among allowed ones.
    message = _refused(policy, "OPENAI_API_KEY", ["https://attacker.example/v1"])
    assert "may be sent only to api.openai.com, not to 'attacker.example'" in message
    _refused(policy, "VLLM_API_KEY", ["http://vllm:8000/v1", "http://evil:8000/v1"])


def test_an_unlisted_name_is_refused_and_the_operator_may_name_any() -> None:
    policy = KeyEnvPolicy.from_entries(["VLLM_API_KEY=vllm"])
    for secret in ("DISTILL_SECRET_KEY", "DATABASE_URL", "vllm_api_key"):
        message = _refused(policy, secret, ["http://vllm:8000/v1"])
        assert "DISTILL_API__KEY_ENV_ALLOWLIST" in message and "api_key" in message
    _refused(KeyEnvPolicy(), "VLLM_API_KEY", ["http://vllm:8000/v1"])  # the default: none
    KeyEnvPolicy(allow_all=True).check("DATABASE_URL", ["http://x/v1"], field="x")


def test_the_settings_make_the_policy_and_an_embedded_servers_user_is_the_operator() -> None:
    served = Settings(
        database=DatabaseSettings(url="postgresql+psycopg://x@127.0.0.1/x"),
        api=ApiSettings.model_validate({"key_env_allowlist": "A=h1, B"}),
    )
    assert served.api.key_env_allowlist == ["A=h1", "B"]
    policy = key_env_policy(served)
    assert not policy.allow_all and policy.hosts == {"A": frozenset({"h1"}), "B": None}
    embedded = Settings(database=DatabaseSettings(url=None), broker=BrokerSettings(url=None))
    assert embedded.single_user and key_env_policy(embedded).allow_all
