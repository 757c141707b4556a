"""The run state machine (services/comfyui/state.py): pure functions, no I/O."""

from __future__ import annotations

from google.protobuf import struct_pb2

from services.comfyui import state
from services.comfyui.state import Report
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as S
from stationthis.comfyui.v1 import webhook_pb2

UP = "0b5a7a5e-6f1e-4c53-9f0e-3f1c1f1d2a10"
T0 = 1_800_000_000_000


def run(status: S.RunStatus = S.RUN_STATUS_NOT_STARTED) -> S.Run:
    r = S.Run(run_id="r1", upstream_run_id=UP, status=status)
    r.submit_time.FromMilliseconds(T0)
    return r


def report(status: str, **extra) -> Report:  # type: ignore[no-untyped-def]
    return Report(upstream_run_id=UP, status=state.STATUS_BY_UPSTREAM[status], upstream_status=status, **extra)


def image(name: str, node: str = "9") -> dict:  # type: ignore[type-arg]
    return {
        "data": {"images": [{"url": f"https://b.s3.amazonaws.com/outputs/{name}", "filename": name, "type": "output"}]},
        "node_meta": {"node_id": node, "node_class": "ComfyDeployOutputImage"},
        "output_id": "output_images",
    }


def test_statuses_move_forward_only() -> None:
    current = run()
    change = state.merge(current, report("running"), T0 + 10)
    assert change is not None and change.run.status == S.RUN_STATUS_RUNNING and change.status_changed
    assert change.event_type == svc.RUN_EVENT_TYPE_STATUS_CHANGED
    assert change.run.HasField("start_time") and change.run.start_time.ToMilliseconds() == T0 + 10
    # An earlier status arriving late changes nothing.
    assert state.merge(change.run, report("queued"), T0 + 20) is None
    # The same report again changes nothing.
    assert state.merge(change.run, report("running"), T0 + 30) is None


def test_an_earlier_status_still_brings_its_progress_and_outputs() -> None:
    current = state.merge(run(), report("running"), T0 + 1).run  # type: ignore[union-attr]
    late = report("queued", progress=0.5, outputs=state.outputs_from_records([image("a.png")]))
    change = state.merge(current, late, T0 + 2)
    assert change is not None and change.run.status == S.RUN_STATUS_RUNNING
    assert change.run.progress == 0.5 and len(change.run.outputs) == 1
    assert change.event_type == svc.RUN_EVENT_TYPE_OUTPUT and not change.status_changed


def test_a_terminal_run_never_changes() -> None:
    done = state.merge(run(), report("success"), T0 + 5).run  # type: ignore[union-attr]
    assert done.status == S.RUN_STATUS_SUCCESS and done.HasField("end_time")
    for later in ("failed", "running", "cancelled", "success"):
        assert state.merge(done, report(later, progress=1.0), T0 + 9) is None
    assert state.finish(done, S.RUN_STATUS_CANCELLED, None, T0 + 9) is None


def test_failure_carries_a_reason() -> None:
    failed = state.merge(run(), report("failed", live_status="Executing KSampler"), T0).run  # type: ignore[union-attr]
    assert failed.error.reason == "RUN_FAILED" and failed.error.domain == "comfyui.stationthis.dev"
    assert failed.error.metadata["live_status"] == "Executing KSampler"
    cancelled = state.merge(run(), report("cancelled"), T0).run  # type: ignore[union-attr]
    assert cancelled.error.reason == "RUN_CANCELLED" and cancelled.error.metadata["source"] == "upstream"


def test_outputs_are_kept_once_in_first_seen_order() -> None:
    first = state.merge(run(), report("running", outputs=state.outputs_from_records([image("a.png")])), T0).run  # type: ignore[union-attr]
    both = state.outputs_from_records([image("a.png"), image("b.png")])
    change = state.merge(first, report("running", outputs=both), T0 + 1)
    assert change is not None
    assert [o.filename for o in change.run.outputs] == ["a.png", "b.png"]
    assert [o.filename for o in change.new_outputs] == ["b.png"]
    assert state.merge(change.run, report("running", outputs=both), T0 + 2) is None


