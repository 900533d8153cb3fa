"""The BPF ring buffer, read straight from its memory mapping: whole batches of records per call.

bcc (through libbpf) calls back into Python once per record, from C, through ctypes; in a storm that
per-record round trip costs a noticeable share of rsttrace's time. Here one
call copies every committed record out of the mapping and moves the consumer position once.

Layout (kernel/bpf/ringbuf.c, Linux 5.8+): page 0 of the map holds consumer_pos (the only page user
space may write), page 1 producer_pos, then the data area. Each record starts with an 8-byte header
(u32 length with BUSY and DISCARD bits, u32 page offset) and is padded to 8 bytes. The kernel maps
the data area twice so that records are contiguous across the end; rsttrace maps it once (half the
resident memory) and joins the two pieces of a batch that wraps.

The BPF side submits with BPF_RB_NO_WAKEUP (bpf/maps.bpf.c), so the reader polls: a wakeup per
record costs the sender an irq_work and the reader a context switch, and a tracer has no use for
sub-millisecond latency. Loads must be ordered (a header seen committed before its data is read):
x86-64's memory model gives that to plain loads; elsewhere bcc's consumer is used instead.
"""
from __future__ import annotations

import mmap
import platform
import select
import struct

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8

# Plain loads are ordered like load-acquires on x86-64 (TSO); other machines need real barriers.
DIRECT_READ = platform.machine() in ("x86_64", "amd64")


def record_stride(size: int) -> int:
    """Bytes one record of `size` takes in the ring, header included (8-byte aligned)."""
    return (HEADER_SIZE + size + 7) & ~7


class RingReader:
    """Fixed-size records from a BPF ring buffer map, header included, `stride` bytes apart."""

    def __init__(self, map_fd: int, data_size: int, record_size: int):
        page = mmap.PAGESIZE
        self.data_size = data_size
        self.record_size = record_size
        self.stride = record_stride(record_size)
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._producer)[page:]
        # The positions as native 8-byte words: one load or store each. struct's "<Q" goes through
        # a byte-by-byte copy, and a consumer_pos the kernel reads half-written looks far behind:
        # it refuses records as if the ring were full (seen: losses in a storm while the ring was
        # mostly empty).
        self._consumer_pos = memoryview(self._consumer).cast("Q")
        self._producer_pos = memoryview(self._producer)[:8].cast("Q")
        self._words = self._data.cast("I")       # record headers, one native load each, likewise
        self._poll = select.epoll()
        self._poll.register(map_fd, select.EPOLLIN)

    def wait(self, timeout_s: float) -> None:
        """Sleep until the kernel wakes us (it rarely does, see above) or `timeout_s` passes."""
        self._poll.poll(timeout_s)

    def pending(self) -> int:
        """Records the kernel has put in the ring that were not read yet."""
        return (self._producer_pos[0] - self._consumer_pos[0]) // self.stride

    def read(self, max_records: int) -> bytes:
        """Up to `max_records` committed records as one bytes object (`stride` bytes each, header
        first). Stops at the first record still being written (BUSY): records are committed in any
        order but must be consumed in ring order."""
        consumer = self._consumer_pos[0]
        producer = self._producer_pos[0]
        n = min((producer - consumer) // self.stride, max_records)
        if n <= 0:
            return b""
        start = consumer % self.data_size
        stride = self.stride
        # Headers first, then the data they vouch for (see the module note on ordering).
        if start + n * stride <= self.data_size:
            headers = self._words[start // 4:(start + n * stride) // 4:stride // 4].tolist()
        else:
            headers = [self._words[(start + i * stride) % self.data_size // 4] for i in range(n)]
        committed = 0
        for length in headers:
            if length & BUSY_BIT:
                break
            if length & ~DISCARD_BIT != self.record_size:
                raise RuntimeError(f"BPF ring buffer record of {length & ~DISCARD_BIT} bytes, "
                                   f"expected {self.record_size}: the BPF programs and the decoder disagree")
            committed += 1
        if not committed:
            return b""
        end = start + committed * stride
        if end <= self.data_size:
            chunk = bytes(self._data[start:end])
        else:
            chunk = bytes(self._data[start:]) + bytes(self._data[:end - self.data_size])
        self._consumer_pos[0] = consumer + committed * stride
        return chunk

    def close(self) -> None:
        self._poll.close()
        self._consumer_pos.release()
        self._producer_pos.release()
        self._words.release()
        self._data.release()
        self._producer.close()
        self._consumer.close()


class CallbackRingReader:
    """The same interface over bcc's own consumer (one callback per record), for machines whose
    memory model does not order plain loads. Records get the header the direct reader would see.
    libbpf has consumed a record before its callback runs (ringbuf_process_ring(), libbpf 1.1), so a
    callback that wants to stop early keeps the record it was given, then says stop."""

    def __init__(self, bpf, table: str, record_size: int):
        import ctypes
        self.record_size = record_size
        self.stride = record_stride(record_size)
        self._bpf = bpf
        self._taken: list[bytes] = []
        self._limit = 1
        header = struct.pack("<II", record_size, 0)
        padding = b"\0" * (self.stride - HEADER_SIZE - record_size)

        def on_record(_ctx, data, size):
            self._taken.append(header + ctypes.string_at(data, size) + padding)
            return -1 if len(self._taken) >= self._limit else 0
        bpf[table].open_ring_buffer(on_record)

    def wait(self, timeout_s: float) -> None:
        if not self._taken:
            self._limit = 1          # wake on the first record; read() takes the rest
            self._bpf.ring_buffer_poll(max(1, int(timeout_s * 1000)))

    def read(self, max_records: int) -> bytes:
        if len(self._taken) < max_records:
            self._limit = max_records
            self._bpf.ring_buffer_consume()
        batch, self._taken = self._taken[:max_records], self._taken[max_records:]
        return b"".join(batch)

    def pending(self) -> int:
        """Records taken from the ring but not read yet (libbpf does not tell what is still in it)."""
        return len(self._taken)

    def close(self) -> None:
        pass
