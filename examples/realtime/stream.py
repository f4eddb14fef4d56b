"""Classify a stream of frames in real time with a vitedge engine.

A frame source (a folder of images played at a target FPS, or a video file read with imageio)
feeds a pipeline of threads: capture -> preprocessing workers -> inference, connected by bounded
queues so that preprocessing of the next frames overlaps inference of the current one.  When
inference falls behind, the capture thread drops the oldest waiting frame instead of letting
latency grow (what a live camera does).  Every second it prints the rolling FPS and the p50/p99 end-to-end latency
(capture to result); a summary closes the run.

    python examples/realtime/stream.py ENGINE --frames DIR [--fps 30] [--seconds 10] [--max-frames N]
    python examples/realtime/stream.py ENGINE --video clip.mp4 [--fps 0]      # needs vitedge[video]
    python examples/realtime/stream.py --make-video clip.mp4 --frames DIR     # a test clip from images

ENGINE is anything ``vitedge.load`` opens (ONNX, OpenVINO IR or blob, TensorRT engine, bundle).
"""

from __future__ import annotations

import argparse
import collections
import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import vitedge
from vitedge.data import list_images

STOP = object()
VIDEO_HINT = 'pip install "vitedge[video]" (imageio + imageio-ffmpeg)'


def need_imageio(what: str) -> None:
    """Stop with one line (not a traceback) when the optional video extra is missing."""
    import importlib.util

    if importlib.util.find_spec("imageio") is None:
        sys.exit(f"error: {what} needs imageio, which is not installed — {VIDEO_HINT}")


# -- sources ------------------------------------------------------------------------------------
def folder_frames(folder: Path, loop: bool):
    paths = list_images(folder)
    if not paths:
        sys.exit(f"error: no images in {folder}")
    while True:
        for p in paths:
            with Image.open(p) as im:
                yield np.asarray(im.convert("RGB")), p.parent.name
        if not loop:
            return


def video_frames(path: Path, loop: bool):
    import imageio.v3 as iio  # main() checked that it is installed

    while True:
        for frame in iio.imiter(path, plugin="pyav") if _has_pyav() else iio.imiter(path):
            yield np.ascontiguousarray(frame[..., :3]), None
        if not loop:
            return


def _has_pyav() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def check_frames(folder: Path) -> None:
    if not folder.is_dir():
        sys.exit(f"error: frames folder {folder} does not exist")
    if not list_images(folder):
        sys.exit(f"error: no images in {folder}")


def make_video(out: Path, folder: Path, fps: int, size: int = 128) -> None:
    """A test clip: the images of ``folder`` as consecutive frames (resized to ``size``)."""
    import imageio.v2 as imageio

    paths = list_images(folder)
    with imageio.get_writer(out, fps=fps, codec="libx264", quality=8, macro_block_size=16) as w:
        for p in paths:
            with Image.open(p) as im:
                w.append_data(np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)))
    print(f"wrote {out}: {len(paths)} frames at {fps} FPS")


