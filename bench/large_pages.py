"""Benchmark: one clinician's large feed pages against another clinician's small reads, on a real server.

Run from anywhere with the project's virtual environment:

    .venv/bin/python bench/large_pages.py [--repo PATH] [--recordings 60] [--limit 500] [--cpu-requests 2000]

`--repo` is the project tree whose server is measured (default: this one), so
that the same script measures an older commit checked out elsewhere
(`git worktree add /tmp/lp_before HEAD`).

Seeds once, through the API of a real server (tests.server.Server: uvicorn
with one worker over its own SQLite file): clinician `heavy` with
`--recordings` recordings of about 1.9 million characters each (a full
transcript, a long error, some verification results), clinician `light` with
50 small ones. Then, each on a fresh copy of that database and a fresh server
process (so that the peak RSS is the scenario's own):

- idle: `light` reads one small recording (GET) every 20 ms, for 3 s;
- 1 and 4 pullers: the same, while 1 or 4 processes walk `heavy`'s whole
  feed at once with `limit=--limit`, from cursor 0 until `has_more` is false.

Prints, per scenario, the latency of `light`'s GETs while the pullers run, a
puller's walk (seconds, pages, largest and total answer), and the server's
peak RSS (VmHWM); then the server's CPU time per request for a small GET and a
small list (50 items), sequential requests on an idle server, median of three
rounds. Exits 1 if a walk missed or repeated a change. Figures, never an
assertion on time; the pullers and the light client share the machine with
the server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import orjson

REPO = Path(__file__).resolve().parent.parent
SMALL_RECORDINGS = 50
LIGHT_PAUSE = 0.02
IDLE_SECONDS = 3.0
CPU_ROUNDS = 3
SENTENCE = "Patient reports intermittent chest pain on exertion, no radiation, relieved by rest. "


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def large_recording(n: int) -> dict:
    """About 1.9 million characters of text, under the 2 MiB body limit."""
    text = SENTENCE * (500_000 // len(SENTENCE))
    return {
        "patient_ref": f"PAT-{n:05}",
        "title": f"Cardiology review {n}",
        "transcript": text,
        "error": f"Transcription service trace {n}: " + (SENTENCE * 15_000)[:1_300_000],
        "verification_results": {"segments": [{"start": i, "text": SENTENCE} for i in range(1_000)]},
    }


def seed(server, count: int) -> tuple[str, str, str]:
    """Both clinicians and their recordings, through the API: (heavy token, light token, a light recording id)."""
    server.prepare("heavy", "light")
    with server:
        heavy, light = server.login("heavy"), server.login("light")
        with server.client(heavy) as client:
            for n in range(count):
                client.post("/recordings", json=large_recording(n)).raise_for_status()
        with server.client(light) as client:
            small = [
                client.post("/recordings", json={"patient_ref": f"LIGHT-{n}", "transcript": SENTENCE})
                for n in range(SMALL_RECORDINGS)
            ]
            for response in small:
                response.raise_for_status()
    return heavy, light, small[0].json()["id"]


def pull_feed(url: str, token: str, limit: int) -> dict:
    """In a process of its own: walk the whole feed, as a device's first sync does."""
    sizes, seen, since, started = [], [], 0, time.perf_counter()
    with httpx.Client(base_url=f"{url}/api", headers={"Authorization": f"Bearer {token}"}, timeout=600) as client:
        while True:
            response = client.get("/sync/changes", params={"since": since, "limit": limit})
            response.raise_for_status()
            sizes.append(len(response.content))
            page = orjson.loads(response.content)
            seen += [change["change_seq"] for change in page["changes"]]
            since = page["cursor"]
            if not page["has_more"]:
                break
    return {"seconds": time.perf_counter() - started, "sizes": sizes, "seen": seen}


