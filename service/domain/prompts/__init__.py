"""Prompts: versioned Jinja2 templates, data blocks that quote untrusted text, output schemas."""

from service.domain.prompts.render import (
    DATA_CLOSE,
    DATA_OPEN,
    DATA_RULES,
    DataBlock,
    PromptTemplate,
    RenderedPrompt,
    build_request,
    check_template,
    load_template,
    render_prompt,
    template_ids,
    to_json,
)
from service.domain.prompts.schemas import (
    example_item_schema,
    examples_schema,
    item_fields,
    rationale_schema,
)

__all__ = [
    "DATA_CLOSE",
    "DATA_OPEN",
    "DATA_RULES",
    "DataBlock",
    "PromptTemplate",
    "RenderedPrompt",
    "build_request",
    "check_template",
    "example_item_schema",
    "examples_schema",
    "item_fields",
    "load_template",
    "rationale_schema",
    "render_prompt",
    "template_ids",
    "to_json",
]
