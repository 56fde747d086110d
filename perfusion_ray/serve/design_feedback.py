"""The design endpoint's writer into the feedback store: requests with their impressions, then feedback.

Beside what ingest reads, under the split (ingest lists only feedback/, so these never reach it):
    {root}/images/ab/ab12...png                               candidates, content-addressed (ImageStore)
    {root}/{split}/feedback/event_hour=.../part-design-<request>.parquet          the K impressions
    {root}/{split}/feedback/event_hour=.../part-design-<request>-<digest>.parquet one feedback POST's new events
    {root}/{split}/design/requests/<request>.json             the request record (merchant, prompt, candidates,
                                                              sha256 of its token), written after the impressions
    {root}/{split}/design/events/<request>/<sha of client id>.json   one marker per accepted event: its row and
                                                              the partition file that holds it

Order of writes, each file atomic: a request's images, then its impressions, then its record, then the answer
(feedback on a request is accepted only once its record exists, so never on a group that was not logged).
Feedback: each new event is claimed by creating its marker exclusively (two replicas cannot both accept one
event id), then the claimed rows are written as one partition file, then the call answers. A crash after a
claim and before the file leaves a marker whose file is missing; the resend of that event finds the marker
and rewrites the file from the markers that name it (same rows, same bytes), so nothing accepted is lost and
nothing is stored twice. Stored event ids are `<request>/<client event id>`: unique in the whole store, as
ingest's duplicate check needs, while clients only keep theirs unique within a request.

Pure Python + pyarrow: no Ray, no HTTP (errors are RewardRequestError with a status, for the endpoint).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from perfusion_ray.data.events import event_id, event_row, event_time, events_table
from perfusion_ray.data.image_store import ImageStore
from perfusion_ray.data.store import StoreLayout, hour_partition, write_partition
from perfusion_ray.serve.design_schemas import FeedbackEvent, FeedbackResult
from perfusion_ray.records import Merchant
from perfusion_ray.serve.schemas import reject
from perfusion_ray.storage import atomic_create_bytes, atomic_write_json, parquet_bytes, read_json


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _sorted_table(rows: list[dict]):
    """Rows in event-id order: the same claimed rows always give the same file."""
    return events_table(sorted(rows, key=lambda row: row["event_id"]))


@dataclass(frozen=True)
class StoredCandidate:
    position: int
    image_ref: str
    image_sha256: str
    score: float | None = None


@dataclass(frozen=True)
class RequestRecord:
    """What the store keeps of a design request (the token only as its sha256)."""

    request_id: str
    token_sha256: str
    merchant_id: str
    merchant_features: dict[str, str]
    merchant_stats: dict[str, float]
    prompt: str
    model_version: str
    seed: int
    n: int
    created: str  # ISO-8601 UTC, the impressions' event_time
    candidates: list[StoredCandidate] = field(default_factory=list)
    reward_version: str | None = None

    @property
    def k(self) -> int:
        return len(self.candidates)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict) -> "RequestRecord":
        return cls(**{**body, "candidates": [StoredCandidate(**c) for c in body["candidates"]]})

    def holds(self, token: str) -> bool:
        return hmac.compare_digest(_sha(token), self.token_sha256)

    def row(self, *, event_id: str, time: str, position: int, event_type: str, value: float = 1.0) -> dict:
        candidate = self.candidates[position]
        return event_row(event_id=event_id, event_time=time, request_id=self.request_id,
                         merchant_id=self.merchant_id, merchant_features=self.merchant_features,
                         merchant_stats=self.merchant_stats, prompt=self.prompt, image_ref=candidate.image_ref,
                         image_sha256=candidate.image_sha256, position=position, event_type=event_type, value=value)


class DesignStore:
    """Requests, impressions and feedback of the design endpoint in one feedback store (any replica, any
    process: everything lives in files; `records` only caches immutable request records)."""

    def __init__(self, root: str, split: str = "train", cache_size: int = 10_000):
        self.layout = StoreLayout(str(root), split)
        self.images = ImageStore(self.layout.images_uri)
        self.filesystem = self.layout.filesystem
        self._design = os.path.join(self.layout.base, split, "design")
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()
        self._cache_size = cache_size

    # ------------------------------------------------------------ requests and impressions
    def _record_path(self, request_id: str) -> str:
        if "/" in request_id or request_id.startswith("."):
            raise reject(404, "unknown_request", f"request_id {request_id!r}: no such request")
        return os.path.join(self._design, "requests", f"{request_id}.json")

    def log_request(self, merchant: Merchant, prompt: str, pngs: list[bytes], model_version: str, seed: int, n: int,
                    scores: list[float] | None = None, reward_version: str | None = None,
                    now: dt.datetime | None = None) -> tuple[RequestRecord, str]:
        """Store the candidates, their impression events and the request record; returns (record, token).
        Returns only once all of it is written."""
        now = now or dt.datetime.now(dt.timezone.utc)
        request_id = f"d{uuid.uuid4().hex}"
        token = secrets.token_urlsafe(24)
        candidates = []
        for position, png in enumerate(pngs):
            ref, digest = self.images.put(png)
            candidates.append(StoredCandidate(position, ref, digest, None if scores is None else float(scores[position])))
        record = RequestRecord(request_id, _sha(token), merchant.id, dict(merchant.features),
                               {k: float(v) for k, v in merchant.stats.items()}, prompt, model_version, int(seed), int(n),
                               event_time(now), candidates, reward_version)
        rows = [record.row(event_id=event_id(request_id, c.position, "impression"), time=record.created,
                           position=c.position, event_type="impression") for c in candidates]
        write_partition(self.layout, now, events_table(rows), f"design-{request_id}")
        atomic_write_json(self._record_path(request_id), record.to_json(), self.filesystem)
        self._remember(record)
        return record, token

    def _remember(self, record: RequestRecord) -> None:
        self._records[record.request_id] = record
        while len(self._records) > self._cache_size:
            self._records.popitem(last=False)

    def load_request(self, request_id: str) -> RequestRecord | None:
        if request_id in self._records:
            return self._records[request_id]
        body = read_json(self._record_path(request_id), filesystem=self.filesystem)
        if body is None:
            return None
        record = RequestRecord.from_json(body)
        self._remember(record)
        return record

    def authorized_request(self, request_id: str, token: str) -> RequestRecord:
        """The record, or 404 unknown_request / 403 wrong_token (the same answer whether or not the token
        belongs to another request: a token opens only its own request)."""
        record = self.load_request(request_id)
        if record is None:
            raise reject(404, "unknown_request", f"request_id {request_id!r}: no such request in this store")
        if not record.holds(token):
            raise reject(403, "wrong_token", f"token does not match request {request_id} (use the token "
                                             f"POST /v1/designs returned with it)")
        return record

    # ------------------------------------------------------------ feedback
    def _marker_path(self, request_id: str, client_id: str) -> str:
        return os.path.join(self._design, "events", request_id, f"{_sha(client_id)[:32]}.json")

    def _read_marker(self, path: str) -> dict | None:
        return read_json(path, filesystem=self.filesystem)

    def _ensure_file(self, record: RequestRecord, relative: str) -> None:
        """Write a partition file a crash left unwritten, from the markers that name it. Exclusive create: if
        the original writer is still at work and writes first, its file (every claimed row) stands; if it writes
        after, its replace brings every claimed row."""
        path = os.path.join(self.layout.feedback, relative)
        if self.filesystem.get_file_info(path).type != pafs.FileType.NotFound:
            return
        folder = os.path.join(self._design, "events", record.request_id)
        infos = self.filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        markers = [self._read_marker(i.path) for i in infos if i.base_name.endswith(".json")]
        rows = [m["row"] for m in markers if m and m["file"] == relative]
        atomic_create_bytes(path, parquet_bytes(_sorted_table(rows)), self.filesystem)

    @staticmethod
    def _content(event: FeedbackEvent) -> dict:
        return {"type": event.type, "position": int(event.position), "value": float(event.value)}

    def append_feedback(self, record: RequestRecord, events: list[FeedbackEvent],
                        now: dt.datetime | None = None) -> FeedbackResult:
        """Validate against the request, store the events not stored before, then return. Raises 422
        (position, repeated id with other content), 409 (an id stored before with other content)."""
        now = now or dt.datetime.now(dt.timezone.utc)
        first: dict[str, FeedbackEvent] = {}
        for index, event in enumerate(events):
            if not 0 <= event.position < record.k:
                raise reject(422, "bad_position", f"events[{index}].position: {event.position}, request "
                                                  f"{record.request_id} has positions 0..{record.k - 1}")
            seen = first.setdefault(event.event_id, event)
            if self._content(seen) != self._content(event):
                raise reject(422, "duplicate_event_id", f"events[{index}].event_id {event.event_id!r} appears twice "
                                                        f"with different content")
        duplicates, new, conflicts = [], [], []
        for client_id, event in first.items():
            marker = self._read_marker(self._marker_path(record.request_id, client_id))
            if marker is None:
                new.append(event)
            elif marker["event"] == self._content(event):
                duplicates.append(client_id)
                self._ensure_file(record, marker["file"])
            else:
                conflicts.append(client_id)
        if conflicts:
            raise reject(409, "event_conflict", f"event_id(s) {conflicts} were stored before with other content "
                                                f"(an event id names one event; use a new id for a new event)")
        accepted = []
        if new:
            name = f"design-{record.request_id}-{_sha(json.dumps(sorted(e.event_id for e in new)))[:16]}"
            relative = os.path.join(hour_partition(now), f"part-{name}.parquet")
            time, rows = event_time(now), []
            for event in new:
                row = record.row(event_id=f"{record.request_id}/{event.event_id}", time=time, position=event.position,
                                 event_type=event.type, value=event.value)
                marker = {"event": self._content(event), "row": row, "file": relative}
                path = self._marker_path(record.request_id, event.event_id)
                if atomic_create_bytes(path, json.dumps(marker, sort_keys=True).encode(), self.filesystem):
                    rows.append(row)
                    accepted.append(event.event_id)
                else:  # another replica stored the same id meanwhile
                    duplicates.append(event.event_id)
            if rows:
                write_partition(self.layout, now, _sorted_table(rows), name)
        return FeedbackResult(record.request_id, accepted, duplicates)

    def image_bytes(self, ref: str) -> bytes:
        return self.images.read_bytes(ref)
