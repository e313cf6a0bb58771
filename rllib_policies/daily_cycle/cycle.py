"""The daily cycle: serve → log → learn → gate → promote → monitor → roll back, once per simulated day.

The recommend app runs a live A/B split: ``control`` serves the start weights for good, ``treatment`` is what
the cycle promotes into. Both log their weights with Gaussian weight logging (σ = ``weight_std``), so every
served request is a logged bandit sample any weight policy can be evaluated on. One day:

1. traffic    the day's users (yesterday's returners first, then fresh users) through the real Serve apps
              (``traffic.run_day``); serving's telemetry writes the events (Parquet under ``storage``)
2. rows       the day's events (its wall-clock slot; corrupt or partial files skipped and counted) → request
              rows (``crm.logs.request_rows``), kept per day
3. monitor    the treatment's live traffic against what was promoted (KL) and against control (objective);
              a breach rolls the treatment arm back (``POST /experiments/arms/treatment/rollback``)
4. sessions   yesterday's sessions → trajectories, their next-day return closed by today's traffic: written
              once, when the window closes
5. learn      CRM on the last ``train_days`` days' rows (train users), contexts blanked (a ``weights`` arm
              serves one static vector); its step from live, scale-free and at most ``trust_region_kl``
              long: the candidate
6. gate       bounds, KL to live, off-policy lower bound ≥ live on the held-out users (``gate.gate``)
7. promote    a versioned hot update of the treatment arm (``PUT /experiments/arms/treatment/weights``)

A day's record (``days/day_NNN.json``) and the cycle's state (``state.json``) are written atomically after
the day: a restarted cycle resumes at the first unfinished day; the aborted day's partial traffic lies outside
every finished day's slot, so nothing is counted twice. A failed training leaves every live policy as it was.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
import traceback
from collections.abc import Callable

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray import serve
from ray.exceptions import RayError

from actors.cascade import build_world
from actors.telemetry import sessionise
from actors.telemetry.sinks import read_event_files
from actors.world import seed_sequence
from rllib_policies import storage
from rllib_policies.crm.algorithm import CRMConfig, certify
from rllib_policies.crm.logs import (
    KPIS,
    LOG_HIGH,
    LOG_LOW,
    REQUEST_SCHEMA,
    Objective,
    as_arrays,
    request_rows,
    split_by_user,
)
from rllib_policies.envs import SessionEnv
from rllib_policies.ope import LoggedBandit, LoggedDensity
from rllib_policies.ope.intervals import clustered_means

from .config import DailyCycleConfig
from .gate import gate, log_weights, monitor, scale_free, served_policy, trust_region
from .traffic import day_traffic

ARMS = ("control", "treatment")
WHO = "daily-cycle"  # the cycle's name in the arms' audit log
DRIFT = np.array([0.8, -0.8, -0.8])  # the injected live drift and the bad candidate, in σ units of log w


class ControlPlaneError(RuntimeError):
    """A non-2xx answer of the recommend app's control plane, with its status."""

    def __init__(self, status: int, message: str, loc: list | None = None):
        super().__init__(message)
        self.status, self.loc = status, loc