# -- the pipeline -------------------------------------------------------------------------------
class Stats:
    """Rolling FPS and latency percentiles over the last ``window`` seconds, plus run totals."""

    def __init__(self, window: float = 2.0):
        self.window = window
        self.recent: collections.deque = collections.deque()  # (done_time, latency_s)
        self.all_latency: list[float] = []
        self.done = self.dropped = 0
        self.lock = threading.Lock()

    def add(self, done: float, latency: float) -> None:
        with self.lock:
            self.recent.append((done, latency))
            self.all_latency.append(latency)
            self.done += 1
            while self.recent and self.recent[0][0] < done - self.window:
                self.recent.popleft()

    def rolling(self, now: float) -> tuple[float, float, float]:
        with self.lock:
            items = [x for x in self.recent if x[0] >= now - self.window]
        if len(items) < 2:
            return 0.0, float("nan"), float("nan")
        span = max(now - items[0][0], 1e-9)
        lat = np.array([x[1] for x in items]) * 1e3
        return (len(items) - 1) / span, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def run(engine, frames, fps: float, seconds: float, workers: int, qsize: int, quiet: bool = False,
        max_frames: int | None = None) -> dict:
    """Run the pipeline for ``seconds`` (or ``max_frames`` captured frames, or the end of a non-looping
    source, whichever comes first).  A stage that fails stops the run; its error is re-raised."""
    pre = engine.preprocessing
    raw_q: queue.Queue = queue.Queue(maxsize=qsize)
    ready_q: queue.Queue = queue.Queue(maxsize=qsize)
    stats = Stats()
    stop = threading.Event()
    last = {"label": None, "prob": 0.0, "truth": None}
    correct = [0, 0]
    failures: list[BaseException] = []

    def capture():
        try:
            produce()
        except BaseException as exc:  # noqa: BLE001 - a bad source ends the run with its error, never a hang
            failures.append(exc)
        finally:
            for _ in range(workers):
                raw_q.put(STOP)

    def produce():
        period = 1.0 / fps if fps > 0 else 0.0
        t_next = time.perf_counter()
        t_end = t_next + seconds
        for i, (frame, truth) in enumerate(frames):
            now = time.perf_counter()
            if now >= t_end or stop.is_set():
                break
            if period:
                if t_next > now:
                    time.sleep(t_next - now)
                t_next += period
            item = (i, time.perf_counter(), frame, truth)
            if period:
                while True:  # a live source cannot wait: drop the oldest waiting frame, keep the freshest
                    try:
                        raw_q.put_nowait(item)
                        break
                    except queue.Full:
                        try:
                            raw_q.get_nowait()
                            stats.dropped += 1
                        except queue.Empty:
                            pass
            else:
                raw_q.put(item)  # offline file: back-pressure, never drop
            if max_frames and i + 1 >= max_frames:
                break

    def preprocess():
        try:
            while (item := raw_q.get()) is not STOP:
                if failures:
                    continue  # drain: the run is ending
                i, t_cap, frame, truth = item
                ready_q.put((i, t_cap, pre(frame), truth))
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)
            stop.set()
            while raw_q.get() is not STOP:  # let capture finish
                pass
        finally:
            ready_q.put(STOP)

    def infer():
        try:
            classify()
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)
            stop.set()

    def classify():
        stopped = 0
        labels = engine.manifest.labels or []
        while stopped < workers:
            item = ready_q.get()
            if item is STOP:
                stopped += 1
                continue
            _, t_cap, x, truth = item
            logits = engine.infer(x[None])[0]
            done = time.perf_counter()
            stats.add(done, done - t_cap)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            k = int(p.argmax())
            last.update(label=labels[k] if k < len(labels) else str(k), prob=float(p[k]), truth=truth)
            if truth is not None:
                correct[0] += last["label"] == truth
                correct[1] += 1

    threads = [threading.Thread(target=capture, daemon=True)]
    threads += [threading.Thread(target=preprocess, daemon=True) for _ in range(workers)]
    threads += [threading.Thread(target=infer, daemon=True)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    try:
        while threads[-1].is_alive():
            threads[-1].join(timeout=1.0)
            now = time.perf_counter()
            f, p50, p99 = stats.rolling(now)
            if not quiet and threads[-1].is_alive():
                print(f"t={now - t0:5.1f}s  fps {f:6.1f}  latency p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
                      f"dropped {stats.dropped}  last: {last['label']} ({last['prob']:.0%})", flush=True)
    except KeyboardInterrupt:
        stop.set()
        threads[-1].join()
    if failures:
        raise failures[0]
    wall = time.perf_counter() - t0
    lat = np.array(stats.all_latency) * 1e3 if stats.all_latency else np.array([np.nan])
    return {
        "frames": stats.done, "dropped": stats.dropped, "seconds": round(wall, 2), "fps": round(stats.done / wall, 1),
        "target_fps": fps or None, "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
        "accuracy": round(correct[0] / correct[1], 4) if correct[1] else None,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Classify a stream of frames in real time with a vitedge engine.")
    ap.add_argument("engine", nargs="?", type=Path, help="engine file, manifest or bundle folder")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--frames", type=Path, help="folder of frames (played in sorted order; class sub-folders give accuracy)")
    src.add_argument("--video", type=Path, help="video file (needs vitedge[video]: imageio + imageio-ffmpeg)")
    ap.add_argument("--fps", type=float, default=30.0, help="target frame rate of the source; 0 = as fast as possible (default 30)")
    ap.add_argument("--seconds", type=float, default=10.0, help="stop after this long (default 10)")
    ap.add_argument("--max-frames", type=int, default=None, metavar="N",
                    help="stop after N frames from the source (a short run, e.g. a smoke test)")
    ap.add_argument("--no-loop", action="store_true", help="stop at the end of the frames instead of looping")
    ap.add_argument("--workers", type=int, default=1, help="preprocessing threads (default 1)")
    ap.add_argument("--queue", type=int, default=1, help="frames buffered between stages (default 1: lowest latency)")
    ap.add_argument("--threads", type=int, default=None, help="inference threads given to the engine")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--make-video", type=Path, help="write a test clip from --frames instead of classifying")
    args = ap.parse_args(argv)
    if args.max_frames is not None and args.max_frames < 1:
        ap.error("--max-frames must be at least 1")
    if args.make_video:
        if not args.frames:
            ap.error("--make-video needs --frames DIR")
        need_imageio("--make-video (writing a video file)")
        check_frames(args.frames)
        try:
            make_video(args.make_video, args.frames, int(args.fps or 30))
        except Exception as exc:  # noqa: BLE001 - e.g. no ffmpeg for imageio: one line, not a traceback
            args.make_video.unlink(missing_ok=True)
            sys.exit(f"error: cannot write {args.make_video} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}) — {VIDEO_HINT}")
        return
    if args.engine is None or not (args.frames or args.video):
        ap.error("give ENGINE and --frames DIR or --video FILE")
    if args.video:
        need_imageio("--video (reading a video file)")
        if not args.video.is_file():
            sys.exit(f"error: video file {args.video} does not exist")
    else:
        check_frames(args.frames)
    options = {"threads": args.threads} if args.threads else {}
    try:
        engine = vitedge.load(args.engine, **options)
    except vitedge.VitedgeError as exc:
        sys.exit(f"error: {exc}")
    frames = folder_frames(args.frames, not args.no_loop) if args.frames else video_frames(args.video, not args.no_loop)
    with engine:
        print(f"{engine!r}, source {'frames ' + str(args.frames) if args.frames else 'video ' + str(args.video)} at "
              f"{args.fps or 'max'} FPS, {args.workers} preprocessing worker(s)", flush=True)
        try:
            summary = run(engine, frames, args.fps, args.seconds, max(1, args.workers), max(1, args.queue),
                          quiet=args.json, max_frames=args.max_frames)
        except vitedge.VitedgeError as exc:
            sys.exit(f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. a corrupt video: one line, not a traceback
            sys.exit(f"error: {type(exc).__name__}: {' '.join(str(exc).split())}")
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"summary: {summary['frames']} frames in {summary['seconds']} s = {summary['fps']} FPS "
              f"(target {summary['target_fps'] or 'max'}), dropped {summary['dropped']}, latency p50 "
              f"{summary['latency_ms_p50']} ms p99 {summary['latency_ms_p99']} ms"
              + (f", accuracy {summary['accuracy']:.1%}" if summary["accuracy"] is not None else ""))


if __name__ == "__main__":
    main()
