"""Request and response bodies, with the examples /docs shows.

Types are strict (a number is not a string, `true` is not a token count) and unknown fields are refused, so a
misspelt option fails loudly instead of being ignored. Limits that depend on settings (number of texts, tokens,
max_new_tokens) are checked by limits.py, whose messages name the setting.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

RTE_INPUT = "sentence1: The cat sat on the mat. sentence2: A cat is sitting."


def _check_text(text: str, where: str) -> str:
    if not text.strip():
        raise ValueError(f"{where} is empty or only whitespace; send the text to classify")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") is valid JSON but not text
        raise ValueError(f"{where} holds an unpaired surrogate at character {exc.start}; send valid Unicode") from None
    return text


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# A structured input: field name -> value, e.g. {"premise": "...", "hypothesis": "..."}.
FieldsInput = Annotated[dict[StrictStr, StrictStr], Field(min_length=1, max_length=16)]
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _check_input(value: object, where: str) -> object:
    """A text, or an object of non-empty string fields with identifier names."""
    if isinstance(value, str):
        return _check_text(value, where)
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a string or an object of fields, not {_json_type(value)}")
    if not value:
        raise ValueError(f'{where} is an empty object; send the task\'s fields, e.g. {{"sentence": "..."}}')
    for name, text in value.items():
        if not FIELD_NAME.fullmatch(name):
            raise ValueError(f"{where} has a field named {name[:64]!r}; field names are identifiers (GET /prototypes)")
        if not isinstance(text, str):
            raise ValueError(f"{where}.{name} must be a string, not {_json_type(text)}")
        _check_text(text, f"{where}.{name}")
    return value


class FieldError(BaseModel):
    loc: list[str | int] = Field(description='where the bad value is, e.g. ["body", "inputs", 1]')
    msg: str
    type: str


class ErrorBody(BaseModel):
    """The body of every answer other than 2xx (errors.py); validation errors (422) add `errors`."""

    detail: str = Field(description="what is wrong and what to change")
    request_id: str | None = Field(description="the request id (X-Request-ID), also on the server's log lines")
    errors: list[FieldError] | None = Field(None, description="each invalid field (422 only; inputs not echoed)")


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": RTE_INPUT},
                {"inputs": ["sentence: a gripping, beautiful film", RTE_INPUT], "max_new_tokens": 8},
                {"inputs": "premise: A man plays a guitar. hypothesis: A person makes music.", "task": "mnli"},
            ]
        },
    )

    inputs: StrictStr | FieldsInput | Annotated[list[StrictStr | FieldsInput], Field(min_length=1)] = Field(
        description="one input or a list. An input is a text written the way the task's template says (GET "
        '/prototypes), or an object of the template\'s fields ({"premise": ..., "hypothesis": ...}): the server '
        "fills the template, and without `task` routes only among the tasks whose templates take exactly those "
        "fields"
    )
    task: StrictStr | None = Field(
        None, description="pin a task (skips retrieval); without it the prototype retriever picks one per input"
    )
    max_new_tokens: StrictInt | None = Field(
        None,
        description="tokens to generate per input, for tasks that generate freely (default: the model's target "
        "length, capped by the server); tasks with label words always answer with a whole label",
    )
    truncate: StrictBool = Field(
        False,
        description="cut inputs longer than the model's window (the response's `truncated` says how much) "
        "instead of answering 422",
    )
    # Benchmark switch (PHA_ALLOW_BACKBONE_ONLY): the backbone without adapters. Hidden from the public schema.
    backbone_only: SkipJsonSchema[StrictBool] = False

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_type(cls, value: object) -> object:
        """One clear message instead of pydantic's one per member of the union."""
        if isinstance(value, str | dict):
            return _check_input(value, "inputs")
        if not isinstance(value, list):
            raise ValueError(f"inputs must be a string, an object of fields or a list, not {_json_type(value)}")
        if not value:
            raise ValueError("inputs is an empty list; send at least one text")
        return [_check_input(item, f"inputs[{i}]") for i, item in enumerate(value)]

    @property
    def input_list(self) -> list[str | dict[str, str]]:
        """The inputs as a list: texts and field objects, in request order."""
        return list(self.inputs) if isinstance(self.inputs, list) else [self.inputs]