def import_app(path: str):
    """A Serve application builder from its import path ``module:attribute`` (as Serve config files name them)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class DailyCycle:
    """The cycle over ``config``'s storage (module docstring); ``log`` gets one progress line per step."""

    def __init__(self, config: DailyCycleConfig, log: Callable[[str], object] = print):
        self.cfg, self.log = config, log
        self.root = storage.resolve(config.storage)
        if storage.is_uri(self.root):
            raise ValueError(
                f"daily cycle storage {self.root!r}: the cycle needs a local path (the recommend app's Parquet sink "
                "writes its events there); on a multi-node cluster, an absolute path on a shared volume"
            )
        self.events_root = os.path.join(self.root, "events")
        self.world = build_world(config.env_config)[0]
        self.url = f"http://{config.http.get('host', '127.0.0.1')}:{config.http.get('port', 8000)}/cycle"
        self.sigma = float(config.weight_std)
        self.state = self._load_state()

    # ------------------------------------------------------------------ state
    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _load_state(self) -> dict:
        path = self._path("state.json")
        if storage.exists(path):  # local or a pyarrow.fs URI, as _save_state writes it
            state = storage.read_json(path)
            if state["config"]["experiment"] != self.cfg.experiment:
                raise ValueError(
                    f"{path} belongs to experiment {state['config']['experiment']!r}, not {self.cfg.experiment!r}: "
                    "use another storage location or --fresh"
                )
            return state
        return {
            "config": self.cfg.to_dict(),
            "next_day": 0,
            "slots": {},  # day → [start_us, end_us) of its traffic
            "returning": {},  # day → users coming back that day
            "next_fresh": 0,  # fresh users are a fixed permutation of all users, taken in order
            "objective_scale": None,
            "live": {"weights": list(self.cfg.start_weights), "version": None},
            "shadow": None,  # the candidate in shadow: {"weights", "day"}
            "deployed": None,  # {"fingerprint" of the apps' import paths and args, "deployed_at" per app}
        }

    def _save_state(self) -> None:
        storage.write_json(self._path("state.json"), self.state, default=float)

    # ------------------------------------------------------------------ serving
    def deploy(self) -> None:
        """Deploy the inner-reward and recommend applications (from their import paths) with the A/B split."""
        cfg = self.cfg
        http = {"host": cfg.http.get("host", "127.0.0.1"), "port": cfg.http.get("port", 8000)}
        for attempt in (1, 2):  # a proxy that misses Serve's start-up timeout on a loaded machine gets one more go
            try:
                serve.start(http_options=http, logging_config={"enable_access_log": False})
                break
            except RayError as e:
                if attempt == 2:
                    raise
                self.log(f"Serve did not start ({type(e).__name__}); trying once more")
        prefix = f"cycle_{cfg.experiment}".replace("-", "_")
        world = {k: cfg.env_config[k] for k in ("preset", "world", "pipeline") if k in cfg.env_config}
        inner = f"{prefix}_inner_reward"
        share = cfg.treatment_share
        apps = {  # name → (import path, args, route)
            inner: (cfg.apps["inner_reward"], {"weights_store": inner}, "/cycle_ir"),
            f"{prefix}_recommend": (
                cfg.apps["recommend"],
                {
                    **world,
                    "store_prefix": prefix,
                    "inner_reward_app": inner,
                    "telemetry": {"sink": "parquet", "path": self.events_root, "n_buckets": 2, "flush_interval_s": 2.0},
                    "weight_logging": {"std": self.sigma},
                    "operator": {"cycle_root": self.root},  # the page shows the cycle's days
                    "experiment": {
                        "name": cfg.experiment,
                        "arms": {
                            "control": {"share": 1 - share, "weights": list(cfg.start_weights)},
                            "treatment": {"share": share, "weights": list(cfg.start_weights)},
                        },
                    },
                },
                "/cycle",
            ),
        }
        self.apps = list(apps)
        fingerprint = hashlib.sha256(json.dumps(apps, sort_keys=True, default=str).encode()).hexdigest()[:16]
        running = serve.status().applications
        live = {n: running[n].last_deployed_time_s for n in apps if n in running and running[n].status == "RUNNING"}
        if self.state.get("deployed") == {"fingerprint": fingerprint, "deployed_at": live}:
            # a resumed cycle whose own deployment (same args, same deploy times: nobody redeployed since)
            # outlived it: serving is not interrupted
            self.log("serving: the applications this cycle deployed are still running; reused")
        else:
            for name, (path, args, route) in apps.items():  # the inner reward first: recommend looks it up
                serve.run(import_app(path)(args), name=name, route_prefix=route)
            running = serve.status().applications
            deployed_at = {n: running[n].last_deployed_time_s for n in apps}
            self.state["deployed"] = {"fingerprint": fingerprint, "deployed_at": deployed_at}
            self._save_state()
        self._restore_live()

    def undeploy(self) -> None:
        """Delete the two applications (their param stores, and so the live versions, stay)."""
        for name in getattr(self, "apps", []):
            serve.delete(name)

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One control-plane call to the recommend app; a non-2xx answer raises naming the call and its detail."""
        r = httpx.request(method, f"{self.url}{path}", json=body, timeout=60)
        if r.status_code >= 300:
            try:
                loc = r.json()["detail"][0]["loc"]
            except (ValueError, KeyError, IndexError, TypeError):
                loc = None
            raise ControlPlaneError(r.status_code, f"{method} {path} answered {r.status_code}: {r.text[:500]}", loc)
        return r.json()

    def _treatment(self) -> dict:
        return self._call("GET", "/experiments")["arms"]["treatment"]

    def _restore_live(self) -> None:
        """Serving made to match the state, whatever the cluster remembers: the treatment arm serves the state's
        live weights (a fresh cluster starts from the config's; a kept one may hold an earlier run's), and the
        shadow holds the state's candidate or none. The state takes the versions the stores answer."""
        arm, live = self._treatment(), self.state["live"]
        if np.allclose(arm["weights"], live["weights"], rtol=1e-5):
            live["version"] = arm["version"]
        else:
            put = self._put_weights(live["weights"], arm["version"], "restored the cycle's live weights")
            self.log(f"treatment arm set to the cycle's live weights {np.round(live['weights'], 3).tolist()}")
            live["version"] = put["version"]
        shadow = self.state.get("shadow")
        if shadow is not None:
            shadow["version"] = self._call("PUT", "/experiments/shadow/weights", {"weights": shadow["weights"]})[
                "version"
            ]
        elif self._call("GET", "/experiments")["shadow"]["active"]:
            self._call("DELETE", "/experiments/shadow")

    def _put_weights(self, weights, expected_version: int | None, reason: str) -> dict:
        body = {"weights": [float(w) for w in weights], "expected_version": expected_version}
        return self._call("PUT", "/experiments/arms/treatment/weights", body | {"operator": WHO, "reason": reason})

    def _rollback(self, expected_version: int, reason: str) -> dict:
        body = {"expected_version": expected_version, "operator": WHO, "reason": reason}
        return self._call("POST", "/experiments/arms/treatment/rollback", body)

    def _wait_flushed(self, timeout_s: float = 60.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            t = self._call("GET", "/telemetry")
            if t["flushed"] >= t["emitted"]:
                return
            time.sleep(0.1)
        raise TimeoutError(f"telemetry did not flush within {timeout_s:g} s")

    # ------------------------------------------------------------------ a day
    def _users(self, day: int) -> np.ndarray:
        n = self.cfg.sessions_per_day
        back = np.asarray(self.state["returning"].pop(str(day), []), np.int64)
        if len(back) > n:  # more returners than the day's sessions: the rest come back the day after
            self.state["returning"].setdefault(str(day + 1), []).extend(back[n:].tolist())
            back = back[:n]
        order = seed_sequence(self.cfg.seed, "daily-cycle-users").permutation(self.world.users.n)
        start = self.state["next_fresh"]
        self.state["next_fresh"] = start + n - len(back)
        return np.concatenate([back, order[start : start + n - len(back)]])

    def _rows(self, day: int) -> pa.Table:
        path = self._path("rows", f"day_{day:03d}.parquet")
        return pq.read_table(path) if os.path.exists(path) else REQUEST_SCHEMA.empty_table()

    def _objective(self) -> Objective:
        return Objective(self.cfg.lam, tuple(self.state["objective_scale"]))

    def run(self) -> list[dict]:
        """Every remaining day of the plan; returns their records."""
        records = []
        for day in range(self.state["next_day"], self.cfg.days):
            records.append(self.run_day(day))
        return records

    def run_day(self, day: int) -> dict:
        cfg, t_day = self.cfg, time.perf_counter()
        record: dict = {"day": day, "injected": []}
        if cfg.inject.get("drift_day") == day:  # an out-of-band change of what the treatment serves
            drifted = np.exp(log_weights(self.state["live"]["weights"]) + DRIFT * self.sigma)
            self._put_weights(drifted, None, "injected drift (a test fault)")
            record["injected"].append(f"live drift: treatment weights set to {drifted.round(3).tolist()} out of band")

        users = self._users(day)
        start_us = time.time_ns() // 1000
        traffic = day_traffic(
            self.world,
            self.url,
            users,
            seed_sequence(cfg.seed, f"daily-cycle-day-{day}"),
            cfg.http.get("concurrency", 16),
        )
        self._wait_flushed()
        end_us = time.time_ns() // 1000
        for gap, back in traffic.returning.items():
            self.state["returning"].setdefault(str(day + gap), []).extend(back)
        events, skipped = read_event_files(self.events_root, start_us, end_us)
        rows = request_rows(events)
        storage.write_parquet(rows, self._path("rows", f"day_{day:03d}.parquet"))
        if self.state["objective_scale"] is None:
            scale = Objective.fitted(cfg.lam, as_arrays(rows)).scale
            self.state["objective_scale"] = list(scale)
        record |= {
            "traffic": {
                "sessions": traffic.sessions,
                "requests": traffic.requests,
                "failed": traffic.failed,
                "wall_s": traffic.wall_s,
            },
            "skipped_files": [os.path.relpath(p, self.root) for p in skipped],
        }
        arms = self._per_arm(rows)
        record["arms"] = self._arm_kpis(arms)
        record["monitor"] = self._monitor(events, arms)
        record["shadow"] = self._evaluate_shadow(rows)
        record["trajectories"] = self._trajectories(day, events, users)
        record["candidate"] = self._learn_gate_promote(day)
        record["live"] = dict(self.state["live"])
        record["wall_s"] = time.perf_counter() - t_day
        self.state["slots"][str(day)] = [start_us, end_us]
        self.state["next_day"] = day + 1
        storage.write_json(self._path("days", f"day_{day:03d}.json"), record, default=float)
        self._save_state()
        self.log(self._line(record))
        return record

    def _per_arm(self, rows: pa.Table) -> dict[str, dict[str, np.ndarray]]:
        """The day's request rows of each arm, as arrays (an arm with fewer than 2 requests is left out)."""
        out = {}
        for arm in ARMS:
            part = rows.filter(pc.equal(rows["arm"], f"{self.cfg.experiment}/{arm}"))
            if part.num_rows >= 2:
                out[arm] = as_arrays(part)
        return out

    def _arm_kpis(self, arms: dict[str, dict[str, np.ndarray]]) -> dict:
        """Per arm: requests, users, and per request each KPI and the objective (mean and 95 % interval, by user)."""
        out = {}
        for arm, a in arms.items():
            values = np.stack([a[k] for k in KPIS] + [self._objective()(a)], axis=1)
            mean, low, high = clustered_means(values, a["user_id"])
            out[arm] = {"requests": len(values), "users": int(len(np.unique(a["user_id"])))} | {
                k: {"mean": float(m), "low": float(lo), "high": float(hi)}
                for k, m, lo, hi in zip((*KPIS, "objective"), mean, low, high)
            }
        return out

    def _monitor(self, events: pa.Table, arms: dict[str, dict[str, np.ndarray]]) -> dict:
        cfg, live = self.cfg, self.state["live"]
        treatment = f"{cfg.experiment}/treatment"
        head = events.filter(pc.and_(pc.equal(events["position"], 0), pc.equal(events["arm"], treatment)))
        served = np.stack(head["weight_mean"].to_pylist()) if head.num_rows else np.empty((0, 3))

        # the KPI comparison only once the treatment serves something else than control: an A/A difference
        # can only be a false alarm (one in a hundred days at level 0.99)
        differs = not np.allclose(live["weights"], cfg.start_weights, rtol=1e-5)

        def objective_and_users(arm: str) -> tuple[np.ndarray, np.ndarray]:
            a = arms.get(arm)
            return (self._objective()(a), a["user_id"]) if a and differs else (np.empty(0), np.empty(0))

        out = monitor(
            *objective_and_users("treatment"),
            *objective_and_users("control"),
            served,
            live["weights"],
            self.sigma,
            cfg.monitor.get("level", 0.99),
            cfg.monitor.get("kl_bound", 0.5),
        )
        if out["breach"]:
            try:
                back = self._rollback(self._treatment()["version"], "monitor: " + "; ".join(out["why"]))
            except ControlPlaneError as e:  # 409 on the path's arm: it serves its first version, nothing before it
                if e.status != 409 or e.loc != ["path", "arm"]:
                    raise
                out["rolled_back_to"] = None
                out["why"].append("nothing to roll back: the treatment serves its first version")
                return out
            live.update(weights=back["weights"], version=back["version"])
            out["rolled_back_to"] = {"version": back["version"], "weights": back["weights"]}
        return out

    def _trajectories(self, day: int, events: pa.Table, users: np.ndarray) -> dict:
        """Yesterday's sessions with their next-day return closed by today's users; written once."""
        out = {}
        if day > 0 and str(day - 1) in self.state["slots"]:
            start, end = self.state["slots"][str(day - 1)]
            yesterday, _ = read_event_files(self.events_root, start, end)
            traj = sessionise(yesterday, self.cfg.gap_s)
            returned = pc.is_in(traj["user_id"], pa.array(np.unique(users)))
            traj = traj.set_column(traj.schema.get_field_index("returned"), "returned", returned)
            storage.write_parquet(traj, self._path("trajectories", f"day_{day - 1:03d}.parquet"))
            sessions = len(set(traj["session_id"].to_pylist()))
            out = {
                "day": day - 1,
                "sessions": sessions,
                "return_rate": float(pc.mean(returned.cast(pa.float64())).as_py()),
            }
        return out

    # ------------------------------------------------------------------ learn, gate, promote
    def _learn_gate_promote(self, day: int) -> dict:
        cfg, live = self.cfg, self.state["live"]
        days = range(max(0, day - cfg.train_days + 1), day + 1)
        rows = pa.concat_tables([self._rows(d) for d in days])
        train, held_out = split_by_user(rows, (1 - cfg.validation,), cfg.seed)  # a user stays on one side
        out: dict = {"train_rows": train.num_rows, "validation_rows": held_out.num_rows, "days": list(days)}
        try:
            if cfg.inject.get("training_failure_day") == day:
                raise RuntimeError("injected training failure")
            proposal = self._train(day, train)
        except Exception as e:  # a failed nightly training leaves every live policy untouched
            out |= {
                "status": "training failed",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
            return out
        candidate = trust_region(
            live["weights"], scale_free(live["weights"], proposal), self.sigma, cfg.trust_region_kl
        )
        out["proposal"], out["candidate"] = proposal.round(4).tolist(), candidate.round(4).tolist()
        if cfg.inject.get("bad_candidate_day") == day:
            candidate = np.exp(log_weights(live["weights"]) + DRIFT * self.sigma)
            out |= {"candidate": candidate.round(4).tolist(), "injected": "a deliberately bad candidate"}
        data = self._bandit(as_arrays(held_out))
        decision = gate(
            candidate, live["weights"], data, self.sigma, cfg.gate.get("level", 0.95), cfg.gate.get("kl_bound", 1.0)
        )
        out["gate"] = decision.to_dict()
        if not decision.passed:
            out["status"] = "rejected"
            return out
        if cfg.shadow:
            put = self._call("PUT", "/experiments/shadow/weights", {"weights": candidate.tolist()})
            self.state["shadow"] = {"weights": candidate.tolist(), "day": day, "version": put["version"]}
            out["status"] = "in shadow"
            return out
        self._promote(candidate, f"day {day}: the gate passed (lower bound {decision.checks['ope'].value:+.4f})")
        out["status"] = "promoted"
        return out

    def _promote(self, candidate, reason: str) -> None:
        live = self.state["live"]
        put = self._put_weights(candidate, live["version"], reason)
        live.update(weights=[float(w) for w in candidate], version=put["version"])

    def _evaluate_shadow(self, rows: pa.Table) -> dict | None:
        """Yesterday's shadow candidate on today's requests (never trained on): the paired lower bound of
        V(candidate) − V(live) with the candidate's logged densities; promoted if it holds, dropped if not."""
        shadow = self.state.get("shadow")
        if not shadow:
            return None
        seen = rows.filter(pc.is_valid(rows["shadow_log_density"]))  # every request logged it while it was on
        self._call("DELETE", "/experiments/shadow")
        self.state["shadow"] = None
        out = {"weights": shadow["weights"], "day": shadow["day"], "requests": seen.num_rows}
        if seen.num_rows < 2:
            return out | {"status": "rejected in shadow", "why": "no request logged the candidate's density"}
        a = as_arrays(seen)
        data = self._bandit(a)
        live = served_policy(self.state["live"]["weights"], self.sigma, len(data))
        cert = certify(
            data, LoggedDensity(seen["shadow_log_density"].to_numpy()), live, self.cfg.gate.get("level", 0.95)
        )
        out |= {"difference": cert.difference, "difference_low": cert.difference_low, "why": cert.reason}
        if not cert.certified:
            return out | {"status": "rejected in shadow"}
        self._promote(shadow["weights"], f"promoted after shadow (paired lower bound {cert.difference_low:+.4f})")
        return out | {"status": "promoted after shadow"}

    def _bandit(self, a: dict) -> LoggedBandit:
        """Request rows (as arrays) as an OPE table with the cycle's fixed objective, clustered by user."""
        return LoggedBandit(
            context=a["obs"],
            action=a["action"],
            reward=self._objective()(a)[:, None],
            propensity=np.exp(a["log_propensity"]),
            clusters=a["user_id"],
        )

    def _train(self, day: int, train: pa.Table) -> np.ndarray:
        """CRM on the training rows from the live weights, contexts blanked: a ``weights`` arm serves one static
        vector, so the learner fits one (CRM's policy m_θ(x) reduces to its bias). Returns exp(m_θ)."""
        obs = train["obs"].combine_chunks()
        blank = pa.ListArray.from_arrays(obs.offsets, pa.array(np.zeros(len(obs.values), np.float32)))
        path = self._path("candidates", f"day_{day:03d}", "train", "part-0.parquet")
        storage.write_parquet(train.set_column(train.schema.get_field_index("obs"), "obs", blank), path)
        options = dict(self.cfg.crm)
        iterations, lr = int(options.pop("iterations", 10)), float(options.pop("lr", 0.05))
        config = (
            CRMConfig()
            .environment(SessionEnv, env_config={**self.cfg.env_config, "seed": self.cfg.seed})
            .crm(
                offline_requests=os.path.dirname(path),
                lam=self.cfg.lam,
                init_weights=tuple(self.state["live"]["weights"]),
                init_sigma=self.sigma,
                learn_sigma=False,
                **options,
            )
            .training(lr=lr)
            .learners(num_learners=0)
            .debugging(seed=self.cfg.seed + day, log_level="ERROR")
        )
        algo = config.build_algo()
        try:
            algo.load_rows()
            for _ in range(iterations):
                algo.train()
            mean = algo.policy(np.zeros((1, len(obs[0])), np.float32)).mean[0]
        finally:
            algo.stop()
        return np.exp(np.clip(mean, LOG_LOW, LOG_HIGH))

    # ------------------------------------------------------------------ output
    def _line(self, r: dict) -> str:
        arms = r["arms"]
        kpis = " vs ".join(
            f"{arm} {arms[arm]['objective']['mean']:.3f} [{arms[arm]['objective']['low']:.3f}, "
            f"{arms[arm]['objective']['high']:.3f}]"
            for arm in ARMS
            if arm in arms
        )
        m = r["monitor"]
        back = m.get("rolled_back_to")
        mon = (
            "ok" if not m["breach"] else f"breach ({'; '.join(m['why'])})" + (f" → v{back['version']}" if back else "")
        )
        c = r["candidate"]
        if c["status"] == "training failed":
            cand = f"training failed ({c['error']}): live policies untouched"
        else:
            why = "; ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in c["gate"]["checks"].items())
            cand = f"candidate {c['candidate']} {c['status']} ({why})"
        if r.get("shadow"):
            cand = f"shadow {r['shadow']['weights']} {r['shadow']['status']}; {cand}"
        skipped = f", {len(r['skipped_files'])} corrupt file(s) skipped" if r["skipped_files"] else ""
        injected = "".join(f" [injected: {x}]" for x in r["injected"])
        return (
            f"day {r['day']:2d} | {r['traffic']['requests']} requests{skipped} | objective/request {kpis} | "
            f"monitor {mon} | {cand} → live v{r['live']['version']} | {r['wall_s']:.0f} s{injected}"
        )
