"""A teacher created over REST, by the CLI or inline in a job is stored from one TeacherSpec:
the REST body must carry the same fields (plus its name and key), or one would be validated
and then dropped (the CLI once dropped a file's replica_urls that way)."""

from __future__ import annotations

from service.api.schemas import TeacherCreate
from service.domain.spec import TeacherSpec


def test_the_rest_body_has_the_specs_fields_and_hands_every_one_over() -> None:
    assert set(TeacherCreate.model_fields) - {"name", "api_key"} == set(TeacherSpec.model_fields)
    body = TeacherCreate.model_validate(
        {
            "name": "t",
            "api_key": "sk-x",
            "base_url": "http://a/v1",
            "replica_urls": ["http://b/v1"],
            "model": "m",
            "api_key_env": "K",
            "limits": {"max_concurrency": 3},
            "prices": {"input_per_million": 0.5},
            "generation": {"temperature": 0.2},
            "structured_mode": "json_object",
            "timeout_s": 30.0,
            "max_attempts": 2,
        }
    )
    spec = body.as_spec()
    for field in TeacherSpec.model_fields:
        assert getattr(spec, field) == getattr(body, field), field
