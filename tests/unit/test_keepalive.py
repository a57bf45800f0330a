"""`streams.KeptAlive`, in process, on a recording stream: nothing before the first silence, then SSE comments
on an event stream or whitespace before a whole JSON answer, one writer at a time. The silences are made by
construction (a route that sleeps), the interval is short; what is asserted is what went out and in which
order, never how late."""

from __future__ import annotations

import json
import threading
import time

import pytest
from recording_stream import RecordingStream
from runtime_api import sse_events

from phi2.api import streams

INTERVAL_S = 0.05
JSON_HEADERS = {"Content-Type": "application/json", "x-request-id": "req-1"}
SSE_OPENING = (200, dict(streams.SSE_HEADERS), b": ok\n\n")


def kept(stream: RecordingStream) -> streams.KeptAlive:
    return streams.KeptAlive(stream, INTERVAL_S, JSON_HEADERS)


def test_an_answer_ready_before_the_first_silence_is_untouched():
    # GIVEN a keep-alive around a route that answers (an error found before any compute) at once
    stream = RecordingStream()
    alive = kept(stream)
    with alive.running():
        pass
    # THEN nothing was sent: the transport still answers it as a normal response, with its own status
    assert not stream.started and alive.sent == 0 and not alive.opened_for_json


def test_a_whole_json_answer_gets_a_200_prelude_then_whitespace_while_it_is_computed():
    # GIVEN a route that computes a whole answer silently for many intervals
    stream = RecordingStream()
    alive = kept(stream)
    with alive.running():
        time.sleep(10 * INTERVAL_S)
        # WHEN the transport then writes the answer's body
    alive.write(b'{"generated_text": "Paris"}')
    # THEN the keep-alive opened it as a JSON answer with status 200, and sent whitespace only before the body
    assert alive.opened_for_json and stream.status == 200 and stream.headers == JSON_HEADERS
    assert alive.sent >= 2
    assert [data for _, data in stream.writes[:-1]] == [streams.JSON_KEEPALIVE] * alive.sent
    # AND the whole body is still the JSON value
    assert json.loads(stream.body) == {"generated_text": "Paris"}


def test_an_announced_event_stream_is_opened_as_announced_and_kept_alive_with_comments():
    # GIVEN a streaming route that announced its opening, then stays silent (a model still loading)
    stream = RecordingStream()
    alive = kept(stream)
    with alive.running():
        alive.announce(*SSE_OPENING)
        time.sleep(6 * INTERVAL_S)
        # WHEN it is admitted and opens the stream itself, then sends its events
        assert alive.open_once(*SSE_OPENING) is True
        alive.write(b'data: {"token": 1}\n\n')
    # THEN the keep-alive had opened it as announced (once: the route's open_once sent no second opening)
    assert stream.status == 200 and stream.headers == SSE_OPENING[1] and not alive.opened_for_json
    events = sse_events(stream.body)
    assert events[0]["comments"] == ["ok"]
    assert [e["comments"] for e in events[1:-1]] == [[streams.KEEPALIVE_COMMENT]] * (len(events) - 2)
    assert len(events) - 2 >= 2 and events[-1]["data"] == '{"token": 1}'


def test_a_stream_the_route_opened_gets_comments_only_when_it_falls_silent():
    # GIVEN a route that opened its event stream and writes an event every half interval, then pauses
    stream = RecordingStream()
    alive = kept(stream)
    with alive.running():
        alive.open_once(*SSE_OPENING)
        for i in range(10):
            alive.write(f"data: {i}\n\n".encode())
            time.sleep(INTERVAL_S / 5)
        busy = alive.sent
        time.sleep(6 * INTERVAL_S)
    # THEN it sent keep-alives during the pause, each a whole comment between whole events
    assert alive.sent > busy
    assert [e.get("data") for e in sse_events(stream.body) if "data" in e] == [str(i) for i in range(10)]


def test_writes_from_the_route_and_the_keep_alive_never_interleave():
    # GIVEN a route writing events from many threads while the keep-alive fires as often as it can
    stream = RecordingStream()
    alive = streams.KeptAlive(stream, 0.0, JSON_HEADERS)
    alive.open_once(*SSE_OPENING)

    def route(n: int) -> None:
        for i in range(200):
            alive.write(f"data: {n}-{i}\n\n".encode())

    with alive.running():
        threads = [threading.Thread(target=route, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # THEN the body is well-formed SSE: every event whole, every keep-alive a whole comment
    events = sse_events(stream.body)
    data = [e["data"] for e in events if "data" in e]
    assert sorted(data) == sorted(f"{n}-{i}" for n in range(4) for i in range(200))
    assert all(e.get("comments") in ([], ["ok"], [streams.KEEPALIVE_COMMENT]) for e in events)


@pytest.mark.parametrize("accept_writes", [1, 3])
def test_a_reader_that_went_away_gets_no_more_keep_alives(accept_writes):
    # GIVEN a JSON answer whose reader stops accepting bytes after a few writes
    stream = RecordingStream(accept_writes=accept_writes)
    alive = kept(stream)
    with alive.running():
        time.sleep(12 * INTERVAL_S)
    # THEN the keep-alive stopped once a write failed
    assert not stream.open and len(stream.writes) == accept_writes
    assert alive.sent <= accept_writes + 1
