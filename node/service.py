"""The node's network side and its two workers.

* **Receiving** (pynetdicom SCP): C-ECHO, and C-STORE of Computed Radiography and Digital X-Ray (for
  presentation, for processing) images. Any other storage SOP Class is negotiated and then refused
  per instance with status 0x0122 "SOP Class not supported", so that a PACS routing a whole study
  sees which object was not taken. A film is validated by the same reader the model uses
  (``data.io.read_image``: a corrupt or undecodable object is refused with 0xC000 and the reason)
  and stored durably (:meth:`node.storage.Storage.receive`) *before* the success status goes back.
  The same SOP Instance UID again is acknowledged without any work (idempotent), and so is the
  node's own output coming back (a routing loop), which is never processed.
* **Processing**: one thread, batches of up to ``batch_size`` received films through the one
  loaded model (:class:`node.inference.NodeModel`).
* **Sending**: one thread, C-STORE of the derived instances to the destination in one association;
  while the destination cannot be reached it retries after 1, 2, 4 ... seconds (``retry_max`` at
  most); an instance the destination refuses ``max_refusals`` times is given up (``failed/``).
* **Log**: one line per study when its films are done (received, processed in N s, sent), plus one
  line per refusal and per destination outage.
* **Health**: ``GET http://127.0.0.1:<health_port>/health`` answers a JSON object (200 while both
  workers run, 503 otherwise).

The state lives on disk (:mod:`node.storage`): a node started again on the same folder resumes its
queue; nothing is processed twice.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from node.storage import Storage, instance_key

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
ACCEPTED_SOP_CLASSES = {CR: "CR", DX_PRESENTATION: "DX for presentation", DX_PROCESSING: "DX for processing"}

SUCCESS = 0x0000
REFUSED_SOP_CLASS = 0x0122                              # "Refused: SOP Class not supported" (PS3.4 / PS3.7 C.4.2)
OUT_OF_RESOURCES = 0xA700                              # "Refused: Out of resources" (cannot store)
CANNOT_UNDERSTAND = 0xC000                             # "Error: Cannot understand"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    ae_title: str

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """``HOST:PORT:AET`` (an IPv6 host in brackets: ``[::1]:104:PACS``).

    Raises:
        ValueError: naming the text and what is wrong.
    """
    host, sep, rest = text.rpartition(":")
    host, sep2, port = host.rpartition(":")
    if not (sep and sep2 and host and port and rest):
        raise ValueError(f"--forward {text}: expected HOST:PORT:AET (e.g. 127.0.0.1:4242:ORTHANC)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--forward {text}: port {port!r} is not a number in 1..65535")
    if not valid_ae_title(rest):
        raise ValueError(f"--forward {text}: AE title {rest!r} must be 1 to 16 printable ASCII characters, "
                         "no backslash")
    return Destination(host, int(port), rest)


def valid_ae_title(title: str) -> bool:
    return 0 < len(title.strip()) <= 16 and all(32 <= ord(c) < 127 and c != "\\" for c in title)


def printable(text: str, limit: int = 80) -> str:
    """A value from a received file as it may appear in a log line: printable ASCII, one line, bounded."""
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status(code: int, comment: str = ""):
    """A C-STORE / C-ECHO response status, with an Error Comment (64 characters at most) if given."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds


@dataclass
class Film:
    """What the node remembers of a queued film (also rebuilt from the file on a restart)."""
    key: str
    study: str
    calling_ae: str
    received: float


@dataclass
class StudyTally:
    films: int = 0
    open: int = 0
    sent: int = 0
    failed: list = field(default_factory=list)
    first_received: float = 0.0
    processing_s: float = 0.0
    calling: set = field(default_factory=set)


