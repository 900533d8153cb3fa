"""--otlp end to end: rsttrace traces real resets and an OTLP/HTTP receiver in the test gets each record
as a log record, exactly as many as the JSON stream has, and the summary says every one was sent.
The sink's delivery rules (batches, retries, a receiver that is down or slow) are tested in
tests/unit/test_otlp.py against the same kind of receiver."""
from __future__ import annotations

from conftest import delta, events
from receivers import OtlpReceiver, attrs

PORT = 8331


def test_every_record_reaches_the_otlp_receiver(tracer, netns):
    receiver = OtlpReceiver()
    try:
        t = tracer("--json", "--port", str(PORT), "--netns", str(netns.inode), "--otlp", receiver.url)
        before = netns.counters()
        facts = netns.scenario("closed_port", "127.0.0.1", PORT)
        unread = netns.scenario("unread_close", "127.0.0.1", PORT, "1000")
        after = netns.counters()
        records = t.stop()
    finally:
        receiver.close()
    assert facts and unread
    sent = events(records, event="rst_sent")
    assert len(sent) == delta(before, after, "TcpOutRsts") >= 2
    logs = [r for r in receiver.records if attrs(r).get("event.name", "").startswith("rsttrace.")]
    by_name: dict[str, list[dict]] = {}
    for r in logs:
        by_name.setdefault(attrs(r)["event.name"], []).append(r)
    # one log record per event record of the JSON stream, the same reason and addresses
    assert len(by_name.get("rsttrace.rst_sent", [])) == len(sent)
    assert sorted((attrs(r)["rsttrace.reason"], attrs(r)["network.local.port"], attrs(r)["network.peer.port"])
                  for r in by_name["rsttrace.rst_sent"]) == sorted(
        (e["reason"], e["local"]["port"], e["remote"]["port"]) for e in sent)
    assert {r["body"]["stringValue"] for r in by_name["rsttrace.rst_sent"]} == {e["explanation"] for e in sent}
    resource = {kv["key"]: next(iter(kv["value"].values())) for kv in receiver.resources[0]["attributes"]}
    assert resource["service.name"] == "rsttrace"
    # nothing lost on the way: the summary counts every record the sink took as sent
    [summary] = [r for r in records if r["type"] == "summary"]
    otlp = summary["otlp"]
    assert (otlp["failed"], otlp["dropped_queue_full"], otlp["unsent_at_exit"]) == (0, 0, 0)
    assert otlp["sent"] == len(receiver.records) - 1      # the summary itself is sent after it is made
