"""Trainables used by the integration tests (importable by worker processes)."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import dtune


def quadratic(config):
    for step in range(config.get("steps", 3)):
        dtune.report({"loss": (config["x"] - 0.3) ** 2 + 1 / (step + 1)})


def forever(config):
    step = 0
    while True:
        step += 1
        dtune.report({"score": step})
        time.sleep(0.001)


def checkpointed(config):
    """Reports `steps` results with a checkpoint each; fails as configured on a first attempt."""
    checkpoint = dtune.get_checkpoint()
    start = checkpoint.to_dict()["i"] if checkpoint else 0
    context = dtune.get_context()
    with open(Path(context.trial_dir, "starts"), "a") as fh:
        fh.write(f"{start}\n")
    for i in range(start, config["steps"]):
        if checkpoint is None and i == config.get("fail_at"):
            if config.get("how") == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"planned failure at step {i}")
        time.sleep(config.get("sleep", 0.0))
        dtune.report({"score": i + config.get("x", 0)}, checkpoint=dtune.Checkpoint.from_dict({"i": i + 1}))


def never_reports(config):
    return None


def returns_dict(config):
    return {"score": config["x"] * 2}


def reports_nan(config):
    dtune.report({"loss": math.nan if config["x"] < 0.5 else config["x"]})


def wrong_metric(config):
    dtune.report({"loss": 1.0, "accuracy": 0.5})


def record_context(config):
    context = dtune.get_context()
    Path(context.trial_dir, "context").write_text(f"{context.trial_id} {context.config['x']}")
    dtune.report({"score": 1.0})


def timed(config):
    start = time.time()
    time.sleep(0.2)
    dtune.report({"start": start, "end": time.time()})


class Counter(dtune.Trainable):
    checkpoint_frequency = 2

    def setup(self, config):
        self.n = 0

    def step(self):
        self.n += 1
        return {"n": self.n * self.config["scale"], "done": self.n >= 5}

    def save(self, checkpoint_dir):
        Path(checkpoint_dir, "n").write_text(str(self.n))

    def restore(self, checkpoint_dir):
        self.n = int(Path(checkpoint_dir, "n").read_text())


def curve(config):
    """A learning curve, loss = (x - 0.3)^2 + 1 / (t + 1), checkpointed at every step."""
    checkpoint = dtune.get_checkpoint()
    start = checkpoint.to_dict()["t"] if checkpoint else 0
    context = dtune.get_context()
    with open(Path(context.trial_dir, "starts"), "a") as fh:
        fh.write(f"{start}\n")
    for t in range(start, config.get("max_t", 100)):
        time.sleep(config.get("sleep", 0.0))
        loss = (config["x"] - 0.3) ** 2 + 1 / (t + 1)
        dtune.report({"loss": loss}, checkpoint=dtune.Checkpoint.from_dict({"t": t + 1}))


def curve_no_checkpoint(config):
    for t in range(config.get("max_t", 100)):
        time.sleep(config.get("sleep", 0.0))
        dtune.report({"loss": (config["x"] - 0.3) ** 2 + 1 / (t + 1)})


class CurveClass(dtune.Trainable):
    """A class trainable whose progress grows by ``lr`` per step (score = progress).

    It checkpoints only when dtune saves it on a pause or stop (``checkpoint_frequency = 0``).
    """

    checkpoint_frequency = 0

    def setup(self, config):
        self.t = 0
        self.progress = 0.0

    def step(self):
        time.sleep(self.config.get("sleep", 0.0))
        self.t += 1
        self.progress += self.config["lr"]
        return {"score": self.progress, "done": self.t >= self.config.get("max_t", 20)}

    def save(self, checkpoint_dir):
        Path(checkpoint_dir, "state").write_text(f"{self.t} {self.progress}")

    def restore(self, checkpoint_dir):
        t, progress = Path(checkpoint_dir, "state").read_text().split()
        self.t, self.progress = int(t), float(progress)


def progress(config):
    """A model whose progress grows by ``lr`` per step (score = progress), checkpointed each step."""
    checkpoint = dtune.get_checkpoint()
    state = checkpoint.to_dict() if checkpoint else {"t": 0, "progress": 0.0}
    for t in range(state["t"], config.get("max_t", 12)):
        time.sleep(config.get("sleep", 0.0))
        state = {"t": t + 1, "progress": state["progress"] + config["lr"]}
        metrics = {"score": state["progress"], "lr": config["lr"]}
        dtune.report(metrics, checkpoint=dtune.Checkpoint.from_dict(state))