class Node:
    """A running DICOM node: :meth:`start` it, :meth:`stop` it (its state stays on disk).

    Args:
        storage: the node's folder.
        model: anything with ``process(jobs)`` like :class:`node.inference.NodeModel`.
        ae_title, port, bind: where it listens (loopback unless ``bind`` says otherwise; port 0: any free port).
        forward: where derived instances go.
        allow_ae: calling AE titles accepted (None: any); others are rejected at association.
        batch_size: films per model call.
        health_port: loopback port of the HTTP health check (None: none; 0: any free port).
        retry_base, retry_max: seconds of the first and the longest wait between tries to reach the destination.
        max_refusals: sends an instance may be refused by the destination before it is given up.
        log: where the log lines go (a callable taking one line).
    """

    def __init__(self, storage: Storage, model, ae_title: str, forward: Destination, port: int = 11112,
                 bind: str = "127.0.0.1", allow_ae: list[str] | None = None, batch_size: int = 4,
                 health_port: int | None = None, retry_base: float = 1.0, retry_max: float = 60.0,
                 max_refusals: int = 5, log: Callable[[str], None] | None = None):
        if not valid_ae_title(ae_title):
            raise ValueError(f"--ae-title {ae_title!r}: must be 1 to 16 printable ASCII characters, no backslash")
        for aet in allow_ae or []:
            if not valid_ae_title(aet):
                raise ValueError(f"--allow-ae {aet!r}: must be 1 to 16 printable ASCII characters, no backslash")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.storage, self.model, self.ae_title, self.forward = storage, model, ae_title, forward
        self.port, self.bind, self.allow_ae, self.batch_size = port, bind, allow_ae, batch_size
        self.health_port, self.retry_base, self.retry_max, self.max_refusals = health_port, retry_base, retry_max, max_refusals
        self._log = log if log is not None else (lambda line: logging.getLogger("dicom_node").info(line))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._work = threading.Event()
        self._send = threading.Event()
        self._films: dict[str, Film] = {}
        self._studies: dict[str, StudyTally] = {}
        self._receiving: set[str] = set()
        self._refusals: dict[str, int] = {}
        self.destination = {"reachable": None, "tries": 0, "last_error": None, "next_try": 0.0}
        self.counters = {"received": 0, "refused": 0, "duplicates": 0, "processed": 0, "sent": 0, "failed": 0}
        self.started = time.time()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._health = None

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> "Node":
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        for key in self.storage.keys("sent"):            # a kill between the marker and the clean-up
            if not self.storage.keep and self.storage.state(key) == "sent":
                self.storage.drop_copies(key)
        for key in self.storage.to_process() + self.storage.to_send():   # the queue of a former run
            self._remember(key, self._film_from_disk(key))
        pending = len(self._films)
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0                           # no limit on what the node receives
        syntaxes = all_transfer_syntaxes()
        for cx in AllStoragePresentationContexts:         # negotiated; refused per instance (0x0122) unless CR/DX
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        if self.allow_ae:
            ae.require_calling_aet = list(self.allow_ae)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_REJECTED, self._on_rejected)]
        self._server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        self._threads = [threading.Thread(target=self._process_loop, name="node-process", daemon=True),
                         threading.Thread(target=self._send_loop, name="node-send", daemon=True)]
        for t in self._threads:
            t.start()
        if self.health_port is not None:
            self._health = ThreadingHTTPServer(("127.0.0.1", self.health_port), _health_handler(self))
            self.health_port = self._health.server_address[1]
            threading.Thread(target=self._health.serve_forever, name="node-health", daemon=True).start()
        self._log(f"listening as {self.ae_title} on {self.bind}:{self.port}"
                  f"{' (calling AEs ' + ','.join(self.allow_ae) + ')' if self.allow_ae else ''}, forwarding to "
                  f"{self.forward}, storage {self.storage.root}"
                  f"{f', health http://127.0.0.1:{self.health_port}/health' if self._health else ''}"
                  f"{f'; {pending} films queued from before' if pending else ''}")
        self._work.set()
        self._send.set()
        return self

    def stop(self) -> None:
        """Stop listening and working (what is queued stays on disk for the next start)."""
        self._stop.set()
        self._work.set()
        self._send.set()
        if self._server is not None:
            self._server.shutdown()
        if self._health is not None:
            self._health.shutdown()
            self._health.server_close()
        for t in self._threads:
            t.join(timeout=60)

    def healthy(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads) and not self._stop.is_set()

    def health(self) -> dict:
        counts = self.storage.counts()
        d = self.destination
        return {"status": "ok" if self.healthy() else "stopped", "ae_title": self.ae_title,
                "listening": f"{self.bind}:{self.port}", "uptime_s": round(time.time() - self.started, 1),
                "queue": {"to_process": counts["to_process"], "to_send": counts["to_send"]},
                "done": {"sent": counts["sent"], "failed": counts["failed"]}, "this_run": dict(self.counters),
                "destination": {"address": str(self.forward), "reachable": d["reachable"], "tries": d["tries"],
                                "last_error": d["last_error"],
                                "next_try_in_s": round(max(0.0, d["next_try"] - time.time()), 1)}}

    # ------------------------------------------------------------------------------ receiving
    def _on_rejected(self, event) -> None:
        self._log(f"association from {printable(event.assoc.requestor.ae_title, 16)} at {event.assoc.requestor.address} rejected"
                  f"{' (calling AE not in --allow-ae)' if self.allow_ae else ''}")

    def _on_store(self, event):
        calling = printable(str(event.assoc.requestor.ae_title).strip(), 16)
        sop_class = printable(event.context.abstract_syntax)
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if sop_class not in ACCEPTED_SOP_CLASSES:
            self.counters["refused"] += 1
            self._log(f"refused from {calling}: SOP Class {sop_class} is not a CR or DX image (status 0x0122)")
            return status(REFUSED_SOP_CLASS, "SOP Class not supported: CR and DX images only")
        if not uid:
            self.counters["refused"] += 1
            return status(CANNOT_UNDERSTAND, "no Affected SOP Instance UID")
        key = instance_key(uid)
        with self._lock:
            state = "being received" if key in self._receiving else self.storage.state(key)
            if state is None:
                self._receiving.add(key)
        if state is not None:                          # already here: idempotent, nothing redone
            self.counters["duplicates"] += 1
            self._log(f"duplicate from {calling}: SOP Instance UID {printable(uid)} already {state}; acknowledged, not "
                      "processed again")
            return status(SUCCESS)
        try:
            try:
                ds = event.dataset
                ds_uid = str(ds.get("SOPInstanceUID", ""))
                study = printable(ds.get("StudyInstanceUID", ""))
                own = _is_own_output(ds)
            except Exception as e:                     # undecodable data set
                return self._refuse(calling, CANNOT_UNDERSTAND, f"cannot decode the data set ({type(e).__name__})")
            if ds_uid != uid:
                return self._refuse(calling, CANNOT_UNDERSTAND, "SOP Instance UID differs from the request's")
            if not study:
                return self._refuse(calling, CANNOT_UNDERSTAND, "no Study Instance UID")
            if own:
                self._log(f"ignored from {calling}: an instance this node derived (not processed again)")
                return status(SUCCESS)
            try:
                self.storage.receive(key, event.encoded_dataset(include_meta=True), check=_check_film)
            except FilmRefused as e:
                return self._refuse(calling, CANNOT_UNDERSTAND, str(e))
            except OSError as e:
                self._log(f"cannot store a film from {calling}: {e.strerror or e} (status 0xA700)")
                return status(OUT_OF_RESOURCES, f"cannot store: {e.strerror or e}")
            self.counters["received"] += 1
            self._remember(key, Film(key, study, calling, time.time()))
            self._work.set()
            return status(SUCCESS)
        finally:
            with self._lock:
                self._receiving.discard(key)

    def _refuse(self, calling: str, code: int, why: str):
        self.counters["refused"] += 1
        self._log(f"refused from {calling}: {why} (status 0x{code:04X})")
        return status(code, why)

    def _remember(self, key: str, film: Film) -> None:
        with self._lock:
            self._films[key] = film
            tally = self._studies.setdefault(film.study, StudyTally(first_received=film.received))
            tally.films += 1
            tally.open += 1
            tally.first_received = min(tally.first_received, film.received)
            tally.calling.add(film.calling_ae)

    def _film_from_disk(self, key: str) -> Film:
        import pydicom

        path = self.storage.path("received", key)
        study, received = f"(unreadable {key[:12]})", time.time()
        try:
            received = path.stat().st_mtime
            study = printable(pydicom.dcmread(path, stop_before_pixels=True).get("StudyInstanceUID", study))
        except Exception:
            pass
        return Film(key, study, "(before restart)", received)

    # ------------------------------------------------------------------------------ processing
    def _process_loop(self) -> None:
        while not self._stop.is_set():
            keys = self.storage.to_process()[: self.batch_size]
            if not keys:
                self._work.wait(1.0)
                self._work.clear()
                continue
            jobs = [(self.storage.path("received", k), self.storage.path("derived", k)) for k in keys]
            results = self._run_model(jobs)
            for key, (seconds, error) in zip(keys, results):
                film = self._films.get(key) or self._film_from_disk(key)
                with self._lock:
                    if film.study in self._studies:
                        self._studies[film.study].processing_s += seconds / len(keys) if not error else 0.0
                if error is None:
                    self.counters["processed"] += 1
                elif "No space left" in error or "Disk quota" in error:
                    self._log(f"cannot write a derived instance ({error}); waiting 30 s")
                    self._stop.wait(30)
                else:
                    self.storage.mark("failed", key, {"stage": "processing", "error": error, "study": film.study})
                    self.counters["failed"] += 1
                    self._finish(key, error)
            self._send.set()

    def _run_model(self, jobs: list) -> list:
        """The model on a batch; if the batch as a whole fails (out of memory ...), each film alone, so
        that only the films that fail by themselves are given up."""
        try:
            return self.model.process(jobs)
        except Exception as e:
            if len(jobs) > 1:
                self._log(f"a batch of {len(jobs)} failed ({type(e).__name__}); processing its films one by one")
                return [r for job in jobs for r in self._run_model([job])]
            return [(0.0, f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__)]

    # ------------------------------------------------------------------------------ sending
    def _send_loop(self) -> None:
        d = self.destination
        while not self._stop.is_set():
            keys = self.storage.to_send()
            if not keys:
                self._send.wait(1.0)
                self._send.clear()
                continue
            wait = d["next_try"] - time.time()
            if wait > 0:
                self._stop.wait(min(wait, 1.0))
                continue
            results, error = send_instances(self.forward, self.ae_title,
                                            [self.storage.path("derived", k) for k in keys])
            delivered_any = False
            for key, (code, comment, uids) in zip(keys, results):
                if code is None:
                    continue
                if code == SUCCESS or (code >> 12) == 0xB:   # success, or a warning (0xB000, 0xB007 ...)
                    delivered_any = True
                    self.storage.mark("sent", key, {"destination": str(self.forward), "status": code, **uids,
                                                    "study": self._films[key].study if key in self._films else None})
                    self.counters["sent"] += 1
                    self._finish(key, None)
                else:
                    n = self._refusals[key] = self._refusals.get(key, 0) + 1
                    why = f"{self.forward} answered 0x{code:04X}{f' ({comment})' if comment else ''}"
                    if n >= self.max_refusals:
                        self.storage.mark("failed", key, {"stage": "sending", "error": why, "tries": n})
                        self.counters["failed"] += 1
                        self._finish(key, why)
                    else:
                        error = error or why
            if error is None:
                d.update(reachable=True, tries=0, last_error=None, next_try=0.0)
                continue
            if delivered_any:
                d["tries"] = 0
            d["tries"] += 1
            delay = min(self.retry_base * 2 ** (d["tries"] - 1), self.retry_max)
            d.update(reachable=False, last_error=error, next_try=time.time() + delay)
            self._log(f"destination {self.forward}: {error}; try {d['tries']} failed, next in {delay:g} s")

    def _finish(self, key: str, error: str | None) -> None:
        """A film is done (sent, or failed with ``error``): log its study once all its films are."""
        with self._lock:
            film = self._films.pop(key, None)
            if film is None:
                return
            tally = self._studies.get(film.study)
            if tally is None:
                return
            tally.open -= 1
            if error is None:
                tally.sent += 1
            else:
                tally.failed.append(error)
            if tally.open > 0:
                return
            del self._studies[film.study]
        n = tally.films
        line = (f"study {film.study}: {n} film{'s' * (n != 1)} received from {','.join(sorted(tally.calling))}, "
                f"processed in {tally.processing_s:.2f} s, ")
        if tally.sent:
            line += (f"sent to {self.forward} ({tally.sent} instance{'s' * (tally.sent != 1)}), "
                     f"{time.time() - tally.first_received:.1f} s after receipt")
        if tally.failed:
            line += f"{'; ' if tally.sent else ''}{len(tally.failed)} failed: {tally.failed[0]}"
        self._log(line)


