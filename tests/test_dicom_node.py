"""The DICOM node (dicom_node.py, node/) against a real PACS: Orthanc from the distribution's packages,
started here on free loopback ports with a temporary storage folder (skipped without the binary).

Films are downscaled copies of RG1_UNCR.dcm (pydicom-data), each with its own UIDs; the model is the
tests' tiny seeded checkpoint (tests/scripts.py, ``untrained_ldm``), global path only.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from data.io import SOFTWARE
from stages import suppress
from tests.conftest import ROOT, untrained_ldm

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom")

import dicom_node  # noqa: E402  (the command line, tested in-process)
from node.service import (CANNOT_UNDERSTAND, REFUSED_SOP_CLASS, Destination, Node,  # noqa: E402
                          parse_destination, quiet_pynetdicom)
from node.storage import Storage, StorageError, instance_key  # noqa: E402

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)),
                                          None)
needs_orthanc = pytest.mark.skipif(ORTHANC is None, reason="Orthanc not installed (Debian: apt-get install orthanc)")
GLOBAL_ONLY = ["global_local.enabled=false"]


# ------------------------------------------------------------------------------------------ helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """An Orthanc process on loopback ports with its own storage folder (stopped by :meth:`stop`)."""

    def __init__(self, folder: Path, dicom_port: int | None = None, aet: str = "ORTHANC"):
        self.folder, self.aet = folder, aet
        self.dicom_port, self.http_port = dicom_port or free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        config = {"Name": "test-pacs", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
                  "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "StableAge": 1,
                  "HttpServerEnabled": True, "DicomModalities": {}}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                self.get("/system")
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.1)

    @property
    def destination(self) -> Destination:
        return Destination("127.0.0.1", self.dicom_port, self.aet)

    def request(self, path: str, data: bytes | None = None, method: str | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def get(self, path: str):
        return json.loads(self.request(path))

    def derived(self) -> list:
        """The instances of every series this toolkit derived, as pydicom datasets."""
        out = []
        for iid in self.get("/instances"):
            ds = pydicom.dcmread(io.BytesIO(self.request(f"/instances/{iid}/file")))
            if ds.get("Manufacturer") == SOFTWARE and "SourceImageSequence" in ds:
                out.append(ds)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def make_films(folder: Path, n: int, start: int = 0, size: int = 8) -> list[Path]:
    """``n`` CR films: RG1_UNCR.dcm downscaled by ``size`` (245 x 231), each with new study / series /
    instance UIDs and slightly different pixels."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = get_testdata_file("RG1_UNCR.dcm", download=False)
    if src is None:
        pytest.skip("RG1_UNCR.dcm not available (pip install pydicom-data)")
    base = pydicom.dcmread(src)
    small = np.ascontiguousarray(base.pixel_array[::size, ::size])
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        ds = base.copy()
        ds.set_pixel_data((small + 37 * i) % 30000, "MONOCHROME1", 15, generate_instance_uid=False)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID = f"NODE-{i:03d}"
        path = folder / f"film{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def store(port: int, paths_or_datasets, calling: str = "STORESCU", called: str = "BONESUP") -> list[int | None]:
    """storescu: C-STORE each object to the node in one association; the statuses (None: no answer)."""
    from pynetdicom import AE

    items = [pydicom.dcmread(p) if isinstance(p, Path) else p for p in paths_or_datasets]
    ae = AE(ae_title=calling)
    for cls in sorted({str(d.SOPClassUID) for d in items}):
        ae.add_requested_context(cls, [str(d.file_meta.TransferSyntaxUID) for d in items
                                       if str(d.SOPClassUID) == cls][0])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "the node did not accept the association"
    out = []
    for d in items:
        st = assoc.send_c_store(d)
        out.append(int(st.Status) if "Status" in st else None)
    assoc.release()
    return out


