"""The storm state machine (tracer/storm.py) over a stand-in for the BPF maps it reads and writes:
when a window's counts are read, and when a storm starts and ends. The kernel side is tested with
real storms in tests/kernel/test_ring.py."""
from __future__ import annotations

from types import SimpleNamespace

from tracer.storm import CALM_RATE, Storms


class FakeMaps:
    """storm_ctl and storm_shapes as the programs would leave them."""

    def __init__(self):
        self.high = self.epoch = self.aggregating = 0
        self.shapes: dict[tuple, list[int]] = {}    # (epoch, pid) → [aggregated, samples]

    def storm_control(self):
        return self.high, self.epoch, self.aggregating

    def set_storm_control(self, high, epoch, aggregating):
        self.high, self.epoch, self.aggregating = high, epoch, aggregating

    def count(self, n: int, pid: int = 42) -> None:
        """What the programs do during a storm: count into the current window."""
        self.aggregating = 1
        slot = self.shapes.setdefault((self.epoch, pid), [0, 0])
        slot[0] += n

    def take_storm_shapes(self, through):
        out = []
        for (epoch, pid), (aggregated, samples) in list(self.shapes.items()):
            if through is None or epoch <= through:
                shape = SimpleNamespace(kind=1, netns=4026531840, service_port=8100)
                key = SimpleNamespace(shape=shape, epoch=epoch, tgid=pid, comm=b"nginx")
                out.append((key, aggregated, samples))
                del self.shapes[(epoch, pid)]
        return out


def storms(maps, pending=0):
    clock = iter(range(0, 1000))          # one tick a second
    return Storms(maps, 32 << 20, lambda shape: "closed_with_unread_data", lambda inode: "host", lambda: pending,
                  clock=lambda: float(next(clock)))


def stats(submitted=0, aggregated=0, lost=0):
    return {"submitted": submitted, "aggregated": aggregated, "lost": lost}


def test_a_storm_is_reported_once_its_windows_are_closed_and_ends_when_calm():
    maps = FakeMaps()
    s = storms(maps)
    assert maps.high == (32 << 20) // 4 and s.tick(stats()) == []          # nothing aggregating: nothing said
    maps.count(100_000)                                                   # the kernel started a storm
    out = s.tick(stats(submitted=500, aggregated=100_000))
    assert [r["type"] for r in out] == ["storm"] and out[0]["phase"] == "start"
    window = maps.epoch                   # the window counts go to now
    maps.count(200_000)
    out = s.tick(stats(submitted=520, aggregated=300_000))
    # The window the storm started in is read only now that it is two behind (no program adds to it).
    assert [(r["type"], r["count"]) for r in out] == [("aggregate", 100_000)]
    assert out[0]["process"] == {"pid": 42, "comm": "nginx"} and out[0]["netns"]["name"] == "host"
    assert maps.aggregating == 1          # still raging: 200 000 events in the last window
    out = s.tick(stats(submitted=530, aggregated=300_000))
    assert [(r["type"], r["count"]) for r in out] == [("aggregate", 200_000)] and maps.epoch == window + 2
    assert maps.aggregating == 0          # calm (under CALM_RATE): the kernel writes one record per event again
    assert 10 < CALM_RATE
    assert s.tick(stats(submitted=540, aggregated=300_000)) == []
    out = s.tick(stats(submitted=550, aggregated=300_000))
    assert [(r["type"], r.get("phase")) for r in out] == [("storm", "end")]
    assert (out[0]["written"], out[0]["aggregated"], out[0]["lost"]) == (550, 300_000, 0)


def test_exit_reads_every_window_left_and_ends_the_storm():
    maps = FakeMaps()
    s = storms(maps)
    maps.count(10)
    s.tick(stats(aggregated=10))
    maps.count(5)
    out = s.finish(stats(aggregated=15))
    assert [(r["type"], r.get("count"), r.get("phase")) for r in out] == [
        ("aggregate", 10, None), ("aggregate", 5, None), ("storm", None, "end")]
    assert maps.shapes == {}