def all_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pydicom knows: negotiated; whether a film decodes is checked per film."""
    from pydicom.uid import AllTransferSyntaxes

    return [str(u) for u in AllTransferSyntaxes]


class FilmRefused(ValueError):
    """A received object cannot be used as a film (the message, one line, goes back as Error Comment)."""


def _check_film(tmp: str) -> None:
    """Read the stored temporary file as the model will (``data.io.read_image``); refuse what fails."""
    from data.io import ImageError, read_image

    try:
        im = read_image(tmp)
    except ImageError as e:
        raise FilmRefused(e.reason) from None
    if im.dicom is None:
        raise FilmRefused("not a DICOM data set")


def _is_own_output(ds) -> bool:
    """An instance this toolkit derived (it must never be processed again, e.g. in a routing loop)."""
    from data.io import SOFTWARE

    return str(ds.get("Manufacturer", "")) == SOFTWARE and "DERIVED" in list(ds.get("ImageType", []))[:1]


def send_instances(dest: Destination, calling_ae: str, paths: list[Path], timeout: float = 30.0):
    """C-STORE each file of ``paths`` to ``dest`` in one association.

    Returns (results, error): per path (status, error comment, UIDs) or (None, None, {}) when it was
    not tried; ``error`` is why the association could not be made or broke (None when it held).
    """
    import pydicom
    from pynetdicom import AE
    from pydicom.uid import ExplicitVRLittleEndian

    results: list = [(None, None, {})] * len(paths)
    headers = []
    for p in paths:
        h = pydicom.dcmread(p, stop_before_pixels=True)
        headers.append(h)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop in sorted({str(h.SOPClassUID) for h in headers}):
        ae.add_requested_context(sop, ExplicitVRLittleEndian)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    except Exception as e:                            # an unresolvable host name ...
        return results, f"cannot connect ({type(e).__name__}: {e})"
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted" if assoc.is_aborted \
            else "cannot connect"
        return results, why
    error = None
    try:
        for i, (p, h) in enumerate(zip(paths, headers)):
            try:
                st = assoc.send_c_store(p)
            except Exception as e:
                error = f"sending failed ({type(e).__name__}: {e})".splitlines()[0]
                break
            if "Status" not in st:
                error = "the association broke while sending"
                break
            results[i] = (int(st.Status), str(st.get("ErrorComment", "")) or None,
                          {"derived_sop_instance_uid": str(h.SOPInstanceUID),
                           "derived_series_uid": str(h.SeriesInstanceUID)})
    finally:
        if assoc.is_established:
            assoc.release()
    return results, error


def quiet_pynetdicom(verbose: bool = False) -> None:
    """pynetdicom logs every failed connection with a traceback-like block; the node logs its own lines."""
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def _health_handler(node: Node):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.rstrip("/") not in ("/health", ""):
                self.send_error(404)
                return
            body = json.dumps(node.health(), allow_nan=False).encode()
            self.send_response(200 if node.healthy() else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:      # no access log
            return

    return Handler

