"""The ``cost`` section: the prices the report's cost ledger (kdflow/reporting/ledger.py) turns tokens and device-hours
into money with. Only the report reads it — no stage is given it, so no price is part of a stage's key: editing a price
rebuilds the report and nothing else."""

from __future__ import annotations

from pydantic import Field

from kdflow.config.fields import Strict

PRICE = "a finite number ≥ 0"


class ApiPrice(Strict):
    """What the API charges per million tokens. One price for every API call a run makes: the teacher's answers, an
    API teacher's evaluation, an API judge."""

    input_per_mtok: float = Field(ge=0, description=f"price of a million prompt (input) tokens, {PRICE}")
    output_per_mtok: float = Field(ge=0, description=f"price of a million generated (output) tokens, {PRICE}")


class DevicePrice(Strict):
    """What an hour of the machine the stages run on costs: the whole machine with all its accelerators, as a cloud
    bills an instance (a stage's device-hours are its wall-clock hours on that machine)."""

    per_hour: float = Field(ge=0, description=f"price of one hour of the machine, {PRICE}")


class CostSection(Strict):
    """Prices for the report's cost ledger; each part is optional. Without prices (or without one part) the ledger
    still shows API tokens and device-hours, and money for the part that has a price."""

    currency: str = Field(
        "USD",
        min_length=1,
        max_length=8,
        pattern=r"^\S+$",
        description="what the prices are in, as the ledger writes it (USD, EUR, credits)",
    )
    api: ApiPrice | None = Field(None, description="per million API tokens, input and output")
    device: DevicePrice | None = Field(None, description="per hour of the machine the stages run on")
