"""FastAPI: ``POST /orders`` validates its JSON body into the ``Order`` model (Pydantic)
and returns it (serialized through ``response_model``). ``GET /`` answers the example
order (the harness's readiness probe)."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from frameworks_apps import ORDER


class Item(BaseModel):
    sku: str
    name: str
    quantity: int
    price: float
    tags: list[str] = []


class Order(BaseModel):
    id: int
    customer: str
    email: str
    items: list[Item]
    express: bool = False
    note: str | None = None


app = FastAPI()
EXAMPLE = Order.model_validate(ORDER)


@app.get("/")
async def example() -> Order:
    return EXAMPLE


@app.post("/orders")
async def create_order(order: Order) -> Order:
    return order
