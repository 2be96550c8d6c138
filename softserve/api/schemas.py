"""Pydantic request/response models for the OpenAI-compatible API (plus vLLM-style extensions)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 256
MAX_LOGPROBS = 20
# Hard caps of the schema, checked before the union of prompt shapes is validated item by item (which
# costs seconds and hundreds of MB on a body of a million tiny lists). --max-choices-per-request and
# --max-request-tokens are the tighter, configurable limits applied next.
MAX_PROMPTS = 2048
MAX_PROMPT_TOKEN_IDS = 131072
MAX_MESSAGES = 4096


def _valid_unicode(value: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"): valid JSON, not valid text; the tokenizer would fail."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (a lone surrogate)") from None
    return value


def _texts_valid(value):
    if isinstance(value, str):
        _valid_unicode(value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                _valid_unicode(item)
    return value
MAX_GRAMMAR_CHARS = 100_000


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# OpenAI / vLLM request fields we do not implement. A request may still send one at its neutral value
# (what clients send when the feature is off: frequency_penalty=0, tools=[], ...); any other value is
# a 400 naming the field, and a field nobody defines is a 400 too (as OpenAI answers), never silence.
NEUTRAL_VALUES: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "length_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "functions": (None, []),
    "function_call": (None, "none"),
    "include_stop_str_in_output": (None, False),
    "spaces_between_special_tokens": (None, True),
    "guided_decoding_backend": (None, "guidance", "llguidance"),
    "guided_whitespace_pattern": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "truncate_prompt_tokens": (None,),
    "add_special_tokens": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None,),
    # Message fields (tool use is not supported).
    "tool_calls": (None, []),
    "tool_call_id": (None,),
    "refusal": (None,),
}


class _Strict(BaseModel):
    """Keeps unknown fields so `unsupported_field` can name them instead of dropping them."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def unsupported_field(self, prefix: str = "") -> tuple[str, str] | None:
        """(param, message) for the first field we would otherwise ignore (nested models too), or None."""
        for name, value in (self.model_extra or {}).items():
            param = f"{prefix}{name}"
            if name not in NEUTRAL_VALUES:
                return param, f"unrecognized request argument: {param}"
            if not any(type(value) is type(v) and value == v for v in NEUTRAL_VALUES[name]):
                return param, f"{param} is not supported by this server"
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                if isinstance(item, _Strict):
                    found = item.unsupported_field(f"{prefix}{name}." if i is None else f"{prefix}{name}.{i}.")
                    if found:
                        return found
        return None


class StreamOptions(_Lenient):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's newer `structured_outputs` object; exactly one constraint may be set."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingFields(_Strict):
    model: str = Field(..., min_length=1, max_length=200)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=100_000)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    user: str | None = Field(None, max_length=256)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    skip_special_tokens: bool = True
    # Structured output: OpenAI's response_format, or one of vLLM's guided_* / structured_outputs.
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=1000)
    guided_grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        if value is None:
            return value
        _texts_valid(value)
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop sequences are limited to {MAX_STOP_LENGTH} characters")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0: score the prompt only (with echo / prompt_logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM

    @field_validator("prompt", mode="before")
    @classmethod
    def _cap_prompt_lists(cls, value):
        if isinstance(value, list) and value:
            token_ids = isinstance(value[0], int)
            cap = MAX_PROMPT_TOKEN_IDS if token_ids else MAX_PROMPTS
            if len(value) > cap:
                what = "token ids in one prompt" if token_ids else "prompts in one request"
                raise ValueError(f"at most {cap} {what}, got {len(value)}")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value):
        return _texts_valid(value)


class ChatContentPart(_Lenient):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _valid_unicode(value)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None

    @field_validator("content", "name")
    @classmethod
    def _text_valid(cls, value):
        return _valid_unicode(value) if isinstance(value, str) else value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)

    @field_validator("messages", mode="before")
    @classmethod
    def _cap_messages(cls, value):
        if isinstance(value, list) and len(value) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} messages, got {len(value)}")
        return value
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# ---- responses ------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    virtual_tokens: int = Field(0, description="soft-prompt tokens; not included in prompt_tokens")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None  # 1 = most likely; None when the token is outside the requested top-N
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM: per prompt token, {token_id: logprob} for the token itself and the top-N; None for the first.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "softserve"
    root: str | None = None
    parent: str | None = None
    num_virtual_tokens: int = 0
    kind: str | None = None  # soft prompts: "prompt_tuning" or "prefix_tuning"; None for the base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_none=False)


# ---- prompt store (/v1/prompts): here, not in api/prompts.py, so softserve.client can use them without fastapi
class PromptInfo(BaseModel):
    object: Literal["prompt"] = "prompt"
    id: str  # what to pass as `model`: "name" or "public/name"
    name: str
    public: bool
    version: str
    ref: str  # "name@version" (prefixed with "public/" for public prompts): pins this version
    sha256: str
    num_virtual_tokens: int
    token_dim: int
    dtype: str
    peft_type: str
    kind: str  # "prompt_tuning" (PROMPT_TUNING, P_TUNING) or "prefix_tuning" (PREFIX_TUNING)
    created_at: int
    description: str | None = None
    parts: list[str] | None = None  # a composition ("a+b"): its parts' pinned refs, in order


class PromptUploadResponse(PromptInfo):
    warnings: list[str] = []


class PromptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PromptInfo]
    has_more: bool = False  # more prompts after last_id: ask again with ?after=<last_id>
    first_id: str | None = None
    last_id: str | None = None


class PromptVersionList(BaseModel):
    object: Literal["list"] = "list"
    id: str
    data: list[PromptInfo]  # latest first


class PromptDeleted(BaseModel):
    object: Literal["prompt.deleted"] = "prompt.deleted"
    id: str
    deleted: bool = True


# ---- prompt releases (softserve/api/releases.py; docs/releases.md) --------------------------------
class _Body(BaseModel):
    """Management bodies refuse unknown fields (a typo must not pass as a default)."""

    model_config = ConfigDict(extra="forbid")


class SplitArmBody(_Body):
    version: str = Field(..., min_length=1, max_length=64)
    weight: float = Field(..., ge=0)


class AliasBody(_Body):
    """Either `version` (the alias points at it) or `split` (weighted versions, 1 to 8)."""

    version: str | None = Field(None, min_length=1, max_length=64)
    split: list[SplitArmBody] | None = None


class SplitArmInfo(BaseModel):
    version: str
    weight: float


class AliasChangeInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    seq: int
    at: float
    by: str | None
    from_: list[SplitArmInfo] | None = Field(None, alias="from")  # None: created
    to: list[SplitArmInfo] | None = None  # None: deleted


class AliasInfo(BaseModel):
    object: Literal["prompt.alias"] = "prompt.alias"
    id: str  # what to pass as `model`: "name@prod"
    name: str
    alias: str
    split: list[SplitArmInfo]  # one arm with weight 1 for a plain pointer
    updated_at: int
    updated_by: str | None
    history: list[AliasChangeInfo] | None = None  # GET of one alias: every change, oldest first


class AliasList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AliasInfo]


class AliasDeleted(BaseModel):
    object: Literal["prompt.alias.deleted"] = "prompt.alias.deleted"
    id: str
    deleted: bool = True


class FeedbackBody(_Body):
    id: str = Field(..., min_length=1, max_length=200)  # a completion id (cmpl-..., chatcmpl-...)
    score: float


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: str
    score: float
    served: list[str]  # pinned refs ("name@version") the score was attributed to
