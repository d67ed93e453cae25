"""DICOM node benchmark: films per minute, and seconds from a film's receipt to the delivery of its
soft-tissue instance.

Usage:
    python -m tools.node_benchmark                                  # demo-size model, 12 films
    python -m tools.node_benchmark --size paper --films 2 --no-warmup   # szch.yaml networks, 1024² input
    python -m tools.node_benchmark --size quick --films 3           # tiny networks (tests)
    python -m tools.node_benchmark --out node_bench.json

Builds a checkpoint of the chosen size with seeded random weights in a temporary folder (timings do
not depend on the weights): ``demo`` = configs/demo.yaml (256² model input), ``demo-phantom`` = the
phantom demo's networks (configs/demo-phantom.yaml, 128²), ``paper`` =
configs/szch.yaml (1024², the published networks), ``quick`` = the tests' smoke networks; the
sampler is the project's default (LCM, ``--steps`` 4) with the global-local path and the built-in
lung segmenter, precision ``auto`` (``--precision``). Starts the node (:class:`node.service.Node`, what
``dicom_node.py`` runs) on loopback with a pynetdicom storage SCP as the destination, and sends, as
a PACS would, copies of the real CR film RG1_UNCR.dcm (1841 x 1955, pydicom-data) with new UIDs:
a warm-up film (unless ``--no-warmup``), then one film alone (the latency of an idle node), then a
burst of ``--films`` films in one association. Latency = from the node's acknowledgement of a film
to the arrival of its derived instance at the destination; films per minute = burst films over the
time from the first film sent to the last delivery. Prints a Markdown row and the CPU (or GPU) it
ran on; ``--out`` saves the JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"paper": ["szch.yaml"], "demo": ["demo.yaml"], "demo-phantom": ["demo.yaml", "demo-phantom.yaml"],
           "quick": ["demo.yaml", "smoke.yaml"]}


def build_checkpoint(folder: Path, size: str) -> Path:
    """A stage-2 checkpoint (and its VQGAN beside it) of the ``size`` networks, seeded random weights."""
    import torch

    from models import build_unet, build_vqgan
    from utils.checkpoint import save_checkpoint
    from utils.config import config_to_dict, load_config

    torch.manual_seed(0)
    cfg = load_config([ROOT / "configs" / f for f in CONFIGS[size]], ["run.device=auto"])
    vqgan = build_vqgan(cfg.vqgan)
    save_checkpoint(folder / "vqgan.pt", kind="vqgan", step=0, epoch=0, config=config_to_dict(cfg),
                    state={"model": vqgan.state_dict()})
    cfg.ldm_train.vqgan_ckpt = "vqgan.pt"
    latent = cfg.data.image_size // vqgan.downsample_factor
    unet = build_unet(cfg.unet, image_size=latent).state_dict()
    path = folder / "ldm.pt"
    save_checkpoint(path, kind="ldm", step=0, epoch=0, config=config_to_dict(cfg),
                    state={"unet": unet, "ema": unet}, extra={"latent_size": latent})
    return path


def film_factory():
    """A function giving a new copy of RG1_UNCR.dcm (new study, series and instance UIDs) per call."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = get_testdata_file("RG1_UNCR.dcm", download=False)
    if src is None:
        raise FileNotFoundError("RG1_UNCR.dcm not found: pip install pydicom-data")
    base = pydicom.dcmread(src)

    def film():
        ds = base.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        return ds

    return film