def read_small(server, token: str, recording_id: str, until) -> list[float]:
    """Latencies (s) of GETs of one small recording, one every LIGHT_PAUSE, until `until()` says stop."""
    latencies = []
    with server.client(token) as client:
        while not until():
            started = time.perf_counter()
            client.get(f"/recordings/{recording_id}").raise_for_status()
            latencies.append(time.perf_counter() - started)
            time.sleep(LIGHT_PAUSE)
    return latencies


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_scenario(server, pullers: int, tokens: tuple[str, str, str], limit: int) -> dict:
    heavy, light, recording_id = tokens
    pid = server.process.pid
    read_small(server, light, recording_id, until=_after(0.5))  # warm-up
    if not pullers:
        latencies, walks = read_small(server, light, recording_id, until=_after(IDLE_SECONDS)), []
    else:
        with ProcessPoolExecutor(pullers) as pool:
            futures = [pool.submit(pull_feed, server.url, heavy, limit) for _ in range(pullers)]
            latencies = read_small(server, light, recording_id, until=lambda: all(f.done() for f in futures))
            walks = [future.result() for future in futures]
    return {"pullers": pullers, "latencies": latencies, "walks": walks, "peak_rss": peak_rss_mb(pid)}


def _after(seconds: float):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline


def cpu_per_request(server, token: str, path: str, requests: int) -> float:
    """Median over CPU_ROUNDS of the server's CPU time per request (µs), sequential requests."""
    rounds = []
    with server.client(token) as client:
        for _ in range(CPU_ROUNDS):
            before = cpu_seconds(server.process.pid)
            for _ in range(requests):
                client.get(path).raise_for_status()
            rounds.append((cpu_seconds(server.process.pid) - before) / requests * 1e6)
    return statistics.median(rounds)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(results: list[dict], cpu: dict[str, float], repo: Path, count: int, limit: int) -> None:
    print(f"\nlarge pages: {repo} ({count} recordings of ~1.9 M characters, feed limit={limit})\n")
    header = (
        "| scenario | light GET p50 ms | p99 ms | max ms | GETs | walk s | pages | largest answer MB "
        "| total MB a walk | server peak RSS MB |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for result in results:
        ms = [latency * 1000 for latency in result["latencies"]]
        walks = result["walks"]
        walk = "- | - | - | -"
        if walks:
            largest = max(max(w["sizes"]) for w in walks)
            walk = (
                f"{max(w['seconds'] for w in walks):.2f} | {len(walks[0]['sizes'])} | "
                f"{largest / 1e6:.1f} | {sum(walks[0]['sizes']) / 1e6:.1f}"
            )
        name = f"{result['pullers']} puller{'s' if result['pullers'] > 1 else ''}" if result["pullers"] else "idle"
        print(
            f"| {name} | {statistics.median(ms):.1f} | {percentile(ms, 0.99):.1f} | {max(ms):.1f} | {len(ms)} "
            f"| {walk} | {result['peak_rss']:.0f} |"
        )
    print()
    for name, micros in cpu.items():
        print(f"server CPU a request, {name}: {micros:.0f} µs")


def check(results: list[dict], count: int) -> bool:
    expected = None
    for result in results:
        for walk in result["walks"]:
            if len(walk["seen"]) != count or walk["seen"] != sorted(set(walk["seen"])):
                return False
            expected = expected or walk["seen"]
            if walk["seen"] != expected:
                return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the project tree whose server to measure")
    parser.add_argument("--recordings", type=int, default=60, help="heavy's large recordings (default 60)")
    parser.add_argument("--limit", type=int, default=500, help="the pullers' page limit (default 500)")
    parser.add_argument("--cpu-requests", type=int, default=2000, help="requests a CPU round (default 2000)")
    options = parser.parse_args()
    sys.path.insert(0, str(options.repo.resolve()))
    from tests.server import Server, clone_database

    folder = Path(tempfile.mkdtemp(prefix="large-pages-"))
    try:
        started = time.perf_counter()
        template = Server(folder / "template")
        tokens = seed(template, options.recordings)
        log(f"seeded in {time.perf_counter() - started:.1f} s")
        results, cpu = [], {}
        for pullers in (0, 1, 4):
            server = Server(folder / f"pullers-{pullers}")
            clone_database(template.db_path, server.db_path)
            with server:
                log(f"{pullers} pullers")
                results.append(run_scenario(server, pullers, tokens, options.limit))
                if not pullers:
                    light = tokens[1]
                    cpu["small GET"] = cpu_per_request(server, light, f"/recordings/{tokens[2]}", options.cpu_requests)
                    cpu["small list (50)"] = cpu_per_request(
                        server, light, "/recordings?limit=50", options.cpu_requests
                    )
        report(results, cpu, options.repo, options.recordings, options.limit)
        if not check(results, options.recordings):
            print("large pages: WRONG: a walk missed or repeated a change", file=sys.stderr)
            return 1
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
