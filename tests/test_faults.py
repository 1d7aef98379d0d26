"""Faults on real ranks end cleanly: a dead or stopped rank never hangs the command or leaves anything behind.

Two gloo ranks run `shardwise.verify(..., nproc=2)`; rank 1 sends itself SIGKILL or SIGSTOP (the
SHARDWISE_FAULT hook of drivers/launch.py) as it starts, as its prefill step begins (rank 0 is inside
that step, waiting in a collective) or as its first decode step begins. Every run must raise a
ShardwiseError naming rank 1, soon after the fault (a few seconds for a dead rank, the timeout and a
few seconds for a stopped one), with no worker process and no temporary folder left. At the fault,
every socket the run listens on (the rendezvous store in this process, gloo's in the workers) must be
bound to 127.0.0.1.
"""

import io
import ipaddress
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.drivers.launch import FAULT_ENV, TEMP_PREFIX, plain, run_real
from shardwise.drivers.verify import max_abs_diff
from shardwise.errors import ShardwiseError
from shardwise.models import example_inputs

TIMEOUT = 6.0  # s, the runs' timeout: how long a rank may wait for another, or stay stopped
SLACK = 6.0  # s after the fault (and the timeout): noticing, the others' grace, killing, cleaning up
MARKER = "SHARDWISE_TEST_MARKER"  # an environment variable the workers inherit: how the test finds them

CASES = [(point, sig) for point in ("start", "prefill", "decode") for sig in ("SIGKILL", "SIGSTOP")]


def _processes(marker: str) -> dict[int, str]:
    """pid → state letter of every process but this one whose environment holds `marker`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes():
                continue
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile, or not ours
            continue
        found[int(entry.name)] = stat[stat.rindex(")") + 2]
    return found


def _listening(pids: list[int]) -> list[str]:
    """'address:port' of every TCP socket in the LISTEN state that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # the process is gone
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append(f"{_address(address)}:{int(port, 16)}")
    return found


def _address(hexed: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp writes it: 32-bit words in the machine's byte order."""
    raw = bytes.fromhex(hexed)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


class FaultClock:
    """Watches the workers from outside: the moment one of them is first seen stopped (T) or dead (Z,
    dead and not yet reaped, or gone after having been seen), and the sockets the run listens on then."""

    def __init__(self, marker: str):
        self.marker, self.at, self.listening, self._done = marker, None, [], threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        seen: set[int] = set()
        while not self._done.is_set() and self.at is None:
            now = time.monotonic()
            states = _processes(self.marker)
            if any(s in "TtZ" for s in states.values()) or seen - set(states):
                self.at = now
                self.listening = _listening([os.getpid(), *states])
            seen |= set(states)
            time.sleep(0.02)

    def stop(self) -> float | None:
        self._done.set()
        self._thread.join()
        return self.at


@pytest.mark.parametrize("point, sig", CASES, ids=lambda v: str(v))
def test_a_faulty_rank_ends_the_run_cleanly(point, sig, monkeypatch, tmp_path):
    run_id = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, run_id)
    marker = f"{MARKER}={run_id}"  # as it appears in the workers' /proc/PID/environ
    monkeypatch.setenv(FAULT_ENV, f"1:{point}:{sig}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the launcher's temporary folder goes here
    clock = FaultClock(marker)
    phase = "decode" if point == "decode" else "prefill"
    with pytest.raises(ShardwiseError) as raised:
        shardwise.verify("llama-tiny", mesh="1x1x2", nproc=2, phase=phase, tokens=2, timeout=TIMEOUT)
    ended = time.monotonic()
    fault = clock.stop()
    message = str(raised.value)

    assert f"sends itself {sig} at {point}" in message, message  # the fault fired where it was asked to
    if sig == "SIGKILL":
        assert "rank 1 was killed by SIGKILL" in message, message
        bound = SLACK
    else:
        assert f"rank 1 was stopped (SIGSTOP, Ctrl-Z or a debugger) and did not finish in {TIMEOUT:g} s" in message
        bound = TIMEOUT + SLACK
    assert "rank 0:" in message and "To do:" in message, message
    # the store (this process) and, once the ranks have joined, rank 0's gloo socket: on loopback only
    assert len(clock.listening) >= (1 if point == "start" else 2), clock.listening
    assert all(a.startswith("127.0.0.1:") for a in clock.listening), clock.listening
    assert fault is not None, "the test never saw rank 1 stop or die"
    assert ended - fault <= bound, f"the run ended {ended - fault:.1f} s after the fault (bound {bound:g} s)"

    assert _processes(marker) == {}, "worker processes outlived the run"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)], "temporary folder left"


def test_a_malformed_fault_or_timeout_is_refused_before_any_rank_starts(monkeypatch):
    job = {"model": "llama-tiny", "mesh": "1x1x2", "layouts": None, "args": (), "kwargs": {}, "state": {}, "nproc": 2}
    with pytest.raises(ShardwiseError, match="expected a positive number of seconds"):
        run_real(**job, timeout=0)
    monkeypatch.setenv(FAULT_ENV, "1:lunch:SIGSTOP")
    with pytest.raises(ShardwiseError, match="RANK:POINT:SIGNAL"):
        run_real(**job, timeout=TIMEOUT)


def test_outputs_cross_as_plain_data(tiny):
    """A Hugging Face ModelOutput crosses as a dict of its fields that torch.load(weights_only=True)
    reads back, equal to the model's output for max_abs_diff; what cannot cross is refused by name."""
    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 2, 8)
    with torch.no_grad():
        out = model(*args, **kwargs)
    buffer = io.BytesIO()
    torch.save(plain(out, "the outputs"), buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=True)
    assert type(back) is dict and list(back) == list(out.keys())
    assert max_abs_diff(back, out) == 0.0
    with pytest.raises(ShardwiseError, match="the outputs hold a builtins.object, which cannot cross"):
        plain({"logits": out.logits, "extra": object()}, "the outputs")
