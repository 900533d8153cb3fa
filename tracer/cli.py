"""Command line: `rsttrace` (trace), `rsttrace doctor`, `rsttrace explain`."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import time

import click

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_USAGE, RsttraceError

STARTED = time.monotonic()

TRACE_EXAMPLES = """\b
Examples:
  sudo rsttrace --port 8100                 # who resets or drops connections on port 8100, and why
  sudo rsttrace --json -o /var/log/rst.jsonl # every reset on the host as JSON lines, appended to a file
  sudo rsttrace -p 80 -p 443 --reason closed_with_unread_data
  sudo rsttrace -6 --pid 4242 --count 10     # the first 10 resets caused by process 4242, IPv6 only
  sudo rsttrace --comm nginx --port 8080      # what nginx resets towards its upstream on 8080
  sudo rsttrace --port 8080 --origins         # ... and who really sent each RST (a firewall, the path)
  sudo rsttrace --port 8080 --app-errors      # ... and which syscalls failed just before each abort,
                                             # and why a full accept queue is not drained
  sudo rsttrace --netns blue --container 3f2a # one `ip netns` namespace, one container (id prefix)
  sudo rsttrace --port 8080 --duration 60 --json | jq .explanation
  sudo rsttrace --format ecs -o /var/log/rsttrace/rsttrace.json --max-rate 200   # for a SIEM's log shipper
  sudo rsttrace --syslog udp:127.0.0.1:514 --metrics 127.0.0.1:9465 -o /dev/null # syslog + Prometheus only
  sudo rsttrace --otlp http://127.0.0.1:4318 -o /dev/null # OpenTelemetry logs to a Collector's otlp receiver
  sudo OTEL_EXPORTER_OTLP_HEADERS="api-key=$KEY" rsttrace --otlp https://otlp.example:4318 -o /dev/null
  sudo kill -HUP $(pidof -x rsttrace)         # after rotating --output: reopen it (logrotate's postrotate)
  sudo rsttrace doctor                       # what this kernel lets rsttrace see
  rsttrace explain closed_with_unread_data   # what a reason means and what to change
