"""Control for the HTTP benchmark: the same handler work (pydantic parse, pack, Rust kernel,
JSON response) in plain uvicorn + FastAPI, with no Ray in the path."""

import numpy as np
from fastapi import FastAPI

import rust_ext
from serve_apps.errors import ServerTiming
from serve_apps.inner_reward import RewardRequest, RewardResponse, pack_slates

app = FastAPI()
app.add_middleware(ServerTiming)
WEIGHTS = rust_ext.RewardWeights()


@app.post("/reward", response_model=RewardResponse)
async def reward(body: RewardRequest) -> RewardResponse:
    slates = body.slates if body.slates is not None else [body.slate]
    offsets, *cols = pack_slates(slates)
    rewards, totals = rust_ext.inner_reward_slates(offsets, *cols, WEIGHTS)
    rewards = np.round(rewards.astype(np.float64), 6)
    per_slate = [r.tolist() for r in np.split(rewards, offsets[1:-1])] if len(slates) > 1 else [rewards.tolist()]
    return RewardResponse(rewards=per_slate, totals=np.round(totals.astype(np.float64), 6).tolist(), weights_version=1)


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}
