"""Run lifecycle on a configurable clock (§4.2):

    not-started -> queued -> started -> running (one step per node: progress, "Executing <class>") -> success

with the failure branches `failed`, `timeout` (chosen by the `next_run_outcomes` fault), a `stuck` run that
stays `running` until cancelled, and `cancelled` (POST cancel). Terminal statuses are sticky. A deployment's
concurrency_limit (else its machine's, else 2) keeps extra runs `not-started` until a slot frees.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import string
from collections import deque
from datetime import timedelta
from typing import Any

from . import graph, media
from .settings import EmulatorSettings
from .state import Output, Row, Run, Store, Tenant, new_file_id, now
from .webhooks import WebhookSender

log = logging.getLogger("emulator.runs")

MODAL_MACHINE_TYPES = ("comfy-deploy-serverless", "modal-serverless")
DATA_URL_PREFIXES = {
    "data:image/png;base64,": ("png", "image/png"),
    "data:image/jpeg;base64,": ("jpeg", "image/jpeg"),
    "data:image/jpg;base64,": ("jpeg", "image/jpeg"),
}
IMAGE_NODES = ("SaveImage", "ComfyDeployOutputImage", "ComfyDeployStdOutputImage", "ComfyDeployStdOutputAny")


def _modal_call_id() -> str:
    return "fc-01" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(24))


class Engine:
    def __init__(self, store: Store, settings: EmulatorSettings, webhooks: WebhookSender, faults: Any) -> None:
        self.store = store
        self.settings = settings
        self.webhooks = webhooks
        self.faults = faults
        self._waiting: dict[str, deque[str]] = {}
        self._active: dict[str, set[str]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    # --- creation ---------------------------------------------------------------------------------

    def upload_data_urls(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Replace ``data:image/...;base64,`` values by the URL of a stored ``inputs/img_<16>.<ext>`` file."""
        out = dict(inputs)
        for key, value in inputs.items():
            if not isinstance(value, str):
                continue
            for prefix, (ext, content_type) in DATA_URL_PREFIXES.items():
                if value.startswith(prefix):
                    try:
                        data = base64.b64decode(value[len(prefix) :], validate=False)
                    except (binascii.Error, ValueError):
                        break
                    out[key] = self.store.put_file(f"inputs/{new_file_id('img_')}.{ext}", content_type, data)
                    break
        return out

    def create_run(
        self,
        *,
        tenant: Tenant,
        version: Row,
        machine: Row,
        deployment: Row | None,
        inputs: dict[str, Any],
        webhook: str | None,
        webhook_intermediate_status: bool,
        gpu: str | None,
        origin: str,
        workflow_api: dict[str, Any] | None = None,
        batch_id: str | None = None,
    ) -> Run:
        api = workflow_api if workflow_api is not None else version.get("workflow_api") or {}
        if deployment is not None:
            key = f"deployment:{deployment['id']}"
            limit = deployment.get("concurrency_limit") or machine.get("concurrency_limit") or 2
        else:
            key = f"machine:{machine['id']}"
            limit = machine.get("concurrency_limit") or 2
        run = Run(
            id=self.store.new_id(),
            user_id=tenant.user_id,
            org_id=tenant.org_id,
            workflow_id=version["workflow_id"],
            workflow_version_id=version.get("id"),
            deployment_id=deployment["id"] if deployment else None,
            machine_id=machine["id"],
            machine_type=machine.get("type"),
            machine_version=machine.get("machine_version"),
            gpu=(deployment or {}).get("gpu") or gpu or machine.get("gpu"),  # the deployment's GPU wins
            origin=origin,
            workflow_inputs=inputs,
            webhook=webhook,
            webhook_intermediate_status=webhook_intermediate_status,
            graph=graph.apply_inputs(api, inputs),
            input_defaults={item["input_id"]: item["default_value"] for item in graph.input_types(api)},
            outcome=self.faults.next_outcome(),
            concurrency_key=key,
            concurrency_limit=int(limit),
            batch_id=batch_id,
        )
        if machine.get("type") in MODAL_MACHINE_TYPES:
            run.modal_function_call_id = _modal_call_id()
        self.store.runs[run.id] = run
        self._waiting.setdefault(key, deque()).append(run.id)
        log.info("run created", extra={"run_id": run.id, "deployment_id": run.deployment_id, "outcome": run.outcome})
        self._pump(key)
        return run

    def queue_position(self, run: Run) -> int:
        """Earlier not-started/queued runs on the same machine, created in the last 24 h."""
        since = now() - timedelta(hours=24)
        return sum(
            1
            for other in self.store.runs.values()
            if other.machine_id == run.machine_id
            and other.status in ("not-started", "queued")
            and since <= other.created_at < run.created_at
            and other.id != run.id
        )

    # --- scheduling -------------------------------------------------------------------------------

    def _pump(self, key: str) -> None:
        if self._closing:
            return
        waiting = self._waiting.get(key)
        active = self._active.setdefault(key, set())
        while waiting:
            run = self.store.runs.get(waiting[0])
            if run is None or run.terminal:
                waiting.popleft()
                continue
            if len(active) >= run.concurrency_limit:
                return
            waiting.popleft()
            active.add(run.id)
            self._tasks[run.id] = asyncio.create_task(self._drive(run), name=f"run-{run.id}")

    async def _drive(self, run: Run) -> None:
        try:
            await self._steps(run)
        finally:
            self._active.get(run.concurrency_key, set()).discard(run.id)
            self._tasks.pop(run.id, None)
            self._pump(run.concurrency_key)

    async def _steps(self, run: Run) -> None:
        step = self.settings.step_seconds
        for status in ("queued", "started", "running"):
            await asyncio.sleep(step)
            self.set_status(run, status)
        nodes = graph.execution_order(run.graph)
        stop_at = len(nodes) if run.outcome == "success" else max(1, len(nodes) // 2)
        for index, (node_id, class_type) in enumerate(nodes[:stop_at]):
            await asyncio.sleep(step)
            if run.terminal:
                return
            run.progress = round((index + 1) / len(nodes), 2)
            run.live_status = f"Executing {class_type}"
            run.updated_at = now()
            self.webhooks.progress(run)
            data = self._produce(run, node_id, class_type)
            if data is not None:
                self._add_output(run, node_id, class_type, data)
        await asyncio.sleep(step)
        if run.outcome == "stuck":
            await asyncio.Future()  # stays running until cancelled
        if run.outcome == "failed":
            node_id, class_type = nodes[stop_at - 1] if nodes else ("0", "Unknown")
            error = {
                "node_id": node_id,
                "node_type": class_type,
                "exception_type": "torch.OutOfMemoryError",
                "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB",
            }
            self._add_output(run, node_id, class_type, {"error": error})  # dropped from responses, as upstream
        self.set_status(run, run.outcome)

    # --- transitions ------------------------------------------------------------------------------

    def set_status(self, run: Run, status: str) -> bool:
        """Move ``run`` to ``status`` and send `run.updated`; ignored once the run is terminal."""
        if run.terminal:
            return False
        moment = now()
        run.status = status
        run.updated_at = moment
        if status == "queued":
            run.queued_at = moment
        elif status == "started":
            run.started_at = moment
            run.gpu_event_id = self.store.new_id()
        elif run.terminal:
            run.ended_at = moment
        log.info("run status", extra={"run_id": run.id, "status": status})
        self.webhooks.status_changed(run)
        return True

    def cancel(self, run: Run) -> None:
        if not self.set_status(run, "cancelled"):
            return
        task = self._tasks.get(run.id)
        if task is not None:
            task.cancel()

    def _add_output(self, run: Run, node_id: str, class_type: str, data: dict[str, Any]) -> None:
        moment = now()
        record = Output(
            id=self.store.new_id(),
            run_id=run.id,
            data=data,
            node_meta={"node_id": node_id, "node_class": class_type},
            created_at=moment,
            updated_at=moment,
        )
        run.outputs.append(record)
        self.webhooks.output(run, record)

    # --- outputs ----------------------------------------------------------------------------------

    def _media(self, run: Run, filename: str, content_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        url = self.store.put_file(f"outputs/runs/{run.id}/{filename}", content_type, data)
        return {
            "url": url,
            "filename": filename,
            "subfolder": "",
            "type": "output",
            "is_public": True,
            "upload_duration": round(self.settings.step_seconds / 5, 3),
            **extra,
        }

    def _produce(self, run: Run, node_id: str, class_type: str) -> dict[str, Any] | None:
        """The ComfyUI `executed` UI dict an output node yields, with its media uploaded; None for other nodes."""
        inputs = run.graph.get(node_id, {}).get("inputs", {})
        prefix = inputs.get("filename_prefix") if isinstance(inputs.get("filename_prefix"), str) else "ComfyUI"
        counter = len(run.outputs) + 1
        seed = f"{run.id}:{node_id}"
        if class_type in IMAGE_NODES:
            extra = {"output_id": inputs["output_id"]} if class_type != "SaveImage" and "output_id" in inputs else {}
            item = self._media(
                run, f"{prefix}_{counter:05d}_.png", "image/png", media.png(64, 64, media.color_for(seed)), **extra
            )
            return {"images": [item]}
        if class_type == "VHS_VideoCombine":
            rate = inputs.get("frame_rate") if isinstance(inputs.get("frame_rate"), (int, float)) else 8
            data = media.gif(32, 32, media.color_for(seed), frames=8)
            item = self._media(
                run, f"{prefix}_{counter:05d}.gif", "image/gif", data, format="image/gif", frame_rate=rate
            )
            return {"gifs": [item]}
        if class_type == "ShowText|pysssss":
            name = run.value("input_lora_name")
            if name:
                trigger = run.value("input_trigger_word")
                return {"text": [f"flux_trainer_output/{name}_rank16_bf16.safetensors (trigger word: {trigger})"]}
            return {"text": [f"{class_type} output of run {run.id}"]}
        if class_type == "ComfyDeployOutputText":
            text = f"text output of run {run.id}\n".encode()
            item = self._media(
                run, f"{prefix}_{counter:05d}.txt", "text/plain", text, output_id=inputs.get("output_id", "output_text")
            )
            return {"text_file": [item]}
        if class_type == "ComfyDeployOutputFile":
            name = str(run.value("input_lora_name") or prefix)
            item = self._media(
                run,
                f"{name}.safetensors",
                "application/octet-stream",
                media.safetensors_stub(name),
                output_id=inputs.get("output_id", "output_file"),
            )
            return {"files": [item]}
        return None

    # --- shutdown ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every run task (runs keep their current status); the engine can be used again after."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._waiting.clear()
        self._active.clear()
        self._closing = False