"""


class PortType(click.ParamType):
    name = "PORT"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            value = str(value)
        ports = []
        for part in str(value).split(","):
            part = part.strip()
            if not part.isdigit() or not 1 <= int(part) <= 65535:
                self.fail(f"{part!r} is not a TCP port (1-65535)", param, ctx)
            ports.append(int(part))
        return ports


class ReasonType(click.ParamType):
    name = "REASON"

    def convert(self, value, param, ctx):
        from .enrich.reasons import REASON_NAMES
        if value not in REASON_NAMES:
            self.fail(f"unknown reason {value!r} (known: {', '.join(REASON_NAMES)})", param, ctx)
        return value


class NetnsType(click.ParamType):
    name = "NETNS"

    def convert(self, value, param, ctx):
        from .enrich.attribution import resolve_netns
        try:
            return resolve_netns(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


class CommType(click.ParamType):
    name = "NAME"

    def convert(self, value, param, ctx):
        if not value or "/" in value:
            self.fail(f"{value!r} is not a process name (comm, as in ps -o comm)", param, ctx)
        return value[:15]      # the kernel keeps 15 characters of a task's name


class CgroupType(click.ParamType):
    name = "PATH"

    def convert(self, value, param, ctx):
        if not value.startswith("/"):
            self.fail(f"{value!r} is not a cgroup path (as in /proc/PID/cgroup: /system.slice/...)", param, ctx)
        return value


class ContainerType(click.ParamType):
    name = "ID"

    def convert(self, value, param, ctx):
        value = value.lower()
        if not 1 <= len(value) <= 64 or any(c not in "0123456789abcdef" for c in value):
            self.fail(f"{value!r} is not a container id or id prefix (hex, as `docker ps` shows it)", param, ctx)
        return value


@click.group(invoke_without_command=True, epilog=TRACE_EXAMPLES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-p", "--port", "ports", type=PortType(), multiple=True,
              help="Trace only connections with this local or remote port (repeatable, or comma-separated).")
@click.option("--pid", type=click.IntRange(min=1), metavar="PID", help="Only events caused by (or on sockets owned by) this process.")
@click.option("--comm", "comms", type=CommType(), multiple=True,
              help="Only events attributed to a process with this name (repeatable).")
@click.option("--netns", "netns", type=NetnsType(), multiple=True,
              help="Only this network namespace: inode, `host`, `ip netns` name or /proc/PID/ns/net "
                   "(repeatable; filtered in the kernel).")
@click.option("--cgroup", "cgroups", type=CgroupType(), multiple=True,
              help="Only events attributed to a process in this cgroup v2 path or below it (repeatable).")
@click.option("--container", "containers", type=ContainerType(), multiple=True,
              help="Only events attributed to a process in a container whose id starts so (repeatable).")
@click.option("-4", "ipv4", is_flag=True, help="IPv4 only.")
@click.option("-6", "ipv6", is_flag=True, help="IPv6 only.")
@click.option("--reason", "reason_filter", type=ReasonType(), multiple=True,
              help="Only these reasons (repeatable; see `rsttrace explain`).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines (schema/rsttrace-v1.schema.json); same as --format json.")
@click.option("--plain", is_flag=True, help="Plain text lines (the default when not in the terminal UI).")
@click.option("--format", "fmt", type=click.Choice(["plain", "json", "ecs"]),
              help="Output lines: plain text, rsttrace's JSON, or JSON mapped onto Elastic Common Schema "
                   "(schema/rsttrace-ecs-v1.schema.json).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Append records to FILE ('-' is stdout); whole lines per write; SIGHUP reopens it (log rotation).")
@click.option("--syslog", "syslog_target", is_flag=False, flag_value="unix:/dev/log", metavar="[unix:PATH|udp:HOST:PORT]",
              help="Also send events as RFC 5424 messages with structured data (default unix:/dev/log).")
@click.option("--syslog-facility", type=click.Choice(["daemon", "kern", "user", "auth", "authpriv", "syslog",
                                                      *[f"local{i}" for i in range(8)]]),
              default="daemon", show_default=True, help="Syslog facility for --syslog.")
@click.option("--otlp", "otlp_url", metavar="URL",
              help="Also send events (and connections, losses, the summary) as OpenTelemetry log records, "
                   "OTLP/HTTP JSON POSTed to URL/v1/logs, e.g. http://127.0.0.1:4318 (a Collector's otlp "
                   "receiver); batched and retried, what cannot be sent is counted.")
@click.option("--otlp-header", "otlp_headers", metavar="NAME=VALUE", multiple=True,
              help="A request header for --otlp (repeatable), e.g. an API key; default: from "
                   "OTEL_EXPORTER_OTLP_LOGS_HEADERS or OTEL_EXPORTER_OTLP_HEADERS (k1=v1,k2=v2, keeps secrets "
                   "out of the process list).")
@click.option("--metrics", "metrics_address", metavar="ADDR:PORT",
              help="Serve Prometheus metrics at http://ADDR:PORT/metrics (exact in-kernel counts, queue gauges; "
                   ":PORT for every address).")
@click.option("--max-rate", type=click.IntRange(min=1), metavar="N",
              help="At most N event records per second; the rest are counted in `suppressed` records "
                   "(the kernel's exact counts are kept either way).")
@click.option("--ring-mb", type=click.Choice([str(1 << i) for i in range(11)]), default="32", show_default=True,
              metavar="MIB", help="Size of the ring buffer between the kernel and rsttrace, MiB, a power of two "
                                 "(1-1024): the burst it absorbs without loss (~4800 events per MiB); resident memory.")
@click.option("--backend", type=click.Choice(["auto", "tracepoint", "kprobe", "fentry"]), default="auto", show_default=True,
              help="Hook family: auto picks the best per event kind (see `rsttrace doctor`).")
@click.option("--no-stories", is_flag=True,
              help="Do not follow connections hurt by drops (their `connection` records) nor pair the RSTs "
                   "received with the RSTs this host sent.")
@click.option("--app-errors/--no-app-errors", default=False, show_default=True,
              help="Also hook the syscalls whose failures explain an abort (open, write, connect, accept, ...): "
                   "`app_errors` on RSTs, the listener's accept() behaviour on full accept queues. Off by default: "
                   "every syscall of every process then takes the kernel's slower tracing entry.")
@click.option("--app-errors-window", type=click.FloatRange(min=0, min_open=True, max=3600), default=5.0,
              show_default=True, metavar="SECONDS",
              help="How long before an RST a failed syscall of its process is still attached to it.")
@click.option("--origins/--no-origins", default=False, show_default=True,
              help="Also tell who really sent each reset: RSTs made by firewall REJECT rules (and the rule), "
                   "received RSTs whose TTL says a middlebox forged them, every RST leaving a device beside "
                   "TcpOutRsts. Off by default: two programs then run on every packet of the host. (REJECTs "
                   "answering with ICMP and RSTs that find no connection are reported either way.)")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS", help="Stop after SECONDS.")
@click.option("--count", type=click.IntRange(min=1), metavar="N", help="Stop after N events.")
@click.version_option(__version__, "-V", "--version", prog_name="rsttrace")
@click.pass_context
def main(ctx, ports, pid, comms, netns, cgroups, containers, ipv4, ipv6, reason_filter, as_json, plain, fmt, output,
         syslog_target, syslog_facility, otlp_url, otlp_headers, metrics_address, max_rate, ring_mb, backend, no_stories, app_errors,
         app_errors_window, origins, duration, count):
    """Explain every TCP reset on this host: who sent it, why, and what to change.

    rsttrace loads small eBPF programs (tracepoints; no kernel headers needed), reports each RST
    sent or received with a stable reason, the addresses, TCP state, network namespace and the
    responsible process, and prints a one-line explanation with the fix. Ctrl-C stops it and
    prints a summary; nothing stays attached in the kernel.
    """
    if ctx.invoked_subcommand is not None:
        return
    if ipv4 and ipv6:
        raise click.UsageError("-4 and -6 exclude each other")
    chosen = {f for f, on in (("json", as_json), ("plain", plain), (fmt, bool(fmt))) if on}
    if len(chosen) > 1:
        raise click.UsageError(f"choose one output format (got {', '.join(sorted(chosen))})")
    syslog = metrics = otlp = None
    if syslog_target is not None:
        from .sinks.syslog import SyslogTarget
        try:
            syslog = SyslogTarget.parse(syslog_target)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--syslog") from None
    if otlp_headers and otlp_url is None:
        raise click.UsageError("--otlp-header needs --otlp URL")
    if otlp_url is not None:
        import dataclasses
        from .sinks.otlp import OtlpEndpoint, otlp_header, otlp_headers_from_env
        try:
            otlp = OtlpEndpoint.parse(otlp_url)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--otlp") from None
        try:
            headers = (tuple(otlp_header(h) for h in otlp_headers) if otlp_headers
                       else otlp_headers_from_env(os.environ))
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--otlp-header") from None
        otlp = dataclasses.replace(otlp, headers=headers)
    if metrics_address is not None:
        try:
            from .sinks.metrics import parse_listen_address
        except ImportError as err:    # only --metrics needs prometheus_client
            if not (err.name or "").startswith("prometheus_client"):
                raise
            raise RsttraceError("--metrics needs the Python package prometheus_client, which is not installed",
                                "apt install python3-prometheus-client, or pip install prometheus_client") from None
        try:
            metrics = parse_listen_address(metrics_address)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--metrics") from None
    from .session import Options
    options = Options(
        ports=sorted({p for group in ports for p in group}),
        pid=pid,
        family=socket.AF_INET if ipv4 else socket.AF_INET6 if ipv6 else None,
        reasons=set(reason_filter),
        netns=sorted(set(netns)),
        comms=list(dict.fromkeys(comms)),
        cgroups=list(dict.fromkeys(cgroups)),
        containers=list(dict.fromkeys(containers)),
        duration=duration,
        count=count,
        backend=backend,
        max_rate=max_rate,
        ring_mb=int(ring_mb),
        stories=not no_stories,
        app_errors=app_errors,
        app_window_s=app_errors_window,
        origins=origins,
    )
    run_trace(options, fmt=next(iter(chosen), None), output=output, syslog=syslog,
              syslog_facility=syslog_facility, metrics=metrics, otlp=otlp)


def use_ui(fmt: str | None, output: str | None) -> bool:
    """The live screen only for a person at a terminal; lines for pipes, files, --json and --plain."""
    return (fmt is None and output is None and sys.stdout.isatty()
            and os.environ.get("TERM", "") not in ("", "dumb"))


def open_sinks(fmt: str | None, output: str | None, syslog=None, syslog_facility: str = "daemon",
               metrics=None, otlp=None) -> tuple[list, bool]:
    """The sinks a run writes to, and whether the first is the terminal UI. Each failure to open one
    is a one-line error, before anything is loaded into the kernel."""
    from .sinks.jsonl import JsonSink
    from .sinks.output import LineOutput
    from .sinks.plain import PlainSink

    sinks: list = []
    try:
        if use_ui(fmt, output):
            from .sinks.ui import UiSink
            sinks.append(UiSink())
        else:
            try:
                out = LineOutput(output)
            except OSError as err:
                raise RsttraceError(f"cannot open --output {output}: {err.strerror}") from err
            sinks.append(JsonSink(out, fmt) if fmt in ("json", "ecs") else PlainSink(out))
        if syslog is not None:
            from .sinks.syslog import SyslogSink
            try:
                sinks.append(SyslogSink(syslog, syslog_facility))
            except OSError as err:
                raise RsttraceError(f"cannot reach syslog at {syslog.text}: {err.strerror or err}",
                                    "is rsyslog/syslog-ng running and listening there?") from err
        if otlp is not None:
            # Nothing to open: a receiver that is not up yet is retried, and its losses counted.
            from .sinks.otlp import OtlpSink
            sinks.append(OtlpSink(otlp))
        if metrics is not None:
            from .sinks.metrics import MetricsSink
            try:
                sinks.append(MetricsSink(metrics))
            except OSError as err:
                raise RsttraceError(f"cannot serve --metrics on {metrics[0]}:{metrics[1]}: {err.strerror or err}") from err
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks, bool(sinks) and type(sinks[0]).__name__ == "UiSink"


def run_trace(options, fmt: str | None = None, output: str | None = None, syslog=None,
              syslog_facility: str = "daemon", metrics=None, otlp=None) -> None:
    from .session import Session, install_signal_handlers
    from .sinks.plain import stderr
    from .sinks.summary import print_summary

    sinks, ui = open_sinks(fmt, output, syslog, syslog_facility, metrics, otlp)
    session = Session(options, sinks, started_at=STARTED)
    install_signal_handlers(session, on_terminal=ui or (output in (None, "-") and sys.stdout.isatty()))
    try:
        session.start()
        if ui:
            # The screen's header shows the coverage, and it prints its own final summary on close.
            session.run()
            return
        cov = session.plan.coverage
        hooks = ", ".join(f"{k}: {v}" for k, v in cov.hooks.items() if v)
        blind = [k for k, v in cov.hooks.items() if not v]
        how = "compiled" if session.program.compiled else "programs cached by this boot's first start"
        stderr(f"rsttrace: attached in {(session.attached_at - STARTED) * 1000:.0f} ms ({how}) — {hooks}")
        if blind:
            stderr(f"rsttrace: not visible with this build/kernel: {', '.join(blind)}")
        if cov.blind_spots:
            # The paragraphs are in the coverage record and in `rsttrace doctor`: one line here.
            stderr(f"rsttrace: {len(cov.blind_spots)} blind spot{'s' if len(cov.blind_spots) > 1 else ''} "
                   f"on this kernel: see `rsttrace doctor`")
        session.run()
    finally:
        try:
            summary = session.finish()
        finally:
            for sink in sinks:
                sink.close()
    if summary:
        # Delivery counts as they stand after the sinks' exit flush (the summary record has them
        # as they stood when it was made, before itself was sent).
        for sink in sinks:
            delivery = getattr(sink, "delivery", None)
            if delivery is not None:
                summary = {**summary, "otlp": delivery()}
    print_summary(summary)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON object.")
def doctor(as_json):
    """What this kernel lets rsttrace see, and which hook it uses for each kind of event.

    \b
    Examples:
      sudo rsttrace doctor
      sudo rsttrace doctor --json | jq .coverage
    """
    from .doctor import run_doctor
    sys.exit(run_doctor(as_json))


@main.command()
@click.argument("reason", required=False, type=ReasonType())
def explain(reason):
    """Explain a reason (or list them all): what the kernel did, typical causes, what to change.

    \b
    Examples:
      rsttrace explain
      rsttrace explain accept_queue_full
    """
    from .enrich.reasons import CATALOG
    if reason is None:
        width = max(map(len, CATALOG))
        for r in CATALOG.values():
            click.echo(f"{r.name:<{width}}  {r.severity:<7}  {r.title}  ({', '.join(r.events)})")
        return
    r = CATALOG[reason]
    # Wrapped for a person at a terminal; one line per field when piped, so that grep finds it.
    wrap = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0

    def field(label: str, text: str, first: bool = True, prose: bool = True) -> None:
        head = f"  {label + ':' if first else '':<15}"
        if wrap and prose:
            text = click.wrap_text(text, min(wrap, 110), initial_indent=head, subsequent_indent=" " * len(head))
            click.echo(text)
        else:
            click.echo(head + text)

    click.echo(f"{r.name} — {r.title}  [{r.severity}]")
    field("events", ", ".join(r.events))
    if r.kernel_names:
        field("kernel names", ", ".join(r.kernel_names))
    if r.counters:
        field("counters", f"{', '.join(r.counters)} (nstat -az | grep -E '{'|'.join(r.counters)}')")
    field("what happened", r.what)
    field("usual causes", r.causes)
    field("what to do", r.fix)
    for i, check in enumerate(r.checks):
        field("check", f"• {check}", first=i == 0, prose=False)    # commands stay whole for copy-paste


def entry() -> None:
    """Console-script entry: one-line errors and distinct exit codes instead of tracebacks."""
    try:
        main.main(standalone_mode=False, prog_name="rsttrace")
    except click.exceptions.UsageError as err:
        print(f"rsttrace: {err.format_message()}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except RsttraceError as err:
        print(f"rsttrace: {err.one_line()}", file=sys.stderr)
        sys.exit(err.exit_code)
    except BrokenPipeError:
        # The reader went away (`| head`): what is still buffered for it has nowhere to go, and
        # the interpreter's flush at exit must not fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":   # pragma: no cover
    entry()
    sys.exit(EXIT_INTERNAL)
