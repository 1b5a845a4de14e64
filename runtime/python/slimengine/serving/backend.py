"""The Triton Python-backend models of a `slimengine triton-repo` repository (docs/serving.md).

Each generated model.py subclasses one of these classes and sets `pb_utils` (Triton's triton_python_backend_utils,
which exists only inside the backend's stub process). One model instance is one stub process holding one engine and
one session: Triton's instance count is the number of sessions per engine.

Batching: Triton's dynamic batcher hands `execute` several requests at once. Requests that fit together (same shapes
and settings) run as one runtime call on their rows concatenated, and each gets its own rows back; the runtime's rows
are independent, so a request's result is bit for bit what a direct call with that request alone returns (tested).
A bad request is answered with an error carrying the runtime's (or binding's) message; when a combined call fails,
its requests are run one by one, so only the bad one fails, and the model keeps serving.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import numpy as np

from ..runtime import MemoryBank, SlimError, open_engine
from ..xslim_policy import excerpt
from .server import RESTARTS_ENV


class RequestError(ValueError):
    """A request's own inputs are wrong (before any runtime call)."""


class _Model:
    pb_utils = None  # set by the generated model.py
    kind = ""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        device = params.get("device", "cpu")
        if device == "cuda":  # KIND_GPU: Triton places each instance on a device
            device = f"cuda:{int(args.get('model_instance_device_id') or 0)}"
        self.engine = open_engine(params["engine_path"], intra_op_threads=int(params.get("intra_op_threads", "0")), device=device)
        family = self.engine.manifest.get("family")
        expected = "sd3" if self.kind == "sd3" else "lemur"
        if family != expected:
            raise SlimError("SLIM_ERR_INVALID_ARGUMENT", f"{params['engine_path']}: family {family!r}, model {self.name} serves {expected} bundles")
        self.session = self.engine.session()
        self.params = params
        # Triton counts a request answered with an error response as a success (nv_inference_request_success): the
        # Python backend reports per-request errors that way. This counter tells them apart.
        self.failure_family = self.pb_utils.MetricFamily(name="slimengine_request_failure", kind=self.pb_utils.MetricFamily.COUNTER,
                                            description="requests answered with an error by a slimengine model (bad input, runtime error)")
        self.failures = self.failure_family.Metric(labels={"model": self.name, "version": str(args.get("model_version", ""))})
        # Restarts of a crashed tritonserver by `slimengine serve` before this one started (0 when run otherwise):
        # on Triton's metrics endpoint, which is where a deployment already scrapes and alerts.
        self.restart_family = self.pb_utils.MetricFamily(name="slimengine_server_restarts", kind=self.pb_utils.MetricFamily.GAUGE,
                                                         description="times slimengine serve restarted a crashed tritonserver")
        self.restarts = self.restart_family.Metric(labels={})
        self.restarts.set(int(os.environ.get(RESTARTS_ENV) or 0))

    def finalize(self) -> None:
        del self.failures, self.restarts  # before their families (Triton's rule)
        self.session.close()
        self.engine.close()

    # -- request helpers --

    def _input(self, request, name: str) -> np.ndarray | None:
        tensor = self.pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _scalar(self, request, name: str):
        """An optional per-request setting sent as a [rows, 1] input: one value for the whole request."""
        value = self._input(request, name)
        if value is None:
            return None
        flat = value.reshape(-1)
        # Compared with the first row itself (np.full_like would turn b"none\x00" into b"none": numpy's bytes scalars
        # drop trailing NULs). equal_nan: a NaN setting reaches the runtime, whose message says what a valid value is.
        if flat.size == 0 or not np.array_equal(flat, np.repeat(flat[:1], flat.size), equal_nan=flat.dtype.kind == "f"):
            raise RequestError(f"{name}: one value per request (every row the same), got {excerpt(str(flat.tolist()))}")
        item = flat[0]
        if isinstance(item, bytes):
            # A NUL would end the text where the runtime reads it (a C string): "none\0..." must not pass as "none"
            nul = item.find(b"\0")
            if nul >= 0:
                raise RequestError(f"{name}: a NUL byte at offset {nul} (text holds no NULs), got {excerpt(repr(item))}")
            try:
                return item.decode()
            except UnicodeDecodeError:
                raise RequestError(f"{name}: not UTF-8 text ({item[:40]!r})") from None
        return item.item()

    # The runtime's statuses that mean the request's own inputs are wrong: answered as the client's error (HTTP 400,
    # gRPC INVALID_ARGUMENT), so that clients and load balancers do not retry them as server failures (500, INTERNAL).
    REQUEST_STATUSES = {"SLIM_ERR_INVALID_ARGUMENT", "SLIM_ERR_SHAPE", "SLIM_ERR_DTYPE", "SLIM_ERR_NUMERICS", "SLIM_ERR_NOT_FOUND"}

    def _error(self, message: str, error: Exception | None = None):
        self.failures.increment(1)
        request_error = not isinstance(error, SlimError) or error.status in self.REQUEST_STATUSES
        code = getattr(self.pb_utils.TritonError, "INVALID_ARG", None) if request_error else None  # no codes before Triton 23.x
        error = self.pb_utils.TritonError(message) if code is None else self.pb_utils.TritonError(message, code)
        return self.pb_utils.InferenceResponse(output_tensors=[], error=error)

    def _response(self, name: str, value: np.ndarray):
        return self.pb_utils.InferenceResponse(output_tensors=[self.pb_utils.Tensor(name, np.ascontiguousarray(value))])

    def execute(self, requests):
        """Parse every request, group those that can share a runtime call, run each group (one by one on failure)."""
        responses: list = [None] * len(requests)
        groups = defaultdict(list)
        for i, request in enumerate(requests):
            try:
                parsed = self.parse(request)
            except (RequestError, ValueError, TypeError, SlimError) as e:
                responses[i] = self._error(f"{self.name}: {e}", e)
                continue
            groups[self.group_key(parsed)].append((i, parsed))
        self.before_batch()
        for key, members in groups.items():
            if key is not None and len(members) > 1:
                try:
                    outputs = self.run([p for _, p in members])
                except (ValueError, TypeError, SlimError):
                    outputs = None  # one of them is bad: run them one by one below, so only it fails
                if outputs is not None:
                    for (i, _), out in zip(members, outputs):
                        responses[i] = self._response(self.output_name, out)
                    continue
            for i, parsed in members:
                try:
                    responses[i] = self._response(self.output_name, self.run([parsed])[0])
                except (ValueError, TypeError, SlimError) as e:
                    responses[i] = self._error(f"{self.name}: {e}", e)
        return responses

    def before_batch(self) -> None:
        pass


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _split(array: np.ndarray, rows: list[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(rows)[:-1]) if len(rows) > 1 else [array]


class SD3Model(_Model):
    """Conditioning embeddings -> latents (Session.generate). Requests batch together (one call, one CFG batch) when they
    have the same shapes and settings and no adaptive X-Slim policy applies (its reuse decisions look at the whole
    batch, so combined requests would change each other's results); each request keeps its own seed."""

    kind = "sd3"
    output_name = "latents"
    SETTINGS = ("guidance_scale", "num_steps", "shift", "height", "width", "xslim_threshold", "xslim")

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.bundle_xslim = self.engine.info.xslim != "none"  # the bundle has a default X-Slim policy

    def parse(self, request) -> dict:
        p = {name: self._input(request, name) for name in ("prompt_embeds", "pooled_embeds", "negative_prompt_embeds",
                                                           "negative_pooled_embeds", "initial_latents")}
        p["seed"] = self._scalar(request, "seed") or 0
        p.update({name: self._scalar(request, name) for name in self.SETTINGS})
        xslim = p["xslim"]
        if xslim is not None and "schedule=" in xslim:
            raise RequestError("xslim: a schedule file is read on the server, so a request cannot name one; put the schedule in "
                               "the bundle (export-engine --xslim xslim:schedule=...) and leave `xslim` out")
        p["rows"] = p["prompt_embeds"].shape[0]
        for name in ("pooled_embeds", "negative_prompt_embeds", "negative_pooled_embeds", "initial_latents"):
            if p[name] is not None and p[name].shape[0] != p["rows"]:
                raise RequestError(f"{name}: {p[name].shape[0]} rows, prompt_embeds has {p['rows']}")
        return p

    def _adaptive(self, p: dict) -> bool:
        """True when an online X-Slim policy (decisions over the whole batch) applies to this request."""
        if p["xslim"] is not None:
            return p["xslim"] != "none"
        if p["xslim_threshold"] is not None:
            return p["xslim_threshold"] > 0
        return self.bundle_xslim

    def group_key(self, p: dict):
        if self._adaptive(p):
            return None
        shapes = tuple(None if p[n] is None else p[n].shape[1:] for n in ("prompt_embeds", "negative_prompt_embeds", "initial_latents"))
        return shapes + tuple(p[name] for name in self.SETTINGS)

    def _kwargs(self, p: dict) -> dict:
        kwargs = {name: p[name] for name in self.SETTINGS if p[name] is not None}
        return kwargs

    def run(self, members: list[dict]) -> list[np.ndarray]:
        if len(members) == 1:
            p = members[0]
            result = self.session.generate(p["prompt_embeds"], p["pooled_embeds"], seed=p["seed"], latents=p["initial_latents"],
                                           negative_prompt_embeds=p["negative_prompt_embeds"],
                                           negative_pooled_embeds=p["negative_pooled_embeds"], **self._kwargs(p))
            return [result.latents]
        # Several requests in one call (the group shares whether initial latents are given): each row's noise is
        # drawn from its own seed, as the request's own call draws it (row r of a request: its seed + r).
        first = members[0]

        def cat(name):
            return None if first[name] is None else np.concatenate([p[name] for p in members])

        noise = {"latents": cat("initial_latents")} if first["initial_latents"] is not None else \
            {"seed": [(p["seed"] + r) % 2**64 for p in members for r in range(p["rows"])]}  # wraps as the runtime does
        result = self.session.generate(cat("prompt_embeds"), cat("pooled_embeds"), **noise,
                                       negative_prompt_embeds=cat("negative_prompt_embeds"),
                                       negative_pooled_embeds=cat("negative_pooled_embeds"), **self._kwargs(first))
        return _split(result.latents, [p["rows"] for p in members])


class LemurEmbedModel(_Model):
    """Document embeddings (Session.embed). Requests of the same text length and frame count run as one batch. This model
    never writes the memory bank: the bank has one writer, outside the server (docs/serving.md)."""

    kind = "lemur_embed"
    output_name = "embedding"

    def parse(self, request) -> dict:
        p = {name: self._input(request, name) for name in ("text_ids", "segment_ids", "frames")}
        p["rows"] = p["text_ids"].shape[0]
        for name in ("segment_ids", "frames"):
            if p[name] is not None and p[name].shape[0] != p["rows"]:
                raise RequestError(f"{name}: {p[name].shape[0]} rows, text_ids has {p['rows']}")
        return p

    def group_key(self, p: dict):
        return p["text_ids"].shape[1:], p["frames"].shape[1:], p["segment_ids"] is None

    def run(self, members: list[dict]) -> list[np.ndarray]:
        def cat(name):
            return None if members[0][name] is None else np.concatenate([p[name] for p in members])

        result = self.session.embed(cat("text_ids"), cat("frames"), segment_ids=cat("segment_ids"))
        return _split(result.embeddings, [p["rows"] for p in members])


class LemurScoreModel(_Model):
    """Click probabilities (Session.score) over histories assembled from the memory bank, opened read-only (any number
    of replicas); each execution first picks up what the bank's writer appended (MemoryBank.refresh), or, when the path
    now names another file (a new copy published by rename), opens that one instead."""

    kind = "lemur_score"
    output_name = "score"

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.bank_path = self.params["bank_path"]
        self.bank, self.bank_id = self._open_bank()
        self.refused_id = None  # the replacement file that failed to open (warned about once)

    def _open_bank(self) -> tuple[MemoryBank, tuple[int, int]]:
        """The bank at bank_path and the (st_dev, st_ino) of the file opened: stat before and after the open agree, so
        a rename in between cannot pair one file's identity with the other's contents."""
        while True:
            before = _file_id(self.bank_path)
            bank = MemoryBank(self.bank_path, read_only=True, create=False)
            if _file_id(self.bank_path) == before:
                return bank, before
            bank.close()

    def finalize(self) -> None:
        self.bank.close()
        super().finalize()

    def before_batch(self) -> None:
        try:
            current = _file_id(self.bank_path)
        except OSError:
            current = None  # deleted: keep serving the file we have open (its handle keeps it)
        if current is not None and current != self.bank_id and current != self.refused_id:
            try:
                bank, bank_id = self._open_bank()
            except (OSError, SlimError) as e:  # not a bank (yet): keep the old one rather than fail every request
                self.refused_id = current
                self._log(f"{self.name}: {self.bank_path} was replaced, but the new file does not open as a memory bank "
                          f"({e}); still serving the previous file")
            else:
                # execute() runs one batch at a time per instance: nothing reads the old bank any more
                old, self.bank, self.bank_id, self.refused_id = self.bank, bank, bank_id, None
                old.close()
                self._log(f"{self.name}: {self.bank_path} was replaced; now serving the new file", warning=False)
                return  # just opened: nothing to refresh
        self.bank.refresh()

    def _log(self, message: str, warning: bool = True) -> None:
        logger = getattr(self.pb_utils, "Logger", None)  # Triton's log (22.x+); stderr reaches it too otherwise
        if logger is not None:
            (logger.log_warn if warning else logger.log_info)(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def parse(self, request) -> dict:
        p = {name: self._input(request, name) for name in ("history_ids", "query_ids")}
        p["skip_missing"] = bool(self._scalar(request, "skip_missing") or False)
        p["min_model_version"] = int(self._scalar(request, "min_model_version") or 0)
        p["rows"] = p["history_ids"].shape[0]
        return p

    def group_key(self, p: dict):
        return p["history_ids"].shape[1:], p["query_ids"].shape[1:], p["skip_missing"], p["min_model_version"]

    def run(self, members: list[dict]) -> list[np.ndarray]:
        first = members[0]
        result = self.session.score(self.bank, np.concatenate([p["history_ids"] for p in members]),
                                    np.concatenate([p["query_ids"] for p in members]), skip_missing=first["skip_missing"],
                                    min_model_version=first["min_model_version"])
        return [s.reshape(-1, 1) for s in _split(result.scores, [p["rows"] for p in members])]