def test_outputs_of_every_kind() -> None:
    records = [
        {"data": {"gifs": [{"url": "https://x/o/clip.mp4", "filename": "clip.mp4", "type": "output",
                            "format": "video/h264-mp4"}]}, "node_meta": {"node_id": "12"}},
        {"data": {"gifs": [{"url": "https://x/o/anim.gif", "filename": "anim.gif", "type": "output"}]}},
        {"data": {"audio": [{"url": "https://x/o/s.mp3", "filename": "s.mp3", "type": "output"}]}},
        {"data": {"text": ["a cat astronaut"]}, "node_meta": {"node_id": "30"}},
        {"data": {"text_file": [{"url": "https://x/o/caption.txt", "filename": "caption.txt", "type": "output"}]}},
        {"data": {"model_file": [{"url": "https://x/o/lora.safetensors", "filename": "lora.safetensors",
                                  "type": "output"}]}},
        {"data": {"mesh": [{"url": "https://x/o/m.glb", "filename": "m.glb", "type": "output"}]}},
        {"data": {"files": [{"url": "https://x/o/bundle.zip", "filename": "bundle.zip", "type": "output"}]}},
        {"data": {"images": [{"url": "https://x/t/preview.png", "filename": "preview.png", "type": "temp"}]}},
        {"data": {"images": [True]}},
    ]  # fmt: skip
    outputs = state.outputs_from_records(records)
    kinds = [(o.type, o.filename or o.text, o.mime_type) for o in outputs]
    assert kinds == [
        (S.OUTPUT_TYPE_VIDEO, "clip.mp4", "video/mp4"),
        (S.OUTPUT_TYPE_GIF, "anim.gif", "image/gif"),
        (S.OUTPUT_TYPE_AUDIO, "s.mp3", "audio/mpeg"),
        (S.OUTPUT_TYPE_TEXT, "a cat astronaut", "text/plain"),
        (S.OUTPUT_TYPE_TEXT, "caption.txt", "text/plain"),
        (S.OUTPUT_TYPE_MODEL, "lora.safetensors", "application/octet-stream"),
        (S.OUTPUT_TYPE_MESH, "m.glb", "model/gltf-binary"),
        (S.OUTPUT_TYPE_FILE, "bundle.zip", "application/zip"),
    ]
    assert outputs[0].node_id == "12" and outputs[3].node_id == "30"


def test_unusual_shapes_follow_the_legacy_image_url_rules() -> None:
    records = [
        {"data": {"result": [{"images": [{"url": "https://cdn/x/img/abc"}, "https://cdn/y.webp?sig=1"]}]}},
        {"data": {"whatever": ["https://cdn/images/1234"]}},
        {"data": {"whatever": [{"url": "https://cdn/z.jpeg"}]}},
    ]
    outputs = state.outputs_from_records(records)
    assert [(o.type, o.url) for o in outputs] == [
        (S.OUTPUT_TYPE_IMAGE, "https://cdn/x/img/abc"),
        (S.OUTPUT_TYPE_IMAGE, "https://cdn/y.webp?sig=1"),
        (S.OUTPUT_TYPE_IMAGE, "https://cdn/images/1234"),
        (S.OUTPUT_TYPE_IMAGE, "https://cdn/z.jpeg"),
    ]


def test_queue_position_only_while_waiting() -> None:
    waiting = state.merge(run(), report("queued", queue_position=3), T0).run  # type: ignore[union-attr]
    assert waiting.HasField("queue_position") and waiting.queue_position == 3
    running = state.merge(waiting, report("running", queue_position=0), T0 + 1).run  # type: ignore[union-attr]
    assert not running.HasField("queue_position")


def test_billed_duration_is_upstreams_when_known_else_observed() -> None:
    polled = report("success", started_ms=T0 + 1000, ended_ms=T0 + 13_500, run_duration_seconds=12.5)
    change = state.merge(run(), polled, T0 + 20_000)
    assert change is not None and change.upstream_duration
    assert change.run.run_duration.ToMilliseconds() == 12_500
    observed = state.merge(state.merge(run(), report("running"), T0 + 2000).run, report("success"), T0 + 9000)  # type: ignore[union-attr]
    assert observed is not None and not observed.upstream_duration
    assert observed.run.run_duration.ToMilliseconds() == 7000  # end - start as we saw them
    # The final poll after a webhook's success: upstream's times and duration replace ours.
    final = state.merge(observed.run, polled, T0 + 30_000, final=True)
    assert final is not None and final.run.run_duration.ToMilliseconds() == 12_500
    assert final.run.status == S.RUN_STATUS_SUCCESS and final.run.end_time.ToMilliseconds() == T0 + 13_500


def test_our_own_endings() -> None:
    error = state.run_error("RUN_CANCELLED", "cancelled by CancelRun", {"source": "cancel_run"})
    ended = state.finish(run(S.RUN_STATUS_SUBMITTING), S.RUN_STATUS_CANCELLED, error, T0 + 50)
    assert ended is not None and ended.status == S.RUN_STATUS_CANCELLED and ended.error.reason == "RUN_CANCELLED"
    assert ended.end_time.ToMilliseconds() == T0 + 50 and ended.run_duration.ToMilliseconds() == 50


def test_webhook_bodies_become_reports() -> None:
    payload = webhook_pb2.ComfyDeployWebhook(event_type="run.updated", status="running", live_status="Executing",
                                             progress=0.42, run_id=UP)  # fmt: skip
    record = struct_pb2.Struct()
    record.update(image("a.png"))
    payload.outputs.append(record)
    found = state.report_from_webhook(payload)
    assert found.status == S.RUN_STATUS_RUNNING and abs(found.progress - 0.42) < 1e-9
    assert [o.filename for o in found.outputs] == ["a.png"]
    unknown = state.report_from_webhook(webhook_pb2.ComfyDeployWebhook(status="exploded", run_id=UP))
    assert unknown.status == S.RUN_STATUS_UNSPECIFIED
    assert state.merge(run(), unknown, T0) is None


def test_inputs_keep_integers_integral() -> None:
    inputs = state.inputs_struct({"steps": 20, "cfg": 7.5, "seed": 123456789012, "prompt": "cat", "sizes": [512, 768]})
    assert state.struct_values(inputs) == {"steps": 20, "cfg": 7.5, "seed": 123456789012, "prompt": "cat",
                                           "sizes": [512, 768]}  # fmt: skip