def wait_for(condition, timeout: float = 60, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Lines(list):
    def __call__(self, line: str) -> None:
        self.append(line)


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("node-model")
    return untrained_ldm(base, base / "no-data")


@pytest.fixture(scope="module")
def model(ckpt):
    from node.inference import NodeModel, node_config

    quiet_pynetdicom()
    return NodeModel(ckpt, node_config(ckpt, global_only=True))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if ORTHANC is None:
        pytest.skip("Orthanc not installed (Debian: apt-get install orthanc)")
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield pacs
    pacs.stop()


@pytest.fixture
def start_node(tmp_path, model):
    nodes = []

    def start(forward: Destination, **kw) -> tuple[Node, Lines]:
        lines = Lines()
        kw.setdefault("health_port", 0)
        n = Node(Storage(kw.pop("storage", tmp_path / "node")), kw.pop("model", model), "BONESUP", forward, port=0,
                 log=lines, **kw).start()
        nodes.append(n)
        return n, lines

    yield start
    for n in nodes:
        n.stop()


# ------------------------------------------------------------------------------------------ tests

def test_loading_the_model_leaves_autograd_on(model):
    """The node once switched autograd off for the whole process on loading (``set_grad_enabled(False)``):
    any training in the same process, such as a later test, then failed in backward."""
    import torch

    assert model is not None and torch.is_grad_enabled()


def test_storage_names_are_hashes_inside_the_folder(tmp_path):
    """Every file is named by the SHA-256 of the UID: a hostile UID cannot reach outside the folder."""
    s = Storage(tmp_path / "st")
    key = instance_key("../../../etc/passwd\0")
    assert len(key) == 64 and set(key) <= set("0123456789abcdef")
    assert s.path("received", key).parent == (tmp_path / "st" / "received").resolve()
    for bad in ("../x", "a" * 63, "A" * 64, key + "/.."):
        with pytest.raises(StorageError):
            s.path("received", bad)
    (tmp_path / "st" / "received" / f".{key}.dcm.x1.tmp").write_bytes(b"half")   # a killed write
    assert Storage(tmp_path / "st").to_process() == [] and not list((tmp_path / "st" / "received").iterdir())
    assert parse_destination("pacs.local:104:PACS") == Destination("pacs.local", 104, "PACS")
    assert parse_destination("[::1]:4242:ORTHANC").host == "::1"
    for bad in ("pacs:104", "pacs:x:PACS", "pacs:104:" + "A" * 17, "pacs:70000:PACS"):
        with pytest.raises(ValueError, match="--forward"):
            parse_destination(bad)


@needs_orthanc
def test_film_to_orthanc_equals_ldm_eval(tmp_path, ckpt, orthanc, start_node):
    """A film C-STOREd to the node arrives in Orthanc as a new series of its study, with the pixels
    ldm_eval.py writes for the same file and checkpoint, its Source Image Sequence and derivation; a
    C-ECHO works; the health check answers; the same film again is acknowledged and not redone."""
    (film,) = make_films(tmp_path / "films", 1)
    node, lines = start_node(orthanc.destination)
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="BONESUP")
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert store(node.port, [film]) == [0]
    src = pydicom.dcmread(film)
    derived = wait_for(lambda: [d for d in orthanc.derived() if d.StudyInstanceUID == src.StudyInstanceUID],
                       what="the derived series in Orthanc")
    assert len(derived) == 1
    got = derived[0]

    # ldm_eval.py on the same file (named as the node names it: the noise is seeded by the file name)
    key = instance_key(src.SOPInstanceUID)
    (tmp_path / "in").mkdir()
    shutil.copy(film, tmp_path / "in" / f"{key}.dcm")
    suppress.suppress_images(suppress.eval_config(ckpt, GLOBAL_ONLY), ckpt, input_dir=str(tmp_path / "in"),
                  out_dir=tmp_path / "out", progress=False)
    ref = pydicom.dcmread(tmp_path / "out" / f"{key}.dcm")
    np.testing.assert_array_equal(got.pixel_array, ref.pixel_array)
    assert got.pixel_array.std() > 0

    # header: same patient and study, a new series, pointing at the film, labelled as derived
    assert got.StudyInstanceUID == src.StudyInstanceUID and got.PatientID == src.PatientID
    assert got.SeriesInstanceUID not in (src.SeriesInstanceUID, ref.SeriesInstanceUID)
    assert got.SOPInstanceUID != src.SOPInstanceUID and got.SOPClassUID == src.SOPClassUID
    assert got.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert got.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
    assert got.DerivationCodeSequence[0].CodeValue == "113062"
    assert got.DerivationDescription == ref.DerivationDescription
    assert got.SeriesDescription == ref.SeriesDescription and list(got.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert int(got.SeriesNumber) == int(src.get("SeriesNumber") or 0) + 1000
    assert (got.Rows, got.Columns, got.BitsStored, got.PhotometricInterpretation) == \
        (src.Rows, src.Columns, src.BitsStored, src.PhotometricInterpretation)

    wait_for(lambda: any(line.startswith(f"study {src.StudyInstanceUID}: 1 film received from STORESCU, processed in ")
                         and "sent to ORTHANC@127.0.0.1" in line for line in lines), 10, f"the study's log line in {lines}")
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/health", timeout=10).read())
    assert health["status"] == "ok" and health["done"]["sent"] == 1 and health["queue"] == {"to_process": 0,
                                                                                             "to_send": 0}
    # received and derived copies are gone after delivery; the marker stays; a resend is not redone
    assert not list((tmp_path / "node" / "received").glob("*.dcm")) and len(list((tmp_path / "node" / "sent").iterdir())) == 1
    assert store(node.port, [film]) == [0]
    time.sleep(1.0)
    assert node.counters["duplicates"] == 1 and node.counters["processed"] == 1
    assert len([d for d in orthanc.derived() if d.StudyInstanceUID == src.StudyInstanceUID]) == 1


@needs_orthanc
def test_global_local_film_equals_ldm_eval(tmp_path, ckpt, orthanc, start_node):
    """With the global-local path (the checkpoint's default; the node takes its lung masks from the
    built-in segmenter), the film in Orthanc equals ldm_eval.py's with global_local.masks=auto."""
    from node.inference import NodeModel, node_config

    cfg = node_config(ckpt)
    assert cfg.global_local.enabled and cfg.global_local.masks == "auto"
    node, _ = start_node(orthanc.destination, model=NodeModel(ckpt, cfg), storage=tmp_path / "gl-node")
    (film,) = make_films(tmp_path / "films", 1, start=70)
    src = pydicom.dcmread(film)
    assert store(node.port, [film]) == [0]
    got = wait_for(lambda: [d for d in orthanc.derived() if d.StudyInstanceUID == src.StudyInstanceUID], 60,
                   "the derived series in Orthanc")[0]
    key = instance_key(src.SOPInstanceUID)
    (tmp_path / "in").mkdir()
    shutil.copy(film, tmp_path / "in" / f"{key}.dcm")
    suppress.suppress_images(suppress.eval_config(ckpt, ["global_local.masks=auto"]), ckpt, input_dir=str(tmp_path / "in"),
                  out_dir=tmp_path / "out", progress=False)
    ref = pydicom.dcmread(tmp_path / "out" / f"{key}.dcm")
    np.testing.assert_array_equal(got.pixel_array, ref.pixel_array)
    assert got.DerivationDescription == ref.DerivationDescription and "GL-LCM global-local" in ref.DerivationDescription


@needs_orthanc
def test_refusals_non_image_corrupt_unknown_ae(tmp_path, orthanc, start_node):
    """A non-image object and a CT image are refused with 0x0122, a film with truncated pixel data
    with 0xC000 (nothing stored); with --allow-ae an unknown calling AE is rejected at association."""
    from pydicom.data import get_testdata_file
    from pynetdicom import AE

    node, lines = start_node(orthanc.destination, allow_ae=["PACS"])
    plan = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    (film,) = make_films(tmp_path / "films", 1)
    bad = pydicom.dcmread(film)
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 3]
    assert store(node.port, [plan, ct, bad], calling="PACS") == [REFUSED_SOP_CLASS, REFUSED_SOP_CLASS,
                                                                  CANNOT_UNDERSTAND]
    assert node.storage.counts() == {"to_process": 0, "to_send": 0, "sent": 0, "failed": 0}
    assert not [p for p in (tmp_path / "node").rglob("*") if p.is_file()]
    assert sum("refused from PACS" in line for line in lines) == 3
    assert any("(status 0xC000)" in line and "pixel data" in line for line in lines), lines

    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="BONESUP")
    assert assoc.is_rejected
    wait_for(lambda: any("INTRUDER" in line and "rejected" in line for line in lines), 5, "the rejection line")


