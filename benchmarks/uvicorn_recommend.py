"""Control for the /recommend benchmark: the fused handler's work without Ray — validation, the cascade in
process, the signed served record and the response — in plain uvicorn + FastAPI (no parameter stores,
telemetry or policies)."""

import time
import uuid

import numpy as np
from fastapi import FastAPI

from actors.cascade import Pipeline
from actors.stages import RequestBatch
from actors.world import World, WorldConfig
from serve_apps.errors import ServerTiming
from serve_apps.recommend import RecommendRequest, RecommendResponse
from serve_apps.served_record import ServedRecordCodec

WORLD = {"n_items": 20000, "n_users": 10000, "seed": 0}  # as serve_apps/configs/recommend.yaml

app = FastAPI()
app.add_middleware(ServerTiming)
pipeline = Pipeline(World(WorldConfig.preset("default", **WORLD)))
codec = ServedRecordCodec.from_config(None)


@app.post("/recommend", response_model=RecommendResponse)
async def recommend(body: RecommendRequest) -> RecommendResponse:
    history = np.full((1, 20), -1, np.int64)
    if body.history:
        history[0, -min(20, len(body.history)) :] = body.history[-20:]
    uid = uuid.uuid4().int & ((1 << 62) - 1)
    req = RequestBatch(np.array([body.user_id]), history, np.array([body.step], np.int32), request_id=uid)
    rec = pipeline.recommend(req)
    request_id = f"{uid:016x}"
    served = {"uid": uid, "user_id": body.user_id, "ts_us": time.time_ns() // 1000, "items": rec.slate[0]}
    return RecommendResponse(
        request_id=request_id,
        user_id=body.user_id,
        slate=rec.slate[0].tolist(),
        scores=rec.scores[0].round(6).tolist(),
        predictions={k: v[0].round(6).tolist() for k, v in rec.predictions.items()},
        versions={"matching": 1, "pre_ranking": 1, "ranking": 1},
        served_record=codec.seal(request_id, served),
        ranking_policy={"name": "held", "version": 1},
    )


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}
