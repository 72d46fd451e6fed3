"""Model cards from typed facts: ``ModelCardData`` + ``EvalResult`` metadata, Jinja body.

The facts about a model (config, recipe, hardware, accuracy) are collected into ``CardFacts``
by whoever knows them (``ascl push``); this module only renders them, through
``ModelCard.from_template`` and the template ``card_template.md`` beside it. Accuracies go
into the card's ``model-index`` metadata as well as into its table.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

KNN = "kNN"
LINEAR = "linear probe"
TEMPLATE = "card_template.md"  # beside this file


@dataclass(frozen=True)
class Metric:
    """One accuracy measured on frozen embeddings.

    ``value`` is a percentage; ``split`` says exactly which images it was measured on.
    """

    protocol: str  # KNN | LINEAR
    name: str  # e.g. "kNN top-1 (k=200, t=0.1)"
    value: float
    dataset: str  # pretty name, e.g. "CIFAR-10"
    dataset_type: str  # hub dataset id or "imagefolder"
    split: str
    source: str  # who measured it: "measured by ascl push" | "recorded in the run's metrics.csv"

    def eval_result(self) -> EvalResult:
        return EvalResult(
            task_type="image-classification",
            task_name=f"{self.protocol} on frozen embeddings",
            dataset_type=self.dataset_type,
            dataset_name=self.dataset,
            dataset_split=self.split,
            metric_type="accuracy",
            metric_name=self.name,
            metric_value=round(float(self.value), 2),
        )


@dataclass
class CardFacts:
    """Everything a card states about one model; unknown facts stay None and say so."""

    model_name: str
    encoder_config: dict[str, Any]
    embedding_dim: int
    repo_id: str | None = None
    summary: str = "A self-supervised image encoder for retrieval and transfer."
    training_data: str | None = None
    datasets: list[str] = field(default_factory=list)  # hub dataset ids, for the metadata
    training_config: dict[str, Any] | None = None
    hardware: str | None = None
    wall_time_s: float | None = None
    metrics: list[Metric] = field(default_factory=list)
    curve_png: str | None = None  # file name next to README.md
    projection_png: str | None = None
    projection_method: str = "PCA"
    commands: list[str] = field(default_factory=list)  # how it was made, in order

    @classmethod
    def minimal(cls, encoder: Any) -> CardFacts:
        """Facts known from the encoder alone (used by a bare ``save_pretrained``)."""
        return cls(
            model_name=f"ascl-{encoder.arch}",
            encoder_config=dict(encoder.config()),
            embedding_dim=int(encoder.embedding_dim),
        )

    @property
    def load_name(self) -> str:
        """The shortest name that loads it: the registered name when registered, else the repo id."""
        from ascl.registry import lookup

        entry = lookup(self.model_name)
        if entry is not None and entry.repo_id == (self.repo_id or entry.repo_id):
            return entry.name
        return self.repo_id or self.model_name

    @property
    def training_yaml(self) -> str | None:
        if not self.training_config:
            return None
        return yaml.safe_dump(self.training_config, sort_keys=False, default_flow_style=False)

    @property
    def wall_time(self) -> str | None:
        if self.wall_time_s is None:
            return None
        return f"{_dt.timedelta(seconds=round(self.wall_time_s))} (h:mm:ss, {self.wall_time_s:.0f} s)"


def card_data_for(facts: CardFacts, base: ModelCardData) -> ModelCardData:
    """The class-level metadata (library, tags, license) plus this model's name, data and results."""
    data = ModelCardData(**base.to_dict())
    data.model_name = facts.model_name
    if facts.datasets:
        data.datasets = list(facts.datasets)
    if facts.metrics:
        data.eval_results = [m.eval_result() for m in facts.metrics]
    return data


def render_card(
    facts: CardFacts,
    *,
    card_data: ModelCardData,
    template: str,
    repo_url: str | None,
    paper_url: str | None,
) -> ModelCard:
    """Render the card for ``facts`` with ``template`` (Jinja) over the given class metadata."""
    data = card_data_for(facts, card_data)
    return ModelCard.from_template(
        data,
        template_str=template,
        facts=facts,
        repo_url=repo_url or "",
        paper_url=paper_url or "https://arxiv.org/abs/2207.11163",
    )


def card_template() -> str:
    """The Jinja model-card template shipped in ``ascl.model_cards``."""
    return resources.files("ascl.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")


def encoder_card(encoder: Any, facts: CardFacts | None = None) -> ModelCard:
    """The project's card for ``encoder``: ``facts`` (``CardFacts.minimal`` when None) rendered with
    ``card_template()`` over the class-level hub metadata of its class (library, tags, license,
    links: the ``PyTorchModelHubMixin`` keywords of ``ascl.encoder.Encoder``).
    """
    from ascl.encoder import PAPER_URL, REPO_URL

    info = getattr(type(encoder), "_hub_mixin_info", None)
    return render_card(
        facts if facts is not None else CardFacts.minimal(encoder),
        card_data=info.model_card_data if info is not None else ModelCardData(),
        template=card_template(),
        repo_url=getattr(info, "repo_url", None) or REPO_URL,
        paper_url=getattr(info, "paper_url", None) or PAPER_URL,
    )