class Sink:
    """A storage SCP on loopback that notes when each derived instance arrives (by its source's UID)."""

    def __init__(self):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComputedRadiographyImageStorage

        self.arrived: dict[str, float] = {}
        self.cond = threading.Condition()
        ae = AE(ae_title="SINK")
        ae.add_supported_context(ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.port = self.server.server_address[1]

    def on_store(self, event):
        uid = str(event.dataset.SourceImageSequence[0].ReferencedSOPInstanceUID)
        with self.cond:
            self.arrived[uid] = time.time()
            self.cond.notify_all()
        return 0x0000

    def wait(self, uids: list[str], timeout: float) -> None:
        deadline = time.time() + timeout
        with self.cond:
            while not all(u in self.arrived for u in uids):
                if not self.cond.wait(max(0.0, deadline - time.time())) and time.time() >= deadline:
                    raise TimeoutError(f"{sum(u not in self.arrived for u in uids)} derived instances not delivered "
                                       f"after {timeout:.0f} s")


def send(port: int, films: list) -> list[float]:
    """C-STORE the films to the node in one association; the time each was acknowledged."""
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    assoc = ae.associate("127.0.0.1", port, ae_title="BONESUP")
    if not assoc.is_established:
        raise RuntimeError("the node refused the benchmark's association")
    acks = []
    for ds in films:
        st = assoc.send_c_store(ds)
        if int(st.get("Status", -1)) != 0:
            raise RuntimeError(f"the node answered {st.get('Status')} to a film")
        acks.append(time.time())
    assoc.release()
    return acks


def run(size: str = "demo", films: int = 12, batch_size: int = 4, steps: int = 4, warmup: bool = True,
        precision: str = "auto", timeout: float = 3600.0) -> dict:
    import torch

    from models.precision import cpu_model
    from node.inference import NodeModel, node_config
    from node.service import Destination, Node, quiet_pynetdicom
    from node.storage import Storage

    quiet_pynetdicom()
    with tempfile.TemporaryDirectory(prefix="node-bench-") as tmp:
        tmp = Path(tmp)
        ckpt = build_checkpoint(tmp, size)
        t0 = time.time()
        cfg = node_config(ckpt, [f"sampler.steps={steps}", "sampler.name=lcm", f"inference.precision={precision}"])
        model = NodeModel(ckpt, cfg)
        load_s = time.time() - t0
        sink = Sink()
        lines: list[str] = []
        node = Node(Storage(tmp / "node"), model, "BONESUP", Destination("127.0.0.1", sink.port, "SINK"), port=0,
                    batch_size=batch_size, log=lines.append).start()
        make = film_factory()
        try:
            if warmup:
                w = make()
                send(node.port, [w])
                sink.wait([w.SOPInstanceUID], timeout)
            one = make()
            ack = send(node.port, [one])[0]
            sink.wait([one.SOPInstanceUID], timeout)
            single = sink.arrived[one.SOPInstanceUID] - ack
            burst = [make() for _ in range(films)]
            start = time.time()
            acks = send(node.port, burst)
            uids = [f.SOPInstanceUID for f in burst]
            sink.wait(uids, timeout)
        finally:
            node.stop()
            sink.server.shutdown()
        lat = [sink.arrived[u] - a for u, a in zip(uids, acks)]
        end = max(sink.arrived[u] for u in uids)
        device = torch.cuda.get_device_name(0) if model.device.type == "cuda" else cpu_model()
        return {"size": size, "image_size": model.cfg.data.image_size, "film": "RG1_UNCR.dcm 1841x1955",
                "sampler": f"{cfg.sampler.name} x{cfg.sampler.steps}",
                "global_local": model.cfg.global_local.enabled, "arithmetic": model.arithmetic,
                "device": device, "threads": torch.get_num_threads(), "batch_size": batch_size,
                "warmup": warmup, "model_load_s": round(load_s, 1), "single_film_s": round(single, 2),
                "burst_films": films, "films_per_minute": round(films / (end - start) * 60, 2),
                "burst_latency_median_s": round(statistics.median(lat), 2), "burst_latency_max_s": round(max(lat), 2)}


HEADER = ("| model | model input | sampler | arithmetic | batch | one film, receipt → delivery s | burst | films / min "
          "| burst latency median / max s |\n|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    return (f"| {r['size']} | {r['image_size']}² | {r['sampler']}{', global-local' if r['global_local'] else ''} | "
            f"{r['arithmetic'].split(' (')[0].removeprefix('precision ')} | {r['batch_size']} | {r['single_film_s']:.2f}{'' if r['warmup'] else ' (cold)'} | "
            f"{r['burst_films']} | {r['films_per_minute']:.1f} | {r['burst_latency_median_s']:.1f} / "
            f"{r['burst_latency_max_s']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="DICOM node benchmark: films per minute, receipt-to-delivery seconds.")
    p.add_argument("--size", choices=sorted(CONFIGS), default="demo")
    p.add_argument("--films", type=int, default=12, help="films of the burst (default 12)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="LCM steps (default 4, the project's default)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="inference.precision (default auto: bf16 where measured faster, models/precision.py)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="no warm-up film before timing")
    p.add_argument("--out", help="also write the result as JSON")
    args = p.parse_args(argv)
    if args.films < 1 or args.batch_size < 1 or args.steps < 1:
        print("error: --films, --batch-size and --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        r = run(args.size, args.films, args.batch_size, args.steps, args.warmup, args.precision)
    except (FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"DICOM node on {r['device']} ({r['threads']} threads); model loaded in {r['model_load_s']} s\n")
    print(HEADER)
    print(row(r))
    if args.out:
        from utils.atomic import atomic_write_text, json_text

        atomic_write_text(args.out, json_text(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