@needs_orthanc
def test_destination_down_then_up(tmp_path, start_node):
    """The destination is down for the first tries (waits 0.2, 0.4, 0.8 s ...), then up: delivered once."""
    port = free_port()
    node, lines = start_node(Destination("127.0.0.1", port, "LATE"), retry_base=0.2, retry_max=2.0)
    films = make_films(tmp_path / "films", 2)
    assert store(node.port, films) == [0, 0]
    wait_for(lambda: node.destination["tries"] >= 3, 30, "three failed tries")
    waits = [float(line.split("next in ")[1].split(" s")[0]) for line in lines if "next in" in line]
    assert waits[:3] == [0.2, 0.4, 0.8]
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/health", timeout=10).read())
    assert health["destination"]["reachable"] is False and health["queue"]["to_send"] == 2
    late = Orthanc(tmp_path / "late", dicom_port=port, aet="LATE")
    try:
        wait_for(lambda: len(late.derived()) == 2, 30, "both films in the late Orthanc")
        wait_for(lambda: node.destination["reachable"], 10, "the destination marked reachable")
        assert sorted(d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in late.derived()) == \
            sorted(pydicom.dcmread(f).SOPInstanceUID for f in films)
    finally:
        late.stop()


@needs_orthanc
def test_killed_mid_queue_then_restarted(tmp_path, ckpt):
    """dicom_node.py killed (SIGKILL) with films still queued, then started again on the same folder:
    every film reaches Orthanc exactly once."""
    pacs_port, port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "dicom_node.py"), "--ckpt", str(ckpt), "--storage", str(tmp_path / "node"),
           "--forward", f"127.0.0.1:{pacs_port}:ORTHANC", "--port", str(port), "--global-only", "--batch-size", "1",
           "--retry-max", "1"]

    def launch(name: str):
        log = open(tmp_path / name, "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        wait_for(lambda: "listening as BONESUP" in (tmp_path / name).read_text() or proc.poll() is not None, 120,
                 "the node to listen")
        assert proc.poll() is None, (tmp_path / name).read_text()
        return proc, log

    films = make_films(tmp_path / "films", 6)
    proc, log = launch("first.log")
    try:
        assert store(port, films) == [0] * 6                 # stored before acknowledged
        storage = tmp_path / "node"
        wait_for(lambda: len(list((storage / "derived").glob("*.dcm"))) >= 2, 60, "two processed films")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    state = Storage(tmp_path / "node").counts()
    assert state["to_send"] >= 2 and state["sent"] == 0 and state["to_process"] + state["to_send"] == 6
    pacs = Orthanc(tmp_path / "pacs", dicom_port=pacs_port)
    proc, log = launch("second.log")
    try:
        wait_for(lambda: len(list((storage / "sent").iterdir())) == 6, 120, "all six delivered")
        derived = pacs.derived()
        assert len(derived) == 6
        assert sorted(d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in derived) == \
            sorted(pydicom.dcmread(f).SOPInstanceUID for f in films)
        text = (tmp_path / "second.log").read_text()
        assert "6 films queued from before" in text and text.count(" film received from (before restart)") == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
        pacs.stop()