class RouteInfo(BaseModel):
    """How the answering task was chosen."""

    task: str | None = Field(
        description="the task whose adapters answered; when no task fits (`fits` false), the nearest task, or "
        "null when the input is written as no task's template"
    )
    routed: bool = Field(description="true: the retriever chose it (Eq. 10); false: the request pinned it")
    cosine: float | None = Field(None, description="cosine of the input to the task's routing key (null when pinned)")
    margin: float | None = Field(
        None, description="cosine minus the runner-up candidate's (null when pinned or the only candidate)"
    )
    candidates: int | None = Field(
        None,
        description="tasks the input was routed among: those whose templates the input is written with (a text) "
        "or takes the fields of (a structured input), plus tasks without a template (null when pinned)",
    )
    confidence: float | None = Field(
        None,
        description="calibrated probability that the routed task is the input's task, from the margin (fitted on "
        "held-out rows; null when pinned, with one candidate, or for a model without calibration)",
    )
    typicality: float | None = Field(
        None,
        description="share of the task's held-out inputs that are less typical of it than this input (a "
        "conformal p-value: about uniform for the task's own inputs), by the content check (the text against the "
        "task's training texts) where the task has a content bank, else by the route cosine; null when pinned "
        "or not fitted",
    )
    fits: bool = Field(
        True,
        description="false: no task fits the input (written as no task's template, or typicality below "
        "PHA_MIN_ROUTE_TYPICALITY); the prediction's output is then null unless PHA_NO_FIT_ACTION=flag",
    )
    reason: str | None = Field(None, description="why no task fits (null when one does)")
    low_confidence: bool = Field(
        False,
        description="the route is doubtful: cosine below PHA_MIN_ROUTE_SCORE, no task fits, or confidence < 0.5",
    )


class Truncation(BaseModel):
    """What `truncate: true` cut from an input longer than the model's window."""

    tokens: int = Field(description="tokens dropped from the end")
    characters: int = Field(description="characters dropped from the end of the (formatted) text")


class Prediction(BaseModel):
    output: str | None = Field(
        description="the answer: the most probable label word for tasks with labels (rank classification), the "
        "expected score for STS-B, generated text otherwise; null when no task fits the input (route.fits)"
    )
    # The fields below predate `route` and repeat it; kept so that v1 clients keep working.
    task: str | None = Field(description="the task whose adapters answered (null for backbone_only); = route.task")
    routed: bool = Field(description="= route.routed")
    score: float | None = Field(None, description="= route.cosine")
    margin: float | None = Field(None, description="= route.margin")
    low_confidence: bool = Field(False, description="= route.low_confidence")
    probabilities: dict[str, float] | None = Field(
        None,
        description="probability of every label of the answering task (its label sequences scored by the decoder, "
        "normalised over the labels); null when the output was generated freely",
    )
    route: RouteInfo | None = Field(None, description="how the task was chosen (null for backbone_only)")
    truncated: Truncation | None = Field(None, description="what was cut (null: the input was read whole)")

    @model_validator(mode="before")
    @classmethod
    def _aliases_from_route(cls, data: object) -> object:
        """The pre-`route` fields are filled from `route`, so the two can never disagree."""
        if not isinstance(data, dict) or data.get("route") is None:
            return data
        route = data["route"]
        r = route.model_dump() if isinstance(route, RouteInfo) else route
        aliases = {"score": r["cosine"], "margin": r["margin"], "low_confidence": r["low_confidence"]}
        return {"task": r["task"], "routed": r["routed"], **aliases, **data}


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "predictions": [
                        {
                            "output": "entailment",
                            "task": "rte",
                            "routed": True,
                            "score": 0.93,
                            "margin": 0.41,
                            "low_confidence": False,
                        }
                    ],
                    "model": "3f2a9c0d1e7b",
                }
            ]
        }
    )

    predictions: list[Prediction]
    model: str = Field(description="model version (a hash of the checkpoint's tensors)")


