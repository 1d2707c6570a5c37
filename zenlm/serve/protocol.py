"""The wire format: every request and response body of the server as a pydantic model.

Field names, defaults and ranges follow the OpenAI API (see shared/docs/OPENAI-WIRE.md) so
that the official ``openai`` client works unchanged; unknown request fields are ignored, as
OpenAI does. Handlers build these models and never assemble response dicts by hand.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator


BIG = 2 ** 53  # limits stored numbers: far beyond any real price or count, inside a 64-bit column
# how many sequences one request may put in the decoding queue: prompts x n for /v1/completions,
# n for chat, inputs for /v1/translations (a larger job is several requests, so others get a turn)
MAX_SEQUENCES = 128
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit for /v1/embeddings


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def _lone_surrogate(value) -> Optional[str]:
    """The first lone UTF-16 surrogate in a (nested) value, written as its escape (e.g. ``\\ud800``).
    JSON allows such escapes, which decode to no character at all; no tokenizer (and no UTF-8 encoder)
    takes them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"\\u{ord(value[e.start]):04x}"
        return None
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _lone_surrogate(item)
            if found:
                return found
    if isinstance(value, dict):
        for k, item in value.items():
            found = _lone_surrogate(k) or _lone_surrogate(item)
            if found:
                return found
    if isinstance(value, BaseModel):
        return _lone_surrogate(value.__dict__)
    return None


class Request(BaseModel):
    """Base of request bodies: unknown fields are ignored, wrong types are 400s, and text that is
    not valid Unicode (a lone surrogate escape) is a 400 naming its field."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        found = _lone_surrogate(value)
        if found:
            raise ValueError(f"holds a lone surrogate escape ({found}); text must be valid Unicode")
        return value


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- errors
class ErrorInfo(Response):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(Response):
    error: ErrorInfo


# the error bodies a route may answer, for the OpenAPI document (FastAPI's ``responses=``)
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


# --------------------------------------------------------------------------- usage
class UsageInfo(Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # zenlm's addition: what this request was billed, in micro-units of the plan's currency
    cost_micros: Optional[int] = None


class EmbeddingUsage(Response):
    prompt_tokens: int = 0
    total_tokens: int = 0
    cost_micros: Optional[int] = None


# --------------------------------------------------------------------------- sampling fields
Stop = Union[str, list[str], None]


class SamplingRequest(Request):
    """The fields chat and text completions share."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stop: Stop = None
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    seed: Optional[int] = Field(None, ge=0, le=2 ** 63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: Optional[str] = None
    response_format: Optional["ResponseFormat"] = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: Stop) -> Stop:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError(f"stop takes at most 4 sequences, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class StreamOptions(Request):
    include_usage: bool = False


class JSONSchemaFormat(Request):
    """OpenAI's ``response_format.json_schema``: the schema under ``schema`` (a Python attribute
    ``schema_``, as pydantic's own ``schema`` method owns the name)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None  # the schema is enforced by constrained decoding either way


class ResponseFormat(Request):
    """``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON object) or ``{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}``: the output is constrained to match (zenlm.constraints)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object "
                             "({'name': ..., 'schema': {...}})")
        return self


# --------------------------------------------------------------------------- chat
class ContentPart(Request):
    """One part of a message's content; this server's models read only ``{"type": "text", "text": ...}``."""

    type: str
    text: Optional[str] = None


class FunctionCall(Request):
    name: str
    arguments: str = Field(description="the function's arguments as JSON text, as OpenAI sends them")


class ToolCall(Request):
    """A tool call an assistant message made earlier in the conversation, given back to the template."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    """One message of a conversation. Everything a model's chat template may read passes through to
    it: ``name``, an assistant's ``tool_calls`` (then ``content`` may be null), a tool result's
    ``tool_call_id``, content as a list of text parts."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = Field(
        None, description="a string, or a list of parts of which only text parts are accepted; null only for an "
                          "assistant message with tool_calls")
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("content is an empty list of parts")
            for i, part in enumerate(v):
                if part.type != "text":
                    raise ValueError(f"part {i} has type {part.type!r}: this model takes text only "
                                     f"(parts of type 'text')")
                if part.text is None:
                    raise ValueError(f"part {i} is a text part without 'text'")
        return v

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with tool_calls "
                             f"may leave it out)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    @property
    def text(self) -> str:
        """The content as one string: text parts are concatenated, as chat templates render them."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        """The message as a template reads it: the fields given (nulls left out), parts as dicts."""
        return self.model_dump(exclude_none=True)


class FunctionDef(Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class ToolDef(Request):
    """One tool the model may call: ``{"type": "function", "function": {"name", "description", "parameters"}}``."""

    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[ToolDef]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> "ChatCompletionRequest":
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, which is not among "
                                 f"the tools given ({', '.join(names) or 'none'})")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @model_validator(mode="after")
    def _completion_tokens(self) -> "ChatCompletionRequest":
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(Response):
    content: Optional[list[TokenLogprob]] = None


class ToolCallFunction(Response):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(Response):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ToolCallFunctionDelta(Response):
    """A streamed call's function: its name in the call's first delta, then fragments of the arguments."""
    name: Optional[str] = None
    arguments: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallDelta(Response):
    """One tool call's piece of a stream chunk, as OpenAI sends it: the first delta of a call carries
    index, id, type and the function's name (arguments ""), the later ones index and an arguments fragment."""
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[ToolCallFunctionDelta] = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


def _without_absent_tool_calls(data: dict) -> dict:
    if data.get("tool_calls") is None:
        data.pop("tool_calls", None)
    return data


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[list[ToolCallOut]] = None  # left out of the JSON when there are none

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        return _without_absent_tool_calls(handler(self))