@needs_orthanc
def test_twenty_films_at_once(tmp_path, orthanc, start_node):
    """20 films from 4 senders at the same time: 20 derived instances, one per film, in batches."""
    node, lines = start_node(orthanc.destination, batch_size=4)
    films = make_films(tmp_path / "films", 20, start=100)
    statuses: list = []
    threads = [threading.Thread(target=lambda part=films[i::4]: statuses.extend(store(node.port, part)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [0] * 20
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in films}
    wait_for(lambda: node.storage.counts()["sent"] == 20, 120, "20 films delivered")
    got = [d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in orthanc.derived()]
    assert sorted(u for u in got if u in uids) == sorted(uids)
    assert sum(line.startswith("study ") for line in lines) == 20           # one line per study


@needs_orthanc
def test_orthanc_routes_a_film_to_the_node_and_no_loop(tmp_path, orthanc, start_node):
    """Orthanc, with the node declared as a modality, sends it a film (as a routing rule would); the
    derived series comes back into the same study; sent back to the node, it is not processed again."""
    node, lines = start_node(orthanc.destination)
    orthanc.request("/modalities/bonesup", json.dumps({"AET": "BONESUP", "Host": "127.0.0.1",
                                                       "Port": node.port}).encode(), method="PUT")
    (film,) = make_films(tmp_path / "films", 1, start=50)
    src = pydicom.dcmread(film)
    iid = json.loads(orthanc.request("/instances", film.read_bytes(), method="POST"))["ID"]
    orthanc.request("/modalities/bonesup/store", iid.encode(), method="POST")
    wait_for(lambda: [d for d in orthanc.derived() if d.StudyInstanceUID == src.StudyInstanceUID], 60,
             "the derived series back in Orthanc")
    study = orthanc.get(f"/instances/{iid}/study")
    assert len(study["Series"]) == 2                       # the film's series and the soft-tissue one
    wait_for(lambda: any(line.startswith(f"study {src.StudyInstanceUID}: 1 film received from ORTHANC")
                         for line in lines), 10, "the study's log line")
    derived_id = next(i for i in orthanc.get("/instances") if i != iid and
                      orthanc.get(f"/instances/{i}/study")["ID"] == study["ID"])
    orthanc.request("/modalities/bonesup/store", derived_id.encode(), method="POST")
    wait_for(lambda: any("an instance this node derived" in line for line in lines), 10, "the loop to be cut")
    assert node.counters["processed"] == 1 and node.storage.counts()["to_process"] == 0


def test_benchmark_quick(capsys):
    """python -m tools.node_benchmark at the tiny size: one table row with films per minute."""
    from tools import node_benchmark

    assert node_benchmark.main(["--size", "quick", "--films", "2", "--batch-size", "2", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert "| quick | 32² | lcm x4, global-local |" in out and "films / min" in out


def test_cli_errors_are_one_line(tmp_path, ckpt, capsys):
    """dicom_node.py: a bad --forward, a missing checkpoint, a storage folder under a file, a taken
    port: one error line naming what is wrong, exit status 2, no traceback."""
    (tmp_path / "file").write_text("x")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    base = ["--storage", str(tmp_path / "st"), "--forward", "127.0.0.1:4242:ORTHANC", "--global-only"]
    cases = [(["--ckpt", str(ckpt), "--storage", str(tmp_path / "st"), "--forward", "pacs:104"], "--forward pacs:104"),
             (["--ckpt", str(tmp_path / "none.pt"), *base], "none.pt: checkpoint not found"),
             (["--ckpt", str(ckpt), *base, "--storage", str(tmp_path / "file" / "st")], "file/st: cannot use"),
             (["--ckpt", str(ckpt), *base, "--set", "unet.model_channels=8"], "unet.model_channels is fixed"),
             (["--ckpt", str(ckpt), *base, "--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1:")]
    try:
        for argv, expected in cases:
            assert dicom_node.main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    finally:
        taken.close()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_failing_batch_is_retried_film_by_film(tmp_path):
    """A batch that fails as a whole (out of memory) is processed film by film; a film that fails by
    itself is given up alone (failed/), with one log line for its study; hostile UIDs stay out of paths."""
    class Model:
        calls: list = []

        def process(self, jobs):
            self.calls.append(len(jobs))
            if len(jobs) > 1:
                raise MemoryError()
            src, dst = jobs[0]
            if pydicom.dcmread(src).PatientID == "NODE-001":
                return [(0.1, f"{src.name}: no two lungs found")]
            shutil.copy(src, dst)
            return [(0.1, None)]

    films = make_films(tmp_path / "films", 3)
    ds = pydicom.dcmread(films[2])
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.StudyInstanceUID = "1.2.3\n../../evil"
    ds.save_as(films[2])
    storage = Storage(tmp_path / "node")                 # three films queued by a former run
    for f in films:
        storage.receive(instance_key(pydicom.dcmread(f).SOPInstanceUID), f.read_bytes())
    lines = Lines()
    node = Node(storage, Model(), "BONESUP", Destination("127.0.0.1", free_port(), "DOWN"), port=0, batch_size=3,
                retry_base=5, log=lines).start()
    try:
        wait_for(lambda: storage.counts()["to_process"] == 0 and storage.counts()["failed"] == 1, 30,
                 "the batch to be processed")
    finally:
        node.stop()
    assert node.storage.counts()["to_send"] == 2
    assert Model.calls == [3, 1, 1, 1] and any("a batch of 3 failed (MemoryError)" in line for line in lines)
    assert any("3 films queued from before" in line for line in lines)
    assert [line for line in lines if line.startswith("study ") and "1 failed: " in line and "no two lungs" in line]
    assert all("\n" not in line for line in lines)
    files = [p for p in (tmp_path / "node").rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to((tmp_path / "node").resolve()) for p in files)