class PrototypeInfo(BaseModel):
    name: str
    source: Literal["trained", "adapted"]
    template: str | None = Field(description="how to write inputs; placeholders are the HF `datasets` columns")
    labels: list[str] | None = Field(description="label words of a classification task (null: free text/number)")
    created: datetime
    examples: int | None = Field(description="examples the prototype was learnt from, when known")
    version: int = Field(description="catalogue version at which this prototype was set")
    prototype_version: str = Field(description="digest of the prototype vector (part of the adapter cache key)")
    vector: list[float] | None = Field(None, description="the prototype (only with include_vector=true)")
    key: list[float] | None = Field(
        None, description="the routing key, when it differs from the prototype (only with include_vector=true)"
    )
    spread: list[float] | None = Field(
        None, description="[median, IQR] of its held-out inputs' route cosines (typicality); null: not fitted"
    )
    label_offsets: list[float] | None = Field(
        None,
        description="per label (in `labels` order), added to its log-likelihood before the probabilities: the "
        "label prior an adapted task was fitted with on its examples; null: none",
    )
    label_temperature: float = Field(
        1.0,
        description="divides the (offset) label log-likelihoods before the probabilities: fitted on held-out rows "
        "for a trained task (> 1 softens an over-confident decoder; never changes the winning label); 1: none",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "rte",
                    "source": "trained",
                    "template": "sentence1: {sentence1} sentence2: {sentence2}",
                    "labels": ["entailment", "not_entailment"],
                    "created": "2026-11-28T05:31:16Z",
                    "examples": 100,
                    "version": 1,
                    "prototype_version": "9b1e0c55d0a1f3e2",
                }
            ]
        }
    )


class PrototypeList(BaseModel):
    prototypes: list[PrototypeInfo]
    version: int = Field(description="catalogue version (changes whenever a task is added, replaced or removed)")
    total: int = Field(description="tasks in the catalogue (all pages)")
    next_offset: int | None = Field(
        None, description="`offset` of the next page; null on the last (pages follow the order tasks were added)"
    )


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    model: str | None
    model_source: str | None = Field(description="checkpoint path, 'demo', or 'untrained-default'")
    tasks: int = Field(description="prototypes in the routing index")
    can_route: bool
    redis: Literal["ok", "degraded", "disabled"]
    redis_error: str | None = None
    queued: int = Field(description="texts waiting for a batch")
    in_flight: int = Field(description="/predict requests being served")
    warmup_seconds: float | None = None
    runtime: dict[str, object] = Field(default_factory=dict, description="torch version, threads, device")
    registry_version: int | None = Field(None, description="registry version of the adapted tasks served")
    registry_error: str | None = Field(None, description="why the latest registry version is not served")


# ------------------------------------------------------------------------------------------ adaptation
CB_INPUT = "premise: It was a complex language. hypothesis: The language was peculiar."


class AdaptExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: StrictStr = Field(description="the input text, written like the task's other inputs")
    target: StrictStr = Field(description="the answer text the model should generate")

    @field_validator("input", "target")
    @classmethod
    def _text(cls, value: str, info) -> str:
        return _check_text(value, info.field_name)


class AdaptRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "task": "cb",
                    "examples": [
                        {"input": CB_INPUT, "target": "entailment"},
                        {
                            "input": "premise: He left early. hypothesis: He stayed all night.",
                            "target": "contradiction",
                        },
                    ],
                    "mode": "prototype",
                    "steps": 200,
                }
            ]
        },
    )
    task: StrictStr = Field(description="name of the new task: a-z, 0-9, '.', '_', '-' (1-64 characters)")
    examples: list[AdaptExample] = Field(min_length=1, description="the k examples (1..PHA_MAX_ADAPT_EXAMPLES)")
    mode: Literal["prototype", "adapter"] = Field(
        "prototype",
        description="prototype: train only the new task's prototype (128 floats; other tasks can never change); "
        "adapter: train a per-task copy of the generated adapters (can learn new label words)",
    )
    steps: StrictInt = Field(200, ge=1, description="optimisation steps (<= PHA_MAX_ADAPT_STEPS)")
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    replace: StrictBool = Field(False, description="overwrite an adapted task of the same name")
    heldout: list[AdaptExample] | None = Field(None, description="optional examples to score the result with")


class JobAccepted(BaseModel):
    job_id: str
    state: Literal["queued"]
    task: str


class JobStatus(BaseModel):
    job_id: str
    state: Literal["queued", "running", "succeeded", "failed"]
    task: str
    mode: str | None = None
    k: int | None = None
    steps: int | None = None
    attempts: int = 0
    progress: float = Field(0.0, description="share of the steps done")
    loss: float | None = Field(None, description="latest cross-entropy on the k examples")
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    worker: str | None = None
    error: str | None = None
    result: dict | None = Field(
        None, description="source task and score, final loss, held-out metrics, timings, registry version"
    )


class Deleted(BaseModel):
    name: str
    deleted: Literal[True] = True
    registry_version: int


class ImportRequest(BaseModel):
    """A prototype-mode task made elsewhere: exported from another deployment of the same model
    (GET /prototypes/{name}?include_vector=true), or written by `pha adapt` / `pha train` offline."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "vector": [0.12, -0.3, 0.05],
                    "key": None,
                    "labels": ["entailment", "contradiction", "neutral"],
                    "template": "premise: {premise} hypothesis: {hypothesis}",
                    "model": "3f2a9c0d1e7b",
                }
            ]
        },
    )
    vector: list[float] = Field(min_length=1, description="the prototype the hypernetwork reads (proto_dim floats)")
    key: list[float] | None = Field(None, description="the routing key in z space (default: the prototype)")
    labels: list[StrictStr] | None = Field(None, description="label words (null: the task generates freely)")
    template: StrictStr | None = Field(None, description="how inputs are written; placeholders are field names")
    model: StrictStr | None = Field(
        None, description="model version the prototype was made for (GET /readyz); refused (409) when different"
    )
    examples: StrictInt | None = Field(None, ge=0, description="examples it was learnt from, when known")
    spread: list[FiniteFloat] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[median, interquartile range > 0] of its held-out inputs' cosines to the key, for "
        "typicality (route.typicality); null: its routes are never turned away as fitting no task",
    )
    label_offsets: list[FiniteFloat] | None = Field(
        None, description="one per label: its log-likelihood offset, as GET /prototypes/{name} exports it"
    )
    label_temperature: FiniteFloat = Field(
        1.0,
        ge=0.01,  # the bounds pha_core.scoring.TEMPERATURE_BOUNDS serves
        le=100.0,
        description="divides the label log-likelihoods before the probabilities, as GET /prototypes/{name} "
        "exports it (0.01-100; 1: none); needs labels",
    )
    replace: StrictBool = Field(False, description="overwrite an adapted task of the same name")

    @model_validator(mode="after")
    def _offsets_match_labels(self) -> ImportRequest:
        if self.label_offsets is not None and len(self.label_offsets) != len(self.labels or []):
            raise ValueError(
                f"label_offsets has {len(self.label_offsets)} numbers for {len(self.labels or [])} labels: "
                "give one per label, in the order of labels"
            )
        if self.label_temperature != 1.0 and not self.labels:
            raise ValueError("label_temperature needs labels: give the label words, or leave it at 1")
        return self

    @field_validator("spread")
    @classmethod
    def _positive_scale(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and value[1] <= 0:
            raise ValueError("spread is [median, interquartile range]: the range must be > 0")
        return value