class ChatCompletionChoice(Response):
    index: int
    message: AssistantMessage
    finish_reason: Optional[Literal["stop", "length", "tool_calls"]] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionResponse(Response):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(Response):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None  # left out of the JSON when there are none

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        return _without_absent_tool_calls(handler(self))


class ChatCompletionStreamChoice(Response):
    index: int
    delta: DeltaMessage
    finish_reason: Optional[Literal["stop", "length", "tool_calls"]] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# --------------------------------------------------------------------------- text completions
class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt is an empty list")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("prompt holds an empty list of token ids")
        if isinstance(v, list) and not all(isinstance(x, int) for x in v) and len(v) > MAX_SEQUENCES:
            raise ValueError(f"prompt holds {len(v)} prompts; a request takes at most {MAX_SEQUENCES} "
                             f"(send the rest as further requests)")
        return v

    @model_validator(mode="after")
    def _check_sequences(self) -> "CompletionRequest":
        if len(self.prompts) * self.n > MAX_SEQUENCES:
            raise ValueError(f"n={self.n} x {len(self.prompts)} prompts = {len(self.prompts) * self.n} sequences; "
                             f"a request may decode at most {MAX_SEQUENCES}")
        return self

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a list of prompts (a string or a token id list each)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class CompletionLogprobs(Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class CompletionResponse(Response):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


# --------------------------------------------------------------------------- embeddings
class EmbeddingRequest(Request):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input is an empty list")
        if isinstance(v, str) and not v:
            raise ValueError("input is an empty string")
        if isinstance(v, list) and any((isinstance(x, (str, list)) and not x) for x in v):
            raise ValueError("input holds an empty string or an empty list of token ids")
        if isinstance(v, list) and not all(isinstance(x, int) for x in v) and len(v) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input holds {len(v)} inputs; a request takes at most {MAX_EMBEDDING_INPUTS}")
        return v

    @property
    def inputs(self) -> list[Union[str, list[int]]]:
        v = self.input
        if isinstance(v, str):
            return [v]
        if all(isinstance(x, int) for x in v):
            return [list(v)]
        return list(v)


class EmbeddingData(Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# --------------------------------------------------------------------------- translations (zenlm's own)
class TranslationRequest(Request):
    model: str
    input: Union[str, list[str]]
    source_language: Optional[str] = Field(None, min_length=1, max_length=32)
    target_language: Optional[str] = Field(None, min_length=1, max_length=32)
    num_beams: int = Field(1, ge=1, le=8)
    max_tokens: Optional[int] = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _check_input(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items or any(not s for s in items):
            raise ValueError("input must be a non-empty string or a non-empty list of non-empty strings")
        if len(items) > MAX_SEQUENCES:
            raise ValueError(f"input holds {len(items)} texts; a request takes at most {MAX_SEQUENCES}")
        return v

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class TranslationData(Response):
    index: int
    text: str
    finish_reason: Optional[Literal["stop", "length"]] = None


class TranslationResponse(Response):
    id: str = Field(default_factory=lambda: random_id("trans"))
    object: Literal["translation"] = "translation"
    created: int = Field(default_factory=now)
    model: str
    data: list[TranslationData]
    usage: UsageInfo


# --------------------------------------------------------------------------- search (zenlm's own)
class SearchRequest(Request):
    model: str = Field(description="the served index's name")
    query: str = Field(min_length=1, max_length=4096)
    k: int = Field(5, ge=1, le=100)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"


class SearchHit(Response):
    index: int
    id: str
    score: float
    title: str = ""
    text: str


class SearchResponse(Response):
    object: Literal["list"] = "list"
    model: str
    data: list[SearchHit]
    usage: EmbeddingUsage


# --------------------------------------------------------------------------- models, health
class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "zenlm"
    # zenlm's additions: what the model does and how long a context it takes
    kind: Optional[str] = None
    context_length: Optional[int] = None


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(Response):
    status: Literal["ok"] = "ok"
    models: list[str]
    queue_depth: int
    running: int


# --------------------------------------------------------------------------- admin
class ModelPrice(Request):
    """Prices per million tokens in micro-units (1 currency unit = 1,000,000 micros)."""

    prompt_micros_per_million: int = Field(ge=0, le=BIG)
    completion_micros_per_million: int = Field(ge=0, le=BIG)


class PlanIn(Request):
    name: str = Field(min_length=1, max_length=64)
    prices: dict[str, ModelPrice] = Field(description="per model id; '*' applies to models not listed")
    included_tokens: int = Field(0, ge=0, le=BIG)
    monthly_budget_micros: int = Field(0, ge=0, le=BIG)
    requests_per_minute: int = Field(60, ge=1, le=2 ** 31 - 1)
    tokens_per_minute: int = Field(100_000, ge=1, le=BIG)


class PlanOut(PlanIn):
    model_config = ConfigDict(extra="forbid")


class PlanList(Response):
    object: Literal["list"] = "list"
    data: list[PlanOut]


class KeyIn(Request):
    customer: str = Field(min_length=1, max_length=128)
    plan: str = Field(min_length=1, max_length=64)
    expires_in_days: Optional[float] = Field(None, gt=0, le=36_500)


class KeyOut(Response):
    prefix: str
    customer: str
    plan: str
    created_at: int
    expires_at: Optional[int] = None
    revoked_at: Optional[int] = None


class KeyCreated(KeyOut):
    key: str = Field(description="the secret: shown here once, stored only as a hash")


class KeyList(Response):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class ReportRow(Response):
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    revenue_micros: int
    compute_cost_micros: int
    margin_micros: int


class BillingReport(Response):
    month: str
    by: str
    rows: list[ReportRow]
    total: ReportRow


SamplingRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
